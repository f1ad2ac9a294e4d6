"""The audit page in headless Chromium (Debian's ``chromium``; tools/ci/setup.sh installs it).

The page of a real recorded scenario loads with no console error and no
network request, its DOM has every machine, timeline and diagram, and a
screenshot is drawn. A control page with a script error shows that the
error check sees errors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from teg_fsm.cli.audit_report import page
from teg_fsm.cli.diagrams import svg_available
from tools.audit_screenshot import JOURNAL, browser, dump_dom, screenshot

pytestmark = pytest.mark.skipif(browser() is None, reason="chromium is not installed (apt-get install chromium)")
MACHINES = ("connection", "controller", "file_sync", "health", "ota", "provisioning", "rpc", "uplink")


@pytest.fixture(scope="module")
def audit_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "audit.html"
    path.write_text(page(JOURNAL), encoding="utf-8")
    return path


def test_the_error_check_sees_a_script_error(tmp_path: Path) -> None:
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><title>x</title><p>x</p><script>nosuchfunction();</script>")
    _dom, errors = dump_dom(control)
    assert any("nosuchfunction" in line for line in errors), errors


def test_the_page_loads_without_errors_and_shows_every_machine(audit_page: Path) -> None:
    dom, errors = dump_dom(audit_page)
    assert errors == []
    for machine in MACHINES:
        assert f'<section id="m-{machine}">' in dom
    assert dom.count('<svg class="timeline"') == 1 + len(MACHINES)
    if svg_available():
        assert dom.count('<div class="diagram"><svg') == len(MACHINES)
    text = re.sub(r"<[^>]+>", "", dom)
    assert "ota: probation -&gt; rolling_back on controller_exited: container exited with code 3" in text
    assert "controller: running -&gt; restarting on restart_requested" in text
    assert "guard held: has_last_good: A last good version other than the target to roll back to" not in text
    assert "has_last_good: A last good version other than the target to roll back to" in text


def test_the_page_draws(audit_page: Path, tmp_path: Path) -> None:
    out = tmp_path / "shot.png"
    assert screenshot(audit_page, out, 1200, 1500) == []
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 1500)
    assert len(data) > 50_000  # a blank page compresses to a few KiB; this one has timelines and a diagram
