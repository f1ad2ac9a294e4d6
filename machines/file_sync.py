"""File sync: keeps the files an operator manages from ThingsBoard in step with it.

ThingsBoard holds the desired state in shared attributes: ``FILES`` (``{key:
{path, encoding, write_version?, create_if_not_exist?, restart_controller_on_change?}}``)
and ``FILE_CONTENT_<key>``. The gateway reports ``FILE_HASHES`` (``{key: {hash,
write_version}}``) and mirrors every file into ``FILE_READ_<key>``. A file with no
``FILE_CONTENT_`` attribute is only mirrored (read-only).

Theory of operation
-------------------
Work is a pipeline of steps, one effect each: requesting (FILES and FILE_HASHES)
-> scanning (md5 of every file) -> fetching (the ``FILE_CONTENT_`` of the files that
need it) -> writing (one file at a time) -> mirroring -> reporting (FILE_HASHES) ->
in_sync. Every event first updates the *plan*, what is still to do
(``take_in``, a validator on every transition, so it runs before the guards);
then the machine moves to the first step, in pipeline order, that the plan
needs (the guards ask the plan). Events that arrive while a step runs only
update the plan, so nothing is lost and one effect at most is in flight.

Work is planned: after each (re)connect and on ``init_files_requested`` a full
pass (all contents fetched, every file mirrored, FILE_HASHES reported;
init_files also rewrites identical files); every ``check_interval_s`` while
FILES defines a file, and on a new FILES, a scan, fetching content for the files whose hash differs from the
reported one (changed on disk, missing), whose write_version differs or whose
definition changed; a pushed ``FILE_CONTENT_<key>`` is written at once. Content
is validated here (bad content changes nothing on disk) and compared with the
scanned hash, so a WriteFile, which carries the content into the journal, is
issued only for a real change. ``restart_controller_on_change`` notifies the
controller once per write that changed a file.

Events: shared_attributes_received, shared_attributes_updated,
init_files_requested, check_due (timer), resumed; the outcomes of request, scan,
fetch, write, mirror and report.
Effects: RequestAttributes, ScanFiles, WriteFile, MirrorFiles, Publish
(FILE_HASHES), StartTimer, Notify(controller, restart_requested), Log.
Persists the definitions and the reported hashes. Every step resumes in in_sync
(the next connect runs a full pass; writes are atomic, so a crash mid-step
leaves nothing half-done); a pass that crashed the gateway more than
``max_resumes`` times in a row resumes in ``suspended``, which waits for
init_files_requested.
"""

from __future__ import annotations

from typing import Any

from statemachine import State

from teg_fsm.engine.effects import Log, Notify, StartTimer
from teg_fsm.engine.effects.files import NO_FILE, ContentError, parse_definitions, parse_hashes
from teg_fsm.engine.events import Event
from teg_fsm.engine.machine import GatewayMachine
from teg_fsm.machines import file_sync_rules as rules
from teg_fsm.machines.file_sync_rules import NEWS, OUTCOMES, REPLIES, FileSyncSettings, Plan, content_key, onward

__all__ = ["FileSyncMachine", "FileSyncSettings", "Plan"]


