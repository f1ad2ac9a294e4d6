"""``teg audit --html FILE``: one self-contained HTML page of what the machines did in a window.

The page has no script and loads nothing: CSS and SVG are inline, so it can
be mailed, archived and opened offline. At the top: the window, every
machine's states on one time axis, and the moments worth a look (failures,
rollbacks, restarts, warnings). Per machine: its states over time, its
diagram with the transitions taken highlighted and counted
(``teg_fsm.cli.audit_diagram``), and each transition with the event, the
guard that decided and the effects with their outcomes, in words
(``teg_fsm.cli.audit_words``).

Everything that comes from the journal is outside input and passes through
``html.escape`` (``_e``) on its way into the page, in text and in attributes;
the diagrams are drawn from the machine classes and carry only counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from string import Template

from teg_fsm.cli import audit_words as words
from teg_fsm.cli.audit_story import EffectStep, MachineStory, Segment, Step, Story

MAX_ROWS = 400  # transitions listed per machine; the rest are counted
MAX_HIGHLIGHTS = 40
TIMELINE_W = 1000  # viewBox units; the SVG scales to the page
LABEL_W = 120
ROW_H = 24
MIN_SEGMENT = 2.0  # narrower state spans are drawn together as "busy"

_BAD = ("fail", "unhealthy", "unreachable", "rolling_back", "reject", "error", "dead", "crash", "lost", "degraded")
_WAIT = ("backoff", "offline", "awaiting", "probation", "wait", "retry", "paused", "stopped", "limited", "held")
_GOOD = ("running", "online", "committed", "idle", "in_sync", "stable", "provisioned", "serving", "normal", "ready")
_PALETTES = {
    "bad": ("#e03131", "#c2255c", "#f03e3e"),
    "wait": ("#f59f00", "#fab005", "#e8590c"),
    "good": ("#2f9e44", "#37b24d", "#0ca678", "#66a80f"),
    "busy": ("#1c7ed6", "#4263eb", "#7048e8", "#1098ad", "#3b5bdb", "#ae3ec9"),
}

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #212529;
       margin: 0 auto; padding: 16px 24px 48px; max-width: 1400px; background: #f8f9fa; }
h1 { font-size: 22px; margin: 4px 0 2px; } h2 { font-size: 19px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #495057; }
.facts { color: #495057; margin: 0 0 12px; } .facts b { color: #212529; }
section, .panel { background: #fff; border: 1px solid #dee2e6; border-radius: 8px; padding: 14px 18px; margin: 14px 0; }
svg.timeline { width: 100%; height: auto; display: block; }
svg.timeline text { font: 11px system-ui, Helvetica, Arial, sans-serif; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 6px 0 0; font-size: 12px; color: #495057; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.diagram { overflow-x: auto; } .diagram svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th { text-align: left; color: #495057; font-weight: 600; border-bottom: 2px solid #dee2e6; padding: 4px 6px; }
td { vertical-align: top; border-bottom: 1px solid #f1f3f5; padding: 5px 6px; overflow-wrap: anywhere; }
td.when { white-space: nowrap; color: #495057; font-variant-numeric: tabular-nums; }
.seq { color: #868e96; font-size: 12px; } .move { font-weight: 600; }
.said { color: #343a40; } .src { color: #868e96; font-size: 12px; }
ul { margin: 0; padding-left: 16px; } li { margin: 1px 0; }
.ok { color: #2b8a3e; } .bad { color: #c92a2a; } .pending { color: #e67700; } .quiet { color: #868e96; }
tr.alarm td:first-child { border-left: 3px solid #e03131; }
.highlights li { margin: 3px 0; } .highlights .when { color: #495057; font-variant-numeric: tabular-nums; }
.chip { display: inline-block; padding: 0 6px; border-radius: 9px; color: #fff; font-size: 12px; }
nav a { margin-right: 12px; } .note { color: #868e96; font-size: 12px; }
</style>
</head>
<body>
$body
</body>
</html>
""")


def _e(text: object) -> str:
    """Escape for text and attribute values alike; a lone surrogate (JSON can carry
    one, UTF-8 cannot) becomes U+FFFD so the page can always be written."""
    return escape(_storable(str(text)), quote=True)


def _storable(text: str) -> str:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def render(story: Story, *, source: str, diagram: Callable[[MachineStory], str | None] | None = None) -> str:
    """The page. ``diagram`` draws a machine's highlighted SVG (None: no diagrams)."""
    parts = [_header(story, source), _overview(story), _highlights(story)]
    parts += [_machine_section(machine, story, diagram) for machine in _by_interest(story)]
    title = f"TEG-FSM audit {_day_time(story.since_ms)} to {_day_time(story.until_ms)}"
    return _PAGE.substitute(title=_e(title), body="\n".join(p for p in parts if p))


