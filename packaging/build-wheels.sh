#!/usr/bin/env bash
# Build the wheel and sdist of every distribution into OUTDIR: each area of the Makefile's
# AREAS (so a new area is picked up) and the meta-distribution `ahvbackup` (packaging/meta).
# Each is built from a copy of its folder, so the checkout gets no build debris.
#   packaging/build-wheels.sh OUTDIR
# PYTHON: an interpreter with `build` and setuptools>=77, which build without an isolated
# environment each (default: the checkout's .venv, where `make dev` installs both).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
out="${1:?usage: build-wheels.sh OUTDIR}"
python="${PYTHON:-$repo/.venv/bin/python}"

areas="$(sed -n 's/^AREAS *:= *//p' "$repo/Makefile")"
[ -n "$areas" ] || { echo "build-wheels: no AREAS in $repo/Makefile" >&2; exit 2; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

for src in $areas packaging/meta; do
  name="$(basename "$src")"
  mkdir -p "$scratch/$name"
  # the sources as they are, without editable-install metadata or caches
  tar -C "$repo/$src" --exclude='*.egg-info' --exclude=__pycache__ --exclude=build \
      --exclude=dist -cf - . | tar -C "$scratch/$name" -xf -
  "$python" -m build --quiet --no-isolation --outdir "$out" "$scratch/$name" >"$scratch/$name.log" 2>&1 \
    || { cat "$scratch/$name.log" >&2; echo "build-wheels: $src failed" >&2; exit 1; }
done
ls "$out"
