"""The Docker engine, as the controller machine needs it: one container and its events.

``DockerEngine`` does the container's lifecycle (inspect, start, stop, read the
health check) and converts docker objects to plain dicts at once. Every call
is guarded: a failure is classified by a fresh ping, so the machine can tell
"the engine is gone" (``EngineError.engine_down``) from "this container or
image is bad". Nothing here raises anything else to its callers.

``EngineWatcher`` follows the engine's event stream (``/events``, filtered to
our container) on its own thread and posts ``container_exited`` /
``container_started`` / ``container_health_changed``; an exit is noticed as
soon as dockerd reports it, without polling. When the stream breaks and the
engine does not answer, it posts ``docker_engine_lost`` once, retries every
``retry_s`` (doubling to 10 s), and posts ``docker_engine_returned`` when the
engine is back. While the engine's unix socket does not exist at all (dockerd
stopped or not installed) it does not poll: it sleeps until the socket's name
appears in its directory (inotify), then tries at once.

Only our own container (by name) is ever stopped or removed: no prune.
"""

from __future__ import annotations

import datetime
import logging
import os
import select
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import docker

from teg_fsm.adapters.file_watch import FileWatch
from teg_fsm.engine.effects.controller import (
    CONTAINER_NAME,
    ENGINE_UNREACHABLE,
    image_name,
    version_of_image,
)

log = logging.getLogger(__name__)

Post = Callable[[str, dict[str, Any]], None]


class NoEngineSocket(OSError):
    """The engine's unix socket is absent (dockerd stopped or not installed): known without docker-py."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed engine call raises; for ``except`` clauses, which evaluate it only when something is raised.

    A function, not a module constant, so that docker-py (and requests) are imported
    when the engine is first used, not when the gateway starts: together they cost
    ~15 MB of RSS and ~70 ms of start-up, and a gateway with no Docker engine never needs them.
    Their exception classes are named only once they are loaded: before that, none of
    their exceptions can have been raised (evaluating this must not import them).
    """
    errors: list[type[BaseException]] = [OSError]
    docker_errors, requests_errors = sys.modules.get("docker.errors"), sys.modules.get("requests.exceptions")
    if docker_errors is not None:
        errors.append(docker_errors.DockerException)
    if requests_errors is not None:
        errors.append(requests_errors.RequestException)
    return tuple(errors)


_MAX_RECONNECT_S = 10.0
_SOCKET_RECHECK_S = 300.0  # waiting for the socket to appear: look anyway this often
_DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def socket_path(base_url: str | None) -> Path | None:
    """The engine's unix socket, or None when the engine is reached otherwise (tcp)."""
    url = base_url or _DEFAULT_SOCKET
    return Path(url[len("unix://"):]) if url.startswith("unix://") else None


def open_client(base_url: str | None, timeout_s: float) -> docker.DockerClient:
    """A client for the engine; fails at once (and cheaply) when its unix socket is absent.

    docker-py builds a requests session and asks the engine's API version on
    every attempt; while dockerd is stopped its socket file is gone, and checking
    that first keeps a long outage from costing CPU on every retry.
    """
    url, path = base_url or _DEFAULT_SOCKET, socket_path(base_url)
    if path is not None and not path.exists():
        raise NoEngineSocket(f"no Docker engine socket at {path}")
    import docker  # the first use of the engine (see transport_errors)

    return docker.DockerClient(base_url=url, timeout=timeout_s)


class EngineError(Exception):
    """A failed engine call; ``engine_down`` when the engine itself did not answer,
    ``image_missing`` when the controller image to start does not exist (OTA builds it)."""

    def __init__(self, message: str, engine_down: bool = False, image_missing: bool = False) -> None:
        super().__init__(message)
        self.engine_down = engine_down
        self.image_missing = image_missing


@attrs.frozen
class ContainerSettings:
    """How the controller container is run (the existing gateway's choices by default)."""

    data_path: Path
    logs_path: Path
    restart_policy: str = "no"
    privileged: bool = True
    extra_mounts: tuple[str, ...] = ()
    stop_timeout_s: float = 60.0
    log_max_size: str = "10m"
    log_max_file: str = "5"
    name: str = CONTAINER_NAME


def restart_policy(spec: str) -> dict[str, Any]:
    """``on-failure:3`` -> ``{"Name": "on-failure", "MaximumRetryCount": 3}``."""
    name, _, count = spec.strip().partition(":")
    policy: dict[str, Any] = {"Name": name or "no"}
    if count:
        policy["MaximumRetryCount"] = int(count)
    return policy


def extra_binds(specs: tuple[str, ...]) -> list[str]:
    """``host:container[:ro|rw]`` (read-only unless ``rw``); missing host paths are left out,
    because Docker would create them as empty directories."""
    binds: list[str] = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1] or parts[2:] not in ([], ["ro"], ["rw"]):
            log.warning("ignoring extra mount %r: expected host:container[:ro|rw]", spec)
            continue
        if not Path(parts[0]).exists():
            log.info("extra mount %s skipped: the host path does not exist", parts[0])
            continue
        binds.append(f"{parts[0]}:{parts[1]}:{parts[2] if len(parts) == 3 else 'ro'}")
    return binds