def _by_interest(story: Story) -> list[MachineStory]:
    """Machines with the most worth a look first, then the busiest; the overview keeps name order."""
    def interest(machine: MachineStory) -> tuple[int, int, str]:
        changes = sum(1 for s in machine.steps if s.changes_state)
        return -sum(1 for s in machine.steps if notable(s)), -changes, machine.name

    return sorted(story.machines.values(), key=interest)


# -- header, overview, highlights -------------------------------------------


def _header(story: Story, source: str) -> str:
    changes = sum(1 for m in story.machines.values() for s in m.steps if s.changes_state)
    facts = [
        f"window <b>{_e(_day_time(story.since_ms))}</b> to <b>{_e(_day_time(story.until_ms))}</b> UTC "
        f"({_e(words.duration((story.until_ms - story.since_ms) / 1000))})",
        f"journal <b>{_e(source)}</b>",
        f"<b>{story.entries}</b> events, <b>{changes}</b> state changes, "
        f"<b>{len(story.starts)}</b> gateway start(s)",
    ]
    if story.skipped:
        kinds = ", ".join(f"{_e(kind)}: {count}" for kind, count in sorted(story.skipped.items()))
        facts.append(f"rows of kinds this report does not know, skipped: {kinds}")
    if story.stopped_reading:
        facts.append(f'<span class="bad">reading stopped early: {_e(words.value(story.stopped_reading))}</span>')
    nav = " ".join(f'<a href="#m-{_e(m.name)}">{_e(m.name)}</a>' for m in _by_interest(story))
    return (f"<h1>What the gateway's machines did</h1>\n<p class=\"facts\">{' &middot; '.join(facts)}</p>\n"
            f"<nav>{nav}</nav>")


def _overview(story: Story) -> str:
    if not story.machines:
        return '<div class="panel"><p>No machine moved in this window.</p></div>'
    rows = [(m.name, m.segments) for m in story.machines.values()]
    return (f'<div class="panel"><h2>States over time</h2>{_timeline(rows, story)}'
            f"{_legend(m.segments for m in story.machines.values())}</div>")


def notable(step: Step) -> bool:
    """Worth a line at the top: failures, rollbacks, restarts, errors and warnings."""
    if step.error or any(_kind(s) == "bad" for s in (step.target,) if step.changes_state):
        return True
    if "restart" in step.event or "rolling" in step.target or "rolled" in step.target:
        return step.changes_state
    if step.event.endswith(("_failed", "_timed_out")) and step.changes_state:
        return True  # the failure itself, not the step whose effect it answers
    return any(e.type == "Log" and e.fields.get("level") in ("warning", "error", "critical") for e in step.effects)


def _highlights(story: Story) -> str:
    steps = sorted((s for m in story.machines.values() for s in m.steps if notable(s)), key=lambda s: (s.ts_ms, s.seq))
    if not steps:
        return '<div class="panel"><h2>Worth a look</h2><p>Nothing failed, restarted or warned in this window.</p></div>'
    items = [
        f'<li><span class="when">{_e(_time(s.ts_ms))}</span> '
        f'<a href="#s-{_e(s.machine)}-{s.seq}">{_e(words.headline(s))}</a></li>'
        for s in steps[:MAX_HIGHLIGHTS]
    ]
    more = f'<p class="note">and {len(steps) - MAX_HIGHLIGHTS} more below</p>' if len(steps) > MAX_HIGHLIGHTS else ""
    return f'<div class="panel highlights"><h2>Worth a look</h2><ul>{"".join(items)}</ul>{more}</div>'


# -- one machine -----------------------------------------------------------------


def _machine_section(machine: MachineStory, story: Story,
                     diagram: Callable[[MachineStory], str | None] | None) -> str:
    changes = sum(1 for s in machine.steps if s.changes_state)
    cls = f" &middot; class <code>{_e(machine.class_path)}</code>" if machine.class_path else ""
    facts = (f"{changes} state change(s), {len(machine.steps) - changes} stay(s); "
             f"from <b>{_e(machine.state_at_start or '?')}</b> to <b>{_e(machine.state_at_end or '?')}</b>{cls}")
    parts = [f'<section id="m-{_e(machine.name)}"><h2>{_e(machine.name)}</h2><p class="facts">{facts}</p>',
             _timeline([(machine.name, machine.segments)], story), _legend([machine.segments])]
    if diagram is not None and machine.cls is not None:
        svg = diagram(machine)
        parts.append("<h3>Diagram: transitions taken in the window</h3>")
        parts.append(f'<div class="diagram">{svg}</div>' if svg else
                     '<p class="note">No diagram: graphviz <code>dot</code> is not installed or failed.</p>')
    parts.append(_steps_table(machine))
    return "\n".join(parts) + "</section>"


