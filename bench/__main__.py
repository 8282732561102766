"""Run every benchmark module in this package (each defines `main()`)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import traceback

import bench


def main() -> int:
    failed = 0
    for module in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        print(f"== bench.{module.name}", flush=True)
        try:
            importlib.import_module(f"bench.{module.name}").main()
        except Exception:  # one broken benchmark should not hide the others' figures
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
