"""The `slow` list in tests/conftest.py names tests that exist: a renamed one would join test-fast."""

from __future__ import annotations

import re

from tests.conftest import ROOT, SLOW


def test_every_slow_entry_names_an_existing_test() -> None:
    for entry in SLOW:
        path, _, test = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        if test:
            name = test.split("[")[0]
            source = (ROOT / path).read_text(encoding="utf-8")
            assert re.search(rf"^(async )?def {re.escape(name)}\(", source, re.M), entry
