"""Benchmark of the MQTT link: idle CPU of a connected gateway, and QoS 1 publish throughput.

Runs the ThingsBoard stand-in in a child process (so its CPU is not counted)
over TLS and prints figures; it asserts nothing.

    python tools/bench_mqtt_link.py --idle-s 60 --publish-s 10 --payload-kib 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from teg_fsm.app import Gateway
from teg_fsm.components.mqtt import MqttComponent
from teg_fsm.config import load_config

TOKEN = "bench-token"


def start_standin() -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.tb_standin", "serve", "--port", "0", "--tls-port", "0",
         "--device", f"bench:{TOKEN}"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def wait_online(gateway: Gateway, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while gateway.dispatcher.machines["connection"].state_name != "online":
        if time.monotonic() > deadline:
            raise SystemExit("the gateway did not come online")
        time.sleep(0.05)


def idle_cpu(seconds: float) -> float:
    """Percent of one core this process used while the connected gateway sat idle."""
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (time.process_time() - cpu0) / (time.monotonic() - wall0)


def throughput(gateway: Gateway, seconds: float, payload_kib: int, inflight: int) -> tuple[int, int, float, float]:
    """Publish ``{"ts","values"}`` payloads of about ``payload_kib`` KiB with at most ``inflight`` unacknowledged."""
    link = gateway.components["mqtt"].link  # type: ignore[attr-defined]
    filler = "x" * (payload_kib * 1024 - 64)
    slots = threading.Semaphore(inflight)
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def on_done(ok: bool, error: str | None) -> None:
        with lock:
            counts["ok" if ok else "failed"] += 1
        slots.release()

    cpu0, start = time.process_time(), time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        slots.acquire()
        payload = json.dumps({"ts": int(time.time() * 1000), "values": {"blob": filler, "n": sent}}).encode()
        link.publish_async("v1/devices/me/telemetry", payload, 1, on_done)
        sent += 1
    for _ in range(inflight):
        slots.acquire()
    wall = time.monotonic() - start
    return counts["ok"], counts["failed"], wall, 100.0 * (time.process_time() - cpu0) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--publish-s", type=float, default=10.0)
    parser.add_argument("--payload-kib", type=int, default=64)
    parser.add_argument("--inflight", type=int, default=100)
    args = parser.parse_args()
    proc, ready = start_standin()
    with tempfile.TemporaryDirectory(prefix="teg-bench-") as tmp:
        token_file = Path(tmp) / "tb_access_token"
        token_file.write_text(TOKEN)
        config = load_config({
            "TB_HOST": "localhost", "TB_PORT": str(ready["tls_port"]), "THINGSBOARD_CA_CERT": str(ready["cafile"]),
            "THINGSBOARD_ACCESS_TOKEN": str(token_file), "TEG_DATA_PATH": str(Path(tmp) / "data"),
        })
        gateway = Gateway(config, components=lambda g: [MqttComponent(g)])
        try:
            gateway.start()
            wait_online(gateway)
            time.sleep(1.0)  # let the on-connect requests settle
            print(f"idle CPU, connected gateway (MQTT component only), {args.idle_s:.0f} s: "
                  f"{idle_cpu(args.idle_s):.3f} % of one core")
            # 64 KiB is ThingsBoard's whole packet limit; stay just under it.
            kib = min(args.payload_kib, 63)
            ok, failed, wall, cpu = throughput(gateway, args.publish_s, kib, args.inflight)
            print(f"QoS 1 publish, {kib} KiB payloads, inflight <= {args.inflight}, TLS: "
                  f"{ok / wall:.1f} packets/s, {ok * kib / 1024 / wall:.2f} MiB/s, {failed} failed, "
                  f"gateway CPU {cpu:.1f} % of one core")
        finally:
            gateway.stop()
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