def _listed(step: Step) -> bool:
    """Bookkeeping stays (internal, nothing said, nothing failed) are counted, not listed."""
    return step.changes_state or not step.internal or not step.declared or notable(step)


def _steps_table(machine: MachineStory) -> str:
    listed = [s for s in machine.steps if _listed(s)]
    folded: dict[str, int] = {}
    for step in machine.steps:
        if not _listed(step):
            folded[step.event] = folded.get(step.event, 0) + 1
    rows = "".join(_step_row(s) for s in listed[:MAX_ROWS])
    notes = []
    if len(listed) > MAX_ROWS:
        notes.append(f"{len(listed) - MAX_ROWS} more transition(s) not listed: narrow the window with --since/--until.")
    if folded:
        counted = ", ".join(f"{_e(event)} &times;{count}" for event, count in sorted(folded.items(), key=lambda i: -i[1]))
        notes.append(f"Bookkeeping stays (internal, nothing failed or said), counted only: {counted}.")
    note = "".join(f'<p class="note">{n}</p>' for n in notes)
    if not listed:
        return f"<h3>Transitions</h3><p>None in this window.</p>{note}"
    head = "<tr><th>When</th><th>What happened</th><th>Why: event and guard</th><th>Effects and their outcomes</th></tr>"
    return f"<h3>Transitions</h3><table>{head}{rows}</table>{note}"


def _step_row(step: Step) -> str:
    said = words.reasons(step)
    move = f"{_e(step.source)} &rarr; {_e(step.target)}" if step.changes_state else f"stays {_e(step.source)}"
    what = f'<div class="move">{move}</div>'
    what += "".join(f'<div class="said">{_e(s)}</div>' for s in said)
    why = [f'{_e(words.event_words(step))} <span class="src">from {_e(step.event_source)}</span>']
    why += [_e(line) for line in words.why_lines(step)]
    effects = [_effect_item(e) for e in step.effects] or ['<li class="quiet">none</li>']
    alarm = ' class="alarm"' if notable(step) else ""
    return (f'<tr id="s-{_e(step.machine)}-{step.seq}"{alarm}><td class="when">{_e(_time(step.ts_ms))}<br>'
            f'<span class="seq">#{step.seq}</span></td><td>{what}</td>'
            f'<td><ul>{"".join(f"<li>{w}</li>" for w in why)}</ul></td><td><ul>{"".join(effects)}</ul></td></tr>')


def _effect_item(effect: EffectStep) -> str:
    outcome = effect.outcome
    if outcome is None:
        css = "pending" if effect.awaits_reply else "quiet"
    else:
        css = "ok" if outcome.kind == "succeeded" else "bad" if outcome.kind in ("failed", "timed_out") else "pending"
    return (f'<li>{_e(words.effect_words(effect))} <span class="{css}">&rarr; '
            f"{_e(words.outcome_words(outcome, effect.awaits_reply))}</span></li>")


# -- timelines -------------------------------------------------------------------


def _kind(state: str) -> str:
    for kind, keys in (("bad", _BAD), ("wait", _WAIT), ("good", _GOOD)):
        if any(key in state for key in keys):
            return kind
    return "busy"


def color(state: str) -> str:
    """A stable colour per state name: red for failures, amber for waiting, green for resting, blue for work."""
    palette = _PALETTES[_kind(state)]
    return palette[int(hashlib.sha1(state.encode("utf-8", "surrogatepass")).hexdigest(), 16) % len(palette)]