def parse_docker_time(text: str | None) -> int | None:
    """Docker's RFC 3339 time with nanoseconds -> unix ms; None for the zero time."""
    if not text or text.startswith("0001-"):
        return None
    main, _, rest = text.rstrip("Z").partition(".")
    fraction = (rest.split("+")[0].split("-")[0] + "000000")[:6]
    moment = datetime.datetime.strptime(main, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000) + int(fraction) // 1000


def read_health_ts(queue_db: Path) -> int | None:
    """Row id=1 of the controller's ``health_check`` table, read-only; None when absent."""
    if not queue_db.exists():
        return None
    try:
        db = sqlite3.connect(f"{queue_db.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
        try:
            row = db.execute("SELECT timestamp_ms FROM health_check WHERE id = 1").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:  # no table yet, or a file mid-creation: no health check yet
        log.debug("no health check readable in %s: %s", queue_db, exc)
        return None
    return int(row[0]) if row and row[0] is not None else None


class DockerEngine:
    """The controller container's lifecycle on one engine."""

    def __init__(self, base_url: str | None, settings: ContainerSettings, timeout_s: float = 30.0) -> None:
        self.base_url = base_url
        self.settings = settings
        self._timeout_s = timeout_s
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    def _get_client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                # Asks the engine's API version, so it fails at once when the engine is down.
                self._client = open_client(self.base_url, self._timeout_s)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def reachable(self) -> bool:
        try:
            probe = open_client(self.base_url, 5)
        except transport_errors():
            return False
        try:
            return bool(probe.ping())
        except transport_errors():
            return False
        finally:
            probe.close()

    def _call(self, what: str, work: Callable[[docker.DockerClient], Any]) -> Any:
        try:
            return work(self._get_client())
        except EngineError:
            raise
        except transport_errors() as exc:
            if self.reachable():
                raise EngineError(f"{what}: {exc}") from exc
            self.close()  # its connection pool may hold dead sockets
            raise EngineError(f"{ENGINE_UNREACHABLE} ({what}): {exc}", engine_down=True) from exc

    def inspect(self) -> dict[str, Any]:
        def work(client: docker.DockerClient) -> dict[str, Any]:
            import docker.errors  # loaded already: the client exists

            try:
                container = client.containers.get(self.settings.name)
            except docker.errors.NotFound:
                return {"found": False, "running": False, "version": None, "container_id": None, "started_at_ms": None}
            return {"found": True, **_describe(container.attrs)}

        return self._call("inspect", work)

    def start(self, version: str) -> dict[str, Any]:
        image = image_name(version)

        def work(client: docker.DockerClient) -> dict[str, Any]:
            import docker.errors  # loaded already: the client exists

            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                raise EngineError(f"image {image} not found", image_missing=True) from None
            self._remove_existing(client)
            # create + start, not run(): run() pulls a missing image, which on an
            # offline device hangs until DNS gives up instead of failing at once.
            try:
                container = client.containers.create(image, name=self.settings.name, **self._run_options())
            except docker.errors.ImageNotFound:
                raise EngineError(f"image {image} not found", image_missing=True) from None
            container.start()
            container.reload()
            described = _describe(container.attrs)
            return {"container_id": container.id, "started_at_ms": described["started_at_ms"], "version": version}

        return self._call(f"start {image}", work)

    def stop(self, container_id: str) -> dict[str, Any]:
        def work(client: docker.DockerClient) -> dict[str, Any]:
            import docker.errors  # loaded already: the client exists

            try:
                container = client.containers.get(container_id)
            except docker.errors.NotFound:
                return {"stopped": False}
            container.stop(timeout=int(self.settings.stop_timeout_s))
            return {"stopped": True}

        return self._call("stop", work)

    def read_health(self, queue_db: Path) -> dict[str, Any]:
        """The health row plus whether our container runs (None: the engine did not say)."""
        running: bool | None = None
        container_id: str | None = None
        try:
            described = self.inspect()
            running, container_id = described["running"], described["container_id"]
        except EngineError as exc:
            log.debug("health read without container state: %s", exc)
        return {"health_ts_ms": read_health_ts(queue_db), "running": running, "container_id": container_id}

    def _remove_existing(self, client: docker.DockerClient) -> None:
        import docker.errors  # loaded already: the client exists

        try:
            old = client.containers.get(self.settings.name)
        except docker.errors.NotFound:
            return
        if old.attrs.get("State", {}).get("Running"):
            old.stop(timeout=int(self.settings.stop_timeout_s))
        old.remove(force=True)  # force: a container that ignored the stop goes too

    def _run_options(self) -> dict[str, Any]:
        from docker.types import LogConfig  # loaded already: the client exists

        s = self.settings
        for path in (s.data_path, s.logs_path):
            path.mkdir(parents=True, exist_ok=True)  # ours; never mount a missing path
        volumes = [
            f"{s.data_path.resolve()}:/root/data:rw",
            f"{s.logs_path.resolve()}:/root/logs:rw",
            *extra_binds(s.extra_mounts),
        ]
        return {
            "network_mode": "host",
            "privileged": s.privileged,
            "restart_policy": restart_policy(s.restart_policy),
            "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": s.log_max_size,
                                                                         "max-file": s.log_max_file}),
            "volumes": volumes,
        }


