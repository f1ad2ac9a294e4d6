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
# for the next run), TEG_DEBIAN_MIRROR, PYTHON (interpreter for the venv),
# TEG_TEST_V5_PASS (1: always run the MQTT 5 pass below, 0: never; default: only
# when pytest got no arguments, i.e. the full suite).
#
# The MQTT 5 pass: after the normal run, every integration and fault test runs again
# with the gateway on MQTT 5 (TEG_TEST_MQTT_PROTOCOL=5, read by tests/rig/protocol.py),
# all but those marked no_mqtt: they build no MQTT link and no stand-in (a fixture in
# tests/rig/protocol.py fails a marked test that does), so the version cannot matter.
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

MQTT_V5_TESTS=(tests/integration tests/faults)

rc=0
python -m pytest "$@" || rc=$?
if ((rc == 5)); then
    echo "pytest collected no tests: treating that as a failure" >&2
fi

v5_pass="${TEG_TEST_V5_PASS:-auto}"
if [[ "$v5_pass" == 1 || ("$v5_pass" == auto && $# -eq 0) ]]; then
    echo "MQTT 5 pass: the integration and fault tests again (all but no_mqtt), the gateway on MQTT 5"
    started=$SECONDS
    v5_rc=0
    TEG_TEST_MQTT_PROTOCOL=5 python -m pytest -p no:cacheprovider -m "not no_mqtt" "${MQTT_V5_TESTS[@]}" || v5_rc=$?
    echo "MQTT 5 pass: exit $v5_rc after $((SECONDS - started)) s"
    if ((rc == 0)); then
        rc=$v5_rc
    fi
fi
exit "$rc"