def _timeline(rows: list[tuple[str, list[Segment]]], story: Story) -> str:
    span = max(story.until_ms - story.since_ms, 1)
    width = TIMELINE_W - LABEL_W
    height = ROW_H * len(rows) + 22

    def x(ts: int) -> float:
        return LABEL_W + width * min(max(ts - story.since_ms, 0), span) / span

    parts = [f'<svg class="timeline" viewBox="0 0 {TIMELINE_W} {height}" role="img" '
             f'xmlns="http://www.w3.org/2000/svg" aria-label="states over time">']
    for index, (name, segments) in enumerate(rows):
        y = index * ROW_H + 2
        parts.append(f'<text x="{LABEL_W - 6}" y="{y + ROW_H / 2 + 2:.0f}" text-anchor="end">{_e(name)}</text>')
        parts.append(f'<rect x="{LABEL_W}" y="{y}" width="{width}" height="{ROW_H - 6}" fill="#f1f3f5"/>')
        parts += [_bar(group, x, y) for group in _groups(segments, x)]
    for start in story.starts:
        parts.append(f'<line x1="{x(start):.1f}" x2="{x(start):.1f}" y1="0" y2="{height - 20}" stroke="#495057" '
                     f'stroke-dasharray="3 2"><title>gateway started {_e(_time(start))}</title></line>')
    for i in range(5):
        ts = story.since_ms + span * i // 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        label = _day_time(ts)[5:16] if span > 20 * 3600 * 1000 else _time(ts)
        parts.append(f'<text x="{x(ts):.1f}" y="{height - 6}" text-anchor="{anchor}" fill="#495057">'
                     f"{_e(label)}</text>")
    return "".join(parts) + "</svg>"


def _groups(segments: list[Segment], x: Callable[[int], float]) -> list[list[Segment]]:
    """Consecutive spans too narrow to see are drawn as one "busy" span."""
    groups: list[list[Segment]] = []
    for segment in segments:
        narrow = x(segment.end_ms) - x(segment.start_ms) < MIN_SEGMENT
        if narrow and groups and _narrow(groups[-1], x):
            groups[-1].append(segment)
        else:
            groups.append([segment])
    return groups


def _narrow(group: list[Segment], x: Callable[[int], float]) -> bool:
    return x(group[-1].end_ms) - x(group[-1].start_ms) < MIN_SEGMENT


def _bar(group: list[Segment], x: Callable[[int], float], y: int) -> str:
    start, end = x(group[0].start_ms), x(group[-1].end_ms)
    width = max(end - start, 1.0)
    if len(group) > 1:
        states = ", ".join(dict.fromkeys(s.state for s in group))
        title = f"{len(group)} short spans ({states}) {_time(group[0].start_ms)} to {_time(group[-1].end_ms)}"
        return (f'<rect x="{start:.1f}" y="{y}" width="{width:.1f}" height="{ROW_H - 6}" fill="#868e96">'
                f"<title>{_e(title)}</title></rect>")
    segment = group[0]
    length = words.duration((segment.end_ms - segment.start_ms) / 1000)
    title = f"{segment.state}: {_time(segment.start_ms)} to {_time(segment.end_ms)} ({length})"
    rect = (f'<rect x="{start:.1f}" y="{y}" width="{width:.1f}" height="{ROW_H - 6}" fill="{color(segment.state)}">'
            f"<title>{_e(title)}</title></rect>")
    if width > 7 * len(segment.state) + 6:
        rect += (f'<text x="{start + 4:.1f}" y="{y + ROW_H / 2 + 1:.0f}" fill="#fff" pointer-events="none">'
                 f"{_e(segment.state)}</text>")
    return rect


def _legend(segment_lists: Iterable[list[Segment]]) -> str:
    states = dict.fromkeys(s.state for segments in segment_lists for s in segments)
    items = "".join(f'<span><i style="background:{color(s)}"></i>{_e(s)}</span>' for s in states)
    return f'<div class="legend">{items}<span><i style="background:#868e96"></i>many short spans</span></div>'


# -- the command ---------------------------------------------------------------------


def page(journal: Path, *, since_ms: int | None = None, until_ms: int | None = None,
         machine: str | None = None, diagrams: bool = True, shown: str | None = None) -> str:
    """The report of ``journal`` (``.db`` or ``.jsonl``) for the window, as one HTML page.

    ``shown`` is how the page names the journal (default: the path as given).
    """
    from teg_fsm.cli.audit_diagram import highlighted_svg
    from teg_fsm.cli.audit_story import build
    from teg_fsm.cli.diagrams import machine_classes
    from teg_fsm.engine.journal import read_entries

    # Read from the journal's start (up to the window's end): earlier transitions say
    # which state each machine was in when the window opened.
    story = build(read_entries(journal, until_ms=until_ms), since_ms=since_ms, until_ms=until_ms,
                  machine=machine, classes=machine_classes())

    def diagram(m: MachineStory) -> str | None:
        assert m.cls is not None
        return highlighted_svg(m.cls, m.counts(), {s.state for s in m.segments}, m.state_at_end)

    return render(story, source=shown or str(journal), diagram=diagram if diagrams else None)


# -- time -----------------------------------------------------------------------------


def _time(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _day_time(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
