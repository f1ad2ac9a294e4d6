"""What a long Docker engine outage costs the real ``teg run`` (issue 16): its retries back off.

With no engine (``DOCKER_HOST`` names a socket that does not exist) the
controller machine used to re-inspect every 10 s forever: each retry is two
journaled events and two ``fsm_controller_state`` points (``inspecting``,
``engine_unreachable``) sent to ThingsBoard, charged to the device's rate limits,
for a state that does not change. Now the waits double from 10 s up to
``TEG_ENGINE_RETRY_MAX_S``. The test counts the points the stand-in received in
the 40 s after the outage was first reported: retries at +10 s and +30 s (the
next one is due at +70 s), four points, where the fixed 10 s made six (retries at
+10, +20 and +30 s). The gateway still answers ``ping`` (the closing check of
every fault test).
"""

from __future__ import annotations

import time
from pathlib import Path

from teg_fsm.components.fsm_report import state_key
from tests.faults import rig
from tests.integration import uplink_rig
from tests.rig.waiting import wait_for
from tools.tb_standin import StandIn

WINDOW_MS = 40_000
KEY = state_key("controller")


def test_a_long_engine_outage_is_retried_with_a_growing_wait_and_the_gateway_answers(
    tb: StandIn, tmp_path: Path
) -> None:
    gateway = rig.start_gateway(tb, tmp_path)
    try:
        points = wait_for(lambda: [p for p in tb.telemetry(gateway.device, KEY) if p[1] == "engine_unreachable"],
                          30, "the outage reported as fsm_controller_state engine_unreachable")
        first_ms = points[0][0]
        # The window's end in gateway time, then 2 s for the last points to pass the outbox.
        time.sleep(max(0.0, (first_ms + WINDOW_MS) / 1000 - time.time()) + 2)
        window = [(ts - first_ms, state) for ts, state in tb.telemetry(gateway.device, KEY)
                  if first_ms < ts <= first_ms + WINDOW_MS]
        retries = [ms for ms, state in window if state == "inspecting"]
        assert len(retries) == 2, f"retries at +10 s and +30 s only; saw (ms after the outage, state) {window}"
        assert abs(retries[0] - 10_000) < 2_000 and abs(retries[1] - 30_000) < 2_000, window
        assert len(window) == 4, f"the fixed 10 s gave 6 points in this window; saw {window}"
        said = [line for line in gateway.log_text().splitlines() if "Docker engine unreachable" in line]
        assert len(said) == 1 and "retrying in 10 s, then backing off (doubling) to every 300 s" in said[0], said
        rig.assert_answers_ping(gateway)
    finally:
        uplink_rig.stop(gateway.proc)
