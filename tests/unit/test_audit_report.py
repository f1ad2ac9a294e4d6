"""``teg audit`` and ``teg journal``'s why, from real recorded journals.

The main journal is ``tests/fixtures/audit/full_gateway_rollback_restart.jsonl``,
recorded from ``tests/integration/test_full_gateway.py`` with the
``tools.record_journal`` plugin (real stand-in, dockerd, git): an OTA install,
an RPC restart of the controller, a missing tag, and a release that crashes in
probation and is rolled back. Chromium checks are in ``test_audit_report_chromium.py``.
"""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teg_fsm.cli import audit_words as words
from teg_fsm.cli.audit_report import page, render
from teg_fsm.cli.audit_story import Story, build
from teg_fsm.cli.diagrams import machine_classes, svg_available
from teg_fsm.engine.journal import JournalEntry, read_entries

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "tests" / "fixtures" / "audit" / "full_gateway_rollback_restart.jsonl"
OTA_CORPUS = REPO / "tests" / "replay" / "corpus" / "ota_success_rollback_missing_tag.jsonl"


def _story(path: Path = FULL, **window: object) -> Story:
    return build(read_entries(path), classes=machine_classes(), **window)  # type: ignore[arg-type]


def _step(story: Story, machine: str, source: str, target: str):  # type: ignore[no-untyped-def]
    return next(s for s in story.machines[machine].steps if (s.source, s.target) == (source, target))


def _teg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "teg_fsm.cli", *args], cwd=REPO, capture_output=True, text=True)


# -- the story ------------------------------------------------------------------------------


def test_the_rollback_names_the_guards_that_decided_and_the_controllers_words() -> None:
    rollback = _step(_story(), "ota", "probation", "rolling_back")
    assert rollback.event == "controller_exited"
    assert [g.expression for g in rollback.guards] == ["is_for_target", "has_last_good"]
    assert rollback.guards[1].meaning == "A last good version other than the target to roll back to."
    assert words.headline(rollback) == "ota: probation -> rolling_back on controller_exited: container exited with code 3"
    swap = next(e for e in rollback.effects if e.type == "Notify")
    assert words.effect_words(swap).startswith("tell controller: swap_requested (version v3.0.0-")


def test_an_effect_carries_the_outcome_that_answered_it() -> None:
    story = _story()
    checkout = next(e for s in story.machines["ota"].steps for e in s.effects
                    if e.type == "CheckoutControllerVersion" and e.fields.get("version", "").startswith("v9.9.9"))
    assert checkout.outcome is not None and checkout.outcome.kind == "failed"
    assert words.outcome_words(checkout.outcome, True).startswith(
        "failed: tag v9.9.9-no-such-tag does not exist in the controller repository")
    restart = _step(story, "controller", "running", "restarting")
    start = next(e for e in restart.effects if e.type == "StartController")
    assert start.outcome is not None and start.outcome.name == "start_succeeded"
    assert "controller restart requested: no reason given" in words.reasons(restart)


def test_rows_tried_before_the_taken_one_are_named_as_not_holding() -> None:
    adopted = _step(_story(), "controller", "inspecting", "awaiting_version")
    assert [p.target for p in adopted.passed_over] == ["swapping", "restarting", "running", "unhealthy", "starting"]
    assert not adopted.guards and "no guard" in list(words.why_lines(adopted))[-1]


def test_two_rows_to_the_same_target_are_reported_as_undecided_not_guessed() -> None:
    failed = _step(_story(), "ota", "checking_out", "failed")  # [fetch_had_failed] -> failed, else -> failed
    assert [g.expression for g in failed.guards] == ["fetch_had_failed"] and failed.or_guards == ((),)
    assert "the journal does not say which" in " ".join(words.why_lines(failed))


def test_the_window_starts_each_machine_in_the_state_earlier_transitions_left_it_in() -> None:
    whole = _story()
    restart = _step(whole, "controller", "running", "restarting")
    window = _story(since_ms=restart.ts_ms - 1)
    controller = window.machines["controller"]
    assert controller.state_at_start == "running" and controller.steps[0].seq == restart.seq
    assert window.machines["ota"].state_at_start == "committed"  # ota did not move between
    assert window.entries < whole.entries and not window.starts  # the start record is before the window
    assert controller.segments[0].start_ms == restart.ts_ms - 1


