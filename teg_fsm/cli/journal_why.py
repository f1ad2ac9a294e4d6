"""``teg journal``'s default format: each event's line, then why it did what it did.

Under the one-line summary (time, event, transitions, effects; ``--brief``
prints only that) come, indented: the event's telling fields, and per
transition the guard that decided (and the rows passed over), what the
machine said (its log lines, reasons), and each effect with its outcome,
found further down the journal by effect id. The words are
``teg_fsm.cli.audit_words``'s, as in ``teg audit``.
"""

from __future__ import annotations

from collections.abc import Sequence

from teg_fsm.cli import audit_words as words
from teg_fsm.cli.audit_story import Step, build
from teg_fsm.cli.journal_lines import journal_line
from teg_fsm.engine.journal import SNAPSHOT, SUMMARY, JournalEntry

INDENT = "    "


_SYSTEM = "system"


def explained(entries: Sequence[JournalEntry]) -> list[str]:
    """One block of lines per entry (the block of an entry this format cannot read is its line only)."""
    from teg_fsm.cli.diagrams import machine_classes

    story = build(entries, classes=machine_classes())
    steps: dict[int, list[Step]] = {}
    issued: dict[str, tuple[int, str]] = {}  # effect id -> (seq, type)
    for machine in story.machines.values():
        for step in machine.steps:
            steps.setdefault(step.seq, []).append(step)
    blocks = []
    for entry in entries:
        if (entry.source, entry.name) in ((_SYSTEM, SNAPSHOT), ("journal", SUMMARY)):
            blocks.append(journal_line(entry))  # its one line already says it all in words
            continue
        try:
            lines = [journal_line(entry)] + [INDENT + line for line in _why(entry, steps.get(entry.seq, []), issued)]
        except (AttributeError, TypeError, KeyError):  # a row of a kind this format does not know
            lines = [f"#{getattr(entry, 'seq', '?')} (a journal row of a kind this version does not read)"]
        blocks.append("\n".join(lines))
    return blocks


def _why(entry: JournalEntry, steps: list[Step], issued: dict[str, tuple[int, str]]) -> list[str]:
    for effect in entry.effects:
        issued[str(effect.get("id", ""))] = (entry.seq, str(effect.get("type", "?")))
    lines = []
    answered = entry.data.get("effect_id") if isinstance(entry.data, dict) else None
    if answered is not None and str(answered) in issued:
        seq, kind = issued[str(answered)]
        lines.append(f"outcome of {answered}: {words.spaced(kind)} (#{seq})")
    said = words.fields(entry.data) if answered is None else ""
    if said:
        lines.append(f"event: {said}")
    for step in steps:
        move = f"{step.source} -> {step.target}" if step.changes_state else f"stays {step.source}"
        lines.append(f"{step.machine}: {move}")
        lines += [INDENT + line for line in words.why_lines(step)]
        lines += [f"{INDENT}said: {reason}" for reason in words.reasons(step)]
        lines += [f"{INDENT}did: {words.effect_and_outcome(e)}" for e in step.effects if e.type != "Log"]
    return lines
