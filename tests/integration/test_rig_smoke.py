"""Smoke tests of the rig itself: each real service works end to end."""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
from pathlib import Path

import docker
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.rig.docker_engine import BuildImage
from tests.rig.gitrepo import GitRepoFactory
from tests.rig.mosquitto import Mosquitto
from tests.rig.tls import TlsMaterial

# no_mqtt: the test rig itself (Docker engine, base image), no gateway and no MQTT (the MQTT 5 pass leaves it out).
pytestmark = [pytest.mark.integration, pytest.mark.no_mqtt]


def _tls_client(ca_cert: Path) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="")
    client.tls_set(ca_certs=str(ca_cert))
    return client


def test_mqtt_over_tls_with_session_ca_round_trips_a_message(mosquitto: Mosquitto) -> None:
    client = _tls_client(mosquitto.ca_cert)
    subscribed, received = threading.Event(), []
    got = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        received.append((msg.topic, msg.payload))
        got.set()

    client.on_message = on_message
    client.connect("localhost", mosquitto.tls_port, keepalive=10)
    client.loop_start()
    try:
        client.subscribe("rig/smoke", qos=1)
        assert subscribed.wait(5), "no SUBACK"
        client.publish("rig/smoke", b"hello", qos=1).wait_for_publish(5)
        assert got.wait(5), "message not delivered"
    finally:
        client.disconnect()
        client.loop_stop()
    assert received == [("rig/smoke", b"hello")]


def test_mqtt_tls_with_wrong_ca_is_refused(
    mosquitto: Mosquitto, tls_material: TlsMaterial
) -> None:
    client = _tls_client(tls_material.other_ca_cert)
    # paho does the TLS handshake inside connect(), so the failure surfaces here.
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client.connect("localhost", mosquitto.tls_port, keepalive=10)


_WRITER = """\
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT, message TEXT)")
for i in range(3):
    db.execute("INSERT INTO messages (type, message) VALUES (?, ?)",
               ("measurement", json.dumps({"ts": 1000 + i, "values": {"co2": 400 + i}})))
db.commit()
db.close()
"""


def test_container_from_base_image_writes_sqlite_rows_the_host_reads(
    docker_client: docker.DockerClient,
    build_image: BuildImage,
    base_image: str,
    docker_test_labels: dict[str, str],
    tmp_path: Path,
) -> None:
    build_image("teg-test-rig-smoke:latest",
                f"FROM {base_image}\nCOPY writer.py /opt/writer.py\n",
                {"writer.py": _WRITER})
    data = tmp_path / "data"
    data.mkdir()
    docker_client.containers.run(
        "teg-test-rig-smoke:latest", ["python3", "/opt/writer.py", "/root/data/queue.db"],
        volumes={str(data): {"bind": "/root/data", "mode": "rw"}},
        network_mode="host", privileged=False, labels=docker_test_labels, remove=True,
    )
    with sqlite3.connect(data / "queue.db") as db:
        rows = db.execute("SELECT id, type, message FROM messages ORDER BY id").fetchall()
    assert [(i, t, json.loads(m)["values"]["co2"]) for i, t, m in rows] == [
        (1, "measurement", 400), (2, "measurement", 401), (3, "measurement", 402)]


def test_git_tag_is_cloned_from_origin_and_checked_out(
    git_repo_factory: GitRepoFactory, tmp_path: Path
) -> None:
    work = git_repo_factory("controller")
    first = work.commit({"app.py": "VERSION = 1\n"}, "v1")
    work.tag("v1.0.0", message="release 1")
    work.commit({"app.py": "VERSION = 2\n"}, "v2")
    work.push()

    clone = work.clone(tmp_path / "clone")
    clone.git.checkout("v1.0.0")
    assert clone.head.commit.hexsha == first
    assert (tmp_path / "clone" / "app.py").read_text() == "VERSION = 1\n"