def test_a_fake_class_named_by_the_journal_is_used_for_its_guards() -> None:
    story = _story(OTA_CORPUS)  # the OTA rig's controller is tests.machines.ota_fakes:FakeControllerMachine
    assert story.machines["controller"].class_path == "tests.machines.ota_fakes:FakeControllerMachine"
    assert all(s.declared for s in story.machines["controller"].steps)


def test_rows_of_unknown_kinds_are_skipped_and_counted() -> None:
    entries = list(read_entries(FULL))
    foreign = attrs.evolve(entries[5], source="retention", name="uplink_summary")
    odd = attrs.evolve(entries[6], transitions=[{"machine": "ota"}])
    mixed = entries[:5] + [foreign, object(), odd, {"kind": "snapshot"}] + entries[7:]
    story = build(mixed, classes=machine_classes())
    assert story.skipped == {"source 'retention'": 1, "object": 1, "malformed transition": 1, "dict": 1}
    assert story.entries == len(entries) - 2
    html = render(story, source="mixed")
    assert "rows of kinds this report does not know, skipped: dict: 1, malformed transition: 1" in html


def test_a_journal_that_cannot_be_read_to_the_end_gives_the_page_of_what_was_read() -> None:
    def broken():  # type: ignore[no-untyped-def]
        yield from list(read_entries(FULL))[:50]
        raise ValueError("line 51: not a journal entry")

    story = build(broken(), classes=machine_classes())
    assert story.entries == 50 and story.stopped_reading == "line 51: not a journal entry"
    assert "reading stopped early: line 51: not a journal entry" in render(story, source="x")


def test_durations_in_seconds_are_read_as_hours_and_minutes() -> None:
    assert words.readable("no health check for 21720 s (limit 21600 s)") == \
        "no health check for 6 h 2 min (limit 6 h)"
    assert words.readable("restarting in 5 s") == "restarting in 5 s"
    assert words.duration(90061) == "1 d 1 h 1 min"


# -- the page ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_page() -> str:
    return page(FULL, shown="full_gateway_rollback_restart.jsonl")


def test_the_page_has_every_machine_and_the_moments_worth_a_look(full_page: str) -> None:
    for machine in ("connection", "controller", "file_sync", "health", "ota", "provisioning", "rpc", "uplink"):
        assert f'<section id="m-{machine}">' in full_page
    for sentence in (
        "ota: probation -&gt; rolling_back on controller_exited: container exited with code 3",
        "controller: running -&gt; restarting on restart_requested: controller restart requested: no reason given",
        "controller: running -&gt; unhealthy on container_exited: container exited with code 3",
        "rolled back to v3.0.0-916d83: probation of v2.0.0-916d83 failed: container exited with code 3",
        "guard held: is_for_target: The event is about the version being installed; "
        "has_last_good: A last good version other than the target to roll back to",
    ):
        assert sentence in full_page, sentence
    assert "396</b> events" in full_page


@pytest.mark.skipif(not svg_available(), reason="graphviz dot is not installed")
def test_the_diagrams_count_the_transitions_taken(full_page: str) -> None:
    ota = full_page[full_page.index('<section id="m-ota">'):]
    ota = ota[: ota.index("</section>")]
    assert ota.count("<svg") == 2  # the timeline and the diagram
    assert "taken 4×" in ota  # fetching -> checking_out: four assignments
    assert "taken 3×" in ota and "taken 1×" in ota


def test_the_page_is_self_contained(full_page: str) -> None:
    lowered = full_page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "<img" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    assert "http://" not in lowered.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', "")
    assert 'href="h' not in lowered and "src=" not in lowered


