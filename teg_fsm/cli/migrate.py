"""``teg migrate``: what switching from the existing gateway keeps, and converting its files' pages.

``--check`` is read-only by design: it lists containers and images, reads the old
runner's environment from ``docker inspect`` (it was started with ``--env-file
.env``), looks at files, and prints. It never stops, removes or writes anything;
the operator runs the commands it prints (docs/MIGRATION.md walks through them).

``--small-pages`` is the one step that writes: it rewrites the gateway's own
files (archive, outbox, journal) with ``SMALL_PAGE_SIZE`` pages, which new files
get anyway (docs/UPLINK.md "At rest"): a station that kept the existing
gateway's 4 KiB-page files would otherwise write four times the bytes per row
for as long as it runs. Only while no gateway runs (it holds ``teg.run`` itself
and asks Docker about the old runner), never the controller's queue file, never
a file that fails ``integrity_check``, and only with room for the copy.

The one thing that must not happen is two gateways driving ``teg_controller``
with the same token: each would restart the other's container and ThingsBoard
would see the device flap between two sessions. So a running old runner, or a
runner whose restart policy would bring it back after a reboot, is a blocker.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import attrs

from teg_fsm.adapters.tokens import fsync_directory
from teg_fsm.cli.status import AlreadyRunning, RunMarker
from teg_fsm.config import SERVICE_DIR, read_config, read_env_file
from teg_fsm.engine.sqlite_files import SMALL_PAGE_SIZE, is_corruption

# Names the existing gateway's install guides give its runner container, and its image.
RUNNER_NAMES = ("thingsboard-edge-gateway-runner", "thingsboard_edge_gateway")
RUNNER_IMAGE_PREFIX = "thingsboard-edge-gateway"
CONTROLLER = "teg_controller"
# The runner mounts the host's / at /host; paths in its .env may carry that prefix.
HOST_MOUNT = "/host"
CARRIED_VARIABLES = (
    "TB_HOST", "TB_PORT", "THINGSBOARD_CA_CERT", "THINGSBOARD_DEVICE_NAME", "THINGSBOARD_ACCESS_TOKEN",
    "THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET", "TEG_DATA_PATH",
    "TEG_CONTROLLER_DATA_PATH", "TEG_CONTROLLER_LOGS_PATH", "TEG_CONTROLLER_GIT_PATH",
    "TEG_CONTROLLER_DOCKERCONTEXT_PATH", "TEG_CONTROLLER_DOCKERFILE_PATH", "TEG_DEFAULT_CONTROLLER_VERSION",
)
SECRETS = ("THINGSBOARD_PROVISION_DEVICE_KEY", "THINGSBOARD_PROVISION_DEVICE_SECRET")
GATEWAY_FILES = ("gateway_archive.db", "gateway_logs_buffer.db", "last_launched_controller_version.txt")


@attrs.define
class Findings:
    keep: list[str] = attrs.field(factory=list)
    stop: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    blockers: list[str] = attrs.field(factory=list)

    def lines(self) -> Iterator[str]:
        for title, items in (("will be kept", self.keep), ("to stop before starting teg-fsm", self.stop),
                             ("notes", self.notes)):
            yield f"{title}:"
            yield from (f"  - {item}" for item in items) if items else ["  (nothing)"]
        if self.blockers:
            yield "NOT ready to switch:"
            yield from (f"  ! {item}" for item in self.blockers)
        else:
            yield "ready to switch: `systemctl enable --now teg-fsm` (nothing was changed by this check)"


def inspect_host(*, ours: Mapping[str, str], ours_origin: str, old_env_file: Path | None) -> Findings:
    findings = Findings()
    old_env: dict[str, str] = {}
    client = _docker_client(findings)
    if client is not None:
        old_env.update(_inspect_runners(client, findings))
        _inspect_controller(client, findings)
    if old_env_file is not None:
        try:
            old_env.update(read_env_file(old_env_file))
        except OSError as exc:
            findings.notes.append(f"cannot read the existing gateway's .env {old_env_file}: {exc.strerror}")
    _compare_settings(old_env, ours, ours_origin, findings)
    _inspect_files(old_env or dict(ours), findings)
    _check_ours(ours, ours_origin, findings)
    return findings


def _docker_client(findings: Findings) -> Any:
    import docker

    try:
        client = docker.from_env(timeout=20)
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot look at containers"
        findings.notes.append(f"Docker engine not reachable ({exc}); containers not inspected")
        return None


def _is_runner(container: Any) -> bool:
    image_tags = container.attrs.get("Config", {}).get("Image", "")
    return container.name in RUNNER_NAMES or image_tags.startswith(RUNNER_IMAGE_PREFIX)


def _inspect_runners(client: Any, findings: Findings) -> dict[str, str]:
    env: dict[str, str] = {}
    for container in client.containers.list(all=True):
        if not _is_runner(container):
            continue
        policy = container.attrs.get("HostConfig", {}).get("RestartPolicy", {}).get("Name") or "no"
        status = container.status
        env.update(_container_env(container))
        what = f"existing gateway runner container {container.name!r} ({status}, restart policy {policy})"
        if status in ("running", "restarting"):
            findings.stop.append(f"{what}: `docker update --restart=no {container.name} && docker stop {container.name}`")
            findings.blockers.append(f"{container.name} is {status}: it drives {CONTROLLER} with the same token")
        elif policy not in ("no", ""):
            findings.stop.append(f"{what}: `docker update --restart=no {container.name}` so a reboot does not revive it")
            findings.blockers.append(f"{container.name} would restart with the Docker engine (policy {policy})")
        else:
            findings.keep.append(f"{what}: stopped; keep it for a rollback, or `docker rm` it later")
    if not env:
        findings.notes.append(f"no existing gateway runner container found (looked for {', '.join(RUNNER_NAMES)})")
    return env


def _container_env(container: Any) -> dict[str, str]:
    pairs = container.attrs.get("Config", {}).get("Env") or []
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair and pair.split("=", 1)[0] in CARRIED_VARIABLES)


def _inspect_controller(client: Any, findings: Findings) -> None:
    import docker.errors

    try:
        controller = client.containers.get(CONTROLLER)
    except docker.errors.NotFound:
        findings.notes.append(f"no {CONTROLLER} container: teg-fsm builds and starts one from TEG_DEFAULT_CONTROLLER_VERSION")
    else:
        image = ", ".join(controller.image.tags) or controller.image.short_id
        findings.keep.append(f"container {CONTROLLER} ({controller.status}, image {image}): teg-fsm adopts it, no rebuild")
    images = sorted(t for image in client.images.list() for t in image.tags if t.startswith("teg-controller-"))
    if images:
        findings.keep.append(f"controller images: {', '.join(images)}")


def _host_path(raw: str) -> Path:
    path = Path(raw)
    if raw.startswith(HOST_MOUNT + "/") and not path.exists():
        return Path(raw[len(HOST_MOUNT):])
    return path


def _compare_settings(old: Mapping[str, str], ours: Mapping[str, str], origin: str, findings: Findings) -> None:
    for name in CARRIED_VARIABLES:
        if name not in old:
            continue
        old_value, our_value = old[name], ours.get(name)
        shown_old = "***" if name in SECRETS else old_value
        if our_value is None:
            findings.notes.append(f"{name}={shown_old} in the existing gateway's settings: copy it into {origin}")
        elif our_value != old_value and str(_host_path(old_value)) != our_value:
            findings.notes.append(f"{name} differs: existing gateway {shown_old}, {origin} "
                                  f"{'***' if name in SECRETS else our_value}")


def _inspect_files(env: Mapping[str, str], findings: Findings) -> None:
    data = _host_path(env.get("TEG_DATA_PATH", "")) if env.get("TEG_DATA_PATH") else None
    if data is not None:
        present = [name for name in GATEWAY_FILES if (data / name).exists()]
        findings.keep.append(f"data directory {data}: {', '.join(present) or 'no gateway files yet'}")
        large = [name for name in SMALL_PAGE_FILES if _header_page_size(data / name) > SMALL_PAGE_SIZE]
        if large:
            findings.notes.append(f"{', '.join(large)} in {data}: larger pages than new files get; with both "
                                  "gateways stopped, `teg migrate --small-pages` converts them (optional)")
    controller = _host_path(env["TEG_CONTROLLER_DATA_PATH"]) if env.get("TEG_CONTROLLER_DATA_PATH") else data
    if controller is not None:
        queue = controller / "communication_queue.db"
        findings.keep.append(f"controller queue {queue}: {'present, rows are drained, never dropped' if queue.exists() else 'not there yet'}")
    token = env.get("THINGSBOARD_ACCESS_TOKEN")
    if token is None:
        findings.notes.append("THINGSBOARD_ACCESS_TOKEN not set: teg-fsm looks for ./tb_access_token in "
                              "/var/lib/teg-fsm; set it to the existing token file's absolute path to keep the device")
    else:
        path = _host_path(token)
        state = "present" if path.is_file() else "MISSING (the device will provision again if it has credentials)"
        findings.keep.append(f"token file {path}: {state}")
    git = env.get("TEG_CONTROLLER_GIT_PATH")
    if git:
        findings.keep.append(f"controller repository {_host_path(git)}: {'present' if _host_path(git).is_dir() else 'MISSING'}")
    _note_write_paths(env, findings)


def _note_write_paths(env: Mapping[str, str], findings: Findings) -> None:
    """The unit may write only /var/lib/teg-fsm; the existing gateway's places need a drop-in."""
    wanted = [env.get(name) for name in ("TEG_DATA_PATH", "TEG_CONTROLLER_DATA_PATH", "TEG_CONTROLLER_LOGS_PATH")]
    token, git = env.get("THINGSBOARD_ACCESS_TOKEN"), env.get("TEG_CONTROLLER_GIT_PATH")
    wanted += [str(Path(token).parent) if token else None, str(Path(git).parent) if git else None]
    paths: list[str] = []
    for raw in wanted:
        if raw and Path(raw).is_absolute():
            path = str(_host_path(raw))
            if path not in paths and not path.startswith(str(SERVICE_DIR)):
                paths.append(path)
    if paths:
        findings.notes.append("the service may write only /var/lib/teg-fsm: run `systemctl edit teg-fsm` and add "
                              f"[Service] ReadWritePaths={' '.join(paths)}")


