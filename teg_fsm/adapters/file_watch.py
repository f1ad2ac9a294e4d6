"""Wake up when files in a directory change: inotify via ctypes, stat polling elsewhere.

An idle gateway must cost almost nothing (<= 0.13 % of a core), so noticing
new controller rows must not mean waking up 20 times a second. On Linux a
thread blocks in ``select`` on an inotify descriptor watching the queue's
directory (the db and its -wal change on every controller commit) and calls
``on_change`` at most once per ``debounce_s``. Without inotify it falls back
to comparing ``os.stat`` of the given files every ``debounce_s``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class FileWatch:
    """Calls ``on_change()`` (from its own thread) after files under ``directory`` change."""

    def __init__(self, directory: Path, files: tuple[Path, ...], on_change: Callable[[], None],
                 debounce_s: float = 0.05) -> None:
        self.directory, self.files = directory, files
        self.on_change, self.debounce_s = on_change, debounce_s
        self._stop_r, self._stop_w = os.pipe()
        self._fd = self._inotify()
        self._thread = threading.Thread(target=self._run, name="teg-queue-watch", daemon=True)

    def _inotify(self) -> int | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                return None
            mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
            if libc.inotify_add_watch(fd, os.fsencode(str(self.directory)), mask) < 0:
                os.close(fd)
                return None
            return fd
        except (OSError, AttributeError):
            return None

    @property
    def uses_inotify(self) -> bool:
        return self._fd is not None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout)
        for fd in (self._fd, self._stop_r, self._stop_w):
            if fd is not None:
                os.close(fd)

    def _run(self) -> None:
        if self._fd is None:
            self._poll()
            return
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            if not self._drain():
                continue  # another file in the directory (journal, archive, ...)
            self._notify()
            # Coalesce a burst of commits into one notice per debounce period.
            ready, _, _ = select.select([self._stop_r], [], [], self.debounce_s)
            if ready:
                return

    def _drain(self) -> bool:
        """Read all pending inotify events; True if one names a watched file."""
        names = {p.name.encode() for p in self.files}
        hit = False
        try:
            while True:
                buf = os.read(self._fd, 65536)  # type: ignore[arg-type]
                if not buf:
                    return hit
                offset = 0
                while offset + 16 <= len(buf):  # struct inotify_event: wd, mask, cookie, len, name
                    length = int.from_bytes(buf[offset + 12:offset + 16], sys.byteorder)
                    name = buf[offset + 16:offset + 16 + length].rstrip(b"\0")
                    hit = hit or name in names
                    offset += 16 + length
        except BlockingIOError:
            return hit

    def _poll(self) -> None:
        stamp = self._stamp()
        while not select.select([self._stop_r], [], [], self.debounce_s)[0]:
            now = self._stamp()
            if now != stamp:
                stamp = now
                self._notify()

    def _stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for path in self.files:
            try:
                st = path.stat()
                out += [st.st_mtime_ns, st.st_size, st.st_ino]
            except FileNotFoundError:
                out += [0, 0, 0]
        return tuple(out)

    def _notify(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.exception("queue change callback failed")
