"""Fixtures for the ThingsBoard stand-in tests: a running stand-in and plain paho devices.

The device side is a bare paho-mqtt 2.x client; no gateway code is involved.
Every test that makes devices runs twice, on MQTT 3.1.1 (as the gateway
speaks it) and on MQTT 5 (as ThingsBoard's own device clients do): the
``mqtt_protocol`` fixture is the version, and a test expecting different
answers reads it from ``device.v5`` or the fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.standin.helpers import V5, V311, Device
from tools.tb_standin import StandIn
from tools.tb_standin.certs import generate


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A stand-in with ThingsBoard's defaults on a free loopback port."""
    with StandIn() as running:
        yield running


@pytest.fixture
def make_standin() -> Iterator[Callable[..., StandIn]]:
    """Factory for a stand-in with non-default settings (short timeouts); stopped after the test."""
    started: list[StandIn] = []

    def make(**kwargs: Any) -> StandIn:
        running = StandIn(**kwargs).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def standin_certs(tmp_path: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    return generate(tmp_path / "pki")


@pytest.fixture
def tls_standin(standin_certs: dict[str, str]) -> Iterator[StandIn]:
    """A stand-in with a TLS listener next to plain TCP."""
    with StandIn(tls_port=0, **standin_certs) as running:
        yield running


@pytest.fixture(params=[V311, V5], ids=["mqtt311", "mqtt5"])
def mqtt_protocol(request: pytest.FixtureRequest) -> int:
    """The protocol level the test's devices speak: 4 (MQTT 3.1.1) or 5."""
    return int(request.param)


@pytest.fixture
def devices(mqtt_protocol: int) -> Iterator[Callable[..., Device]]:
    """Factory for paho devices speaking ``mqtt_protocol``; every one is disconnected after the test."""
    made: list[Device] = []

    def make(port: int, username: str | None = None, **kwargs: Any) -> Device:
        kwargs.setdefault("protocol", mqtt_protocol)
        device = Device(port, username, **kwargs)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def connected(standin: StandIn, devices: Callable[..., Device]) -> Device:
    """Device "dev1" (token "token1") connected to ``standin``."""
    standin.add_device("dev1", "token1")
    device = devices(standin.port, "token1")
    device.connect()
    return device
