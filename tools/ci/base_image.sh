#!/usr/bin/env bash
# Build the local base image (name in tools/ci/base-image-name) without any
# registry: debootstrap a minimal Debian bookworm with python3 and `docker import`
# it. Our engines cannot pull images, so every test/demo image starts FROM this.
#
# Cached twice: the image itself (skip everything if it exists) and the
# debootstrap result as a tarball in $TEG_RIG_CACHE, so a new engine data root
# only costs an import. Needs root, debootstrap and a reachable engine
# (DOCKER_HOST as set by tools/ci/docker_engine.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="$(tr -d '[:space:]' <"$here/base-image-name")"
cache_dir="${TEG_RIG_CACHE:-/var/cache/teg-rig}"
tarball="$cache_dir/base-bookworm.tar"
mirror="${TEG_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

verify() {
    # The controller contract is a SQLite file, so sqlite3 must import in there.
    docker run --rm --network host "$image" python3 -c 'import sqlite3, sys; print("base image ok:", sys.version.split()[0], "sqlite", sqlite3.sqlite_version)'
}

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image: $image present"
    exit 0
fi

start=$SECONDS
if [[ ! -s "$tarball" ]]; then
    mkdir -p "$cache_dir"
    work="$(mktemp -d /var/tmp/teg-base.XXXXXX)"
    # debootstrap mounts /proc etc. inside the target on some hosts; unmount
    # before deleting so rm never walks into the host's /proc.
    cleanup() {
        local m
        for m in $(awk -v root="$work/root" '$2 ~ "^"root {print $2}' /proc/mounts | sort -r); do
            umount -l "$m" || true
        done
        rm -rf "$work"
    }
    trap cleanup EXIT
    echo "base image: debootstrap bookworm from $mirror (takes a few minutes)"
    debootstrap --variant=minbase --include=python3 bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || {
        echo "base image: debootstrap failed; log tail:" >&2
        tail -n 40 "$work/debootstrap.log" >&2
        [[ -f "$work/root/debootstrap/debootstrap.log" ]] && tail -n 40 "$work/root/debootstrap/debootstrap.log" >&2
        exit 1
    }
    # Downloaded .debs and apt lists are dead weight in an image.
    rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
    tar -C "$work/root" --numeric-owner -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    echo "base image: debootstrap done in $((SECONDS - start))s, cached at $tarball"
else
    echo "base image: using cached $tarball"
fi

docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$image" <"$tarball" >/dev/null
verify
echo "base image: $image built in $((SECONDS - start))s"
