"""docker-py, GitPython and tarfile are loaded when first needed, not when the gateway starts.

docker-py and GitPython cost ~20 MB of RSS and ~110 ms of start-up (tools/bench_rest.py),
tarfile (only an OTA package is examined with it) ~0.3 MB; a gateway whose Docker engine is
absent, or that never receives an OTA assignment, never needs them. Run in a fresh
interpreter: this test process may have imported them already.

``teg run`` also defers asyncio and urllib.request (teg_fsm/cli/deferred_imports.py): the
last test checks that the deferred modules still work wherever they are used.
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


DEFERRED_PROBE = """
import sys, threading
from teg_fsm.cli.deferred_imports import DeferredModule, defer, loaded

assert defer() == ["asyncio", "urllib.request"], sys.modules.get("asyncio")
import teg_fsm.app, teg_fsm.cli.main, paho.mqtt.client, statemachine  # every import statement of them ran
before = [loaded("asyncio"), loaded("urllib.request"), "http.client" in sys.modules, "email" in sys.modules]

import asyncio
results = []
def use() -> None:  # eight threads read the deferred module at once: one loads, the others wait for it
    results.append(asyncio.run(asyncio.sleep(0, result=42)))
threads = [threading.Thread(target=use) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
import asyncio.events
from urllib.request import getproxies
import docker, git  # requests imports urllib.request's names: the deferred module loads on that use
print(before, results, loaded("asyncio"), loaded("urllib.request"), type(asyncio) is DeferredModule,
      asyncio.events.AbstractEventLoop is asyncio.AbstractEventLoop, callable(getproxies), defer())
"""


def test_deferred_modules_load_on_first_use_only_and_work_from_every_holder() -> None:
    out = subprocess.run([sys.executable, "-c", DEFERRED_PROBE], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, False, False, False] [42, 42, 42, 42, 42, 42, 42, 42] True True False True True []"