class FileSyncMachine(GatewayMachine):
    """Reconciles managed files with ThingsBoard's FILES / FILE_CONTENT_ attributes.

    The table, then its data, guards and actions: ``take_in`` (what each event
    means for the plan), the bookkeeping of reported hashes, and the step entries
    that issue the effects. ``Plan``, the settings and the effect builders are in
    ``machines/file_sync_rules.py``.
    """

    machine_name = "file_sync"
    settings_type = FileSyncSettings
    resume_table = {
        "idle": "idle",
        "requesting": "in_sync",
        "scanning": "in_sync",
        "fetching": "in_sync",
        "writing": "in_sync",
        "mirroring": "in_sync",
        "reporting": "in_sync",
        "in_sync": "in_sync",
        "suspended": "suspended",
    }
    rest_states = frozenset({"idle", "in_sync", "suspended"})
    crash_loop_state = "suspended"
    max_resumes = 3
    # ``suspended`` has no incoming transition: only the engine's loop guard
    # enters it (crash_loop_state), so the reachability check cannot see it.
    validate_disconnected_states = False

    idle = State(initial=True)  # no definitions yet: waits for the first connect
    requesting = State()
    scanning = State()
    fetching = State()
    writing = State()
    mirroring = State()
    reporting = State()
    in_sync = State()
    suspended = State()  # crash loop: waits for init_files_requested

    # The pipeline, in order; each step's guard asks whether the plan needs it.
    _steps = [
        (requesting, "wants_definitions"),
        (scanning, "wants_scan"),
        (fetching, "has_fetches"),
        (writing, "has_writes"),
        (mirroring, "has_mirrors"),
        (reporting, "has_report"),
    ]
    # News (a connect, a push, init_files, the check timer) at rest starts the pipeline ...
    onward(idle, _steps, idle, NEWS)
    onward(in_sync, _steps, in_sync, NEWS)
    # ... and while a step runs it only updates the plan.
    for _busy in (requesting, scanning, fetching, writing, mirroring, reporting):
        _busy.to.itself(internal=True, event=NEWS, validators="take_in")
    # Every outcome (succeeded, failed, timed_out, cancelled) of a step moves on
    # the same way: what failed was logged and dropped from the plan by take_in.
    onward(requesting, _steps, in_sync, "request")
    onward(scanning, _steps, in_sync, "scan")
    onward(fetching, _steps, in_sync, "fetch")
    onward(writing, _steps, in_sync, "write")
    onward(mirroring, _steps, in_sync, "mirror")
    onward(reporting, _steps, in_sync, "report")
    suspended.to(requesting, event="init_files_requested", validators="take_in")
    resumed = idle.to.itself(internal=True) | in_sync.to.itself(internal=True) | suspended.to.itself(internal=True)
    del _steps, _busy

    # -- data -----------------------------------------------------------------

    def setup(self) -> None:
        self.definitions: dict[str, dict[str, Any]] = {}
        self.recorded: dict[str, dict[str, Any]] = {}  # FILE_HASHES as last reported
        self.local: dict[str, str] = {}  # key -> md5 or E_NOFILE, from the last scan or write
        self.plan = Plan()
        self.logged: dict[str, str] = {}  # key -> last error logged, so a retry does not repeat it
        self._taken: Event | None = None

    # -- guards: what does the plan need next? ---------------------------

    def wants_definitions(self) -> bool:
        """The plan wants a full pass: request the file definitions (shared attributes) first."""
        return self.plan.full

    def wants_scan(self) -> bool:
        """The plan wants the managed files hashed on disk."""
        return self.plan.scan

    def has_fetches(self) -> bool:
        """The plan has file contents to request from ThingsBoard."""
        return bool(self.plan.fetch)

    def has_writes(self) -> bool:
        """The plan has received file contents waiting to be written."""
        return bool(self.plan.writes)

    def has_mirrors(self) -> bool:
        """The plan has files to mirror into the controller's directory."""
        return bool(self.plan.mirror)

    def has_report(self) -> bool:
        """The plan has FILE_HASHES to report to ThingsBoard."""
        return self.plan.report

    # -- taking events into the plan (before the transition is chosen) ---

    def take_in(self, ev: Event) -> None:
        """Validator on every transition, so it runs before the guards: takes ``ev`` into the plan, once."""
        if self._taken is ev:  # the next candidate transition of the same event
            return
        self._taken = ev
        name, data = ev.name, ev.data
        reply, _, outcome = name.partition("_")
        if name in ("shared_attributes_received", "init_files_requested"):
            self.plan.full = True
            self.plan.force = self.plan.force or name == "init_files_requested"
        elif name == "shared_attributes_updated":
            self._take_push(data.get("values") or {}, data.get("deleted") or [])
        elif name == "check_due":  # a timer armed before FILES emptied: nothing to check
            self.plan.scan = (self.state_name == "in_sync" and bool(self.definitions)) or self.plan.scan
        elif reply in REPLIES and outcome in OUTCOMES:
            ok = outcome == "succeeded"
            result = (data.get("result") or {}) if ok else None
            getattr(self, f"_took_{reply}")(result, data.get("error") or outcome.replace("_", " "))
        self.mark_dirty()

    def _take_push(self, values: dict[str, Any], deleted: list[str]) -> None:
        if "FILES" in values or "FILES" in deleted:
            self.logged.clear()  # new definitions: report their problems afresh
        if "FILES" in deleted:
            self._set_definitions({})
        elif "FILES" in values:
            self._set_definitions(values["FILES"])
        for name, value in values.items():
            key = content_key(name)
            if key is not None:
                self.logged.pop(key, None)
                self._take_content(key, value)
        for name in deleted:
            key = content_key(name)
            if key in self.definitions:  # from now on read-only: mirror what is there
                self.plan.writes.pop(key, None)
                self.plan.mirror.add(key)

    def _set_definitions(self, raw: Any) -> None:
        found, errors = parse_definitions(raw)
        for key, reason in errors.items():
            self._log("ERROR", key, f"file {key}: invalid definition, ignored: {reason}")
        changed = {k for k in found if self.definitions.get(k) != found[k]}
        for key in set(self.definitions) - set(found):  # no longer managed
            self.recorded.pop(key, None)
            self.local.pop(key, None)
            self.plan.forget(key)
            self.plan.report = True
        self.definitions = found
        self.plan.changed |= changed
        self.plan.scan = self.plan.scan or bool(changed)

    def _took_request(self, result: dict[str, Any] | None, error: str) -> None:
        if result is None:
            self.plan.in_full = False
            self._log("WARNING", "*", f"requesting FILES and FILE_HASHES failed: {error}")
            return
        for key, entry in parse_hashes((result.get("client") or {}).get("FILE_HASHES")).items():
            self.recorded.setdefault(key, entry)  # our own record wins: it is newer
        self._set_definitions((result.get("shared") or {}).get("FILES", {}))
        self.plan.scan = True

    def _took_scan(self, result: dict[str, Any] | None, error: str) -> None:
        if result is None:
            self._log("ERROR", "*", f"scanning the managed files failed: {error}")
            return
        for key, found in result.items():
            if key not in self.definitions:
                continue
            if "error" in found:
                self._refused(key, found["error"])
                continue
            self.local[key] = found["hash"]
            if self.plan.in_full or key in self.plan.changed or self._drifted(key):
                self.plan.fetch.add(key)
        self.plan.changed.clear()
        if self.plan.in_full:
            self.plan.mirror |= set(self.local)
            self.plan.report = True

    def _refused(self, key: str, reason: str) -> None:
        self.local.pop(key, None)
        self.plan.forget(key)
        self.plan.report = self.plan.report or self.recorded.pop(key, None) is not None
        self._log("ERROR", key, f"file {key}: refused: {reason}")

    def _drifted(self, key: str) -> bool:
        return rules.drifted(self.local[key], self.recorded.get(key) or {}, self.definitions[key]["write_version"])

    def _took_fetch(self, result: dict[str, Any] | None, error: str) -> None:
        keys, self.plan.fetching = self.plan.fetching, []
        if result is None:
            self._log("WARNING", "*", f"fetching file contents failed: {error}")
            return
        shared = result.get("shared") or {}
        for key in keys:
            if key not in self.definitions or key not in self.local:
                continue
            if rules.CONTENT_PREFIX + key in shared:
                self._take_content(key, shared[rules.CONTENT_PREFIX + key])
            else:  # no content attribute: the file is mirrored read-only
                self._record(key, self.local[key])

    def _take_content(self, key: str, value: Any) -> None:
        d = self.definitions.get(key)
        if d is None:
            self._log("WARNING", key, f"{rules.CONTENT_PREFIX}{key} has no definition in FILES; ignored")
            return
        try:
            digest = rules.digest(d["encoding"], value)
        except ContentError as exc:
            self._log("ERROR", key, f"file {key}: content rejected, nothing written: {exc}")
            return
        local = self.local.get(key)
        if local == NO_FILE and not d["create"]:
            self._log("WARNING", key, f"file {key}: missing and create_if_not_exist is false; not created")
            self._record(key, NO_FILE)
        elif digest == local and not self.plan.force:
            self._record(key, local)  # already in place; the write_version is now applied too
        else:
            self.plan.writes[key] = value

    def _took_write(self, result: dict[str, Any] | None, error: str) -> None:
        key, self.plan.writing = self.plan.writing, None
        if key is None or key not in self.definitions:
            return
        if result is None or not isinstance(result.get("hash"), str):
            self._log("ERROR", key, f"file {key}: write failed, file unchanged: {error}")
            return
        self.local[key] = result["hash"]
        self._record(key, result["hash"], mirror=bool(result.get("changed")))
        self.logged.pop(key, None)
        if result.get("changed") and self.definitions[key]["restart"]:
            self.emit(Notify(machine="controller", name="restart_requested", data={"reason": f"file {key} changed"}))

    def _took_mirror(self, result: dict[str, Any] | None, error: str) -> None:
        if result is None:
            self._log("WARNING", "*", f"mirroring files failed: {error}")
            return
        for key, status in sorted(result.items()):
            problem = rules.mirror_problem(key, status)
            if problem is not None:
                self._log("ERROR", key, problem)

    def _took_report(self, result: dict[str, Any] | None, error: str) -> None:
        if result is None:  # the next connect reports again: every full pass does
            self._log("WARNING", "*", f"publishing FILE_HASHES failed: {error}")

    # -- bookkeeping ------------------------------------------------------

    def _record(self, key: str, digest: str, mirror: bool = False) -> None:
        entry = {"hash": digest, "write_version": self.definitions[key]["write_version"]}
        if self.recorded.get(key) != entry or mirror:
            self.plan.mirror.add(key)
            self.plan.report = True
        self.recorded[key] = entry

    def _log(self, level: str, key: str, message: str) -> None:
        """Report to the gateway log (forwarded to ThingsBoard); a repeat of the last message for a key is dropped."""
        message = rules.capped(message)
        if self.logged.get(key) == message:
            return
        self.logged[key] = message
        self.emit(Log(level=level, message=message))

    # -- entering a step issues its effect -------------------------------

    def on_enter_requesting(self) -> None:
        self.plan.full, self.plan.in_full = False, True
        self.emit(rules.request_definitions(self.settings))

    def on_enter_scanning(self) -> None:
        self.plan.scan = False
        self.emit(rules.scan(self.definitions))

    def on_enter_fetching(self) -> None:
        self.plan.fetching, self.plan.fetch = sorted(self.plan.fetch), set()
        self.emit(rules.fetch(self.plan.fetching, self.settings))

    def on_enter_writing(self) -> None:
        key = next(iter(self.plan.writes))
        content = self.plan.writes.pop(key)
        self.plan.writing = key
        self.emit(rules.write(key, self.definitions[key], content, self.plan.force, self.settings))

    def on_enter_mirroring(self) -> None:
        keys, self.plan.mirror = sorted(k for k in self.plan.mirror if k in self.definitions), set()
        self.emit(rules.mirror(keys, self.definitions))

    def on_enter_reporting(self) -> None:
        self.plan.report = False
        self.emit(rules.report(rules.hashes_attribute(self.recorded, self.definitions), self.settings))

    def on_enter_in_sync(self) -> None:
        self.plan.in_full = self.plan.force = False
        self._arm_check()

    def on_resumed(self, ev: Event) -> None:
        if self.state_name == "in_sync":
            self._arm_check()
        elif self.state_name == "suspended" and ev.data.get("crash_loop"):
            self._log("ERROR", "*", "file sync suspended after repeated crashes mid-pass; send init_files to resume")

    def _arm_check(self) -> None:
        # With no managed file a check hashes nothing; at rest it was half the gateway's
        # wake-ups and two thirds of its journal growth. A new FILES scans and arms it.
        if self.definitions:
            self.emit(StartTimer(name="check_due", seconds=self.settings.check_interval_s))

    # -- resume data --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"definitions": self.definitions, "recorded": self.recorded}

    def restore(self, data: Any) -> None:
        self.definitions = dict(data.get("definitions") or {})
        self.recorded = dict(data.get("recorded") or {})
