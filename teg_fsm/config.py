"""Gateway configuration from the environment (the existing gateway's names).

The variables of the existing ThingsBoard Edge Gateway keep their names and
defaults; new settings carry a ``TEG_`` prefix and a safe default. Anything
malformed is rejected at start with a message naming the variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

import attrs


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


@attrs.frozen
class Config:
    tb_host: str
    tb_port: int
    tb_tls: bool
    ca_cert: Path | None
    device_name: str
    provision_key: str | None = attrs.field(repr=False)
    provision_secret: str | None = attrs.field(repr=False)
    token_path: Path
    data_path: Path
    controller_data_path: Path
    controller_logs_path: Path
    controller_git_path: Path | None
    docker_context_path: Path | None
    dockerfile_path: str
    default_controller_version: str | None
    log_level: str
    # new settings (TEG_*)
    journal_max_bytes: int
    journal_max_age_s: float
    reconnect_min_s: float
    reconnect_max_s: float
    uplink_batch_rows: int
    uplink_max_inflight: int
    uplink_max_payload_bytes: int
    uplink_rate_messages: str
    uplink_rate_telemetry_messages: str
    uplink_rate_data_points: str
    uplink_puback_timeout_s: float  # PUBACKs missing this long on a live session: reconnect
    pending_max_rows: int
    archive_max_rows: int
    archive_max_bytes: int
    health_check_max_age_s: float
    restart_backoff_s: float
    restart_backoff_factor: float
    controller_restart_policy: str
    controller_privileged: bool
    controller_extra_mounts: tuple[str, ...]
    controller_stop_timeout_s: float
    probation_s: float
    min_free_disk_mb: int
    keep_images: int
    file_check_interval_s: float
    file_allowed_roots: tuple[Path, ...]
    run_command_enabled: bool
    run_command_output_cap: int
    reboot_command: tuple[str, ...]
    shutdown_command: tuple[str, ...]
    docker_host: str | None

    @property
    def queue_db(self) -> Path:
        return self.controller_data_path / "communication_queue.db"

    @property
    def archive_db(self) -> Path:
        return self.data_path / "gateway_archive.db"

    @property
    def logs_buffer_db(self) -> Path:
        return self.data_path / "gateway_logs_buffer.db"

    @property
    def journal_db(self) -> Path:
        return self.data_path / "teg_journal.db"

    @property
    def last_version_file(self) -> Path:
        return self.data_path / "last_launched_controller_version.txt"


# The existing gateway's read-only tool mounts (Raspberry Pi); missing host paths are skipped.
_EXTRA_MOUNTS = "/bin/vcgencmd:/bin/vcgencmd:ro,/bin/uptime:/bin/uptime:ro,/bin/pigs:/bin/pigs:ro"


def _get(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    return value if value not in (None, "") else default


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _get(env, name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _list(env: Mapping[str, str], name: str, default: str = "") -> tuple[str, ...]:
    raw = env.get(name, default) or ""  # set but empty means "none", not the default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read the configuration; raises ConfigError naming the bad variable."""
    env = os.environ if env is None else env
    host = _get(env, "TB_HOST")
    if host is None:
        raise ConfigError("TB_HOST is required (the ThingsBoard MQTT host)")
    if _get(env, "TB_PORT") is None:
        raise ConfigError("TB_PORT is required (the ThingsBoard MQTT port)")
    data_path = Path(_get(env, "TEG_DATA_PATH", "./data") or "./data")
    controller_data = Path(_get(env, "TEG_CONTROLLER_DATA_PATH", str(data_path)) or data_path)
    git_path = _get(env, "TEG_CONTROLLER_GIT_PATH")
    context = _get(env, "TEG_CONTROLLER_DOCKERCONTEXT_PATH")
    if context is None and git_path is not None:
        context = str(Path(git_path).parent / "docker")
    ca = _get(env, "THINGSBOARD_CA_CERT")
    roots = _list(env, "TEG_FILE_ALLOWED_ROOTS") or (str(controller_data),)
    return Config(
        tb_host=host,
        tb_port=_int(env, "TB_PORT", 8883),
        tb_tls=_bool(env, "TEG_TLS", True),
        ca_cert=Path(ca) if ca else None,
        device_name=_get(env, "THINGSBOARD_DEVICE_NAME", socket.gethostname()) or socket.gethostname(),
        provision_key=_get(env, "THINGSBOARD_PROVISION_DEVICE_KEY"),
        provision_secret=_get(env, "THINGSBOARD_PROVISION_DEVICE_SECRET"),
        token_path=Path(_get(env, "THINGSBOARD_ACCESS_TOKEN", "./tb_access_token") or "./tb_access_token"),
        data_path=data_path,
        controller_data_path=controller_data,
        controller_logs_path=Path(_get(env, "TEG_CONTROLLER_LOGS_PATH", str(controller_data / "logs")) or ""),
        controller_git_path=Path(git_path) if git_path else None,
        docker_context_path=Path(context) if context else None,
        dockerfile_path=_get(env, "TEG_CONTROLLER_DOCKERFILE_PATH", "./Dockerfile") or "./Dockerfile",
        default_controller_version=_get(env, "TEG_DEFAULT_CONTROLLER_VERSION"),
        log_level=(_get(env, "LOG_LEVEL", "INFO") or "INFO").upper(),
        journal_max_bytes=_int(env, "TEG_JOURNAL_MAX_BYTES", 64 * 1024 * 1024),
        journal_max_age_s=_float(env, "TEG_JOURNAL_MAX_AGE_S", 30 * 24 * 3600),
        reconnect_min_s=_float(env, "TEG_RECONNECT_MIN_S", 1.0),
        reconnect_max_s=_float(env, "TEG_RECONNECT_MAX_S", 300.0),
        uplink_batch_rows=_int(env, "TEG_UPLINK_BATCH_ROWS", 2000),
        uplink_max_inflight=_int(env, "TEG_UPLINK_MAX_INFLIGHT", 16),
        uplink_max_payload_bytes=_int(env, "TEG_UPLINK_MAX_PAYLOAD_BYTES", 65536),
        uplink_rate_messages=_get(env, "TEG_RATE_LIMIT_MESSAGES", "") or "",
        uplink_rate_telemetry_messages=_get(env, "TEG_RATE_LIMIT_TELEMETRY_MESSAGES", "") or "",
        uplink_rate_data_points=_get(env, "TEG_RATE_LIMIT_DATA_POINTS", "") or "",
        uplink_puback_timeout_s=_float(env, "TEG_UPLINK_PUBACK_TIMEOUT_S", 10.0),
        pending_max_rows=_int(env, "TEG_PENDING_MAX_ROWS", 5_000_000),
        archive_max_rows=_int(env, "TEG_ARCHIVE_MAX_ROWS", 5_000_000),
        archive_max_bytes=_int(env, "TEG_ARCHIVE_MAX_BYTES", 2 * 1024 * 1024 * 1024),
        health_check_max_age_s=_float(env, "TEG_HEALTH_CHECK_MAX_AGE_S", 6 * 3600),
        restart_backoff_s=_float(env, "TEG_RESTART_BACKOFF_S", 600.0),
        restart_backoff_factor=_float(env, "TEG_RESTART_BACKOFF_FACTOR", 1.6),
        controller_restart_policy=_get(env, "TEG_CONTROLLER_RESTART_POLICY", "on-failure:3") or "on-failure:3",
        controller_privileged=_bool(env, "TEG_CONTROLLER_PRIVILEGED", True),
        controller_extra_mounts=_list(env, "TEG_CONTROLLER_EXTRA_MOUNTS", _EXTRA_MOUNTS),
        controller_stop_timeout_s=_float(env, "TEG_CONTROLLER_STOP_TIMEOUT_S", 60.0),
        probation_s=_float(env, "TEG_OTA_PROBATION_S", 120.0),
        min_free_disk_mb=_int(env, "TEG_OTA_MIN_FREE_DISK_MB", 1024),
        keep_images=_int(env, "TEG_OTA_KEEP_IMAGES", 2),
        file_check_interval_s=_float(env, "TEG_FILE_CHECK_INTERVAL_S", 30.0),
        file_allowed_roots=tuple(Path(r) for r in roots),
        run_command_enabled=_bool(env, "TEG_RUN_COMMAND_ENABLED", False),
        run_command_output_cap=_int(env, "TEG_RUN_COMMAND_OUTPUT_CAP", 16 * 1024),
        reboot_command=tuple((_get(env, "TEG_REBOOT_COMMAND", "reboot") or "reboot").split()),
        shutdown_command=tuple((_get(env, "TEG_SHUTDOWN_COMMAND", "shutdown now") or "shutdown now").split()),
        docker_host=_get(env, "DOCKER_HOST"),
    )
