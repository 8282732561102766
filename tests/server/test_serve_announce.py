"""`nodegraph serve` announces its address only once it accepts connections (scripts wait for it)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_serving_line_comes_when_the_socket_listens(tmp_path: Path) -> None:
    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "nodegraph",
        "serve",
        "--base-directory",
        str(tmp_path),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the warm-up (model library imports) runs before this line
            if "serving on" in line:
                break
        else:
            raise AssertionError(f"the server exited without announcing itself (rc {proc.wait()})")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=10) as response:
            assert response.status == 200  # connected at the first try: no retry loop needed
    finally:
        proc.terminate()
        proc.wait(timeout=30)
