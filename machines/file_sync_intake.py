"""File sync's plan intake: how each event it takes updates the plan.

``FileSyncMachine`` (``machines/file_sync.py``) holds the table, the guards
and the step entries. Every transition there runs ``take_in`` as a validator,
so an event reaches the plan before any guard asks it what is next; the
rest of this module is what each event means for the plan and for the
reported hashes. A plain mixin: python-statemachine finds ``take_in`` by name
on the machine, inherited or not. Pure, like the machine: it updates the
machine's data and emits Log and Notify, nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from teg_fsm.machines import file_sync_rules as support
from teg_fsm.machines.file_sync_rules import OUTCOMES, REPLIES, content_key
from teg_fsm.engine.effects import Log, Notify
from teg_fsm.engine.effects.files import NO_FILE, ContentError, parse_definitions, parse_hashes
from teg_fsm.engine.events import Event

if TYPE_CHECKING:
    from teg_fsm.machines.file_sync_rules import Plan
    from teg_fsm.engine.effects import Effect


class FileSyncIntake:
    """Takes events into ``FileSyncMachine``'s plan, definitions and hashes."""

    # What FileSyncMachine provides (GatewayMachine, setup()'s data), declared for type
    # checkers only: defined at run time they would shadow GatewayMachine's (MRO order).
    if TYPE_CHECKING:
        definitions: dict[str, dict[str, Any]]
        recorded: dict[str, dict[str, Any]]
        local: dict[str, str]
        plan: Plan
        logged: dict[str, str]
        _taken: Event | None

        @property
        def state_name(self) -> str: ...
        def emit(self, *effects: Effect) -> None: ...
        def mark_dirty(self) -> None: ...

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
        elif name == "check_due":
            self.plan.scan = self.state_name == "in_sync" or self.plan.scan
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
        return support.drifted(self.local[key], self.recorded.get(key) or {}, self.definitions[key]["write_version"])

    def _took_fetch(self, result: dict[str, Any] | None, error: str) -> None:
        keys, self.plan.fetching = self.plan.fetching, []
        if result is None:
            self._log("WARNING", "*", f"fetching file contents failed: {error}")
            return
        shared = result.get("shared") or {}
        for key in keys:
            if key not in self.definitions or key not in self.local:
                continue
            if support.CONTENT_PREFIX + key in shared:
                self._take_content(key, shared[support.CONTENT_PREFIX + key])
            else:  # no content attribute: the file is mirrored read-only
                self._record(key, self.local[key])

    def _take_content(self, key: str, value: Any) -> None:
        d = self.definitions.get(key)
        if d is None:
            self._log("WARNING", key, f"{support.CONTENT_PREFIX}{key} has no definition in FILES; ignored")
            return
        try:
            digest = support.digest(d["encoding"], value)
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
            problem = support.mirror_problem(key, status)
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
        message = support.capped(message)
        if self.logged.get(key) == message:
            return
        self.logged[key] = message
        self.emit(Log(level=level, message=message))
