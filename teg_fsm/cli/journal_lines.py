"""How ``teg journal --brief`` and ``teg status`` print a journal row: one line each."""

from __future__ import annotations

from datetime import datetime, timezone

from teg_fsm.engine.journal import SNAPSHOT, SUMMARY, JournalEntry


def format_time(ts_ms: int) -> str:
    """A journal time as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def journal_line(entry: JournalEntry) -> str:
    """One journal row in one line: time, seq, event, moves, effects (or a summary or snapshot in words)."""
    target = f"->{entry.target}" if entry.target else ""
    if entry.name == SUMMARY and entry.source == "journal":
        return f"{format_time(entry.ts_ms)} #{entry.seq} {entry.source}:{entry.name}{target} | {summary_words(entry.data)}"
    if entry.name == SNAPSHOT and entry.source == "system":
        states = ", ".join(f"{name}: {m.get('state')}" for name, m in sorted(entry.data.get("machines", {}).items()))
        return f"{format_time(entry.ts_ms)} #{entry.seq} {entry.source}:{entry.name} | {states or '-'}"
    moves = ", ".join(f"{t['machine']}: {t['source']}->{t['target']}" for t in entry.transitions) or "-"
    effects = ", ".join(f"{e.get('type')}({e.get('id')})" for e in entry.effects) or "-"
    return f"{format_time(entry.ts_ms)} #{entry.seq} {entry.source}:{entry.name}{target} | {moves} | {effects}"


def summary_words(data: dict) -> str:  # type: ignore[type-arg]
    """A traffic summary in a line: the interval, events counted, what moved, and the sequence range."""
    seconds = max(1, round((int(data.get("to_ms", 0)) - int(data.get("from_ms", 0))) / 1000))
    events = ", ".join(f"{n} {name}" for name, n in sorted(data.get("events", {}).items()))
    totals = data.get("totals", {})
    moved = totals.get("transfer_succeeded", {}).get("moved", 0)
    sent = totals.get("data_packet_succeeded", {}).get("rows", 0)
    logs = totals.get("log_packet_succeeded", {}).get("rows", 0)
    sent_bytes = sum(t.get("bytes", 0) for t in totals.values())
    moves = ", ".join(f"{n}x {move}" for move, n in sorted(data.get("moves", {}).items()))
    rate = sent / max(1, int(data.get("interval_s", 60)))
    return (f"summary of {seconds} s: {events}; rows moved {moved}, sent {sent} ({rate:.2f}/s), log records "
            f"{logs}, {sent_bytes} bytes" + (f"; moves: {moves}" if moves else "")
            + f"; events #{data.get('first_seq')}..#{data.get('last_seq')}")
