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
# The MQTT 5 pass: after the normal run, the integration and fault tests that talk
# MQTT to the stand-in run again with the gateway on MQTT 5 (TEG_TEST_MQTT_PROTOCOL=5,
# read by tests/rig/protocol.py). Left out of it: tests about Docker, OTA, the
# controller, packaging, the engine's storage faults, RPC parameter checks and file
# confinement, which do not depend on the MQTT version (MQTT_V5_DESELECT and the
# files not in MQTT_V5_TESTS). It takes about 3 minutes on 2 CPUs.
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

MQTT_V5_TESTS=(
    tests/integration/test_connection_provisioning.py
    tests/integration/test_mqtt_link.py
    tests/integration/test_uplink.py
    tests/integration/test_rpc.py
    tests/integration/test_file_sync.py
    tests/integration/test_sigterm.py
    tests/integration/test_drop_in_keys.py::test_gateway_keys_attributes_log_severities_and_rpc_answers
    tests/faults/test_control.py
    tests/faults/test_uplink_faults.py
    tests/faults/test_outbox_outage.py
    tests/faults/test_fsm_states_outage.py
)
# Docker and controller-image tests inside the files above: the MQTT version changes nothing there.
MQTT_V5_DESELECT=(
    --deselect tests/integration/test_rpc.py::test_restart_controller_is_refused_while_no_controller_version_is_known
    --deselect tests/integration/test_rpc.py::test_restart_controller_restarts_the_running_controller
)

rc=0
python -m pytest "$@" || rc=$?
if ((rc == 5)); then
    echo "pytest collected no tests: treating that as a failure" >&2
fi

v5_pass="${TEG_TEST_V5_PASS:-auto}"
if [[ "$v5_pass" == 1 || ("$v5_pass" == auto && $# -eq 0) ]]; then
    echo "MQTT 5 pass: the MQTT integration and fault tests again, the gateway on MQTT 5"
    started=$SECONDS
    v5_rc=0
    TEG_TEST_MQTT_PROTOCOL=5 python -m pytest -p no:cacheprovider "${MQTT_V5_DESELECT[@]}" "${MQTT_V5_TESTS[@]}" || v5_rc=$?
    echo "MQTT 5 pass: exit $v5_rc after $((SECONDS - started)) s"
    if ((rc == 0)); then
        rc=$v5_rc
    fi
fi
exit "$rc"