def _check_ours(ours: Mapping[str, str], origin: str, findings: Findings) -> None:
    _config, problems = read_config(ours)
    for problem in problems:
        findings.blockers.append(f"{origin}: {problem}")
    if ours.get("TEG_RUN_COMMAND_ENABLED", "").lower() not in ("1", "true", "yes", "on"):
        findings.notes.append("run_command RPC is OFF in teg-fsm (on in the existing gateway); "
                              f"set TEG_RUN_COMMAND_ENABLED=true in {origin} if dashboards use it")


# -- teg migrate --small-pages ----------------------------------------------------------

# The files the gateway alone writes. The controller's queue is the controller's format.
SMALL_PAGE_FILES = ("gateway_archive.db", "gateway_logs_buffer.db", "teg_journal.db")
CONTROLLER_QUEUE = "communication_queue.db"
COPY_MARK = ".small-pages-tmp"
# Room asked for beyond the live pages: smaller pages hold a little less each (more
# headers, more interior pages), and the -wal starts again when the gateway opens it.
SPACE_FACTOR = 1.1
SPACE_MARGIN_BYTES = 1024 * 1024


@attrs.frozen
class Converted:
    line: str
    ok: bool  # converted, or nothing to do; False: refused or failed (the file is as it was)


def old_runner_blockers() -> list[str]:
    """Why the existing gateway might have the files open now ([] when it does not run)."""
    findings = Findings()
    client = _docker_client(findings)
    if client is None:
        return [f"cannot tell whether the existing gateway runs: {findings.notes[0]}"]
    return [f"{c.name} is {c.status}: stop it first (`docker stop {c.name}`)"
            for c in client.containers.list(all=True) if _is_runner(c) and c.status in ("running", "restarting")]


