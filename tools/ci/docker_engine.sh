# shellcheck shell=bash
# Sourced (not executed) by tools/ci/test.sh and the demo: makes a Docker engine
# reachable and exports DOCKER_HOST for it.
#
# Order: a working $DOCKER_HOST, then the system socket (unless
# TEG_RIG_PRIVATE_ENGINE=1), then a private dockerd
# started from Debian's docker.io package under $TEG_RIG_DIR. The private daemon
# has its own data/exec roots, pidfile and socket so it never touches a system
# engine's state, and runs without the default bridge or iptables rules: another
# dockerd on the same host owns docker0 and the DOCKER chains, and everything the
# project runs uses host networking anyway.

TEG_RIG_DIR="${TEG_RIG_DIR:-/var/lib/teg-rig}"
TEG_RIG_DOCKER_SOCK="$TEG_RIG_DIR/docker.sock"
TEG_RIG_DOCKERD_PID="$TEG_RIG_DIR/dockerd.pid"
TEG_RIG_DOCKERD_LOG="$TEG_RIG_DIR/dockerd.log"
TEG_RIG_DOCKERD_TIMEOUT="${TEG_RIG_DOCKERD_TIMEOUT:-90}"
# Set to the pid of a dockerd this shell started, so the caller can stop it.
TEG_RIG_STARTED_DOCKERD_PID=""

_teg_docker_works() {
    # `docker info` can hang on a half-dead socket; bound it.
    timeout 20 docker info >/dev/null 2>&1
}

_teg_start_private_dockerd() {
    mkdir -p "$TEG_RIG_DIR"
    local host="unix://$TEG_RIG_DOCKER_SOCK"
    # Reuse a private daemon left running by an earlier run (TEG_RIG_KEEP_DOCKERD=1).
    if [[ -S "$TEG_RIG_DOCKER_SOCK" ]] && DOCKER_HOST="$host" _teg_docker_works; then
        export DOCKER_HOST="$host"
        echo "docker: reusing private dockerd at $DOCKER_HOST"
        return 0
    fi
    command -v dockerd >/dev/null || { echo "docker: dockerd not installed" >&2; return 1; }
    # A stale pidfile makes dockerd refuse to start.
    if [[ -f "$TEG_RIG_DOCKERD_PID" ]] && ! kill -0 "$(cat "$TEG_RIG_DOCKERD_PID")" 2>/dev/null; then
        rm -f "$TEG_RIG_DOCKERD_PID"
    fi
    rm -f "$TEG_RIG_DOCKER_SOCK"
    echo "docker: starting private dockerd at $host (log: $TEG_RIG_DOCKERD_LOG)"
    # setsid + all fds redirected: CI runners wait for anything holding their pipes.
    setsid dockerd \
        --data-root "$TEG_RIG_DIR/data" \
        --exec-root "$TEG_RIG_DIR/exec" \
        --pidfile "$TEG_RIG_DOCKERD_PID" \
        --host "$host" \
        --bridge none --iptables=false --ip6tables=false \
        </dev/null >"$TEG_RIG_DOCKERD_LOG" 2>&1 &
    TEG_RIG_STARTED_DOCKERD_PID=$!
    export DOCKER_HOST="$host"
    local deadline=$((SECONDS + TEG_RIG_DOCKERD_TIMEOUT))
    until _teg_docker_works; do
        if ! kill -0 "$TEG_RIG_STARTED_DOCKERD_PID" 2>/dev/null; then
            echo "docker: dockerd exited during startup; log tail:" >&2
            tail -n 30 "$TEG_RIG_DOCKERD_LOG" >&2
            TEG_RIG_STARTED_DOCKERD_PID=""
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "docker: dockerd not ready after ${TEG_RIG_DOCKERD_TIMEOUT}s; log tail:" >&2
            tail -n 30 "$TEG_RIG_DOCKERD_LOG" >&2
            return 1
        fi
        sleep 1
    done
    echo "docker: private dockerd ready (pid $TEG_RIG_STARTED_DOCKERD_PID)"
}

# Make an engine reachable; exports DOCKER_HOST (empty means the default socket).
teg_ensure_docker_engine() {
    command -v docker >/dev/null || { echo "docker: docker CLI not installed" >&2; return 1; }
    if [[ -n "${DOCKER_HOST:-}" ]]; then
        if _teg_docker_works; then
            echo "docker: using DOCKER_HOST=$DOCKER_HOST"
            return 0
        fi
        echo "docker: DOCKER_HOST=$DOCKER_HOST is not answering; trying others" >&2
    fi
    # TEG_RIG_PRIVATE_ENGINE=1 (the demo): never the system engine, whose
    # teg_controller may be a live station's.
    if [[ "${TEG_RIG_PRIVATE_ENGINE:-0}" != 1 ]] && DOCKER_HOST= _teg_docker_works; then
        unset DOCKER_HOST
        echo "docker: using the system engine"
        return 0
    fi
    _teg_start_private_dockerd
}

# Stop the private dockerd this shell started (no-op otherwise).
teg_stop_started_dockerd() {
    local pid="$TEG_RIG_STARTED_DOCKERD_PID"
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    # dockerd stops its containers first; give it time before giving up.
    local i
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "docker: dockerd $pid did not stop in 30s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # dockerd leaves its netns bind mount behind, which blocks `rm -rf` of the rig dir.
    local m
    for m in $(awk -v root="$TEG_RIG_DIR/exec" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}
