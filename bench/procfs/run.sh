#!/usr/bin/env bash
# Benchmark fatbox-procfs against lxcfs 5.0.3 in the same run (root, cgroup v1/hybrid host).
#   bench/procfs/run.sh [SECONDS_PER_RUN=5] [CPU_SAMPLE_SECONDS=30]
# Prints a markdown table: open+read+close of meminfo by a process inside a "container"
# (cgroup with a 512 MiB limit + own pid namespace, which is what lxcfs keys on), with 1 and
# 16 reader threads; then the daemon's CPU use with 50 registered containers, loadavg on.
set -euo pipefail
SECS=${1:-5}
CPU_SECS=${2:-30}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -q -p procfs-fuse --bins --manifest-path "$ROOT/Cargo.toml"
BIN=$CARGO_TARGET_DIR/release/fatbox-procfs
BENCH=$CARGO_TARGET_DIR/release/procfs-bench
CTRLS="memory cpuset cpu cpuacct blkio"
TMP=$(mktemp -d /tmp/procfs-bench.XXXXXX)
CG=/fatbox-bench-$$
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  "$BIN" shutdown --mount "$TMP/mnt" --keeper-socket "$TMP/keeper.sock" 2>/dev/null
  [ -f "$TMP/lxcfs.pid" ] && kill -9 "$(cat "$TMP/lxcfs.pid")" 2>/dev/null
  sleep 0.2
  umount -l "$TMP/lxmnt" 2>/dev/null
  for c in $CTRLS; do
    d=/sys/fs/cgroup/$c$CG
    [ -d "$d" ] || continue
    find "$d" -depth -type d | while read -r x; do
      while read -r p; do echo "$p" > "/sys/fs/cgroup/$c/cgroup.procs"; done < "$x/cgroup.procs"
      rmdir "$x" 2>/dev/null
    done
  done
  rm -rf "$TMP"
}
trap cleanup EXIT
# Quiet job-kill notices during cleanup.
set +m

mkcg() { # path below $CG
  for c in $CTRLS; do mkdir -p "/sys/fs/cgroup/$c$CG/$1"; done
  for d in "" "/$1"; do
    for f in cpuset.cpus cpuset.mems; do
      cat "/sys/fs/cgroup/cpuset/$f" > "/sys/fs/cgroup/cpuset$CG$d/$f"
    done
  done
}
# Shell snippet that moves the running shell ($$ stays literal) into cgroup $1 everywhere.
# shellcheck disable=SC2016
enter() { for c in $CTRLS; do printf 'echo $$ > /sys/fs/cgroup/%s%s/%s/cgroup.procs; ' "$c" "$CG" "$1"; done; }

# Extra daemon flags, e.g. PROCFS_ARGS="--coalesce-ms 0 --clone-fd".
read -ra EXTRA <<< "${PROCFS_ARGS:-}"
mkdir -p "$TMP/mnt" "$TMP/reg" "$TMP/lxmnt"
lxcfs -f --enable-cfs -p "$TMP/lxcfs.pid" "$TMP/lxmnt" >/dev/null 2>&1 &
PIDS+=("$!")
"$BIN" serve --mount "$TMP/mnt" --registry "$TMP/reg" --keeper-socket "$TMP/keeper.sock" \
  "${EXTRA[@]}" 2>"$TMP/daemon.log" &
DAEMON=$!
PIDS+=("$DAEMON")
for _ in $(seq 100); do
  [ -r "$TMP/lxmnt/proc/meminfo" ] && grep -q " $TMP/mnt " /proc/self/mountinfo && break
  sleep 0.1
done
KEEPER=$(cat "$TMP/keeper.sock.pid"); PIDS+=("$KEEPER")

mkcg c0
echo $((512 << 20)) > /sys/fs/cgroup/memory$CG/c0/memory.limit_in_bytes
bash -c "$(enter c0) exec unshare -p -f --kill-child sleep 3600" &
PIDS+=("$!")
for _ in $(seq 100); do INIT=$(pgrep -P $! sleep || true); [ -n "$INIT" ] && break; sleep 0.05; done
PIDS+=("$INIT")
printf '{"id":"bench","cgroup":"%s/c0","init_pid":%s}' "$CG" "$INIT" > "$TMP/reg/bench.json"
sleep 0.3

inrun() { bash -c "$(enter c0) exec nsenter -t $INIT -p -- $*"; }
# Sanity: both report the container's 512 MiB.
for m in "$TMP/mnt" "$TMP/lxmnt"; do
  t=$(inrun cat "$m/proc/meminfo" | awk '/^MemTotal/{print $2}')
  [ "$t" = 524288 ] || { echo "unexpected MemTotal $t from $m" >&2; exit 1; }
done

echo "daemon flags: ${PROCFS_ARGS:-(defaults)}; $(nproc) CPUs; loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
EMIT=()
echo "| readers | lxcfs 5.0.3 reads/s | fatbox-procfs reads/s | ratio |"
echo "|---:|---:|---:|---:|"
for n in 1 16; do
  l=$(inrun "$BENCH" "$TMP/lxmnt/proc/meminfo" "$n" "$SECS" | cut -d' ' -f1)
  o=$(inrun "$BENCH" "$TMP/mnt/proc/meminfo" "$n" "$SECS" | cut -d' ' -f1)
  echo "| $n | $l | $o | $(awk -v a="$o" -v b="$l" 'BEGIN{printf "%.2fx", a/b}') |"
  EMIT+=(--row "/proc/meminfo open+read+close, $n reader(s)|reads/s|$o|lxcfs 5.0.3|$l|ratio_at_least:1|higher")
done

# Daemon CPU with 50 registered containers and loadavg sampling on (no readers).
for i in $(seq 1 50); do
  mkcg "n$i"
  bash -c "$(enter "n$i") exec sleep 3600" &
  PIDS+=("$!")
  printf '{"id":"n%s","cgroup":"%s/n%s","init_pid":%s}' "$i" "$CG" "$i" "$!" > "$TMP/reg/n$i.json"
done
sleep 1
tick=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$DAEMON/stat; }
a=$(cpu); sleep "$CPU_SECS"; b=$(cpu)
echo
echo "daemon CPU with 51 registered containers, loadavg sampling every 5 s, ${CPU_SECS}s idle:" \
  "$(awk -v a="$a" -v b="$b" -v t="$tick" -v s="$CPU_SECS" 'BEGIN{printf "%.3f%% of one core", (b-a)/t/s*100}')"
cpu_pct=$(awk -v a="$a" -v b="$b" -v t="$tick" -v s="$CPU_SECS" 'BEGIN{printf "%.3f", (b-a)/t/s*100}')
(cd "$ROOT" && python3 bench/emit.py "${BENCH_OUT:-$ROOT/bench/out}/procfs.json" --area procfs \
  --title "fatbox-procfs vs lxcfs (same run)" --command "bench/procfs/run.sh $SECS $CPU_SECS" \
  "${EMIT[@]}" --row "daemon CPU, 51 registered containers, idle|% of one core|$cpu_pct||||" \
  --note "daemon flags: ${PROCFS_ARGS:-(defaults)}; readers run inside a cgroup with a 512 MiB limit and their own pid namespace.")
