"""Configuration: every problem named with its variable, value and what is allowed; exit 78."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teg_fsm.config import EX_CONFIG, ConfigError, effective_settings, load_config, read_config, read_env_file

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "tools" / "packaging" / "teg.env"


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    return {"TB_HOST": "tb.example", "TB_PORT": "8883", "TEG_DATA_PATH": str(tmp_path / "data"),
            "THINGSBOARD_ACCESS_TOKEN": str(tmp_path / "tb_access_token")}


def problems_of(env: dict[str, str]) -> list[str]:
    return read_config(env)[1]


def test_a_good_configuration_has_no_problems(base: dict[str, str]) -> None:
    config = load_config(base)
    assert (config.tb_host, config.tb_port, config.tb_tls) == ("tb.example", 8883, True)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"TB_HOST": ""}, "TB_HOST is required: the ThingsBoard MQTT host name or address"),
    ({"TB_PORT": ""}, "TB_PORT is required: the ThingsBoard MQTT port, an integer from 1 to 65535"),
    ({"TB_PORT": "70000"}, "TB_PORT=70000: must be an integer from 1 to 65535"),
    ({"TB_PORT": "0"}, "TB_PORT=0: must be an integer from 1 to 65535"),
    ({"TB_PORT": "eighty"}, "TB_PORT=eighty: must be an integer from 1 to 65535"),
    ({"TEG_TLS": "maybe"}, "TEG_TLS=maybe: must be true or false (also 1/0, yes/no, on/off)"),
    ({"TEG_RECONNECT_MIN_S": "-1"}, "TEG_RECONNECT_MIN_S=-1: must be a number from 0.01 to 3600"),
    ({"TEG_RECONNECT_MIN_S": "nan"}, "TEG_RECONNECT_MIN_S=nan: must be a number from 0.01 to 3600"),
    ({"TEG_RECONNECT_MIN_S": "10", "TEG_RECONNECT_MAX_S": "5"},
     "TEG_RECONNECT_MIN_S=10 is above TEG_RECONNECT_MAX_S=5: the minimum backoff must not exceed the maximum"),
    ({"TEG_JOURNAL_DETAIL_WINDOW_S": "-5"}, "TEG_JOURNAL_DETAIL_WINDOW_S=-5: must be a number from 0 to 604800"),
    ({"TEG_JOURNAL_DETAIL_WINDOW_S": "7200", "TEG_JOURNAL_MAX_AGE_S": "3600"},
     "TEG_JOURNAL_DETAIL_WINDOW_S=7200 is above TEG_JOURNAL_MAX_AGE_S=3600: traffic detail cannot outlive the journal"),
    ({"TEG_UPLINK_BATCH_ROWS": "0"}, "TEG_UPLINK_BATCH_ROWS=0: must be an integer from 1 up"),
    ({"TEG_UPLINK_MAX_PAYLOAD_BYTES": "100"}, "TEG_UPLINK_MAX_PAYLOAD_BYTES=100: must be an integer from 1024 to 268435455"),
    ({"TEG_UPLINK_COALESCE_MS": "0.5"}, "TEG_UPLINK_COALESCE_MS=0.5: must be an integer from 0 to 60000"),
    ({"TEG_RESTART_BACKOFF_FACTOR": "0.5"}, "TEG_RESTART_BACKOFF_FACTOR=0.5: must be a number from 1 to 10"),
    ({"TEG_ENGINE_RETRY_MAX_S": "5"}, "TEG_ENGINE_RETRY_MAX_S=5: must be a number from 10 to 3600"),
    ({"TEG_ENGINE_RETRY_MAX_S": "86400"}, "TEG_ENGINE_RETRY_MAX_S=86400: must be a number from 10 to 3600"),
    ({"TEG_OTA_KEEP_IMAGES": "2.5"}, "TEG_OTA_KEEP_IMAGES=2.5: must be an integer from 0 up"),
    ({"TEG_RATE_LIMIT_MESSAGES": "100"},
     "TEG_RATE_LIMIT_MESSAGES=100: must be capacity:seconds[,capacity:seconds...] with positive numbers, e.g. 100:1,3000:60"),
    ({"TEG_RATE_LIMIT_DATA_POINTS": "10:0"},
     "TEG_RATE_LIMIT_DATA_POINTS=10:0: must be capacity:seconds[,capacity:seconds...] with positive numbers, e.g. 100:1,3000:60"),
    ({"TEG_MQTT_PROTOCOL": "3"}, "TEG_MQTT_PROTOCOL=3: must be 3.1.1 or 5"),
    ({"TEG_MQTT_PROTOCOL": "v5"}, "TEG_MQTT_PROTOCOL=v5: must be 3.1.1 or 5"),
    ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL=chatty: must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG"),
    ({"TEG_CONTROLLER_RESTART_POLICY": "sometimes"},
     "TEG_CONTROLLER_RESTART_POLICY=sometimes: must be no, always, unless-stopped or on-failure[:N]"),
    ({"TEG_CONTROLLER_EXTRA_MOUNTS": "/a:/b:rx"},
     "TEG_CONTROLLER_EXTRA_MOUNTS entry '/a:/b:rx': must be /host/path:/container/path[:ro|rw]"),
    ({"THINGSBOARD_PROVISION_DEVICE_KEY": "k"},
     "THINGSBOARD_PROVISION_DEVICE_SECRET is required when the other provisioning credential is set"),
    ({"THINGSBOARD_PROVISION_DEVICE_SECRET": "s"},
     "THINGSBOARD_PROVISION_DEVICE_KEY is required when the other provisioning credential is set"),
])
def test_each_bad_setting_is_named_with_its_value_and_what_is_allowed(
    base: dict[str, str], overrides: dict[str, str], message: str
) -> None:
    assert problems_of({**base, **overrides}) == [message]


def test_the_mqtt_protocol_defaults_to_3_1_1_and_takes_5(base: dict[str, str]) -> None:
    assert load_config(base).mqtt_protocol == "3.1.1"
    assert load_config({**base, "TEG_MQTT_PROTOCOL": "5"}).mqtt_protocol == "5"


def test_the_engine_retry_cap_reaches_the_controller_machine(base: dict[str, str], tmp_path: Path) -> None:
    from teg_fsm.app import Gateway

    (tmp_path / "data").mkdir()
    assert load_config(base).engine_retry_max_s == 300.0
    gateway = Gateway(load_config({**base, "TEG_CONTROLLER_DATA_PATH": str(tmp_path / "data"),
                                   "TEG_ENGINE_RETRY_MAX_S": "60"}))
    try:
        [spec] = [s for s in gateway.machine_specs() if s.cls.machine_name == "controller"]
    finally:
        gateway.journal.close()
    assert spec.settings["engine_retry_max_s"] == 60.0


def test_a_missing_ca_file_is_named_at_start(base: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert problems_of({**base, "THINGSBOARD_CA_CERT": str(missing)}) == [
        f"THINGSBOARD_CA_CERT={missing}: must be a readable CA certificate file (PEM)"]
    # Without TLS the CA file is not used, so it is not a problem.
    assert problems_of({**base, "THINGSBOARD_CA_CERT": str(missing), "TEG_TLS": "false"}) == []


def test_paths_that_are_not_what_they_should_be_are_named(base: dict[str, str], tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    assert problems_of({**base, "TEG_CONTROLLER_GIT_PATH": str(tmp_path / "no-repo" / ".git")}) == [
        f"TEG_CONTROLLER_GIT_PATH={tmp_path / 'no-repo' / '.git'}: must be the controller repository's .git directory"]
    assert problems_of({**base, "TEG_DATA_PATH": str(a_file)}) == [
        f"TEG_DATA_PATH={a_file}: must be a directory (it is created when missing)"]
    assert problems_of({**base, "THINGSBOARD_ACCESS_TOKEN": str(tmp_path)}) == [
        f"THINGSBOARD_ACCESS_TOKEN={tmp_path}: must be the path of the token file, not a directory"]


def test_a_path_on_a_read_only_mount_is_named_with_the_systemd_fix(base: dict[str, str]) -> None:
    read_only = Path("/proc/sys/teg-fsm-data")  # /proc/sys is mounted read-only in containers and refuses creation
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")  # pragma: no cover - only on hosts with a writable /proc/sys
    assert problems_of({**base, "TEG_CONTROLLER_DATA_PATH": str(read_only)}) == [
        f"TEG_CONTROLLER_DATA_PATH: {read_only} is not writable (under systemd's ProtectSystem=strict, add it to "
        "ReadWritePaths= with `systemctl edit teg-fsm`)"]


def test_every_problem_is_reported_at_once_and_secrets_are_masked(base: dict[str, str]) -> None:
    env = {**base, "TB_PORT": "70000", "TEG_TLS": "perhaps", "THINGSBOARD_PROVISION_DEVICE_KEY": "top-secret-key"}
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    assert [p.split(":")[0].split("=")[0].split(" ")[0] for p in caught.value.problems] == [
        "TB_PORT", "TEG_TLS", "THINGSBOARD_PROVISION_DEVICE_SECRET"]
    assert "top-secret-key" not in str(caught.value)
    shown = {name: value for name, value, _ in effective_settings({**base, "THINGSBOARD_PROVISION_DEVICE_KEY": "k",
                                                                   "THINGSBOARD_PROVISION_DEVICE_SECRET": "s"})}
    assert shown["THINGSBOARD_PROVISION_DEVICE_KEY"] == shown["THINGSBOARD_PROVISION_DEVICE_SECRET"] == "***"


@given(st.text(max_size=12))
def test_any_tb_port_is_accepted_in_range_or_named(raw: str) -> None:
    env = {"TB_HOST": "h", "TB_PORT": raw, "TEG_DATA_PATH": "/nonexistent-teg/data",
           "THINGSBOARD_ACCESS_TOKEN": "/nonexistent-teg/token"}
    config, problems = read_config(env)
    port_problems = [p for p in problems if p.startswith("TB_PORT")]
    try:
        valid = raw != "" and 1 <= int(raw) <= 65535
    except ValueError:
        valid = False
    assert (port_problems == []) == valid
    if valid:
        assert config.tb_port == int(raw)


def test_env_file_reads_like_systemd(tmp_path: Path) -> None:
    path = tmp_path / "teg.env"
    path.write_text("# comment\n; also a comment\n\nTB_HOST=tb.example\nTB_PORT = 1883\n"
                    "TEG_SHUTDOWN_COMMAND=\"shutdown now\"\nexport LOG_LEVEL='debug'\nnot a setting\n")
    assert read_env_file(path) == {"TB_HOST": "tb.example", "TB_PORT": "1883",
                                   "TEG_SHUTDOWN_COMMAND": "shutdown now", "LOG_LEVEL": "debug"}


@given(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,15}", fullmatch=True),
                       st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)
                       .map(str.strip).filter(lambda v: not (len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"")),
                       max_size=6))
def test_env_file_round_trips_plain_values(values: dict[str, str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "teg.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        assert read_env_file(path) == values


def test_the_packaged_env_template_documents_every_setting() -> None:
    documented = set(read_env_file(TEMPLATE)) | {
        line.lstrip("#").split("=", 1)[0] for line in TEMPLATE.read_text().splitlines() if line.startswith("#") and "=" in line
    }
    read = {name for name, _, _ in effective_settings({"TB_HOST": "h", "TB_PORT": "1"})}
    assert read - documented == set(), "add these settings to tools/packaging/teg.env"


def _teg(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "TEG_", "THINGSBOARD_"))}
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean, **env}, timeout=60)


def test_teg_run_exits_78_naming_each_problem_before_doing_anything(tmp_path: Path) -> None:
    done = _teg("run", env={"TB_HOST": "127.0.0.1", "TB_PORT": "70000", "TEG_DATA_PATH": str(tmp_path / "data"),
                            "TEG_RATE_LIMIT_MESSAGES": "lots", "JOURNAL_STREAM": "8:1"})
    assert done.returncode == EX_CONFIG
    assert done.stderr.splitlines() == [
        "<3>teg: configuration error: TB_PORT=70000: must be an integer from 1 to 65535",
        "<3>teg: configuration error: TEG_RATE_LIMIT_MESSAGES=lots: must be capacity:seconds[,capacity:seconds...] "
        "with positive numbers, e.g. 100:1,3000:60",
        "<3>teg: 2 configuration problem(s); not starting (exit 78)",
    ]
    assert not (tmp_path / "data").exists()


def test_teg_config_check_validates_an_env_file_and_teg_config_prints_the_effective_values(tmp_path: Path) -> None:
    env_file = tmp_path / "teg.env"
    env_file.write_text(f"TB_HOST=tb.example\nTB_PORT=8883\nTEG_DATA_PATH={tmp_path}\n"
                        "THINGSBOARD_PROVISION_DEVICE_KEY=k\nTHINGSBOARD_PROVISION_DEVICE_SECRET=very-secret\n")
    ok = _teg("config", "--check", "--env-file", str(env_file), env={})
    assert (ok.returncode, ok.stdout) == (0, f"{env_file}: configuration OK\n")
    shown = _teg("config", "--env-file", str(env_file), env={})
    assert "TB_HOST=tb.example\n" in shown.stdout and "TEG_RECONNECT_MAX_S=120.0    # default\n" in shown.stdout
    assert "THINGSBOARD_PROVISION_DEVICE_SECRET=***" in shown.stdout and "very-secret" not in shown.stdout
    env_file.write_text("TB_HOST=tb.example\nTB_PORT=70000\n")
    bad = _teg("config", "--check", "--env-file", str(env_file), env={})
    assert bad.returncode == EX_CONFIG
    assert "configuration error: TB_PORT=70000: must be an integer from 1 to 65535" in bad.stderr
