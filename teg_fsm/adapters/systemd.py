"""systemd notify protocol (``Type=notify``) without libsystemd.

READY=1 after start-up, WATCHDOG=1 from the dispatcher thread (so a wedged
dispatcher stops the pings and systemd restarts us), STATUS= with every
machine's state, STOPPING=1 on shutdown. Without ``NOTIFY_SOCKET`` (not under
systemd) every call is a no-op. A degraded mode leads the STATUS= line
(``DEGRADED (disk_full) ...``) and is written to ``teg_status.json`` for
``teg status``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams; rate-limits watchdog and status messages."""

    def __init__(self, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if env is None else env
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._clock = clock
        usec = env.get("WATCHDOG_USEC", "")
        # Ping at a quarter of the watchdog period. Without a watchdog nothing needs the pings:
        # the interval then only spaces the status updates.
        self.watchdog_expected = usec.isdigit() and int(usec) > 0 and self._address is not None
        self.watchdog_interval_s = int(usec) / 4_000_000 if usec.isdigit() and int(usec) > 0 else 5.0
        self._last_ping = float("-inf")
        self._last_status = ""
        self._ready = False
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, message: str) -> bool:
        if self._socket is None or self._address is None:
            return False
        try:
            self._socket.sendto(message.encode(), self._address)
            return True
        except OSError:
            return False  # systemd went away; nothing useful to do about it

    def ready(self, status: str = "") -> None:
        self._ready = True
        self._last_status = status
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping, at most once per interval; call it from the dispatcher thread.

        Returns True when a ping was due (and sent, if under systemd).
        """
        now = self._clock()
        if not self._ready or now - self._last_ping < self.watchdog_interval_s:
            return False
        self._last_ping = now
        self.send("WATCHDOG=1")
        return True

    def watchdog_due_in(self) -> float:
        """Seconds until ``watchdog`` would ping again (0: now)."""
        return max(0.0, self._last_ping + self.watchdog_interval_s - self._clock())

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):  # abstract namespace
        return "\0" + raw[1:]
    return raw


def status_line(states: Mapping[str, Mapping[str, object]], conditions: Mapping[str, str] | None = None) -> str:
    line = " ".join(f"{name}={info['state']}" for name, info in sorted(states.items())) or "starting"
    if conditions:
        return f"DEGRADED ({', '.join(sorted(conditions))}) {line}"
    return line


STATUS_FILE_BYTES = 4096


class StatusFile:
    """The live status for ``teg status``, in a file that can be rewritten on a full disk.

    The file is allocated once at start at a fixed size and always rewritten in
    place (``pwrite`` at offset 0, padded with spaces, which JSON ignores), so
    updating it needs no new disk blocks: the degraded mode stays visible
    exactly when the disk is full. Writing never raises.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._last = b""
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            os.posix_fallocate(self._fd, 0, STATUS_FILE_BYTES)
        except OSError as exc:
            log.warning("status file %s unavailable: %s", path, exc.strerror)
            self.close()

    def write(self, status: Mapping[str, object]) -> None:
        if self._fd is None:
            return
        body = json.dumps(status, sort_keys=True, default=str).encode()[: STATUS_FILE_BYTES - 1]
        if body == self._last:
            return
        try:
            os.pwrite(self._fd, body.ljust(STATUS_FILE_BYTES - 1) + b"\n", 0)
            self._last = body
        except OSError:
            pass  # a status we cannot show is not worth failing for

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_status(path: Path) -> dict[str, object] | None:
    """What the running (or last) gateway wrote to its status file; None if unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace") or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
