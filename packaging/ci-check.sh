#!/usr/bin/env bash
# The packaging check CI runs (issue 14): build every wheel and sdist and the .deb; install
# the wheels into a clean venv (no editable installs) and run the checks from there; install
# the .deb with dpkg -i, run the same checks, lintian it, purge it and check that nothing is
# left behind. Exits non-zero on the first failure.
#   packaging/ci-check.sh [WORKDIR]      (default: a temporary folder, removed at the end)
# Needs root (dpkg -i) and: debhelper dpkg-dev fakeroot lintian logrotate python3.11
# python3.11-venv (apt). PYTHON: an interpreter with `build` and pip (default: .venv).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$repo/.venv/bin/python}"
base_python=/usr/bin/python3.11  # Debian's, as in the package: the venv must not need /root

if [ -n "${1:-}" ]; then
  mkdir -p "$1" && work="$(cd "$1" && pwd)"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
fi
sim_pid=""
stop_simulator() {
  if [ -n "$sim_pid" ]; then
    kill "$sim_pid" 2>/dev/null || true
    wait "$sim_pid" 2>/dev/null || true
    sim_pid=""
  fi
}
trap 'stop_simulator' ERR

say() { echo "ci-check: $* (${SECONDS}s)"; }
deb_installed=""
fail() {
  stop_simulator
  echo "ci-check: FAIL: $*" >&2
  # leave the machine as it was: the package this check installed goes again
  [ -z "$deb_installed" ] || dpkg --purge ahvbackup >/dev/null 2>&1 || true
  exit 1
}

# ---- build ------------------------------------------------------------------------------
say "building the wheels and sdists"
"$here/build-wheels.sh" "$work/dist" >/dev/null
areas="$(sed -n 's/^AREAS *:= *//p' "$repo/Makefile")"
dists=""
for src in $areas packaging/meta; do
  name="$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["name"])' "$repo/$src/pyproject.toml")"
  stem="${name//-/_}"
  ls "$work/dist/$stem"-*.whl "$work/dist/$stem"-*.tar.gz >/dev/null 2>&1 \
    || fail "$src: no wheel and sdist of $name in $work/dist"
  [ "$src" = packaging/meta ] || dists="$dists $name"
done

say "building the Debian package"
"$here/build-deb.sh" "$work/deb" "$work/dist" >/dev/null 2>"$work/build-deb.log" \
  || { cat "$work/build-deb.log" >&2; fail "build-deb.sh"; }
deb="$(ls "$work"/deb/ahvbackup_*.deb)"

# ---- the checks, run from one installation ------------------------------------------------
# run_checks BIN LABEL: --version, plugins (every area's distribution, nothing else of
# ours), a full backup over iSCSI against the simulator, listed and verified, and the
# Bacula backend's health-check against the same simulator.
run_checks() {
  local bin="$1" label="$2" w="$work/run-$2"
  rm -rf "$w" && mkdir -p "$w"
  "$bin/ahvbackup" --version | grep -qx "ahvbackup, version 0.1.0" \
    || fail "$label: ahvbackup --version"
  "$bin/ahvbackup" --json plugins > "$w/plugins.json" || fail "$label: ahvbackup plugins"
  /usr/bin/python3 - "$w/plugins.json" $dists <<'PY' || fail "$label: ahvbackup plugins"
import json, sys
found = {p["distribution"] for p in json.load(open(sys.argv[1]))}
wanted = set(sys.argv[2:])
if found != wanted:
    sys.exit(f"plugins: distributions {sorted(found)}, expected {sorted(wanted)}")
PY
  "$bin/ahvbackup" --json simulator serve --state "$w/sim" --port 0 --host 127.0.0.1 \
    > "$w/sim.json" 2> "$w/sim.err" &
  sim_pid=$!
  local ports=""
  for _ in $(seq 100); do
    ports="$(/usr/bin/python3 - "$w/sim.json" <<'PY' 2>/dev/null
import json, sys
facts = json.load(open(sys.argv[1]))
pc = facts["prism_central"]
iscsi = facts["prism_elements"][0]["iscsi_portal"]
print(pc.rsplit(":", 1)[1].strip("/"), iscsi.rsplit(":", 1)[1])
PY
)" && break
    kill -0 "$sim_pid" 2>/dev/null || { cat "$w/sim.err" >&2; fail "$label: simulator serve"; }
    sleep 0.2
  done
  [ -n "$ports" ] || { cat "$w/sim.json" "$w/sim.err" >&2; fail "$label: simulator facts"; }
  read -r pc_port iscsi_port <<< "$ports"
  printf '%s\n' 'prism_central = 127.0.0.1' "prism_port = $pc_port" "prism_ca_cert = $w/sim/ca.pem" \
    'user = backup' "passfile = $w/backup.pass" "state_dir = $w/state" \
    "repository = $w/repo" "debug_log = $w/ahvbackup.log" 'prism_rate_rpm = 0' \
    'data_path = iscsi' "iscsi_port = $iscsi_port" > "$w/ahvbackup.conf"
  echo 'password = backup/4u' > "$w/backup.pass"
  chmod 600 "$w/backup.pass" "$w/ahvbackup.conf"
  "$bin/ahvbackup" backup -c "$w/ahvbackup.conf" -o vm=tiny-01 > "$w/backup.out" 2>&1 \
    || { cat "$w/backup.out" >&2; fail "$label: backup against the simulator"; }
  "$bin/ahvbackup" list -c "$w/ahvbackup.conf" | grep -q tiny-01 \
    || fail "$label: list does not show the backup of tiny-01"
  "$bin/ahvbackup" verify -c "$w/ahvbackup.conf" --all > "$w/verify.out" 2>&1 \
    || { cat "$w/verify.out" >&2; fail "$label: verify"; }
  # the Bacula backend, as an operator checks it before the first job
  "$bin/ahvbackup-bacula-backend" --standalone health-check --config "$w/ahvbackup.conf" \
    > "$w/health.out" 2>&1 || { cat "$w/health.out" >&2; fail "$label: backend health-check"; }
  stop_simulator
  say "$label: --version, plugins, backup over iSCSI, list, verify, backend health-check pass"
}