def test_teg_audit_writes_the_page_for_one_machine_and_a_window(tmp_path: Path) -> None:
    out = tmp_path / "ota.html"
    done = _teg("audit", "--file", str(FULL), "--machine", "ota", "--since", "2026-12-07T11:10:40", "--html", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out} (")
    html = out.read_text()
    assert '<section id="m-ota">' in html and '<section id="m-controller">' not in html
    assert "probation -&gt; rolling_back" in html and "idle -&gt; fetching" not in html
    assert _teg("audit", "--file", str(tmp_path / "none.db"), "--html", str(out)).returncode == 2


# -- teg journal prints the why ----------------------------------------------------------------


def test_teg_journal_prints_guards_reasons_and_outcomes_by_default() -> None:
    done = _teg("journal", "--file", str(FULL), "--machine", "ota")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "    ota: probation -> rolling_back\n        guard held: is_for_target:" in text
    assert "        said: container exited with code 3\n" in text
    assert "-> failed: tag v9.9.9-no-such-tag does not exist" in text
    assert "    outcome of ota:" in text


def test_teg_journal_brief_is_one_line_per_event_and_limit_counts_events() -> None:
    brief = _teg("journal", "--file", str(FULL), "--machine", "ota", "--brief").stdout.splitlines()
    full = _teg("journal", "--file", str(FULL), "--machine", "ota").stdout.splitlines()
    assert [line for line in full if not line.startswith(" ")] == brief
    last = _teg("journal", "--file", str(FULL), "--machine", "ota", "--limit", "1").stdout.splitlines()
    assert last[0] == brief[-1] and all(line.startswith(" ") for line in last[1:])


# -- hostile journal text never becomes markup ----------------------------------------------------

_MARK = "<zq9"  # every hostile text starts with a tag opener no page of ours contains
_hostile = st.builds(
    lambda tail: _MARK + tail,
    st.lists(st.sampled_from(list("<>&\"'/=x ;:\u2028")) | st.characters() | st.sampled_from(
        ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "\"><svg onload=alert(1)>",
         "</td></tr></table><b>", "&lt;", "]]>", "<!--", "javascript:",
         "\ud800", "\udfff"]), max_size=12).map("".join),  # lone surrogates: JSON carries them, UTF-8 cannot
)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs_: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs_)


def _markup(html: str) -> tuple[set[str], set[str]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags, parser.attributes


def _hostile_entries(text: list[str]) -> list[JournalEntry]:
    base = list(read_entries(OTA_CORPUS))
    a, b, c, d, e, f = (text * 6)[:6]
    entries = []
    for entry in base:
        data = {**entry.data, "reason": a, b: c} if isinstance(entry.data, dict) else {"reason": a}
        moves = [{**t, "target": d} if t["machine"] == "controller" else t for t in entry.transitions]
        effects = [{**x, "message": e, "level": "warning", "type": "Log"} if i == 0 else {**x, "topic": f}
                   for i, x in enumerate(entry.effects)]
        entries.append(attrs.evolve(entry, data=data, transitions=moves, effects=effects, name=entry.name + b))
    entries.append(attrs.evolve(base[-1], seq=999, transitions=[{"machine": f, "source": a, "target": c, "event": e}]))
    return entries


@pytest.fixture(scope="module")
def vocabulary() -> tuple[set[str], set[str]]:
    """The tags and attributes a page of ours uses (with diagrams none of these tests draw)."""
    return _markup(page(FULL, diagrams=False))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_hostile, min_size=1, max_size=6))
def test_hostile_journal_text_never_becomes_markup(vocabulary: tuple[set[str], set[str]], text: list[str]) -> None:
    story = build(_hostile_entries(text), classes=machine_classes())
    html = render(story, source=text[0])
    html.encode("utf-8")  # the page can always be written
    assert _MARK not in html  # every "<" from the journal arrives escaped
    tags, attributes = _markup(html)
    assert tags <= vocabulary[0] and attributes <= vocabulary[1]
    assert "script" not in tags and not any(a.startswith("on") for a in attributes)


@pytest.mark.skipif(not svg_available(), reason="graphviz dot is not installed")
def test_hostile_state_names_do_not_reach_the_diagrams(tmp_path: Path) -> None:
    from teg_fsm.engine.journal import write_jsonl

    journal = tmp_path / "hostile.jsonl"
    with journal.open("w") as out:
        write_jsonl(_hostile_entries([_MARK + "<script>alert(1)</script>", _MARK + "\"><svg onload=x>"]), out)
    html = page(journal)
    assert _MARK not in html and "<script" not in html.lower()
    assert html.count('<div class="diagram"><svg') == 2  # ota's and the fake controller's, drawn from their classes
