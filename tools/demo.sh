#!/usr/bin/env bash
# The demo (README's first command): installs what is missing (as root on a
# fresh Debian bookworm machine), then runs the gateway against the bundled
# ThingsBoard stand-in with a demo controller built from a git repository it
# creates, on the real Docker engine. Pass --workdir DIR to keep files there.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
# shellcheck source=tools/ci/setup.sh
source "$repo_root/tools/ci/setup.sh"
python tools/demo.py "$@"
