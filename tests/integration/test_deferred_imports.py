"""A running gateway never loads the modules ``teg run`` defers (teg_fsm/cli/deferred_imports.py).

The gateway runs as ``teg run`` does, through ``teg_fsm.cli.main.main(["run"])``, against the
stand-in over TLS with no Docker engine: it connects, forwards rows, answers RPCs, reports
its machines' states and stops on SIGTERM. After ``main`` returns, the same interpreter says
whether asyncio or urllib.request ever ran. Then the usual closing checks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import rig as faults
from tests.integration import uplink_rig as rig
from tools.tb_standin import StandIn

pytestmark = pytest.mark.integration

RUN_THEN_REPORT = """
import json, sys
from teg_fsm.cli.deferred_imports import UNUSED_WHILE_RUNNING, loaded
from teg_fsm.cli.main import main
code = main(["run"])
print("DEFERRED " + json.dumps({name: {"in sys.modules": name in sys.modules, "loaded": loaded(name)}
                                for name in UNUSED_WHILE_RUNNING}), flush=True)
sys.exit(code)
"""


def test_a_gateway_that_connects_forwards_answers_and_stops_never_runs_the_deferred_modules(tmp_path: Path) -> None:
    n = 200
    with StandIn(tls_port=0) as tb:
        device = "deferred-station"
        data = tmp_path / "data"
        env = rig.gateway_env(tb, data, tb.add_device(device), THINGSBOARD_DEVICE_NAME=device,
                              DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
        rig.fill(data / "communication_queue.db", n)
        log = tmp_path / "gateway.log"
        with open(log, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-c", RUN_THEN_REPORT], env=env, cwd=rig.REPO,
                                    stdout=subprocess.PIPE, stderr=stderr)
        try:
            gateway = faults.FaultedGateway(tb, device, proc, data, log)
            faults.wait_until_rpc_ready(gateway)
            assert set(gateway.ask("fsm_state")) >= {"connection", "uplink", "controller"}
            faults.finish(gateway, range(n))
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        finally:
            rig.stop(proc)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    report = json.loads(out.decode().split("DEFERRED ", 1)[1])
    assert report == {"asyncio": {"in sys.modules": True, "loaded": False},
                      "urllib.request": {"in sys.modules": True, "loaded": False}}, report
    faults.assert_integrity(faults.gateway_databases(data))
