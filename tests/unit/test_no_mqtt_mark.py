"""The ``no_mqtt`` mark is checked, not trusted: the MQTT 5 pass skips marked tests.

``tools/ci/test.sh`` runs the integration and fault tests again on MQTT 5, all but
those marked ``no_mqtt``; a marked test that quietly connected would escape the
second pass. tests/rig/protocol.py makes building an MQTT link or a stand-in fail
in a marked test; these tests check that it does, and only there.
"""

from __future__ import annotations

import pytest

from teg_fsm.adapters.mqtt_link import MqttLink
from tools.tb_standin import StandIn


@pytest.mark.no_mqtt
def test_a_test_marked_no_mqtt_cannot_build_a_stand_in() -> None:
    with pytest.raises(AssertionError, match="marked no_mqtt but built a ThingsBoard stand-in"):
        StandIn(host="127.0.0.1", port=0)


@pytest.mark.no_mqtt
def test_a_test_marked_no_mqtt_cannot_build_an_mqtt_link() -> None:
    with pytest.raises(AssertionError, match="marked no_mqtt but built an MQTT link"):
        MqttLink()  # type: ignore[call-arg]


def test_an_unmarked_test_builds_a_stand_in_as_usual() -> None:
    with StandIn(host="127.0.0.1", port=0) as tb:
        assert tb.port > 0
