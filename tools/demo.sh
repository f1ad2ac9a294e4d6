#!/usr/bin/env bash
# The demo (README's first command): installs what is missing (as root on a
# fresh Debian bookworm machine), then runs the gateway against the bundled
# ThingsBoard stand-in with a demo controller built from a git repository it
# creates. Pass --workdir DIR to keep files there.
#
# It runs on a private Docker engine of its own (state in $TEG_RIG_DIR,
# default /var/lib/teg-demo, stopped afterwards), never on the system engine,
# so it cannot disturb a station's real teg_controller. To use another engine
# on purpose, set DOCKER_HOST; the demo still refuses an engine that already
# has a teg_controller container or controller images.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export TEG_RIG_PRIVATE_ENGINE=1
export TEG_RIG_DIR="${TEG_RIG_DIR:-/var/lib/teg-demo}"
# shellcheck source=tools/ci/setup.sh
source "$repo_root/tools/ci/setup.sh"
python tools/demo.py "$@"
