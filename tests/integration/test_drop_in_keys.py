"""Drop-in truth: the real gateway produces every key and RPC answer the existing gateway's users rely on.

The list is tests/fixtures/existing_gateway_keys.json (the existing gateway's
dashboard and RPC widget). Each entry says what it needs: ``gateway`` entries
are checked by the first test (``teg run`` against the stand-in, no Docker
engine), ``controller`` entries by the second (a controller built and run on
the real Docker engine). A third test checks the split itself, so no entry is
skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from teg_fsm.engine.journal import read_journal
from tests.integration import uplink_rig
from tests.rig.protocol import protocol_env
from tests.rig.waiting import wait_for
from tools.demo import DEVICE, PROFILE_KEY, PROFILE_SECRET, gateway_env, make_controller_repo
from tools.tb_standin import StandIn

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "existing_gateway_keys.json").read_text())
pytestmark = pytest.mark.integration


def _needing(section: dict[str, Any], needs: str) -> dict[str, Any]:
    return {name: entry for name, entry in section.items() if entry["needs"] == needs}


def test_every_fixture_entry_is_checked_by_one_of_the_tests() -> None:
    for section in ("telemetry", "client_attributes", "rpc"):
        for name, entry in FIXTURE[section].items():
            assert entry["needs"] in ("gateway", "controller"), f"{section} {name} is checked by no test"
    assert {n for n, e in FIXTURE["rpc"].items() if "answer" not in e} == {"list"}


def _ask(tb: StandIn, device: str, method: str, params: Any) -> Any:
    return tb.rpc(device, method, params if params is not None else {}, timeout=20)["message"]


def _check_answer(method: str, entry: dict[str, Any], answer: Any) -> None:
    if "answer" in entry:
        assert answer == entry["answer"], f"{method}: {answer!r}"
    else:
        assert answer[0] == entry["answer_first"], f"{method}: {answer!r}"
        listed = {line.split(":")[0] for line in answer[1:]}
        wanted = set(FIXTURE["rpc"]) - {"list"}
        assert wanted <= listed, f"list lacks {wanted - listed}"


def test_gateway_keys_attributes_log_severities_and_rpc_answers(tmp_path: Path) -> None:
    with StandIn(tls_port=0) as tb:
        device = f"dropin-{uuid.uuid4().hex[:6]}"
        token = tb.add_device(device)
        env = uplink_rig.gateway_env(
            tb, tmp_path / "data", token, THINGSBOARD_DEVICE_NAME=device,
            DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock", TEG_RUN_COMMAND_ENABLED="true",
            TEG_REBOOT_COMMAND="true", TEG_SHUTDOWN_COMMAND="true")
        uplink_rig.create_queue(tmp_path / "data" / "communication_queue.db")
        proc = uplink_rig.start_gateway(env, tmp_path / "gateway.log")
        try:
            wait_for(lambda: "v1/devices/me/rpc/request/+" in tb.subscriptions(device), 30, "gateway subscribed")
            _check_sys_info(tb, device)
            rpcs = _needing(FIXTURE["rpc"], "gateway")
            for method, entry in rpcs.items():
                if not entry.get("last"):
                    _check_answer(method, entry, _ask(tb, device, method, entry.get("params")))
            _check_logs(tb, device)
            [(method, entry)] = [(m, e) for m, e in rpcs.items() if e.get("last")]
            _check_answer(method, entry, _ask(tb, device, method, entry.get("params")))
            assert proc.wait(20) == 0, "exit ends the gateway process"
        except BaseException:
            print((tmp_path / "gateway.log").read_text(errors="replace")[-6000:])
            raise
        finally:
            uplink_rig.stop(proc)


def _check_sys_info(tb: StandIn, device: str) -> None:
    for name, entry in _needing(FIXTURE["client_attributes"], "gateway").items():
        value = wait_for(lambda: tb.client_attributes(device).get(name), 20, f"client attribute {name}")
        assert set(entry["fields"]) <= set(value), f"{name} lacks {set(entry['fields']) - set(value)}"
        assert all(isinstance(value[f], int) for f in ("btime", "procs_running", "processes"))
        assert value["cpu"] and all(isinstance(v, int) for v in value["cpu"])


def _check_logs(tb: StandIn, device: str) -> None:
    """The reboot RPC logged a warning: it arrives as WARN, prefixed, like every other record."""
    log_keys = set(_needing(FIXTURE["telemetry"], "gateway"))
    assert log_keys == {"severity", "message"}
    records = wait_for(lambda: [v for _, v in tb.telemetry(device) if "severity" in v and
                                any(s == "WARN" for s in [v["severity"]])], 20, "a WARN log record")
    every = [v for _, v in tb.telemetry(device) if log_keys & set(v)]
    assert all(set(v) == log_keys for v in every)
    assert {v["severity"] for v in every} <= set(FIXTURE["log"]["severities"])
    assert all(v["message"].startswith(FIXTURE["log"]["message_prefix"]) for v in every)
    assert any("rebooting" in v["message"] for v in records)


# -- with a controller on the real Docker engine ------------------------------------------


@pytest.fixture
def release(controller_release: str) -> str:
    return controller_release


def test_controller_keys_and_answers_with_a_running_controller(
    tmp_path: Path, release: str, docker_test_labels: dict[str, str],
) -> None:
    labels = " ".join(f"{k}={v}" for k, v in docker_test_labels.items())
    repo_dir = make_controller_repo(tmp_path, releases=((release, "healthy"),), dockerfile_extra=f"LABEL {labels}\n")
    with StandIn(tls_port=0) as tb:
        tb.add_provision_profile(PROFILE_KEY, PROFILE_SECRET)
        env = gateway_env(tmp_path, tb, repo_dir)
        env["DOCKER_HOST"] = os.environ.get("DOCKER_HOST", "")
        env.update(protocol_env())
        proc = uplink_rig.start_gateway(env, tmp_path / "gateway.log")
        try:
            wait_for(lambda: tb.is_connected(DEVICE), 30, "self-provisioning", 0.2)
            # After the on-connect attribute answer: one requested before the push would unassign it.
            journal = tmp_path / "data" / "teg_journal.db"
            wait_for(lambda: any(e.name == "shared_attributes_received" for e in read_journal(journal)),
                     30, "the on-connect shared attributes answered", 0.2)
            tb.assign_ota(DEVICE, kind="sw", title="co2-controller", version=release)
            wait_for(lambda: tb.latest(DEVICE).get("sw_state") == "UPDATED", 240, "UPDATED", 0.2)
            keys = _needing(FIXTURE["telemetry"], "controller")
            latest = wait_for(lambda: (lambda v: v if set(keys) <= set(v) else None)(tb.latest(DEVICE)),
                              60, f"telemetry {sorted(keys)}", 0.2)
            assert latest["current_sw_version"] == release
            assert isinstance(latest["ms_since_controller_startup"], int)
            assert isinstance(latest["ms_since_last_controller_health_check"], int)
            for method, entry in _needing(FIXTURE["rpc"], "controller").items():
                _check_answer(method, entry, _ask(tb, DEVICE, method, entry.get("params")))
        except BaseException:
            print((tmp_path / "gateway.log").read_text(errors="replace")[-6000:])
            raise
        finally:
            uplink_rig.stop(proc, timeout=25)


def test_the_fixture_names_every_rpc_the_existing_dashboard_lists() -> None:
    names = "list, ping, reboot, shutdown, exit, restart_controller, init_files, run_command, " \
            "archive_republish_messages, archive_discard_messages"
    assert set(re.split(r",\s*", names)) == set(FIXTURE["rpc"])
