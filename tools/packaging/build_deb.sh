#!/usr/bin/env bash
# Build the Debian package teg-fsm_<version>_all.deb from this checkout:
#
#   bash tools/packaging/build_deb.sh [OUT_DIR]      (default: dist/)
#
# The package ships our wheel and every dependency as pure-Python wheels under
# /opt/teg-fsm/wheels; its postinst creates the private virtualenv
# /opt/teg-fsm/venv from them with Debian's python3 (no network needed on the
# device, nothing installed into the system Python). It also ships /usr/bin/teg,
# the systemd unit and /etc/teg-fsm/teg.env (a conffile). Built with dpkg-deb.
#
# Needs python3 and python3-venv (or the .venv of tools/ci/setup.sh), git, dpkg-deb,
# and PyPI (or pip's cache / PIP_INDEX_URL) for the dependency wheels.
# Wheels are cached in $TEG_WHEEL_CACHE (default /var/cache/teg-rig/wheels) keyed
# by the dependency list, so a rebuild only builds our own wheel.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo_root/tools/packaging"
out_dir="$(realpath -m "${1:-$repo_root/dist}")"
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo_root/teg_fsm/__init__.py")"
[[ -n "$version" ]] || { echo "build_deb: no __version__ in teg_fsm/__init__.py" >&2; exit 1; }
package="teg-fsm_${version}_all.deb"

work="$(mktemp -d /var/tmp/teg-deb.XXXXXX)"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
# pip: $PYTHON, else the checkout's .venv (tools/ci/setup.sh), else a throw-away venv
# (Debian's python3 has no pip of its own; python3-venv brings one).
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo_root/.venv/bin/python" ]]; then
        python="$repo_root/.venv/bin/python"
    else
        python3 -m venv "$work/venv"
        python="$work/venv/bin/python"
    fi
fi
wheels="$stage/opt/teg-fsm/wheels"
mkdir -p "$wheels" "$out_dir"

# Our wheel, built from a copy of the checkout's files (pip builds in-tree: no build/ litter here).
mkdir -p "$work/src"
git -C "$repo_root" ls-files -z --cached --others --exclude-standard |
    tar -C "$repo_root" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$work/src" -xf -
"$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$wheels" "$work/src" >"$work/wheel.log" 2>&1 ||
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$work/src" || {
        cat "$work/wheel.log" >&2; echo "build_deb: building our wheel failed" >&2; exit 1; }
ours="$(ls "$wheels"/teg_fsm-*.whl)"

# Every dependency as a pure-Python wheel ("all" means no compiled code). Cached by requirement set.
requirements="$("$python" - "$ours" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
print("\n".join(sorted(l.split(":", 1)[1].strip() for l in lines
                       if l.startswith("Requires-Dist:") and "extra ==" not in l)))
EOF
)"
cache_root="${TEG_WHEEL_CACHE:-/var/cache/teg-rig/wheels}"
cache="$cache_root/$(printf '%s' "$requirements" | sha256sum | cut -c1-16)"
if [[ ! -f "$cache/.complete" ]]; then
    echo "build_deb: downloading dependency wheels into $cache"
    rm -rf "$cache" && mkdir -p "$cache"
    printf '%s\n' "$requirements" >"$work/requirements.txt"
    "$python" -m pip download --quiet --no-input --dest "$cache" \
        --only-binary=:all: --platform any --implementation py --python-version 3.11 --abi none \
        -r "$work/requirements.txt"
    touch "$cache/.complete"
fi
cp "$cache"/*.whl "$wheels/"

# The file system of the package.
install -D -m 0644 "$repo_root/tools/teg-fsm.service" "$stage/lib/systemd/system/teg-fsm.service"
install -D -m 0600 "$here/teg.env" "$stage/etc/teg-fsm/teg.env"
install -d "$stage/usr/bin"
ln -s /opt/teg-fsm/venv/bin/teg "$stage/usr/bin/teg"
doc="$stage/usr/share/doc/teg-fsm"
install -D -m 0644 "$repo_root/README.md" "$doc/README.md"
install -D -m 0644 "$repo_root/docs/MIGRATION.md" "$doc/MIGRATION.md"
install -D -m 0644 "$repo_root/LICENSE" "$doc/copyright"

install -d "$stage/DEBIAN"
sed -e "s/@VERSION@/$version/" \
    -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$stage" | cut -f1)/" \
    "$here/control" >"$stage/DEBIAN/control"
echo "/etc/teg-fsm/teg.env" >"$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    sed -e "s/@VERSION@/$version/" "$here/$script" >"$stage/DEBIAN/$script"
    chmod 0755 "$stage/DEBIAN/$script"
done

dpkg-deb --root-owner-group -Zxz --build "$stage" "$out_dir/$package" >/dev/null
echo "$out_dir/$package"
