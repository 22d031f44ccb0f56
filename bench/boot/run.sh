#!/usr/bin/env bash
# Boot time, side by side, on the same rootfs (the image's unpacked layers, warm cache):
#   fatbox:  `fatbox run` (API call) → systemd `running`, and → sshd listening
#   nspawn:  `systemd-nspawn --register=no --keep-unit --private-network -b` (own netns, as fatbox) → systemd `running`
# Usage: bench/boot/run.sh [RUNS]   (root; FATBOX_FIXTURES or the cached fixture dir;
#        FATBOX_BIN = directory holding fatbox/fatboxd, default target/release)
set -euo pipefail
RUNS=${1:-5}
cd "$(dirname "$0")/../.."
BIN=${FATBOX_BIN:-${CARGO_TARGET_DIR:-target}/release}
FIX=${FATBOX_FIXTURES:-$(dirname "$(find /var/cache/fatbox-fixtures -mindepth 2 -maxdepth 2 -name .complete | head -n1)")}
WORK=$(mktemp -d /var/tmp/fatbox-bench.XXXXXX)
DAEMON=
cleanup() {
  set +e
  [ -n "${NSPAWN:-}" ] && kill "$NSPAWN" 2>/dev/null && wait "$NSPAWN" 2>/dev/null
  mountpoint -q "$WORK/nsroot" && umount "$WORK/nsroot"
  if [ -n "$DAEMON" ]; then
    for u in $("$BIN/fatbox" --socket "$WORK/sock" list --json | python3 -c 'import json,sys; [print(i["uuid"]) for i in json.load(sys.stdin)]'); do
      "$BIN/fatbox" --socket "$WORK/sock" delete "$u"
    done
    kill "$DAEMON"; wait "$DAEMON" 2>/dev/null
  fi
  rmdir /sys/fs/cgroup/*/fatbox-bench 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 1" INT TERM
now() { date +%s.%N; }
cat > "$WORK/fatbox.toml" <<EOT
state_dir = "$WORK/state"
socket = "$WORK/sock"
cgroup_parent = "fatbox-bench"
EOT
"$BIN/fatboxd" --config "$WORK/fatbox.toml" 2>"${FATBOX_BENCH_LOG:-$WORK/fatboxd.log}" &
DAEMON=$!
until "$BIN/fatbox" --socket "$WORK/sock" list >/dev/null 2>&1; do sleep 0.05; done
F() { "$BIN/fatbox" --socket "$WORK/sock" "$@"; }
F image import "$FIX/v3.qcow2" --name bench >/dev/null
RESULTS=()
echo "run  fatbox_running_s  fatbox_sshd_s  nspawn_running_s"
for i in $(seq 1 "$RUNS"); do
  t0=$(now)
  F run --image bench --name "b$i" --vcpus 1 --memory 512 --disk 1 >/dev/null
  t1=$(now)
  until F exec "b$i" -- ss -ltnH 'sport = :22' 2>/dev/null | grep -q LISTEN; do sleep 0.005; done
  t2=$(now)
  F delete "b$i"

  # nspawn on an overlay of the same layers (top first), fresh upper each run.
  lowers=$(python3 - "$WORK/state" <<'PY'
import json, sys, os
st = sys.argv[1]
idx = json.load(open(f"{st}/images/index.json"))
m = [d for d in idx["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "bench"][0]
man = json.load(open(f"{st}/images/blobs/sha256/" + m["digest"].split(":")[1]))
print(":".join(f"{st}/layers/" + l["digest"].split(":")[1] for l in reversed(man["layers"])))
PY
)
  rm -rf "$WORK/up" "$WORK/wk"; mkdir -p "$WORK/up" "$WORK/wk" "$WORK/nsroot"
  mount -t overlay overlay -o "lowerdir=$lowers,upperdir=$WORK/up,workdir=$WORK/wk" "$WORK/nsroot"
  # fatboxd writes host keys from its pool before init starts (hostkeys.rs); nspawn gets its
  # keys before the clock starts too, so both compare runtimes, not RSA prime searches.
  ssh-keygen -q -A -f "$WORK/nsroot" >/dev/null
  t3=$(now)
  systemd-nspawn --register=no --keep-unit --private-network -q -b -D "$WORK/nsroot" --console=read-only >/dev/null 2>&1 &
  NSPAWN=$!
  leader=
  while :; do
    leader=${leader:-$(pgrep -P "$NSPAWN" | head -n1 || true)}
    if [ -n "$leader" ] && [ -e "/proc/$leader/root/run/systemd/private" ]; then
      s=$(nsenter -t "$leader" -m -u -i -n -p -r -w systemctl is-system-running --wait 2>/dev/null || true)
      case "$s" in running|degraded) break;; esac
    fi
    sleep 0.005
  done
  t4=$(now)
  kill "$NSPAWN"; wait "$NSPAWN" 2>/dev/null || true; NSPAWN=
  umount "$WORK/nsroot"
  line=$(python3 -c "print('%d  %.3f  %.3f  %.3f' % ($i, $t1-$t0, $t2-$t0, $t4-$t3))")
  echo "$line"; RESULTS+=("$line")
done
# Medians into the report (bench/REPORT.md via bench/run.sh).
# (The lines go in as an argument: the heredoc is python's stdin.)
python3 - "${BENCH_OUT:-bench/out}/boot.json" "$RUNS" "$(printf '%s\n' "${RESULTS[@]}")" <<'PY'
import statistics, subprocess, sys
out, runs = sys.argv[1], sys.argv[2]
rows = [list(map(float, l.split())) for l in sys.argv[3].splitlines() if l.strip()]
med = lambda k: statistics.median(r[k] for r in rows)
pts = []
for r in rows:
    n = int(r[0])
    pts += ["--point", f"Boot time per run|fatbox → running|run|seconds|{n}|{r[1]}",
            "--point", f"Boot time per run|fatbox → sshd|run|seconds|{n}|{r[2]}",
            "--point", f"Boot time per run|nspawn → running|run|seconds|{n}|{r[3]}"]
subprocess.run([sys.executable, "bench/emit.py", out, "--area", "boot", "--title", "Boot time (warm layer cache)",
    "--command", f"bench/boot/run.sh {runs}",
    "--row", f"API call → systemd running (median of {len(rows)})|s|{med(1)}|systemd-nspawn -b|{med(3)}|ratio_at_most:1.1",
    "--row", f"API call → sshd accepting (median)|s|{med(2)}||||",
    "--note", "nspawn runs on an overlay of the same image layers, own netns (--private-network), fresh upper dir each run.",
    "--note", "Both start with SSH host keys present: fatboxd writes a set from its pool (ssh_host_key_pool) before init, nspawn's are made by ssh-keygen -A before its clock starts. Generated at boot instead, the keys took 0.4-2.7 s of a 0.6-3.2 s first boot here (systemd-analyze blame: fatbox-ssh-keygen.service).",
    *pts], check=True)
PY
