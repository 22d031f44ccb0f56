#!/usr/bin/env bash
# Boot time and per-instance memory with isolation on (user namespace + seccomp, the
# default) vs off (--privileged), alternating in the same run, plus the first boot under a
# new id range with the shifted-copy fallback (the shift cost idmapped mounts avoid).
#   boot = `fatbox run` wall time (API call → systemd `running`)
#   PSS  = sum of Pss over the instance's processes (smaps_rollup) once running
# Usage: bench/isolation/run.sh [RUNS]   (root; FATBOX_BIN = dir with fatbox/fatboxd)
set -euo pipefail
RUNS=${1:-3}
cd "$(dirname "$0")/../.."
BIN=${FATBOX_BIN:-${CARGO_TARGET_DIR:-target}/release}
FIX=${FATBOX_FIXTURES:-$(dirname "$(find /var/cache/fatbox-fixtures -mindepth 2 -maxdepth 2 -name .complete | head -n1)")}
WORK=$(mktemp -d /var/tmp/fatbox-isobench.XXXXXX)
DAEMON=
cleanup() {
  set +e
  if [ -n "$DAEMON" ]; then
    for u in $("$BIN/fatbox" --socket "$WORK/sock" list --json | python3 -c 'import json,sys; [print(i["uuid"]) for i in json.load(sys.stdin)]'); do
      "$BIN/fatbox" --socket "$WORK/sock" delete "$u"
    done
    kill "$DAEMON"; wait "$DAEMON" 2>/dev/null
  fi
  rmdir /sys/fs/cgroup/*/fatbox-isobench 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 1" INT TERM
now() { date +%s.%N; }
start_daemon() {
  cat > "$WORK/fatbox.toml" <<EOT
state_dir = "$WORK/state"
socket = "$WORK/sock"
cgroup_parent = "fatbox-isobench"
[security]
allow_privileged = true
$1
EOT
  "$BIN/fatboxd" --config "$WORK/fatbox.toml" 2>>"$WORK/fatboxd.log" &
  DAEMON=$!
  until "$BIN/fatbox" --socket "$WORK/sock" list >/dev/null 2>&1; do sleep 0.05; done
}
F() { "$BIN/fatbox" --socket "$WORK/sock" "$@"; }
pss_kib() { # sum of Pss over the processes of the instance's unified cgroup tree
  local cg; cg=$(F show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cgroups"][-1])')
  find "$cg" -name cgroup.procs -exec cat {} + | while read -r p; do
    awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null
  done | awk '{s+=$1} END {print s+0}'
}
start_daemon ""
F image import "$FIX/v3.qcow2" --name bench >/dev/null
echo "| run | mode | boot s | PSS MiB |"
echo "|---|---|---|---|"
for i in $(seq 1 "$RUNS"); do
  for mode in isolated privileged; do
    flag=(); [ $mode = privileged ] && flag=(--privileged)
    t0=$(now)
    F run --image bench --name "b$mode$i" --vcpus 1 --memory 512 --disk 1 "${flag[@]}" >/dev/null
    t1=$(now)
    # Let the boot's transient processes settle (bounded poll on the process count).
    prev=-1; for _ in $(seq 40); do n=$(F exec "b$mode$i" -- sh -c 'ls /proc | grep -c "^[0-9]"'); [ "$n" = "$prev" ] && break; prev=$n; sleep 0.25; done
    pss=$(pss_kib "b$mode$i")
    printf '| %s | %s | %.2f | %.1f |\n' "$i" "$mode" "$(echo "$t1 - $t0" | bc)" "$(echo "$pss / 1024" | bc -l)"
    F delete "b$mode$i"
  done
done
# First boot under a new id range with the copy fallback (isolated ranges: each instance a new range).
kill "$DAEMON"; wait "$DAEMON" 2>/dev/null || true
start_daemon $'isolated_ranges = true\nshift = "copy"\nid_base = 3000000'
for i in 1 2; do
  t0=$(now); F run --image bench --name "c$i" --vcpus 1 --memory 512 --disk 1 >/dev/null; t1=$(now)
  label="new range, shifted copy made"; [ $i = 2 ] && label="same range again, copy reused"
  printf "| copy-shift %s | %s | %.2f | |\n" "$i" "$label" "$(echo "$t1 - $t0" | bc)"
  F delete "c$i"
done
grep -a "shifted copies" "$WORK/fatboxd.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -2
