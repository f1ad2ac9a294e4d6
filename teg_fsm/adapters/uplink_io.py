"""The uplink's I/O thread: every SQLite access of the uplink, in one place.

Theory of operation
-------------------
One thread owns the queue store and the log buffer, so our own writes never
contend with each other (only with the controller, a separate process, which
the busy timeout covers). Effect handlers, called on the dispatcher thread,
only enqueue jobs here. A job that publishes hands the payload to
``publish(topic, payload, qos, on_done)`` (the MQTT link); the PUBACK comes
back on paho's thread as another job, which deletes the packet's rows and
only then settles the effect. Rows are never deleted before their PUBACK.
A packet ThingsBoard refuses (MQTT 5 PUBACK >= 0x80) is not lost: its rows
move to ``dead_letters`` with ThingsBoard's reason (log records are dropped),
and the effect fails with ``refused`` so the machine does not send them again.

Idle costs nothing: the thread blocks in ``select`` on a wake-up pipe (jobs)
and the queue's ``FileWatch`` (one thread does both: a notice never needs a
hand-over between threads). Work nobody announced arrives two ways:
- the ``FileWatch`` (inotify on the queue's directory, stat polling where there
  is none) sees the queue db or its -wal change; the thread then stops
  listening to it for ``coalesce_s`` (at least ``WATCH_DEBOUNCE_S``), looks
  (``QueueStore.has_news``: ``PRAGMA data_version``, then the highest id in
  ``messages``) and only a new row posts ``rows_waiting``. A file opened and
  closed, a WAL checkpoint, a health-check write or our own writes in the
  same directory cost one cheap read: no event, no transaction, no journal row;
- the log handler's first record after a flush enqueues a flush job; it
  stores the records in the log buffer and posts ``logs_waiting``.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from teg_fsm.adapters.file_watch import FileWatch
from teg_fsm.adapters.gateway_logs import BufferingLogHandler, LogBuffer
from teg_fsm.adapters.mqtt_link import Refused
from teg_fsm.adapters.queue_store import QueueStore
from teg_fsm.engine.effects.mqtt import TELEMETRY_TOPIC
from teg_fsm.engine.effects.uplink import LOGS, SendPacket
from teg_fsm.engine.runner import Completion
from teg_fsm.engine.sqlite_files import is_corruption, quarantine

log = logging.getLogger(__name__)

WATCH_DEBOUNCE_S = 0.05
TRIM_REPORT_S = 60.0
Publish = Callable[[str, bytes, int, Callable[[bool, "str | None"], None]], None]
Post = Callable[[str, dict[str, Any]], None]
Job = Callable[[], None]


class _Ack(NamedTuple):
    """A queue packet's PUBACK whose rows are still to be deleted."""

    source: QueueStore
    generation: int
    packet: Any
    result: dict[str, Any]
    completion: Completion


