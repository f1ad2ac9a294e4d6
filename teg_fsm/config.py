"""Gateway configuration from the environment (the existing gateway's names).

The variables of the existing ThingsBoard Edge Gateway keep their names and
defaults; new settings carry a ``TEG_`` prefix and a safe default.

Every setting is read through one of the small readers below (``_get``,
``_int``, ``_float``, ``_bool``, ``_list``), which record the effective value
(for ``teg config``) and, instead of raising, note a problem naming the
variable, the value and what is allowed. Cross-setting rules (min <= max,
files readable, formats) run after all settings are read, so an operator
sees every problem at once; ``load_config`` then raises one ``ConfigError``
carrying them all and ``teg run`` exits with ``EX_CONFIG`` (78), which the
unit's ``RestartPreventExitStatus=`` turns into a failed unit, not a loop.
Adding a setting is one line in ``load_config`` (and one field in ``Config``).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from teg_fsm.engine.rate_limits import LimitSpecError, parse_limit

# sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus= names it.
EX_CONFIG = 78
# Settings whose values never appear in output (problems, `teg config`).
SECRET_VARIABLES = frozenset({"THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET"})
MASK = "***"


class ConfigError(ValueError):
    """Settings that cannot be used; each problem names its variable."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


@attrs.frozen
class Config:
    tb_host: str
    tb_port: int
    tb_tls: bool
    ca_cert: Path | None
    mqtt_protocol: str  # "3.1.1" or "5" (MQTT_PROTOCOLS)
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
    journal_detail_window_s: float  # traffic kept event by event for this long, then summarised per minute
    reconnect_min_s: float
    reconnect_max_s: float
    reconnect_jitter: float  # fraction: each wait is drawn from wait * (1 ± jitter)
    uplink_batch_rows: int
    uplink_max_inflight: int
    uplink_max_payload_bytes: int
    uplink_rate_messages: str
    uplink_rate_telemetry_messages: str
    uplink_rate_data_points: str
    uplink_puback_timeout_s: float  # PUBACKs missing this long on a live session: reconnect
    uplink_coalesce_s: float  # wait this long after the queue changes, so a slow controller's rows move together
    pending_max_rows: int
    archive_max_rows: int
    archive_max_bytes: int
    health_check_max_age_s: float
    restart_backoff_s: float
    restart_backoff_factor: float
    engine_retry_max_s: float  # the controller's engine retries double from 10 s up to this
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
    # coalesced state reports (the uplink's) and queue-depth samples: at most one per interval
    fsm_report_interval_s: float = 60.0
    # bytes per OTA chunk request; ThingsBoard refuses more than its max_payload_size, 65536
    ota_chunk_size: int = 65536

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
# Rows a controller writes within this window after the queue changed leave in one
# transfer, one packet and one delete; see docs/UPLINK.md for the latency it adds.
UPLINK_COALESCE_MS = 5000
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# 3.1.1 stays the default until MQTT 5 has run in the field (issue 17).
MQTT_PROTOCOLS = ("3.1.1", "5")
_RESTART_POLICY = re.compile(r"^(no|always|unless-stopped|on-failure(:[0-9]+)?)$")
_MOUNT = re.compile(r"^/[^:]*:/[^:]*(:(ro|rw))?$")


