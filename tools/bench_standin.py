"""How many telemetry records per second the ThingsBoard stand-in accepts from one device.

One paho client (MQTT 3.1.1) sends arrays of 100 timestamped records at QoS 1
to ``v1/devices/me/telemetry``; the clock runs from the first publish to the
last PUBACK, and the stored count is checked through the control channel.
By default the stand-in runs as a separate process (``python -m
tools.tb_standin serve``) so the client does not share its interpreter.

    python tools/bench_standin.py [--messages 3000] [--batch 100] [--inflight 100] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tools.tb_standin.api import StandIn  # noqa: E402
from tools.tb_standin.control import request  # noqa: E402

TOKEN = "bench-token"


def _payloads(messages: int, batch: int) -> list[bytes]:
    """Pre-built payloads, so the figure measures the stand-in, not JSON encoding in the client."""
    base = int(time.time() * 1000)
    out = []
    for m in range(messages):
        records = [{"ts": base + m * batch + i, "values": {"temperature": 21.5 + i % 7, "humidity": 40 + i % 13,
                                                           "state": "ok", "counter": m * batch + i}}
                   for i in range(batch)]
        out.append(json.dumps(records, separators=(",", ":")).encode())
    return out


def run_client(port: int, payloads: list[bytes], inflight: int) -> float:
    """Publish everything at QoS 1 and return the seconds from first publish to last PUBACK."""
    done = threading.Event()
    acked = 0
    total = len(payloads)

    def on_publish(client: mqtt.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        nonlocal acked
        acked += 1
        if acked == total:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv311)
    client.username_pw_set(TOKEN)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        start = time.perf_counter()
        for payload in payloads:
            client.publish("v1/devices/me/telemetry", payload, qos=1)
        if not done.wait(300):
            raise RuntimeError(f"only {acked} of {total} PUBACKs arrived")
        return time.perf_counter() - start
    finally:
        client.disconnect()
        client.loop_stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=100, help="records per array")
    parser.add_argument("--inflight", type=int, default=100, help="paho max inflight messages")
    parser.add_argument("--in-process", action="store_true", help="run the stand-in in this process (thread)")
    args = parser.parse_args()
    payloads = _payloads(args.messages, args.batch)

    if args.in_process:
        with StandIn() as standin:
            standin.add_device("bench", TOKEN)
            seconds = run_client(standin.port, payloads, args.inflight)
            stored = standin.telemetry_count("bench")
    else:
        root = Path(__file__).resolve().parents[1]
        command = [sys.executable, "-m", "tools.tb_standin", "serve", "--port", "0", "--control-port", "0",
                   "--device", f"bench:{TOKEN}"]
        proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            seconds = run_client(ready["port"], payloads, args.inflight)
            stored = request("telemetry_count", {"device": "bench"}, port=ready["control_port"])["result"]
        finally:
            proc.terminate()
            proc.wait(10)

    records = args.messages * args.batch
    if stored != records:
        print(f"stored {stored} records, expected {records}", file=sys.stderr)
        return 1
    rate = records / seconds
    print(f"tb_standin accepted {records} records ({args.messages} arrays of {args.batch}, QoS 1) "
          f"in {seconds:.2f} s: {rate:,.0f} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
