#!/usr/bin/env bash
# Build ahvbackup-fd.so against a Bacula source tree of the File Daemon's own version.
#
#   bacula/fd-plugin/build.sh <bacula source tree> [<bacula library dir>] [<output .so>]
#
#   <bacula source tree>   the unpacked source of the bacula-fd you run (same version), e.g.
#                          Debian's: `apt-get source bacula` (docs/bacula-fd-plugin.md)
#   <bacula library dir>   where that bacula-fd's libbac-<version>.so and libbaccfg-<version>.so
#                          are (default /usr/lib/bacula, Debian; /opt/bacula/lib for Bacula's
#                          own packages)
#   <output .so>           default ./ahvbackup-fd.so
#
# The tree is configured once (`--enable-client-only --enable-smartalloc`: the headers only;
# Debian and Bacula's packages are built with smartalloc, and without it the allocator symbols
# do not match); then Bacula's metaplugin library (src/plugins/fd/pluginlib/, the METAPLUGINOBJ
# list of src/plugins/fd/Makefile.inc.in) and ahvbackup-fd.cpp are compiled and linked with the
# installed Bacula libraries. Needs g++ and make. About 30 s on two cores.
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] || die "usage: build.sh <bacula source tree> [<bacula library dir>] [<output .so>]"
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$1" && pwd) || die "$1: not a folder"
libdir=${2:-/usr/lib/bacula}
out=${3:-$PWD/ahvbackup-fd.so}
CXX=${CXX:-g++}

[ -f "$src/src/version.h" ] && [ -d "$src/src/plugins/fd/pluginlib" ] \
  || die "$src is not a Bacula source tree with the metaplugin library (src/plugins/fd/pluginlib/; Bacula 13.0 or newer)"
version=$(sed -n 's/^#define VERSION "\(.*\)"$/\1/p' "$src/src/version.h")
[ -n "$version" ] || die "$src/src/version.h: no VERSION"
for lib in bac baccfg; do
  [ -e "$libdir/lib$lib-$version.so" ] \
    || die "$libdir/lib$lib-$version.so not found: the source tree is Bacula $version; give the library folder of a bacula-fd $version"
done

if [ ! -f "$src/src/config.h" ] || [ ! -f "$src/src/host.h" ]; then
  echo "build.sh: configuring $src (headers only; log in $src/ahvbackup-configure.log)"
  (cd "$src" && ./configure --enable-client-only --enable-smartalloc \
      >ahvbackup-configure.log 2>&1) || die "configure failed; see $src/ahvbackup-configure.log"
fi

obj=$(mktemp -d)
trap 'rm -rf "$obj"' EXIT
flags=(-fPIC -g -O2 -Wall -fno-strict-aliasing -fno-exceptions -fno-rtti
       -I"$src/src" -I"$src/src/filed" -I"$src/src/lib" -I"$src/src/plugins/fd")
pluginlib="$src/src/plugins/fd/pluginlib"
sources=("$here/ahvbackup-fd.cpp")
for f in pluginlib ptcomm metaplugin metaplugin_attributes metaplugin_accurate metaplugin_metadata; do
  sources+=("$pluginlib/$f.cpp")
done
pids=()
for s in "${sources[@]}"; do
  "$CXX" "${flags[@]}" -c "$s" -o "$obj/$(basename "${s%.cpp}").o" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || die "compiling failed (see above)"; done

"$CXX" -shared -o "$out.tmp" "$obj"/*.o -L"$libdir" \
  "-l:libbaccfg-$version.so" "-l:libbac-$version.so" -Wl,--no-undefined -lstdc++
mv -f "$out.tmp" "$out"
echo "build.sh: built $out for Bacula $version (libraries in $libdir)"