def convert_data_dir(data: Path, *, controller_queue: Path | None, blockers: list[str]) -> tuple[list[str], bool]:
    """Convert every file of ``SMALL_PAGE_FILES`` in ``data``; the lines to print and whether all went well."""
    if blockers:
        return [f"not converted: {b}" for b in blockers], False
    if not data.is_dir():
        return [f"not converted: no data directory {data}"], False
    marker = RunMarker(data)
    try:
        marker.acquire(int(time.time() * 1000))  # `teg run` cannot start while we hold it
    except AlreadyRunning as exc:
        return [f"not converted: {exc}; stop it first (`systemctl stop teg-fsm`)"], False
    try:
        results = [convert_file(data / name, protected=controller_queue) for name in SMALL_PAGE_FILES]
    finally:
        marker.release()
    return [r.line for r in results], all(r.ok for r in results)


def convert_file(path: Path, *, page_size: int = SMALL_PAGE_SIZE, protected: Path | None = None,
                 free_bytes: Callable[[Path], int] = lambda d: shutil.disk_usage(d).free) -> Converted:
    """Rewrite ``path`` with ``page_size`` pages, or say why not; the file is never left half done.

    ``VACUUM INTO`` a copy beside it, check the copy (``integrity_check``, page size,
    rows per table), then rename it over the file: the file changes in one step or not
    at all, and the copy needs the live pages' size free once (an in-place ``VACUUM``
    needs it twice: a temporary copy, then a rollback journal of the whole file).
    """
    if path.name == CONTROLLER_QUEUE or (protected is not None and _same_file(path, protected)):
        return Converted(f"{path}: refused, the controller's queue keeps the controller's format", False)
    if not path.exists():
        return Converted(f"{path}: not there (a new file gets {page_size} B pages)", True)
    copy = path.with_name(path.name + COPY_MARK)
    copy.unlink(missing_ok=True)  # left by an interrupted run; the file itself was not touched then
    mode = ""
    try:
        with closing(sqlite3.connect(str(path), timeout=0, isolation_level=None)) as conn:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            return _convert(conn, path, copy, page_size, free_bytes)
    except (sqlite3.Error, OSError) as exc:
        copy.unlink(missing_ok=True)
        if isinstance(exc, sqlite3.Error) and is_corruption(exc):
            return Converted(f"{path}: damaged, left alone ({exc})", False)
        busy = " (another process has it open)" if "locked" in str(exc) else ""
        return Converted(f"{path}: not converted, left as it was ({exc}){busy}", False)
    finally:
        if mode == "wal":
            _back_to_wal(path)