# ---- wheels in a clean venv -------------------------------------------------------------
say "installing the wheels into a clean venv"
"$base_python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --find-links "$work/dist" 'ahvbackup[all]' > "$work/pip.log" 2>&1 \
  || { cat "$work/pip.log" >&2; fail "pip install ahvbackup[all] from the wheels"; }
"$work/venv/bin/python" -m pip list --editable --format=freeze --disable-pip-version-check \
  2>/dev/null | grep . && fail "the clean venv has editable installs"
"$work/venv/bin/python" - "$work/venv" <<'PY' || fail "the venv imports ahvbackup from elsewhere"
import sys
from pathlib import Path
import ahvbackup.core
where = Path(ahvbackup.core.__file__).resolve()
if not where.is_relative_to(Path(sys.argv[1]).resolve()):
    sys.exit(f"ahvbackup.core comes from {where}")
PY
run_checks "$work/venv/bin" venv

# ---- the Debian package -----------------------------------------------------------------
state_dir=/opt/bacula/working/ahvbackup-state
if dpkg-query -W -f='${db:Status-Status}' ahvbackup 2>/dev/null | grep -qx installed; then
  fail "ahvbackup is installed already; this check installs and purges its own"
fi
# what exists before, so that purge is checked to leave exactly that
before() {
  for p in /opt/ahvbackup /etc/ahvbackup /var/lib/ahvbackup /opt/bacula /opt/bacula/working \
           "$state_dir" /etc/logrotate.d/ahvbackup /usr/bin/ahvbackup; do
    [ -e "$p" ] && echo "path $p"
  done
  getent passwd bacula >/dev/null && echo "user bacula"
  getent group bacula >/dev/null && echo "group bacula"
  true
}
before > "$work/before"

say "installing $(basename "$deb") with dpkg -i"
deb_installed=1
dpkg -i "$deb" > "$work/dpkg-i.log" 2>&1 || { cat "$work/dpkg-i.log" >&2; fail "dpkg -i"; }
[ "$(stat -c '%U:%G %a' "$state_dir")" = "root:root 700" ] \
  || fail "state directory $state_dir is $(stat -c '%U:%G %a' "$state_dir"), not root:root 700"
getent passwd bacula >/dev/null && getent group bacula >/dev/null \
  || fail "no bacula user and group after installing"
cmp -s /etc/ahvbackup/ahvbackup.conf.example "$here/ahvbackup.conf" \
  || fail "/etc/ahvbackup/ahvbackup.conf.example differs from packaging/ahvbackup.conf"
for cmd in ahvbackup ahvbackup-bacula-backend; do
  [ "$(readlink "/usr/bin/$cmd")" = "/opt/ahvbackup/bin/$cmd" ] || fail "/usr/bin/$cmd"
done
[ "$(readlink -f /opt/ahvbackup/bin/python)" = "$(readlink -f /usr/bin/python3.11)" ] \
  || fail "the packaged venv does not run Debian's python3.11"
if grep -l '/root' /opt/ahvbackup/pyvenv.cfg /opt/ahvbackup/bin/ahvbackup*; then
  fail "the packaged venv names /root"
fi
if command -v logrotate >/dev/null; then
  logrotate -d /etc/logrotate.d/ahvbackup > "$work/logrotate.log" 2>&1 \
    || { cat "$work/logrotate.log" >&2; fail "logrotate -d /etc/logrotate.d/ahvbackup"; }
fi
units="$(dpkg -L ahvbackup | grep -E '\.(service|socket|timer)$' || true)"
if [ -n "$units" ]; then
  # shellcheck disable=SC2086 # one argument per unit
  systemd-analyze verify $units || fail "systemd-analyze verify"
else
  say "no systemd units in the package (no daemon yet)"
fi
run_checks /usr/bin deb

say "lintian"
lintian "$deb" > "$work/lintian.log" 2>&1 || true
grep -v '^running with root' "$work/lintian.log" || true
if grep -q '^E:' "$work/lintian.log"; then
  fail "lintian reports errors (fix them, or override and justify them in docs/install.md)"
fi

say "purging the package"
dpkg --purge ahvbackup > "$work/dpkg-purge.log" 2>&1 \
  || { cat "$work/dpkg-purge.log" >&2; fail "dpkg --purge"; }
deb_installed=""
before > "$work/after"
diff "$work/before" "$work/after" >&2 || fail "purge left or removed the above"
say "all packaging checks pass"