class UplinkIO:
    """Runs uplink jobs on one thread and watches the controller queue."""

    def __init__(self, store: Callable[[], QueueStore], logs: Callable[[], LogBuffer],
                 handler: BufferingLogHandler, post: Post, coalesce_s: float = 0.0) -> None:
        self._open_store, self._open_logs = store, logs
        self.coalesce_s = coalesce_s
        self.handler = handler
        self._post = post
        self.publish: Publish | None = None
        self.store: QueueStore | None = None
        self.logs: LogBuffer | None = None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._acks: collections.deque[_Ack] = collections.deque()  # paho's thread appends, this one settles
        self._watch: FileWatch | None = None
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._signalled = False  # a wake-up byte is on its way: later submits need not write another
        self._last_trim_report = 0.0
        self._storage_errors = StorageErrorLog()
        handler.wake = lambda: self.submit(self._flush_logs)

    def open(self) -> None:
        self.store = self._open_store()
        self.logs = self._open_logs()

    def start(self) -> None:
        assert self.store is not None
        queue_db = self.store.queue_path
        self._watch = FileWatch(queue_db.parent, (queue_db, Path(f"{queue_db}-wal")), WATCH_DEBOUNCE_S)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, name="teg-uplink-io", daemon=True)
        self._thread.start()
        self.submit(self._flush_logs)

    def stop(self, timeout: float = 5.0) -> None:
        self.submit(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._flush_logs()
        for store in (self.store, self.logs):
            if store is not None:
                store.close()
        if self._thread is None or not self._thread.is_alive():
            self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)
        if self._watch is not None:
            self._watch.close()

    def submit(self, job: Job | None) -> None:
        """Queue a job for the I/O thread (from any thread); None stops the thread."""
        self._jobs.put(job)
        wake = self._wake_w
        if wake is not None and not self._signalled:
            self._signalled = True
            try:
                os.write(wake, b"x")
            except OSError:  # closed by stop() meanwhile: nobody runs jobs any more
                pass

    # -- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        watch, wake = self._watch, self._wake_r
        assert watch is not None and wake is not None
        look_at: float | None = None  # when to look at the queue (a change was seen)
        last_look = float("-inf")
        while True:
            timeout: float | None = None
            waiting = [wake]
            if look_at is not None:  # the watch stays unread until then: a burst is one notice
                timeout = max(0.0, look_at - time.monotonic())
            elif watch.fileno() is not None:
                waiting.append(watch.fileno())  # type: ignore[arg-type]
            else:
                timeout = watch.poll_s
            ready = select.select(waiting, [], [], timeout)[0]
            noticed = watch.fileno() in ready if watch.fileno() is not None else True
            if wake in ready:
                # Read, then clear, then run the queue: a byte written after the read stays for the
                # next select; clearing first could swallow a byte whose flag then stays set, and
                # later jobs would wait with no byte to wake this thread.
                os.read(wake, 4096)
                self._signalled = False
            if not self._run_jobs():
                return
            if look_at is None and noticed and watch.changed():
                look_at = max(time.monotonic() + self.coalesce_s, last_look + WATCH_DEBOUNCE_S)
            if look_at is not None and time.monotonic() >= look_at:
                look_at, last_look = None, time.monotonic()
                self._guarded(self._look)

    def _run_jobs(self) -> bool:
        """Run every queued job; False when the stop marker came."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self._guarded(job)
            if self.store is not None and self.store.trimmed_archive_rows:
                self._guarded(self._report_trims)

    def _guarded(self, job: Job) -> None:
        try:
            job()
        except sqlite3.DatabaseError as exc:
            self._storage_errors.failed(exc)
            if is_corruption(exc):
                self._recover()
            elif _schema_changed(exc) and self.store is not None:
                # A table changed shape under us: reading the shapes again adapts or quarantines.
                self.store.reopen()
                self._post("rows_waiting", {})
        except Exception:
            log.exception("uplink job failed")
        else:
            self._storage_errors.succeeded()

    def _recover(self) -> None:
        """A file went bad under us: quarantine the one that fails a check, reopen."""
        assert self.store is not None
        self.store.close()
        for path in (self.store.queue_path, self.store.archive_path):
            try:
                conn = sqlite3.connect(str(path))
                ok = conn.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok"
                conn.close()
            except sqlite3.DatabaseError as exc:
                ok = not is_corruption(exc)
            if not ok:
                quarantine(path, "failed a quick check after a storage error")
        self.store = self._open_store()

    def _look(self) -> None:
        """The queue file changed: tell the machine only if a row was added (or the file replaced)."""
        if self.store is not None and self.store.has_news():
            self._post("rows_waiting", {})

    def _flush_logs(self) -> None:
        records = self.handler.take()
        if records and self.logs is not None:
            top = self.logs.add(records)
            self._post("logs_waiting", {"top": top})

    def _report_trims(self) -> None:
        store = self.store
        now = time.monotonic()
        if store is None or not store.trimmed_archive_rows or now - self._last_trim_report < TRIM_REPORT_S:
            return
        log.warning("archive cap reached (%d rows / %d bytes): discarded the %d oldest archived rows",
                    store.archive_max_rows, store.archive_max_bytes, store.trimmed_archive_rows)
        store.trimmed_archive_rows = 0
        self._last_trim_report = now

    # -- jobs ----------------------------------------------------------------------

    def send(self, effect: SendPacket, completion: Completion) -> None:
        """Build the next packet of the stream and publish it (runs on this thread)."""
        source = self.logs if effect.stream == LOGS else self.store
        assert source is not None
        generation = getattr(source, "generation", 0)
        packet = source.next_packet(effect.restart, effect.max_payload_bytes, effect.max_points,
                                    effect.points_capacity)
        result = {"rows": packet.rows, "points": packet.points, "bytes": len(packet.payload),
                  "first_id": packet.after_id, "last_id": packet.last_id, "more": packet.more,
                  "top": packet.last_id if packet.more else source.top() if effect.stream == LOGS
                  else self.store.pending_top(),  # type: ignore[union-attr]
                  "needs_points": packet.needs_points, "max_points": effect.max_points}
        if packet.rows == 0:
            if packet.last_id > packet.after_id:  # only dead rows: their range is done
                source.ack(packet.after_id, packet.last_id)
            completion.succeed(result)
            return
        if self.publish is None:
            completion.fail("no MQTT link")
            return

        def on_done(ok: bool, error: str | None) -> None:
            if ok and isinstance(source, QueueStore):
                self._acks.append(_Ack(source, generation, packet, result, completion))
                self.submit(self._settle_acks)
            elif ok:
                self.submit(lambda: self._acked(source, generation, packet, result, completion))
            elif isinstance(error, Refused):
                self.submit(lambda: self._refused(source, generation, packet, result, completion, error))
            else:
                completion.fail(error or "publish failed")

        self.publish(TELEMETRY_TOPIC, packet.payload, 1, on_done)

    def _settle_acks(self) -> None:
        """Delete the rows of every queue PUBACK come so far in one statement, then settle them.

        PUBACKs come in bursts while this thread moves a batch (the packets of the previous
        one were out meanwhile): the first job takes them all, one delete and one commit
        instead of one each; the jobs of the others find nothing left.
        """
        acks: list[_Ack] = []
        while self._acks:
            acks.append(self._acks.popleft())
        failure: Exception | None = None
        for source in {id(a.source): a.source for a in acks}.values():
            group = [a for a in acks if a.source is source]
            # Deleted even when the effect already timed out (the server has the rows); not when
            # the queue file was reopened since: these ids now name other rows (as ``_acked``).
            live = [a for a in group if a.generation == source.generation]
            try:
                if live:
                    source.ack_ranges([(a.packet.after_id, a.packet.last_id) for a in live])
            except Exception as exc:
                failure = failure or exc
                for a in live:
                    a.completion.fail(f"deleting acknowledged rows failed: {exc}")
                group = [a for a in group if a.generation != source.generation]
            for a in group:
                a.completion.succeed(a.result)
        if failure is not None:
            raise failure

    @staticmethod
    def _acked(source: Any, generation: int, packet: Any, result: dict[str, Any], completion: Completion) -> None:
        # Deleted even when the effect already timed out: the server has the rows. Not when
        # the queue file was reopened since: these ids now name other rows (the packet's
        # rows were carried over and go out again: duplicates, never a loss).
        if getattr(source, "generation", 0) != generation:
            completion.succeed(result)
            return
        try:
            source.ack(packet.after_id, packet.last_id)
        except Exception as exc:
            completion.fail(f"deleting acknowledged rows failed: {exc}")
            raise
        completion.succeed(result)


    @staticmethod
    def _refused(source: Any, generation: int, packet: Any, result: dict[str, Any], completion: Completion,
                 error: Refused) -> None:
        """ThingsBoard refused the packet: sending it again gets the same answer, so it leaves pending."""
        if getattr(source, "generation", 0) != generation:  # as in _acked: these ids name other rows now
            completion.fail(str(error), {"refused": error.reason, "result": result})
            return
        if isinstance(source, QueueStore):
            source.refused(packet.after_id, packet.last_id, str(error))
        else:  # the gateway's own log records have no dead letters; the machine logs the drop
            source.ack(packet.after_id, packet.last_id)
        completion.fail(str(error), {"refused": error.reason, "result": result})


def _schema_changed(exc: sqlite3.DatabaseError) -> bool:
    text = str(exc).lower()
    return "no such table" in text or "no such column" in text or "has no column" in text


class StorageErrorLog:
    """Logs a storage error once per kind and minute, and the recovery with a count.

    Why: every log line is itself buffered in the logs database, so on a full disk
    each "storage error" line failed to be stored and logged again (16,141 lines in
    4 s in the fault test): the log must not feed on its own failure.
    """

    REPEAT_S = 60.0

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._last: tuple[str, float] | None = None  # (message, when logged)
        self.failures = 0
        self.unlogged = 0

    def failed(self, exc: sqlite3.DatabaseError) -> None:
        self.failures += 1
        message, now = str(exc), self._monotonic()
        if self._last is not None and self._last[0] == message and now - self._last[1] < self.REPEAT_S:
            self.unlogged += 1
            return
        repeats = f" ({self.unlogged} more like it not logged)" if self.unlogged else ""
        log.error("uplink storage error: %s%s", message, repeats)
        self._last, self.unlogged = (message, now), 0

    def succeeded(self) -> None:
        if self.failures:
            log.warning("uplink storage works again after %d failed jobs", self.failures)
        self._last, self.failures, self.unlogged = None, 0, 0
