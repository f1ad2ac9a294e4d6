"""OTA benchmark: assignment -> UPDATED with and without a cached image, and the
controller's downtime during the swap.

    DOCKER_HOST=unix:///tmp/dockertest/docker.sock python -m tools.bench_ota [--rounds 3]

Needs a Docker engine with the local base image (tools/ci/base_image.sh) and
git. It builds a controller repository in a temp dir, runs the real OTA
component in a real gateway (tests/integration/ota_rig.py) and measures:
- cold: the image is built (fetch + checkout + build + swap + probation);
- cached: the image exists, the build is skipped;
- downtime: the gap in the controller's health-check timestamps across the
  swap (old container's last write -> new container's first write; the
  controllers write once a second, so the figure has 1 s resolution on top).
Probation is set to 1 s and the health probe period to 0.2 s, so the figures
show the gateway's own overhead, not the policy's waiting time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Self

import docker
import git

if not __package__:  # run as `python tools/bench_ota.py`: the repository root holds `tests` and `tools`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.ota_rig import HEALTHY, OtaRig, controller_files, read_health_ms  # noqa: E402
from tests.rig.docker_engine import base_image_name  # noqa: E402

LABELS = {"teg-bench": "ota"}


def make_repo(root: Path, base_image: str, versions: list[str]) -> Path:
    origin = root / "origin.git"
    git.Repo.init(origin, bare=True, initial_branch="main")
    work = git.Repo.init(root / "work", initial_branch="main")
    with work.config_writer() as cfg:
        cfg.set_value("user", "name", "bench").set_value("user", "email", "bench@example.invalid")
    work.create_remote("origin", str(origin))
    for version in versions:
        for rel, text in controller_files(base_image, HEALTHY + f"# {version}\n").items():
            path = root / "work" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        work.index.add(list(controller_files(base_image, "")))
        work.index.commit(version)
        work.create_tag(version)
    work.remote("origin").push(refspec="main:main")
    work.remote("origin").push(tags=True)
    git.Repo.clone_from(str(origin), root / "device")
    return root / "device" / ".git"


class GapWatch:
    """Largest gap between successive health timestamps while it runs."""

    def __init__(self, db: Path) -> None:
        self.db, self.gap_ms, self._stop = db, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = read_health_ms(self.db)
        while not self._stop.is_set():
            now = read_health_ms(self.db)
            if now is not None and last is not None and now != last:
                self.gap_ms = max(self.gap_ms, now - last)
            last = now if now is not None else last
            time.sleep(0.02)


def update(rig: OtaRig, version: str) -> tuple[float, int]:
    """Seconds from assignment to UPDATED, and the health gap in ms."""
    mark = len(rig.reports)
    with GapWatch(rig.controller.data_dir / "communication_queue.db") as watch:
        start = rig.assign(version)
        report = rig.wait_report("UPDATED", mark, timeout_s=180)
        elapsed = report["at"] - start
        time.sleep(1.5)  # let the new controller write again so the gap closes
    return elapsed, watch.gap_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    client = docker.from_env(timeout=300)
    base = base_image_name()
    suffix = uuid.uuid4().hex[:6]
    versions = [f"b{i}-{suffix}" for i in range(args.rounds + 1)]
    cold: list[float] = []
    cached: list[float] = []
    gaps: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        git_dir = make_repo(root, base, versions)
        rig = OtaRig(client=client, data_dir=root / "data", git_dir=git_dir, labels=LABELS,
                     settings={"probation_s": 1.0, "health_timeout_s": 30.0}, health_period_s=0.2)
        rig.start()
        try:
            update(rig, versions[0])  # something to swap away from
            for i in range(1, args.rounds + 1):
                seconds, gap = update(rig, versions[i])  # built
                cold.append(seconds)
                gaps.append(gap)
                seconds, gap = update(rig, versions[i - 1])  # image kept: cached
                cached.append(seconds)
                gaps.append(gap)
        finally:
            rig.stop()
            rig.controller.remove()
            rig.remove_images()
            client.close()
    print(f"assignment -> UPDATED, image built : median {statistics.median(cold):.2f} s  (n={len(cold)})")
    print(f"assignment -> UPDATED, image cached: median {statistics.median(cached):.2f} s  (n={len(cached)})")
    print(f"controller downtime during the swap (health-check gap): median {statistics.median(gaps)} ms, "
          f"max {max(gaps)} ms  (n={len(gaps)}, 1 s write period included)")


if __name__ == "__main__":
    main()