def _convert(conn: sqlite3.Connection, path: Path, copy: Path, page_size: int,
             free_bytes: Callable[[Path], int]) -> Converted:
    old_size = conn.execute("PRAGMA page_size").fetchone()[0]
    if old_size <= page_size:
        return Converted(f"{path}: already {old_size} B pages, unchanged", True)
    check = conn.execute("PRAGMA integrity_check(1)").fetchone()[0]
    if check != "ok":
        return Converted(f"{path}: damaged, left alone (integrity_check: {check})", False)
    # Out of WAL: folds the -wal into the file (the copy must not need it), and fails
    # ("database is locked") while any other connection has the file open.
    if conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] != "delete":
        return Converted(f"{path}: not converted, left as it was (it stays in WAL mode: in use?)", False)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # the lock is kept until close: nobody opens it meanwhile
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("COMMIT")
    return _copy_and_swap(conn, path, copy, page_size, old_size, free_bytes)


def _back_to_wal(path: Path) -> None:
    """The file (as it was, or converted) in WAL mode again, as the gateway keeps it."""
    try:
        with closing(sqlite3.connect(str(path), timeout=10, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:  # the gateway switches it at its next open anyway
        print(f"{path}: could not switch back to WAL ({exc}); the gateway does at its next start")


def _copy_and_swap(conn: sqlite3.Connection, path: Path, copy: Path, page_size: int, old_size: int,
                   free_bytes: Callable[[Path], int]) -> Converted:
    pages, free_pages = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count"))
    need = int((pages - free_pages) * old_size * SPACE_FACTOR) + SPACE_MARGIN_BYTES
    room = free_bytes(path.parent)
    if room < need:
        return Converted(f"{path}: not converted, left as it was: the copy needs {_mb(need)} free, "
                         f"{path.parent} has {_mb(room)}", False)
    rows = _row_counts(conn)
    started = time.monotonic()
    conn.execute(f"PRAGMA page_size={int(page_size)}")  # the size VACUUM INTO gives the copy
    try:
        conn.execute("VACUUM INTO ?", (str(copy),))
        problem = _check_copy(copy, page_size, rows)
        if problem:
            return Converted(f"{path}: not converted, left as it was: the copy {problem}", False)
        _swap(copy, path)
    finally:
        copy.unlink(missing_ok=True)
    ours = {t: n for t, n in rows.items() if not t.startswith("sqlite_")}
    return Converted(f"{path}: {old_size} -> {page_size} B pages, {sum(ours.values())} rows in {len(ours)} tables "
                     f"kept, integrity ok, {_mb(pages * old_size)} -> {_mb(path.stat().st_size)} "
                     f"({time.monotonic() - started:.1f} s)", True)


def _row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _check_copy(copy: Path, page_size: int, rows: dict[str, int]) -> str:
    """What is wrong with the copy, or "" when it is the file's rows in ``page_size`` pages."""
    with closing(sqlite3.connect(str(copy), isolation_level=None)) as conn:
        check = conn.execute("PRAGMA integrity_check(1)").fetchone()[0]
        if check != "ok":
            return f"failed integrity_check ({check})"
        got = conn.execute("PRAGMA page_size").fetchone()[0]
        if got != page_size:
            return f"has {got} B pages"
        counts = _row_counts(conn)
    return "" if counts == rows else f"has other row counts ({counts} instead of {rows})"


def _swap(copy: Path, path: Path) -> None:
    """Give the copy the file's owner and mode, make it durable, and rename it over the file."""
    st = path.stat()
    if os.geteuid() == 0:
        os.chown(copy, st.st_uid, st.st_gid)  # the service may not run as root
    os.chmod(copy, stat.S_IMODE(st.st_mode))
    fd = os.open(copy, os.O_RDONLY)
    try:
        os.fsync(fd)  # VACUUM INTO does not sync its output
    finally:
        os.close(fd)
    os.replace(copy, path)
    # The rename itself; a file system that refuses fsync on a directory must not turn
    # a finished conversion into a reported failure.
    fsync_directory(path.parent)


def _header_page_size(path: Path) -> int:
    """The page size an SQLite file's header records (bytes 16-17), 0 when not one; reads no page."""
    try:
        with path.open("rb") as f:
            header = f.read(18)
    except OSError:
        return 0
    if len(header) < 18 or not header.startswith(b"SQLite format 3\0"):
        return 0
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
