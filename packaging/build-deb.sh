#!/usr/bin/env bash
# Build the Debian package ahvbackup_<version>_<arch>.deb into OUTDIR with Debian's tooling
# (dpkg-buildpackage, debhelper). The wheels come from WHEELS (default: built now with
# build-wheels.sh); their dependencies are fetched as wheels first, so the package build
# itself needs no network.
#   packaging/build-deb.sh OUTDIR [WHEELS]
# Needs: debhelper dpkg-dev fakeroot python3.11 python3.11-venv (apt); PYTHON: an
# interpreter with pip for fetching the dependency wheels (default: the checkout's .venv).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="${1:?usage: build-deb.sh OUTDIR [WHEELS]}"
python="${PYTHON:-$repo/.venv/bin/python}"

mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ -n "${2:-}" ]; then
  wheels="$(cd "$2" && pwd)"
else
  wheels="$work/dist"
  "$here/build-wheels.sh" "$wheels" >/dev/null
fi

src="$work/ahvbackup"
mkdir -p "$src/wheelhouse"
cp -r "$here/debian" "$src/debian"
cp "$here/conf_example.py" "$src/"

# every wheel the application needs; ours must be the ones just built, never an index's
PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip wheel --wheel-dir "$src/wheelhouse" \
  --find-links "$wheels" 'ahvbackup[all]' >"$work/wheels.log" 2>&1 \
  || { tail -20 "$work/wheels.log" >&2; echo "build-deb: fetching the wheels failed" >&2; exit 1; }
for w in "$wheels"/ahvbackup*.whl; do
  cmp -s "$w" "$src/wheelhouse/$(basename "$w")" \
    || { echo "build-deb: $(basename "$w") in the wheelhouse is not the one built" >&2; exit 1; }
done

echo "build-deb: wheelhouse ready after ${SECONDS}s" >&2
(cd "$src" && dpkg-buildpackage -b -us -uc) >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; echo "build-deb: dpkg-buildpackage failed" >&2; exit 1; }
echo "build-deb: package built after ${SECONDS}s" >&2
cp "$work"/ahvbackup_*.deb "$out/"
ls "$out"/ahvbackup_*.deb
