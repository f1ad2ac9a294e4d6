"""docker-py, GitPython and tarfile are loaded when first needed, not when the gateway starts.

docker-py and GitPython cost ~20 MB of RSS and ~110 ms of start-up (tools/bench_rest.py),
tarfile (only an OTA package is examined with it) ~0.3 MB; a gateway whose Docker engine is
absent, or that never receives an OTA assignment, never needs them. Run in a fresh
interpreter: this test process may have imported them already.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import sys
import teg_fsm.app
import teg_fsm.cli.main
from teg_fsm.adapters.docker_engine import DockerEngine, EngineError, transport_errors, open_client
from teg_fsm.adapters.git_repo import ControllerRepo
try:
    open_client("unix:///nonexistent/docker.sock", 1)
except transport_errors():  # the except clause of every engine call, evaluated on the failure
    pass
print(sorted(m for m in ("docker", "docker.errors", "git", "requests", "tarfile") if m in sys.modules))
"""


def test_the_gateway_and_a_missing_engine_socket_load_neither_docker_nor_git_nor_tarfile() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
