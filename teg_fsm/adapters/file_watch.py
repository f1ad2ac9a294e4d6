"""Notice when files in a directory change: inotify via ctypes, stat polling elsewhere.

An idle gateway must cost almost nothing (<= 0.13 % of a core), so noticing
new controller rows must not mean waking up 20 times a second. ``FileWatch``
owns no thread: the uplink's I/O thread puts ``fileno()`` (an inotify
descriptor: the db and its -wal change on every controller commit) into the
``select`` it waits in for jobs anyway, and calls ``changed()`` when it is
readable.

The watched files are watched one by one, the directory only for names that
appear or go: the queue's directory is by default the gateway's own data
directory, and a watch on the whole directory woke the I/O thread for every
write of the journal, the outbox and the archive (~3 times a second at rest,
for nothing). A file that does not exist yet, or is replaced (deleted and
created again, or renamed over), is watched again when its name appears. Without inotify, ``fileno()`` is None and
the caller wakes every ``poll_s`` to call ``changed()``, which then compares
``os.stat`` of the given files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100
_IN_DELETE, _IN_MOVED_FROM = 0x200, 0x40
_IN_Q_OVERFLOW, _IN_IGNORED = 0x4000, 0x8000
_FILE_MASK = _IN_MODIFY | _IN_CLOSE_WRITE
_DIRECTORY_MASK = _IN_CREATE | _IN_MOVED_TO | _IN_DELETE | _IN_MOVED_FROM
_IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000


class FileWatch:
    """Tells whether files under ``directory`` changed since the last ``changed()``."""

    def __init__(self, directory: Path, files: tuple[Path, ...], poll_s: float = 0.05) -> None:
        self.directory, self.files, self.poll_s = directory, files, poll_s
        self._names = {p.name.encode() for p in files}
        self._libc: ctypes.CDLL | None = None
        self._directory_wd = -1
        self._fd = self._inotify()
        self._stamp = self._stat() if self._fd is None else ()
        self._moved = False  # polling: the last call saw a change

    def _inotify(self) -> int | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if fd < 0:
                return None
            self._directory_wd = libc.inotify_add_watch(fd, os.fsencode(str(self.directory)), _DIRECTORY_MASK)
            if self._directory_wd < 0:
                os.close(fd)
                return None
            self._libc = libc
            for path in self.files:
                self._watch_file(fd, path)
            return fd
        except (OSError, AttributeError):
            return None

    def _watch_file(self, fd: int, path: Path) -> None:
        """Watch one file's writes; a missing file is watched when its name appears in the directory."""
        assert self._libc is not None
        # Adding a watch again for the same inode just returns its descriptor, so a
        # name that appears twice costs nothing.
        self._libc.inotify_add_watch(fd, os.fsencode(str(path)), _FILE_MASK)

    @property
    def uses_inotify(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The descriptor to wait on (readable after a change), or None: poll every ``poll_s``."""
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def changed(self) -> bool:
        """True if a watched file changed (inotify: since the last call; polling: its stat differs)."""
        if self._fd is not None:
            return self._drain()
        # A change also counts at the next call: a stat can fall between the controller's WAL
        # write and its WAL index update (a look then finds nothing yet), and a later stat within
        # the same clock tick and size would see no change at all.
        now = self._stat()
        moved, self._moved = self._moved, now != self._stamp
        self._stamp = now
        return moved or self._moved

    def _drain(self) -> bool:
        """Read all pending inotify events; True if a watched file changed, appeared or went.

        File watches name no file (their events are the file's own); directory events
        name the file, and only watched names count. A watched name that appears is
        watched again: it is a new file (the controller re-created its queue, or SQLite
        made a new -wal).
        """
        hit = False
        try:
            while True:
                buf = os.read(self._fd, 65536)  # type: ignore[arg-type]
                if not buf:
                    return hit
                offset = 0
                while offset + 16 <= len(buf):  # struct inotify_event: wd, mask, cookie, len, name
                    mask = int.from_bytes(buf[offset + 4:offset + 8], sys.byteorder)
                    length = int.from_bytes(buf[offset + 12:offset + 16], sys.byteorder)
                    wd = int.from_bytes(buf[offset:offset + 4], sys.byteorder, signed=True)
                    name = buf[offset + 16:offset + 16 + length].rstrip(b"\0")
                    offset += 16 + length
                    if mask & _IN_Q_OVERFLOW:  # names nothing: a change may hide in it
                        hit = True
                    elif wd == self._directory_wd:
                        if name in self._names:
                            hit = True
                            if mask & (_IN_CREATE | _IN_MOVED_TO):
                                self._watch_file(self._fd, self.directory / os.fsdecode(name))  # type: ignore[arg-type]
                    elif not mask & _IN_IGNORED:  # a watched file was written (IGNORED: it went)
                        hit = True
        except BlockingIOError:
            return hit

    def _stat(self) -> tuple[int, ...]:
        out: list[int] = []
        for path in self.files:
            try:
                st = path.stat()
                out += [st.st_mtime_ns, st.st_size, st.st_ino]
            except FileNotFoundError:
                out += [0, 0, 0]
        return tuple(out)
