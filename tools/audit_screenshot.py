"""Regenerate docs/audit-report.png: the audit page of a real scenario, as headless Chromium draws it.

    python tools/audit_screenshot.py [--journal J] [--out docs/audit-report.png] [--width W] [--height H]

The journal (default ``tests/fixtures/audit/full_gateway_rollback_restart.jsonl``)
was recorded from ``tests/integration/test_full_gateway.py`` with the
``tools.record_journal`` plugin: self-provisioning, OTA of a real controller,
an RPC restart of the controller, a missing tag, and an automatic rollback.
The page is ``teg audit --file J --html ...``; the picture is its top
(window, states over time, the moments worth a look, the first machines).
Needs Debian's ``chromium`` (tools/ci/setup.sh installs it) and graphviz.

The Chromium helpers here are also what the report's tests use.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

JOURNAL = REPO / "tests" / "fixtures" / "audit" / "full_gateway_rollback_restart.jsonl"
OUT = REPO / "docs" / "audit-report.png"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 120
# Headless Chromium in a container: no GPU, no sandbox (root), no D-Bus; keep it off the network.
_FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
          "--disable-extensions", "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND")
# What Chromium logs (--enable-logging=stderr) for a page's console errors and failed loads.
_PAGE_ERRORS = re.compile(r"CONSOLE[:(]|Uncaught|net::ERR_|Refused to", re.I)


def browser() -> str | None:
    """The Chromium binary on PATH, if any."""
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    binary = browser()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="teg-chromium-") as profile:
        return subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=TIMEOUT_S, check=False)


def dump_dom(page: Path) -> tuple[str, list[str]]:
    """(the DOM after loading ``page``, the page's console errors and failed loads)."""
    done = _run(["--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()])
    return done.stdout, page_errors(done.stderr)


def screenshot(page: Path, out: Path, width: int, height: int) -> list[str]:
    """Draw ``page`` into ``out`` (PNG); returns the page's console errors."""
    done = _run(["--enable-logging=stderr", "--v=0", f"--window-size={width},{height}",
                 f"--screenshot={out.resolve()}", page.resolve().as_uri()])
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return page_errors(done.stderr)


def page_errors(stderr: str) -> list[str]:
    """The lines of Chromium's log that are about the page (not D-Bus or GPU noise)."""
    return [line for line in stderr.splitlines() if _PAGE_ERRORS.search(line)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--journal", type=Path, default=JOURNAL, help="a journal (.jsonl or .db)")
    parser.add_argument("--out", type=Path, default=OUT, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args(argv)

    from teg_fsm.cli.audit_report import page

    with tempfile.TemporaryDirectory(prefix="teg-audit-") as work:
        html = Path(work) / "audit.html"
        html.write_text(page(args.journal, shown=_relative(args.journal.resolve())), encoding="utf-8")
        errors = screenshot(html, args.out, args.width, args.height)
    for line in errors:
        print(f"audit_screenshot: page error: {line}", file=sys.stderr)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB, {args.width} x {args.height} px)")
    return 1 if errors else 0


def _relative(path: Path) -> str:
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