@attrs.define
class _Env:
    """The environment being read, what was read from it, and what is wrong with it."""

    values: Mapping[str, str]
    effective: dict[str, str] = attrs.field(factory=dict)
    problems: list[str] = attrs.field(factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.values.get(name, default)

    def use(self, name: str, value: object) -> None:
        self.effective[name] = "" if value is None else str(value)

    def reject(self, name: str, allowed: str) -> None:
        self.problems.append(f"{name}={shown(name, self.values.get(name, ''))}: {allowed}")


def shown(name: str, value: str) -> str:
    """A value as it may appear in output: secrets masked; blank or padded values quoted."""
    if name in SECRET_VARIABLES and value:
        return MASK
    return repr(value) if not value or value != value.strip() or " " in value else value


def _get(env: _Env, name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    value = value if value not in (None, "") else default
    env.use(name, value)
    return value


def _number(env: _Env, name: str, default: float, kind: type, minimum: float, maximum: float | None) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        env.use(name, default)
        return default
    allowed = f"must be {'an integer' if kind is int else 'a number'} from {_plain(minimum)}" + (
        f" to {_plain(maximum)}" if maximum is not None else " up"
    )
    try:
        value = kind(raw)
    except ValueError:
        env.reject(name, allowed)
        return default
    if value < minimum or (maximum is not None and value > maximum) or value != value:  # NaN too
        env.reject(name, allowed)
        return default
    env.use(name, value)
    return value


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _int(env: _Env, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    return int(_number(env, name, default, int, minimum, maximum))


def _float(env: _Env, name: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
    return float(_number(env, name, default, float, minimum, maximum))


def _bool(env: _Env, name: str, default: bool) -> bool:
    raw = env.get(name)
    value = default
    if raw not in (None, ""):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            value = True
        elif lowered in ("0", "false", "no", "off"):
            value = False
        else:
            env.reject(name, "must be true or false (also 1/0, yes/no, on/off)")
    env.use(name, str(value).lower())
    return value


def _list(env: _Env, name: str, default: str = "") -> tuple[str, ...]:
    raw = env.get(name, default) or ""  # set but empty means "none", not the default
    env.use(name, raw)
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Read and check the configuration; raises ConfigError listing every problem."""
    config, problems = read_config(env)
    if problems:
        raise ConfigError(problems)
    return config


def read_config(env: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """The configuration (defaults in place of bad values) and every problem found in it."""
    checked = _Env(os.environ if env is None else env)
    config = _read(checked)
    _check(checked, config)
    return config, checked.problems


def effective_settings(env: Mapping[str, str] | None = None) -> Iterator[tuple[str, str, bool]]:
    """``(variable, value as shown, set explicitly)`` for every setting, secrets masked."""
    checked = _Env(os.environ if env is None else env)
    _read(checked)
    for name, value in checked.effective.items():
        explicit = checked.values.get(name) not in (None, "")
        yield name, (MASK if name in SECRET_VARIABLES and value else value), explicit


def _read(env: _Env) -> Config:
    host = _get(env, "TB_HOST")
    if host is None:
        env.problems.append("TB_HOST is required: the ThingsBoard MQTT host name or address")
    if env.get("TB_PORT") in (None, ""):
        env.problems.append("TB_PORT is required: the ThingsBoard MQTT port, an integer from 1 to 65535")
    data_path = Path(_get(env, "TEG_DATA_PATH", "./data") or "./data")
    controller_data = Path(_get(env, "TEG_CONTROLLER_DATA_PATH", str(data_path)) or data_path)
    git_path = _get(env, "TEG_CONTROLLER_GIT_PATH")
    context_default = str(Path(git_path).parent / "docker") if git_path is not None else None
    context = _get(env, "TEG_CONTROLLER_DOCKERCONTEXT_PATH", context_default)
    ca = _get(env, "THINGSBOARD_CA_CERT")
    roots = _list(env, "TEG_FILE_ALLOWED_ROOTS") or (str(controller_data),)
    return Config(
        tb_host=host or "",
        tb_port=_int(env, "TB_PORT", 8883, minimum=1, maximum=65535),
        tb_tls=_bool(env, "TEG_TLS", True),
        ca_cert=Path(ca) if ca else None,
        mqtt_protocol=(_get(env, "TEG_MQTT_PROTOCOL", "3.1.1") or "3.1.1").strip(),
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
        journal_max_bytes=_int(env, "TEG_JOURNAL_MAX_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024),
        # Decisions are kept 450 days (>= 400 asked for), within the size bound: tools/bench_retention.py.
        journal_max_age_s=_float(env, "TEG_JOURNAL_MAX_AGE_S", 450 * 24 * 3600, minimum=3600),
        journal_detail_window_s=_float(env, "TEG_JOURNAL_DETAIL_WINDOW_S", 600.0, minimum=0.0, maximum=7 * 24 * 3600),
        reconnect_min_s=_float(env, "TEG_RECONNECT_MIN_S", 1.0, minimum=0.01, maximum=3600),
        # 120 s and ±50 %: tools/bench_fleet.py and docs/CONNECTION.md give the fleet-wide trade-off.
        reconnect_max_s=_float(env, "TEG_RECONNECT_MAX_S", 120.0, minimum=0.01, maximum=86400),
        reconnect_jitter=_float(env, "TEG_RECONNECT_JITTER", 0.5, minimum=0.0, maximum=1.0),
        uplink_batch_rows=_int(env, "TEG_UPLINK_BATCH_ROWS", 2000, minimum=1),
        uplink_max_inflight=_int(env, "TEG_UPLINK_MAX_INFLIGHT", 16, minimum=1, maximum=65535),
        uplink_max_payload_bytes=_int(env, "TEG_UPLINK_MAX_PAYLOAD_BYTES", 65536, minimum=1024, maximum=268435455),
        uplink_rate_messages=_get(env, "TEG_RATE_LIMIT_MESSAGES", "") or "",
        uplink_rate_telemetry_messages=_get(env, "TEG_RATE_LIMIT_TELEMETRY_MESSAGES", "") or "",
        uplink_rate_data_points=_get(env, "TEG_RATE_LIMIT_DATA_POINTS", "") or "",
        uplink_puback_timeout_s=_float(env, "TEG_UPLINK_PUBACK_TIMEOUT_S", 10.0, minimum=0.5, maximum=600.0),
        uplink_coalesce_s=_int(env, "TEG_UPLINK_COALESCE_MS", UPLINK_COALESCE_MS, minimum=0, maximum=60_000) / 1000,
        pending_max_rows=_int(env, "TEG_PENDING_MAX_ROWS", 5_000_000, minimum=1),
        archive_max_rows=_int(env, "TEG_ARCHIVE_MAX_ROWS", 5_000_000),
        archive_max_bytes=_int(env, "TEG_ARCHIVE_MAX_BYTES", 2 * 1024 * 1024 * 1024),
        health_check_max_age_s=_float(env, "TEG_HEALTH_CHECK_MAX_AGE_S", 6 * 3600, minimum=1),
        restart_backoff_s=_float(env, "TEG_RESTART_BACKOFF_S", 600.0, minimum=0.1),
        restart_backoff_factor=_float(env, "TEG_RESTART_BACKOFF_FACTOR", 1.6, minimum=1.0, maximum=10.0),
        # From the first retry's 10 s (ControllerSettings.engine_retry_s) up to an hour.
        engine_retry_max_s=_float(env, "TEG_ENGINE_RETRY_MAX_S", 300.0, minimum=10.0, maximum=3600.0),
        controller_restart_policy=_get(env, "TEG_CONTROLLER_RESTART_POLICY", "on-failure:3") or "on-failure:3",
        controller_privileged=_bool(env, "TEG_CONTROLLER_PRIVILEGED", True),
        controller_extra_mounts=_list(env, "TEG_CONTROLLER_EXTRA_MOUNTS", _EXTRA_MOUNTS),
        controller_stop_timeout_s=_float(env, "TEG_CONTROLLER_STOP_TIMEOUT_S", 60.0, maximum=3600),
        probation_s=_float(env, "TEG_OTA_PROBATION_S", 120.0, minimum=0.1),
        min_free_disk_mb=_int(env, "TEG_OTA_MIN_FREE_DISK_MB", 1024),
        keep_images=_int(env, "TEG_OTA_KEEP_IMAGES", 2),
        ota_chunk_size=_int(env, "TEG_OTA_CHUNK_SIZE", 65536, minimum=1, maximum=65536),
        file_check_interval_s=_float(env, "TEG_FILE_CHECK_INTERVAL_S", 30.0, minimum=0.1),
        file_allowed_roots=tuple(Path(r) for r in roots),
        run_command_enabled=_bool(env, "TEG_RUN_COMMAND_ENABLED", False),
        run_command_output_cap=_int(env, "TEG_RUN_COMMAND_OUTPUT_CAP", 16 * 1024),
        reboot_command=tuple((_get(env, "TEG_REBOOT_COMMAND", "reboot") or "reboot").split()),
        shutdown_command=tuple((_get(env, "TEG_SHUTDOWN_COMMAND", "shutdown now") or "shutdown now").split()),
        docker_host=_get(env, "DOCKER_HOST"),
        fsm_report_interval_s=_float(env, "TEG_FSM_REPORT_INTERVAL_S", 60.0, minimum=0.1, maximum=86400),
    )


def _check(env: _Env, config: Config) -> None:
    """Rules that span settings or look at the file system."""
    if config.reconnect_min_s > config.reconnect_max_s:
        env.problems.append(
            f"TEG_RECONNECT_MIN_S={config.reconnect_min_s:g} is above TEG_RECONNECT_MAX_S="
            f"{config.reconnect_max_s:g}: the minimum backoff must not exceed the maximum"
        )
    if config.journal_detail_window_s > config.journal_max_age_s:
        env.problems.append(
            f"TEG_JOURNAL_DETAIL_WINDOW_S={config.journal_detail_window_s:g} is above TEG_JOURNAL_MAX_AGE_S="
            f"{config.journal_max_age_s:g}: traffic detail cannot outlive the journal"
        )
    if bool(config.provision_key) != bool(config.provision_secret):
        missing = "THINGSBOARD_PROVISION_DEVICE_SECRET" if config.provision_key else "THINGSBOARD_PROVISION_DEVICE_KEY"
        env.problems.append(f"{missing} is required when the other provisioning credential is set")
    if config.mqtt_protocol not in MQTT_PROTOCOLS:
        env.reject("TEG_MQTT_PROTOCOL", "must be 3.1.1 or 5")
    if config.log_level not in _LOG_LEVELS:
        env.reject("LOG_LEVEL", f"must be one of {', '.join(_LOG_LEVELS)}")
    if not _RESTART_POLICY.match(config.controller_restart_policy):
        env.reject("TEG_CONTROLLER_RESTART_POLICY", "must be no, always, unless-stopped or on-failure[:N]")
    for mount in config.controller_extra_mounts:
        if not _MOUNT.match(mount):
            env.problems.append(
                f"TEG_CONTROLLER_EXTRA_MOUNTS entry {mount!r}: must be /host/path:/container/path[:ro|rw]"
            )
    for name in ("TEG_RATE_LIMIT_MESSAGES", "TEG_RATE_LIMIT_TELEMETRY_MESSAGES", "TEG_RATE_LIMIT_DATA_POINTS"):
        try:
            parse_limit(env.get(name))
        except LimitSpecError:
            env.reject(name, "must be capacity:seconds[,capacity:seconds...] with positive numbers, e.g. 100:1,3000:60")
    _check_paths(env, config)


def _check_paths(env: _Env, config: Config) -> None:
    if config.tb_tls and config.ca_cert is not None and not _readable_file(config.ca_cert):
        env.reject("THINGSBOARD_CA_CERT", "must be a readable CA certificate file (PEM)")
    if config.controller_git_path is not None and not config.controller_git_path.is_dir():
        env.reject("TEG_CONTROLLER_GIT_PATH", "must be the controller repository's .git directory")
    for name, path in (("TEG_DATA_PATH", config.data_path), ("TEG_CONTROLLER_DATA_PATH", config.controller_data_path)):
        if env.get(name) and path.exists() and not path.is_dir():
            env.reject(name, "must be a directory (it is created when missing)")
    if config.token_path.is_dir():
        env.reject("THINGSBOARD_ACCESS_TOKEN", "must be the path of the token file, not a directory")
    writable = [("TEG_DATA_PATH", config.data_path), ("TEG_CONTROLLER_DATA_PATH", config.controller_data_path),
                ("TEG_CONTROLLER_LOGS_PATH", config.controller_logs_path),
                ("THINGSBOARD_ACCESS_TOKEN", config.token_path.parent)]
    if config.controller_git_path is not None:  # checkout writes the work tree, not only .git
        writable.append(("TEG_CONTROLLER_GIT_PATH", config.controller_git_path.parent))
    writable += [("TEG_FILE_ALLOWED_ROOTS", root) for root in config.file_allowed_roots]
    refused: list[Path] = []
    for name, path in writable:
        if any(path == r or r in path.parents for r in refused):
            continue  # one line per place the operator has to fix
        if not _writable(path):
            refused.append(path)
            env.problems.append(
                f"{name}: {path} is not writable (under systemd's ProtectSystem=strict, add it to "
                "ReadWritePaths= with `systemctl edit teg-fsm`)"
            )


def _writable(path: Path) -> bool:
    """Writable, or creatable below its nearest existing parent (read-only mounts included)."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return os.access(candidate, os.W_OK)
    return False


def _readable_file(path: Path) -> bool:
    try:
        with path.open("rb"):
            return path.is_file()
    except OSError:
        return False


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as systemd's ``EnvironmentFile=`` reads them (comments, optional quotes)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values



# Where the Debian package puts the service's settings and state (the unit's
# EnvironmentFile= and WorkingDirectory=); TEG_ENV_FILE points elsewhere.
ENV_FILE = Path("/etc/teg-fsm/teg.env")
SERVICE_DIR = Path("/var/lib/teg-fsm")


@attrs.frozen
class ToolEnvironment:
    """The settings an operator command (status, journal) should read, and what relative paths mean."""

    values: Mapping[str, str]
    base: Path
    origin: str

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base / path


def tool_environment(environ: Mapping[str, str] | None = None) -> ToolEnvironment:
    """The process environment when it configures a gateway, else the service's env file."""
    environ = os.environ if environ is None else environ
    if environ.get("TEG_DATA_PATH") or environ.get("TB_HOST"):
        return ToolEnvironment(environ, Path.cwd(), "the environment")
    env_file = Path(environ.get("TEG_ENV_FILE") or ENV_FILE)
    try:
        values = read_env_file(env_file)
    except OSError:
        return ToolEnvironment(environ, Path.cwd(), "the environment")
    return ToolEnvironment(values, SERVICE_DIR, str(env_file))
