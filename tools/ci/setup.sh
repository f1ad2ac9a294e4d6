#!/usr/bin/env bash
# Shared set-up for the test command and the demo (sourced, not run):
# Debian packages, the .venv with the project, a reachable Docker engine and the
# local base image. Run as root on a fresh Debian bookworm machine, or in a dev
# checkout where everything is present (then it only checks).
#
# Knobs (all optional): DOCKER_HOST (an engine to use), TEG_RIG_DIR (private
# dockerd state, /var/lib/teg-rig), TEG_RIG_CACHE (debootstrap tarball,
# /var/cache/teg-rig), TEG_RIG_KEEP_DOCKERD=1 (leave a private dockerd running
# for the next run), TEG_DEBIAN_MIRROR, PYTHON (interpreter for the venv).

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

# Debian packages: brokers, engine (docker.io pulls containerd/runc/iptables/tini),
# diagram rendering, base image bootstrap, TLS material, the venv, and headless
# Chromium for the audit report's tests (tests/unit/test_audit_report_chromium.py).
packages=(mosquitto docker.io graphviz debootstrap openssl git ca-certificates
          python3 python3-venv chromium)

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        echo "apt: all packages present"
        return 0
    fi
    if ((EUID != 0)); then
        echo "apt: missing packages ${missing[*]} and not root; install them or run as root" >&2
        exit 1
    fi
    echo "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

ensure_venv() {
    local venv="$repo_root/.venv" stamp
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        echo "venv: creating $venv"
        rm -rf "$venv"
        "${PYTHON:-python3}" -m venv "$venv"
    fi
    # Reinstall only when pyproject changed: pip -e costs seconds even when idle.
    stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [[ "$(cat "$venv/.teg-installed" 2>/dev/null)" != "$stamp" ]]; then
        echo "venv: pip install -e '.[test]' (log: $venv/pip.log)"
        # pip's build-backend chatter drowns the CI log; show it only on failure.
        if ! { "$venv/bin/python" -m pip install --no-input --upgrade pip &&
               "$venv/bin/python" -m pip install --no-input -e '.[test]'; } >"$venv/pip.log" 2>&1; then
            echo "venv: pip install failed; log tail:" >&2
            tail -n 40 "$venv/pip.log" >&2
            exit 1
        fi
        echo "$stamp" >"$venv/.teg-installed"
    else
        echo "venv: up to date"
    fi
    export PATH="$venv/bin:$PATH"
}

install_packages
ensure_venv

# shellcheck source=tools/ci/docker_engine.sh
source "$repo_root/tools/ci/docker_engine.sh"
# A private dockerd we started is stopped on exit, unless kept for the next run.
if [[ "${TEG_RIG_KEEP_DOCKERD:-0}" != 1 ]]; then
    trap teg_stop_started_dockerd EXIT
fi
teg_ensure_docker_engine

bash "$repo_root/tools/ci/base_image.sh"

