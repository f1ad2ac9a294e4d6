#!/usr/bin/env bash
# The single test command (README shows it, .ci/run calls it):
#
#   bash tools/ci/test.sh [pytest args...]
#
# Run as root from a fresh Debian bookworm machine or a dev checkout. It installs
# the Debian packages the real-service tests need, creates/reuses .venv, makes a
# Docker engine reachable (see tools/ci/docker_engine.sh), builds the local base
# image if missing, checks the generated diagrams and runs pytest. The exit code
# is pytest's (or the first failing step's).
#
# Knobs (all optional): DOCKER_HOST (an engine to use), TEG_RIG_DIR (private
# dockerd state, /var/lib/teg-rig), TEG_RIG_CACHE (debootstrap tarball,
# /var/cache/teg-rig), TEG_RIG_KEEP_DOCKERD=1 (leave a private dockerd running
# for the next run), TEG_DEBIAN_MIRROR, PYTHON (interpreter for the venv).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

# shellcheck source=tools/ci/setup.sh
source "$repo_root/tools/ci/setup.sh"

# Diagrams are generated from the machines; a stale or hand-edited one fails the build.
echo "diagrams: teg diagrams --check"
teg diagrams --check

# Hypothesis keeps its example database and caches outside the working tree
# (the hygiene check fails a run that leaves files behind).
export HYPOTHESIS_STORAGE_DIRECTORY="${HYPOTHESIS_STORAGE_DIRECTORY:-$repo_root/.venv/hypothesis}"

rc=0
python -m pytest "$@" || rc=$?
if ((rc == 5)); then
    echo "pytest collected no tests: treating that as a failure" >&2
fi
exit "$rc"
