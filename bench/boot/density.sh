#!/usr/bin/env bash
# Density: N instances booted in parallel; time to all running, PSS per idle instance
# (sum over the processes in its cgroup), fatboxd RSS.
# Usage: bench/boot/density.sh [N]   (root; FATBOX_BIN as in run.sh)
set -euo pipefail
N=${1:-10}
cd "$(dirname "$0")/../.."
BIN=${FATBOX_BIN:-${CARGO_TARGET_DIR:-target}/release}
FIX=${FATBOX_FIXTURES:-$(dirname "$(find /var/cache/fatbox-fixtures -mindepth 2 -maxdepth 2 -name .complete | head -n1)")}
WORK=$(mktemp -d /var/tmp/fatbox-density.XXXXXX)
DAEMON=
F() { "$BIN/fatbox" --socket "$WORK/sock" "$@"; }
cleanup() {
  set +e
  if [ -n "$DAEMON" ]; then
    # Interrupted runs: a fresh daemon live-restores the instances so they can be deleted.
    if ! F list >/dev/null 2>&1; then
      "$BIN/fatboxd" --config "$WORK/fatbox.toml" 2>>"$WORK/fatboxd.log" &
      DAEMON=$!
      for _ in $(seq 100); do F list >/dev/null 2>&1 && break; sleep 0.1; done
    fi
    for u in $(F list --json | python3 -c 'import json,sys; [print(i["uuid"]) for i in json.load(sys.stdin)]'); do
      F delete "$u"
    done
    kill "$DAEMON"; wait "$DAEMON" 2>/dev/null
  fi
  rmdir /sys/fs/cgroup/*/fatbox-density 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 1" INT TERM
printf 'state_dir = "%s/state"\nsocket = "%s/sock"\ncgroup_parent = "fatbox-density"\nboot_timeout = 600\n' "$WORK" "$WORK" > "$WORK/fatbox.toml"
"$BIN/fatboxd" --config "$WORK/fatbox.toml" 2>"$WORK/fatboxd.log" &
DAEMON=$!
until F list >/dev/null 2>&1; do sleep 0.05; done
F image import "$FIX/v3.qcow2" --name d >/dev/null
t0=$(date +%s.%N)
for i in $(seq 1 "$N"); do
  F run --image d --name "d$i" --vcpus 1 --memory 256 --disk 1 >/dev/null &
done
wait_fail=0
for j in $(jobs -p); do [ "$j" = "$DAEMON" ] && continue; wait "$j" || wait_fail=$((wait_fail + 1)); done
t1=$(date +%s.%N)
sleep 5 # let the guests settle to idle before measuring memory
pss=$(for d in /sys/fs/cgroup/unified/fatbox-density/*/; do
  find "$d" -name cgroup.procs -exec cat {} + | while read -r p; do
    awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true
  done | awk '{s+=$1} END {print s/1024}'
done | awk '{s+=$1; n++} END {printf "%.1f", s/n}')
rss=$(awk '/^VmRSS:/ {print $2/1024}' "/proc/$DAEMON/status")
python3 -c "print('instances=%d failed=%d all_running_s=%.2f pss_per_instance_mib=%s fatboxd_rss_mib=%s' % ($N, $wait_fail, $t1-$t0, '$pss', '$rss'))"
