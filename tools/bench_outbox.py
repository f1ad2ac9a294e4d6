"""Benchmark of the gateway's outbox: storing reports while ThingsBoard is away, and the drain after.

The MQTT component (with its outbox) runs against the stand-in in this process
(TLS). ThingsBoard is down while ``--reports`` telemetry reports are said, all
stamped with one event time (the case that used to collapse); then it comes
back and the drain is timed from the moment the session is up. Prints figures;
asserts nothing.

    python -m tools.bench_outbox --reports 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # run as `python tools/bench_outbox.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from teg_fsm.app import Gateway  # noqa: E402
from teg_fsm.components.mqtt import MqttComponent  # noqa: E402
from teg_fsm.config import load_config  # noqa: E402
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC  # noqa: E402
from tools.tb_standin import StandIn  # noqa: E402

DEVICE = "bench-outbox"


def store_offline(gateway: Gateway, reports: int) -> float:
    """Say ``reports`` reports of one millisecond; seconds until all are stored."""
    outbox = gateway.components["mqtt"].outbox  # type: ignore[attr-defined]
    stored = threading.Semaphore(0)
    now_ms = gateway.clock.now_ms()
    start = time.monotonic()
    for i in range(reports):
        outbox.say(TELEMETRY_TOPIC, json.dumps({"bench_i": i, "sw_state": "DOWNLOADING" if i % 2 else "FAILED"}),
                   now_ms, lambda error: stored.release())
    for _ in range(reports):
        stored.acquire()
    return time.monotonic() - start


def drain(tb: StandIn, reports: int) -> float:
    tb.up()
    while not tb.is_connected(DEVICE):
        time.sleep(0.005)
    start = time.monotonic()
    while len(tb.telemetry(DEVICE, "bench_i")) < reports:
        time.sleep(0.02)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", type=int, default=20_000)
    args = parser.parse_args()
    with StandIn(tls_port=0) as tb, tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp:
        token_file = Path(tmp) / "tb_access_token"
        token_file.write_text(tb.add_device(DEVICE))
        config = load_config({
            "TB_HOST": "127.0.0.1", "TB_PORT": str(tb.tls_port), "THINGSBOARD_CA_CERT": str(tb.cafile),
            "THINGSBOARD_ACCESS_TOKEN": str(token_file), "TEG_DATA_PATH": str(Path(tmp) / "data"),
            "TEG_RECONNECT_MIN_S": "0.2", "TEG_RECONNECT_MAX_S": "0.5",
        })
        tb.down()
        gateway = Gateway(config, components=lambda g: [MqttComponent(g)])
        try:
            gateway.start()
            stored_s = store_offline(gateway, args.reports)
            print(f"stored {args.reports} reports offline in {stored_s:.2f} s ({args.reports / stored_s:.0f} reports/s)")
            drain_s = drain(tb, args.reports)
            stamps = [ts for ts, _ in tb.telemetry(DEVICE, "sw_state")]
            print(f"drained after connect in {drain_s:.2f} s ({args.reports / drain_s:.0f} reports/s); "
                  f"sw_state values kept by the stand-in: {len(stamps)} of {args.reports}, "
                  f"distinct ts: {len(set(stamps))}")
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
