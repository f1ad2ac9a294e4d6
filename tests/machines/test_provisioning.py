"""The provisioning machine, pure: fake clock, effects answered by the test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from teg_fsm.engine.effects import Log, StartTimer
from teg_fsm.engine.effects.mqtt import Connect, Disconnect
from teg_fsm.engine.effects.provisioning import CheckToken, RequestProvisioning
from tests.machines.link_harness import LinkRig

SECRETS = ("psecret", "the-token")


@pytest.fixture
def rig() -> Iterator[LinkRig]:
    made = LinkRig(connection={"can_provision": True}, provisioning={"min_s": 2.0, "max_s": 60.0, "can_provision": True})
    yield made
    assert made.uncovered_outcomes() == []
    made.close()


def retry_delays(rig: LinkRig) -> list[float]:
    return [t.seconds for t in rig.all(StartTimer) if t.id.startswith("provisioning")]


def to_requesting(rig: LinkRig) -> RequestProvisioning:
    rig.answer(rig.last(CheckToken), result={"present": False})
    connect = rig.last(Connect)
    assert connect.credentials == "provision"
    rig.answer(connect, result={"session": 7})
    assert rig.state("provisioning") == "requesting"
    return rig.last(RequestProvisioning)


def test_a_present_token_file_means_provisioned_and_the_connection_connects(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": True})
    assert rig.state("provisioning") == "provisioned"
    assert [c.credentials for c in rig.all(Connect)] == ["token_file"]


def test_no_token_provisions_over_the_provision_session_then_connects_with_the_stored_token(rig: LinkRig) -> None:
    request = to_requesting(rig)
    assert request.timeout_s
    rig.answer(request, result={"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "errorMsg": None, "token_stored": True})
    assert rig.state("provisioning") == "provisioned"
    assert rig.all(Disconnect), "the provision session is closed"
    assert [c.credentials for c in rig.all(Connect)] == ["provision", "token_file"]
    assert rig.state("connection") == "connecting"


@pytest.mark.parametrize(
    ("status", "error_msg"),
    [("NOT_FOUND", "Provision data was not found!"), ("FAILURE", "Failed to provision device!")],
)
def test_a_refusal_is_logged_with_thingsboards_error_and_retried_with_growing_delays(
    rig: LinkRig, status: str, error_msg: str
) -> None:
    for _ in range(6):
        rig.answer(
            to_requesting(rig), result={"status": status, "credentialsType": None, "errorMsg": error_msg, "token_stored": False}
        )
        assert rig.state("provisioning") == "waiting_retry"
        assert error_msg in rig.last(Log).message and status in rig.last(Log).message
        rig.advance(retry_delays(rig)[-1])
    assert retry_delays(rig) == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert len(rig.all(Disconnect)) == 6
    assert rig.state("connection") == "offline"


@pytest.mark.parametrize("outcome", ["failed", "timed_out", "cancelled"])
def test_no_answer_or_a_lost_session_retries_later(rig: LinkRig, outcome: str) -> None:
    rig.answer(to_requesting(rig), outcome, error="session lost before the answer")
    assert rig.state("provisioning") == "waiting_retry"
    rig.advance(1.9)
    assert rig.state("provisioning") == "waiting_retry"
    rig.advance(0.2)
    assert rig.state("provisioning") == "checking", "a token may have appeared meanwhile"
    rig.answer(rig.last(CheckToken), result={"present": False})
    assert rig.state("provisioning") == "connecting"


def test_a_refused_provision_connect_retries_later(rig: LinkRig) -> None:
    rig.answer(rig.last(CheckToken), result={"present": False})
    rig.answer(rig.last(Connect), "failed", error="cannot connect", network=True)
    assert rig.state("provisioning") == "waiting_retry"


def test_success_with_an_unusable_credentials_type_is_retried_not_trusted(rig: LinkRig) -> None:
    rig.answer(to_requesting(rig), result={"status": "SUCCESS", "credentialsType": "X509_CERTIFICATE",
                                           "errorMsg": "unsupported credentials type", "token_stored": False})
    assert rig.state("provisioning") == "waiting_retry"
    assert "could not be stored" in rig.last(Log).message


def test_a_successful_provisioning_resets_the_retry_delay(rig: LinkRig) -> None:
    rig.answer(to_requesting(rig), result={"status": "NOT_FOUND", "errorMsg": "x", "token_stored": False})
    rig.advance(2)
    rig.answer(to_requesting(rig), result={"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "token_stored": True})
    assert rig.dispatcher.machines["provisioning"].attempts == 0


def test_without_credentials_and_token_it_waits_unconfigured_and_looks_again() -> None:
    rig = LinkRig(provisioning={"can_provision": False, "recheck_s": 60.0})
    try:
        rig.answer(rig.last(CheckToken), result={"present": False})
        assert rig.state("provisioning") == "unconfigured"
        assert "THINGSBOARD_PROVISION_DEVICE_KEY" in rig.last(Log).message
        assert rig.all(Connect) == []
        rig.advance(61)
        rig.answer(rig.last(CheckToken), result={"present": True})
        assert rig.state("provisioning") == "provisioned"
        assert rig.state("connection") == "connecting"
        assert rig.uncovered_outcomes() == []
    finally:
        rig.close()


def test_effects_carry_no_secret(rig: LinkRig) -> None:
    rig.answer(to_requesting(rig), result={"status": "SUCCESS", "credentialsType": "ACCESS_TOKEN", "token_stored": True})
    text = repr(rig.effects)
    assert rig.effects and not any(secret in text for secret in SECRETS)
    assert "provisionDeviceSecret" not in text and "credentialsValue" not in text
