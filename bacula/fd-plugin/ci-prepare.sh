#!/usr/bin/env bash
# Bacula 15.0.3 for the tests, beside Debian stable's 9.6.7 (which the bpipe tests keep using):
#   1. downloads Debian's 15.0.3 packages (bookworm-backports) and unpacks them with `dpkg -x`
#      into a private prefix (nothing is installed, /etc/apt is not touched: a private apt
#      state under the cache is used);
#   2. fetches Debian's 15.0.3 source package (`apt-get source bacula/trixie`: the
#      bookworm-backports .dsc is not served; trixie's 15.0.3-3 is the same source and
#      Debian revision the backport was rebuilt from);
#   3. builds ahvbackup-fd.so with build.sh into the prefix's plugin folder, next to bpipe-fd.so.
#
#   bacula/fd-plugin/ci-prepare.sh            # cache: $AHVBACKUP_BACULA15 or /opt/ahvbackup-ci/bacula15
#
# Idempotent: a finished step is not repeated (downloads are cached; the plugin is rebuilt
# only when ahvbackup-fd.cpp or build.sh changed). The tests (tests/bacula/lab15.py) read the
# same folder. Needs: apt-get, dpkg-dev (dpkg-source), g++, make; network to deb.debian.org.
set -euo pipefail

VERSION=15.0.3
DEBVER=15.0.3-3~bpo12+1
here=$(cd "$(dirname "$0")" && pwd)
cache=${AHVBACKUP_BACULA15:-/opt/ahvbackup-ci/bacula15}
PACKAGES=(bacula-common bacula-common-sqlite3 bacula-fd bacula-sd bacula-director
          bacula-director-sqlite3 bacula-console)
log() { echo "ci-prepare: $*"; }
for tool in apt-get dpkg dpkg-source g++ make sha256sum; do
  command -v "$tool" >/dev/null || { echo "ci-prepare: $tool is missing (apt-get install dpkg-dev g++ make)" >&2; exit 2; }
done
mkdir -p "$cache"
cd "$cache"

apt_private() {
  apt-get -o Dir::Etc::SourceList="$cache/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$cache/apt/lists" -o Dir::Cache="$cache/apt/cache" \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq "$@"
}

fetched=0
ensure_lists() {
  [ "$fetched" = 1 ] && return
  mkdir -p apt/lists/partial apt/cache/archives/partial
  cat > apt/sources.list <<LIST
deb http://deb.debian.org/debian bookworm-backports main
deb-src http://deb.debian.org/debian trixie main
LIST
  log "apt-get update (private lists: bookworm-backports, trixie sources)"
  apt_private update
  fetched=1
}

# 1. binaries -------------------------------------------------------------------------------
if [ ! -x root/usr/sbin/bacula-fd ] || [ ! -f root/.unpacked-$DEBVER ]; then
  ensure_lists
  rm -rf debs root.tmp && mkdir -p debs root.tmp
  log "downloading ${PACKAGES[*]} $DEBVER"
  (cd debs && apt_private download "${PACKAGES[@]/%/=$DEBVER}")
  for deb in debs/*.deb; do dpkg -x "$deb" root.tmp; done
  touch root.tmp/.unpacked-$DEBVER
  rm -rf root && mv root.tmp root
fi

# 2. source ---------------------------------------------------------------------------------
srcdir=src/bacula-$VERSION
if [ ! -f "$srcdir/src/version.h" ]; then
  ensure_lists
  rm -rf src && mkdir -p src
  log "fetching the source package bacula/trixie"
  (cd src && apt_private source --download-only bacula/trixie \
     && dpkg-source --no-check -x bacula_*.dsc "bacula-$VERSION" >/dev/null)
fi
got=$(sed -n 's/^#define VERSION "\(.*\)"$/\1/p' "$srcdir/src/version.h")
[ "$got" = "$VERSION" ] || { echo "ci-prepare: $srcdir is Bacula $got, not $VERSION" >&2; exit 2; }

# 3. plugin ---------------------------------------------------------------------------------
plugdir=root/usr/lib/bacula
stamp=$(cat "$here/ahvbackup-fd.cpp" "$here/build.sh" | sha256sum | cut -d' ' -f1)
if [ ! -f "$plugdir/ahvbackup-fd.so" ] || [ "$(cat "$plugdir/ahvbackup-fd.so.source" 2>/dev/null)" != "$stamp" ]; then
  "$here/build.sh" "$srcdir" "$plugdir" "$plugdir/ahvbackup-fd.so"
  echo "$stamp" > "$plugdir/ahvbackup-fd.so.source"
fi
log "Bacula $VERSION ready in $cache (programs in root/usr/sbin, plugins in $plugdir)"
