"""The MQTT version the gateway under test speaks: a knob the rigs read.

``TEG_TEST_MQTT_PROTOCOL`` (``3.1.1``, the default, or ``5``) is read in the test
process and passed on as the gateway's ``TEG_MQTT_PROTOCOL`` by every place that
builds a gateway's settings, so one test file runs on either version unchanged.
``tools/ci/test.sh`` runs the integration and fault tests a second time with it
set to ``5``, all but those marked ``no_mqtt``. That mark is a claim ("this test
never speaks MQTT, so the version cannot matter"), and the fixture below holds
every marked test to it: building an MQTT link or a stand-in there fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

KNOB = "TEG_TEST_MQTT_PROTOCOL"
VERSIONS = ("3.1.1", "5")


def mqtt_protocol() -> str:
    """The version asked for; a typo fails loudly instead of testing 3.1.1 twice."""
    value = os.environ.get(KNOB, "").strip() or "3.1.1"
    if value not in VERSIONS:
        raise ValueError(f"{KNOB}={value!r}: must be 3.1.1 or 5")
    return value


def protocol_env() -> dict[str, str]:
    """The gateway setting for it, to merge into a gateway's environment."""
    return {"TEG_MQTT_PROTOCOL": mqtt_protocol()}


@pytest.fixture(autouse=True)
def _no_mqtt_means_no_mqtt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test marked ``no_mqtt`` that builds an MQTT link or a stand-in fails instead of passing unseen."""
    if request.node.get_closest_marker("no_mqtt") is None:
        yield
        return
    from teg_fsm.adapters.mqtt_link import MqttLink
    from tools.tb_standin import StandIn

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"{request.node.nodeid} is marked no_mqtt but built {what}: "
                                 "remove the mark so the MQTT 5 pass runs it")
        return refused

    monkeypatch.setattr(MqttLink, "__init__", refuse("an MQTT link"))
    monkeypatch.setattr(StandIn, "__init__", refuse("a ThingsBoard stand-in"))
    yield
