"""The connection machine, pure: fake clock, effects answered by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from teg_fsm.engine.effects import Log, StartTimer
from teg_fsm.engine.effects.mqtt import ClientRpc, Connect, Publish, RequestAttributes, Subscribe
from teg_fsm.engine.effects.provisioning import CheckToken, MoveTokenAside
from teg_fsm.machines.connection import SHARED_KEYS, TOPICS
from tests.machines.link_harness import LinkRig


@pytest.fixture
def rig() -> Iterator[LinkRig]:
    made = LinkRig(connection={"min_s": 1.0, "max_s": 30.0, "can_provision": True}, provisioning={"can_provision": True})
    yield made
    assert made.uncovered_outcomes() == []
    made.close()


def online(rig: LinkRig, session: int = 1) -> None:
    """Token present, connect accepted as ``session``."""
    if rig.state("connection") == "offline":
        rig.answer(rig.last(CheckToken), result={"present": True})
    rig.answer(rig.last(Connect), result={"session": session})
    assert rig.state("connection") == "online"


def backoff_delays(rig: LinkRig) -> list[float]:
    return [t.seconds for t in rig.all(StartTimer) if t.name == "retry_elapsed" and t.id.startswith("connection")]


def test_waits_offline_until_provisioning_says_the_token_is_ready(rig: LinkRig) -> None:
    assert rig.state("connection") == "offline"
    assert rig.all(Connect) == []
    rig.answer(rig.last(CheckToken), result={"present": True})
    assert rig.state("connection") == "connecting"
    assert rig.last(Connect).credentials == "token_file"


def test_every_connect_subscribes_requests_shared_attributes_publishes_client_attributes_and_asks_limits(
    rig: LinkRig,
) -> None:
    online(rig)
    subscribe, request = rig.last(Subscribe), rig.last(RequestAttributes)
    assert subscribe.topics == TOPICS
    assert set(TOPICS) == {
        "v1/devices/me/rpc/request/+", "v1/devices/me/attributes",
        "v1/devices/me/attributes/response/+", "v1/devices/me/rpc/response/+",
    }
    assert request.shared_keys == SHARED_KEYS and request.timeout_s
    assert rig.last(Publish).topic == "v1/devices/me/attributes"
    assert rig.last(ClientRpc).method == "getSessionLimits"
    # and again after a reconnect
    rig.post("mqtt_disconnected", {"session": 1, "reason": "lost"})
    rig.advance(2)
    online(rig, session=2)
    assert len(rig.all(Subscribe)) == 2 and len(rig.all(RequestAttributes)) == 2 and len(rig.all(ClientRpc)) == 2


def test_the_shared_attribute_answer_is_broadcast(rig: LinkRig) -> None:
    online(rig)
    answer = {"client": {}, "shared": {"sw_title": "ctl", "sw_version": "v1.2.3"}}
    done = rig.answer(rig.last(RequestAttributes), result=answer)
    rig.dispatcher.run_until_idle()
    broadcast = [d.event for d in done if d.event.name == "shared_attributes_received"]
    assert broadcast and broadcast[0].data == answer and broadcast[0].target is None


def test_a_failed_shared_attribute_request_is_asked_again_while_online(rig: LinkRig) -> None:
    online(rig)
    rig.answer(rig.last(RequestAttributes), "timed_out", error="timed out after 30 s")
    assert len(rig.all(RequestAttributes)) == 1
    rig.advance(31)
    assert len(rig.all(RequestAttributes)) == 2


def test_the_session_limits_answer_is_broadcast(rig: LinkRig) -> None:
    online(rig)
    limits = {"maxPayloadSize": 65536, "maxInflightMessages": 100,
              "rateLimits": {"messages": "200:1", "telemetryMessages": "100:1", "telemetryDataPoints": None}}
    done = rig.answer(rig.last(ClientRpc), result=limits)
    broadcast = [d.event for d in done if d.event.name == "session_limits_received"]
    assert broadcast and broadcast[0].data == limits


@pytest.mark.parametrize(
    ("outcome", "payload"),
    [("succeeded", {"result": {"error": "timeout"}}), ("timed_out", {"error": "timed out after 70 s"})],
)
def test_an_unanswered_session_limits_request_keeps_the_configured_limits(
    rig: LinkRig, outcome: str, payload: dict[str, object]
) -> None:
    online(rig)
    done = rig.answer(rig.last(ClientRpc), outcome, **payload)
    assert not any(d.event.name == "session_limits_received" for d in done)
    assert rig.state("connection") == "online"
    assert "configured limits" in rig.last(Log).message


def test_a_lost_connection_backs_off_exponentially_capped_and_reconnects(rig: LinkRig) -> None:
    online(rig)
    rig.post("mqtt_disconnected", {"session": 1, "reason": "broker gone"})
    assert rig.state("connection") == "backoff"
    for _ in range(7):
        rig.advance(backoff_delays(rig)[-1])
        assert rig.state("connection") == "connecting"
        rig.answer(rig.last(Connect), "failed", error="connection refused", network=True)
    assert backoff_delays(rig) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    rig.advance(29.9)
    assert rig.state("connection") == "backoff"
    rig.advance(0.2)
    online(rig, session=9)


def test_a_session_that_held_up_resets_the_backoff_but_a_flapping_one_does_not(rig: LinkRig) -> None:
    online(rig)
    rig.post("mqtt_disconnected", {"session": 1, "reason": "x"})
    rig.advance(1)
    online(rig, session=2)
    rig.post("mqtt_disconnected", {"session": 2, "reason": "kicked at once"})
    assert backoff_delays(rig) == [1.0, 2.0]
    rig.advance(2)
    online(rig, session=3)
    rig.advance(61)  # stayed up longer than stable_after_s
    rig.post("mqtt_disconnected", {"session": 3, "reason": "x"})
    assert backoff_delays(rig)[-1] == 1.0


def test_a_disconnect_from_an_old_session_is_ignored(rig: LinkRig) -> None:
    online(rig, session=5)
    rig.post("mqtt_disconnected", {"session": 4, "reason": "late callback"})
    assert rig.state("connection") == "online"


def test_a_connect_timeout_backs_off(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": True})
    rig.answer(rig.last(Connect), "timed_out", error="timed out after 30 s")
    assert rig.state("connection") == "backoff"


def test_not_authorized_moves_the_token_aside_and_hands_over_to_provisioning(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": True})
    rig.answer(rig.last(Connect), "failed", error="CONNACK refused", reason_code=135, not_authorized=True)
    assert rig.state("connection") == "handing_over"
    checks_before = len(rig.all(CheckToken))
    rig.answer(rig.last(MoveTokenAside), result={"moved_to": "tb_access_token.rejected-20250101T000000Z"})
    assert rig.state("connection") == "offline"
    assert rig.state("provisioning") == "checking"
    assert len(rig.all(CheckToken)) == checks_before + 1
    rig.answer(rig.last(CheckToken), result={"present": False})
    assert rig.state("provisioning") == "connecting"


def test_not_authorized_without_provisioning_credentials_retries_slowly() -> None:
    rig = LinkRig(connection={"max_s": 300.0, "can_provision": False})
    try:
        rig.answer(rig.last(CheckToken), result={"present": True})
        rig.answer(rig.last(Connect), "failed", error="CONNACK refused", reason_code=135, not_authorized=True)
        assert rig.state("connection") == "credentials_rejected"
        assert rig.all(MoveTokenAside) == []
        assert backoff_delays(rig) == [300.0]
        rig.advance(299)
        assert len(rig.all(Connect)) == 1
        rig.advance(2)
        assert len(rig.all(Connect)) == 2
        assert rig.uncovered_outcomes() == []
    finally:
        rig.close()


def test_a_failed_move_aside_waits_as_credentials_rejected(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": True})
    rig.answer(rig.last(Connect), "failed", error="CONNACK refused", not_authorized=True)
    rig.answer(rig.last(MoveTokenAside), "failed", error="permission denied")
    assert rig.state("connection") == "credentials_rejected"


def test_a_missing_token_file_asks_provisioning_to_look_again(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": True})
    rig.answer(rig.last(Connect), "failed", error="no access token", no_token=True)
    assert rig.state("connection") == "offline"
    assert rig.state("provisioning") == "checking"


def test_after_a_restart_every_state_waits_offline_for_the_token(tmp_path: Path) -> None:
    first = LinkRig(connection={"can_provision": True}, provisioning={"can_provision": True}, journal_path=tmp_path / "j.db")
    online(first)
    first.close()
    again = LinkRig(connection={"can_provision": True}, provisioning={"can_provision": True}, journal_path=tmp_path / "j.db")
    try:
        assert again.state("connection") == "offline"
        assert again.state("provisioning") == "checking"
        again.answer(again.last(CheckToken), result={"present": True})
        assert again.state("connection") == "connecting"
    finally:
        again.close()