def _describe(attrs_: dict[str, Any]) -> dict[str, Any]:
    state = attrs_.get("State", {})
    return {
        "running": bool(state.get("Running")),
        "version": version_of_image(attrs_.get("Config", {}).get("Image", "")),
        "container_id": attrs_.get("Id"),
        "started_at_ms": parse_docker_time(state.get("StartedAt")),
    }


class EngineWatcher:
    """Posts the container's engine events, and the engine going and coming back."""

    def __init__(self, base_url: str | None, post: Post, name: str = CONTAINER_NAME, retry_s: float = 1.0) -> None:
        self.base_url = base_url
        self._post = post
        self._name = name
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # a pipe: stop() ends a wait for the socket

    def start(self) -> None:
        self._stop.clear()
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(self._wake[0],), name="teg-docker-events",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        with self._lock:
            stream = self._stream
        if stream is not None:
            try:
                stream.close()  # unblocks the reading thread (closes the socket)
            except Exception:
                log.debug("closing the event stream", exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._wake is not None and (self._thread is None or not self._thread.is_alive()):
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _run(self, woken: int) -> None:
        lost = False
        since: int | None = None
        wait_s = self._retry_s
        while not self._stop.is_set():
            try:
                client = open_client(self.base_url, 5)
            except transport_errors() as exc:
                if not lost:
                    lost = True
                    self._post("docker_engine_lost", {"error": str(exc)})
                if isinstance(exc, NoEngineSocket) and self._await_socket(woken):
                    wait_s = self._retry_s  # a new dockerd may answer a moment after its socket appears
                    continue
                self._stop.wait(wait_s)
                # A long outage must not cost a client set-up every second.
                wait_s = min(wait_s * 2, _MAX_RECONNECT_S)
                continue
            wait_s = self._retry_s
            if lost:
                lost, since = False, None  # the machine re-inspects; old events are moot
                self._post("docker_engine_returned", {})
            self._follow(client, since)
            # The stream broke: replay a little, in case the engine is still there.
            since = int(time.time()) - 5

    def _await_socket(self, woken: int) -> bool:
        """Sleep until the engine's socket appears or ``stop``; False when that cannot be watched.

        dockerd creates its socket when it starts: polling for it every 10 s would cost a
        wake-up per 10 s for as long as a station runs without an engine, and notice the
        engine up to 10 s late.
        """
        path = socket_path(self.base_url)
        if path is None:
            return False
        watch = FileWatch(path.parent, (path,))
        try:
            descriptor = watch.fileno()
            if descriptor is None:  # no inotify, or no such directory: retry as for any failure
                return False
            # Watching before looking: a socket made in between is seen by one or the other.
            while not path.exists() and not self._stop.is_set():
                ready = select.select([descriptor, woken], [], [], _SOCKET_RECHECK_S)[0]
                if descriptor in ready:
                    watch.changed()
            return True
        finally:
            watch.close()

    def _follow(self, client: docker.DockerClient, since: int | None) -> None:
        try:
            filters = {"type": "container", "container": self._name}
            stream = client.events(decode=True, filters=filters, since=since)
            with self._lock:
                self._stream = stream
            if self._stop.is_set():
                return
            for raw in stream:
                self._handle(raw)
        except transport_errors() + (ValueError,) as exc:  # ValueError: a torn JSON chunk
            log.debug("docker event stream ended: %s", exc)
        finally:
            with self._lock:
                self._stream = None
            client.close()

    def _handle(self, raw: dict[str, Any]) -> None:
        actor = raw.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if attributes.get("name") != self._name:  # the filter also matches id prefixes
            return
        action = str(raw.get("Action") or raw.get("status") or "")
        container_id = actor.get("ID") or raw.get("id")
        if action == "die":
            exit_code = int(attributes.get("exitCode", -1))
            self._post("container_exited", {"container_id": container_id, "exit_code": exit_code})
        elif action == "start":
            started = int(raw.get("timeNano") or 0) // 1_000_000 or None
            self._post("container_started", {"container_id": container_id, "started_at_ms": started})
        elif action.startswith("health_status"):
            status = action.partition(":")[2].strip()
            self._post("container_health_changed", {"container_id": container_id, "status": status})
