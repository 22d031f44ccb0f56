#!/usr/bin/env bash
# Density: N instances booted in parallel; time to all running, PSS per idle instance
# (sum over the processes in its cgroup), fatboxd RSS.
# Usage: bench/boot/density.sh [N ...]   (root; FATBOX_BIN as in run.sh). Several N give the
# density curve: each N boots from zero (the previous batch deleted first). Results also go to
# $BENCH_OUT/density.json (default bench/out) for bench/REPORT.md.
set -euo pipefail
[ $# -eq 0 ] && set -- 10
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
measure() {
  local N=$1 t0 t1 wait_fail=0 pids=() pss rss
  t0=$(date +%s.%N)
  for i in $(seq 1 "$N"); do
    F run --image d --name "d$i" --vcpus 1 --memory 256 --disk 1 >/dev/null &
    pids+=($!)
  done
  for j in "${pids[@]}"; do wait "$j" || wait_fail=$((wait_fail + 1)); done
  t1=$(date +%s.%N)
  sleep 5 # let the guests settle to idle before measuring memory
  pss=$(for d in /sys/fs/cgroup/unified/fatbox-density/*/; do
    find "$d" -name cgroup.procs -exec cat {} + | while read -r p; do
      awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || true
    done | awk '{s+=$1} END {print s/1024}'
  done | awk '{s+=$1; n++} END {printf "%.1f", s/n}')
  rss=$(awk '/^VmRSS:/ {print $2/1024}' "/proc/$DAEMON/status")
  python3 -c "print('instances=%d failed=%d all_running_s=%.2f pss_per_instance_mib=%s fatboxd_rss_mib=%s' % ($N, $wait_fail, $t1-$t0, '$pss', '$rss'))"
  for u in $(F list --json | python3 -c 'import json,sys; [print(i["uuid"]) for i in json.load(sys.stdin)]'); do
    F delete "$u"
  done
}
LINES=()
for n in "$@"; do
  line=$(measure "$n"); echo "$line"; LINES+=("$line")
done
# (The lines go in as an argument: the heredoc is python's stdin.)
python3 - "${BENCH_OUT:-bench/out}/density.json" "$*" "$(printf '%s\n' "${LINES[@]}")" <<'PY'
import subprocess, sys
out, ns = sys.argv[1], sys.argv[2]
rows = [dict(kv.split("=") for kv in l.split()) for l in sys.argv[3].splitlines() if l.strip()]
args = []
for r in rows:
    n = r["instances"]
    args += ["--point", f"Time to all running|fatbox|instances booted in parallel|seconds|{n}|{r['all_running_s']}",
             "--point", f"Memory per idle instance|PSS per instance|instances|MiB|{n}|{r['pss_per_instance_mib']}",
             "--point", f"Memory per idle instance|fatboxd RSS|instances|MiB|{n}|{r['fatboxd_rss_mib']}"]
    if r["failed"] != "0":
        args += ["--note", f"{r['failed']} of {n} instances failed to boot in the {n}-instance batch."]
big = max(rows, key=lambda r: int(r["instances"]))
n = big["instances"]
args += ["--row", f"{n} instances in parallel: time to all running|s|{big['all_running_s']}||||",
         "--row", f"memory per idle instance (PSS, {n} running)|MiB|{big['pss_per_instance_mib']}|||at_most:25|",
         "--row", f"fatboxd RSS with {n} instances|MiB|{big['fatboxd_rss_mib']}||||",
         "--row", f"instances that failed to boot ({n} batch)|count|{big['failed']}|||at_most:0|"]
subprocess.run([sys.executable, "bench/emit.py", out, "--area", "density", "--title", "Density (2 cores)",
    "--command", f"bench/boot/density.sh {ns}", *args], check=True)
PY
