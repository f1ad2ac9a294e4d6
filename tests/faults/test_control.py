"""The control run for the fault suite: with no fault injected the closing checks pass.

If this fails, every other fault test's failure says nothing about its fault.
"""

from __future__ import annotations

from pathlib import Path

from tests.faults import rig
from tests.integration import uplink_rig
from tools.tb_standin import StandIn


def test_an_unfaulted_gateway_passes_the_closing_checks(tb: StandIn, tmp_path: Path) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        uplink_rig.fill(gateway.queue, 50)
        rig.finish(gateway, expected_seqs=range(50))
    finally:
        uplink_rig.stop(gateway.proc)
