"""Opening the gateway's SQLite (and small text) files: WAL, busy timeout, and quarantine instead of deletion.

The existing gateway deleted the controller queue when it met a schema error
and lost every queued row. Here a file SQLite cannot read is moved aside as
``<name>.corrupt-<UTC timestamp>`` (with its -wal/-shm), reported, and a
fresh file takes its place. Schema differences are never a reason to move a
file: missing tables are created, existing rows are left alone.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
QUARANTINE_MARK = ".corrupt-"
CORRUPT_MARKERS = ("file is not a database", "malformed", "disk image", "file is encrypted")
# Page cache bound per schema (main and each ATTACHed one). SQLite's default,
# 2000 KiB, fills slowly as a growing file's pages are touched: at 50 rows/s the
# queue + archive connection took ~20 minutes to reach it, which reads as a
# leak in a soak. Our access is appends and deletes at the ends of the tables.
CACHE_KIB = 512
# Page size of the gateway's own new files (the archive, the outbox, the journal has
# its own PAGE_SIZE). At rest each commit appends a row or two to a table and its
# index: the WAL writes every touched page whole, so 1 KiB pages write a quarter of
# SQLite's default 4 KiB (docs/UPLINK.md "At rest"). An existing file keeps its size
# until `teg migrate --small-pages` rewrites it. Never the controller's queue file:
# its format is the controller's.
SMALL_PAGE_SIZE = 1024


def is_corruption(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and any(m in str(exc).lower() for m in CORRUPT_MARKERS)


def connect(path: Path, *, wal: bool = True, page_size: int | None = None) -> sqlite3.Connection:
    """A connection in autocommit mode (we BEGIN ourselves), WAL, NORMAL sync.

    ``page_size`` applies to a new (empty) file only: it must be set before the
    switch to WAL writes the header; an existing file keeps the size it has.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if page_size is not None:
            conn.execute(f"PRAGMA page_size={int(page_size)}")
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a killed process; only power loss can lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except BaseException:
        conn.close()  # a half-opened connection would keep the file locked (e.g. no room for its -shm)
        raise
    return conn


def quarantine(path: Path, reason: str) -> Path:
    """Move ``path`` (and its -wal/-shm) aside; return the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}{QUARANTINE_MARK}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{QUARANTINE_MARK}{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            side.rename(Path(str(target) + suffix))
    log.error("file %s is unreadable (%s); moved aside to %s, starting a fresh one", path, reason, target)
    return target


def read_text_checked(path: Path) -> str:
    """A small gateway-owned text file (e.g. the last launched version); "" when missing or unreadable.

    A file that is not UTF-8 text is damaged: it is quarantined like a database, so the
    next start does not meet it again and nothing is deleted.
    """
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except UnicodeDecodeError as exc:
        try:
            quarantine(path, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
        except OSError as move_error:
            log.error("file %s is not UTF-8 text and cannot be moved aside: %s", path, move_error)
        return ""
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return ""


def open_checked(
    path: Path,
    schema: Callable[[sqlite3.Connection], None],
    *,
    wal: bool = True,
    on_quarantine: Callable[[Path], None] | None = None,
    page_size: int | None = None,
) -> sqlite3.Connection:
    """Open ``path`` and apply ``schema``; a corrupt file is quarantined and replaced once.

    ``on_quarantine`` receives the new name of a file moved aside, so the caller can report it.
    """
    conn: sqlite3.Connection | None = None
    try:
        conn = connect(path, wal=wal, page_size=page_size)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        schema(conn)
        return conn
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()  # an open connection would keep the file locked for whoever tries next
        if not is_corruption(exc):
            raise
        moved = quarantine(path, str(exc))
        if on_quarantine is not None:
            on_quarantine(moved)
    conn = connect(path, wal=wal, page_size=page_size)
    schema(conn)
    return conn
