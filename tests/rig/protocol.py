"""The MQTT version the gateway under test speaks: a knob the rigs read.

``TEG_TEST_MQTT_PROTOCOL`` (``3.1.1``, the default, or ``5``) is read in the test
process and passed on as the gateway's ``TEG_MQTT_PROTOCOL`` by every place that
builds a gateway's settings, so one test file runs on either version unchanged.
``tools/ci/test.sh`` runs the MQTT tests a second time with it set to ``5``.
"""

from __future__ import annotations

import os

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
