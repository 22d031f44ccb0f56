#!/usr/bin/env bash
# Runs every benchmark and writes bench/REPORT.md + bench/charts/*.png from their results.
#   bench/run.sh [--quick] [AREA ...]     (root; areas: convert procfs boot density network isolation
#                                         image-bridge snapshot nova)
# --quick: fewer repetitions and smaller sizes (about 10 min on 2 cores); the full run takes
# about 30 min. Each area writes bench/out/<area>.json (bench/emit.py); an area that fails is
# named at the end and the report is still written from the others.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""; AREAS=()
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    convert|procfs|boot|density|network|isolation|image-bridge|snapshot|nova) AREAS+=("$a") ;;
    *) echo "bench/run.sh: unknown argument '$a' (areas: convert procfs boot density network isolation image-bridge snapshot nova)" >&2; exit 2 ;;
  esac
done
[ ${#AREAS[@]} -eq 0 ] && AREAS=(convert procfs boot density network isolation image-bridge snapshot nova)
[ "$(id -u)" = 0 ] || { echo "bench/run.sh: needs root (cgroups, mounts, OVS)" >&2; exit 2; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export BENCH_OUT=${BENCH_OUT:-$PWD/bench/out}
export FATBOX_BIN=$CARGO_TARGET_DIR/release
mkdir -p "$BENCH_OUT"

step() { printf '\n=== %s ===\n' "$*"; }
step "dependencies, release build, fixtures"
bash tests/deps.sh || exit 1
cargo build --release --workspace --bins -q || exit 1
FATBOX_FIXTURES=$(bash tests/fixtures/build-guest-images.sh | tail -n1) || exit 1
export FATBOX_FIXTURES

FAILED=()
for area in "${AREAS[@]}"; do
  rm -f "$BENCH_OUT/$area.json"
  step "$area"
  case "$area" in
    convert) bash bench/convert/run.sh ${QUICK:+--quick} ;;
    procfs) if [ -n "$QUICK" ]; then bash bench/procfs/run.sh 2 5; else bash bench/procfs/run.sh 5 30; fi ;;
    boot) if [ -n "$QUICK" ]; then bash bench/boot/run.sh 3; else bash bench/boot/run.sh 10; fi ;;
    density) if [ -n "$QUICK" ]; then bash bench/boot/density.sh 1 5 10; else bash bench/boot/density.sh 1 10 25 50; fi ;;
    network) bash bench/network/run.sh ;;
    isolation)
      runs=5; [ -n "$QUICK" ] && runs=3
      bash bench/isolation/run.sh "$runs" | tee "$BENCH_OUT/isolation.md" &&
        python3 - "$BENCH_OUT/isolation.md" "$BENCH_OUT/isolation.json" "$runs" <<'PY'
import statistics, subprocess, sys
md, out, runs = sys.argv[1:]
iso, priv, pss_i, pss_p, copy = [], [], [], [], []
for line in open(md):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if len(c) == 4 and c[1] in ("isolated", "privileged"):
        (iso if c[1] == "isolated" else priv).append(float(c[2]))
        (pss_i if c[1] == "isolated" else pss_p).append(float(c[3]))
    elif len(c) >= 3 and c[0].startswith("copy-shift"):
        copy.append(float(c[2]))
m = statistics.median
args = ["--row", f"boot, user namespace + seccomp (median of {len(iso)})|s|{m(iso)}|same, privileged (no userns, no seccomp)|{m(priv)}|ratio_at_most:1.05|",
        "--row", f"PSS per instance, isolated|MiB|{m(pss_i)}|same, privileged|{m(pss_p)}||"]
if copy:
    args += ["--row", f"first boot under a new id range, shifted-copy fallback|s|{copy[0]}||||"]
    if len(copy) > 1:
        args += ["--row", f"second boot in that range (copy reused)|s|{copy[1]}||||"]
for i, (a, b) in enumerate(zip(iso, priv), 1):
    args += ["--point", f"Boot time per run|isolated|run|seconds|{i}|{a}",
             "--point", f"Boot time per run|privileged|run|seconds|{i}|{b}"]
subprocess.run([sys.executable, "bench/emit.py", out, "--area", "isolation",
    "--title", "Isolation cost: user namespace + seccomp vs privileged", "--command", f"bench/isolation/run.sh {runs}",
    "--note", "With idmapped mounts (the default) a new id range costs nothing; the copy rows show the fallback the kernel would force without them.",
    *args], check=True)
PY
      ;;
    image-bridge)
      bash bench/image-bridge/run.sh | tee "$BENCH_OUT/image-bridge.md" &&
        python3 - "$BENCH_OUT/image-bridge.md" "$BENCH_OUT/image-bridge.json" <<'PY'
import re, subprocess, sys
md, out = sys.argv[1:]
cells = {}
for line in open(md):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if len(c) == 2:
        cells[c[0]] = c[1]
num = lambda pat, key: float(re.search(pat, next(v for k, v in cells.items() if k.startswith(key))).group(1))
curl_s, curl_mibs = num(r"([\d.]+) s", "curl"), num(r"= ([\d.]+) MiB/s", "curl")
dl_mibs = num(r"= ([\d.]+) MiB/s", "image-bridge download")
cold_s, cold_mibs = num(r"([\d.]+) s", "cold ensure_image"), num(r"= ([\d.]+) MiB/s", "cold ensure_image")
warm_med = num(r"median ([\d.]+) ms", "warm ensure_image")
warm_p99 = num(r"p99 ([\d.]+) ms", "warm ensure_image")
subprocess.run([sys.executable, "bench/emit.py", out, "--area", "image-bridge",
    "--title", "image-bridge: Glance pulls and the layer cache", "--command", "bench/image-bridge/run.sh",
    "--row", f"download from the local Glance, hash verified while streaming|MiB/s|{dl_mibs}|curl of the same file|{curl_mibs}||higher",
    "--row", f"cold ensure_image: download + verify + convert + unpack|MiB/s|{cold_mibs}|curl of the same file|{curl_mibs}||higher",
    "--row", f"cold ensure_image, wall time|s|{cold_s}|curl of the same file|{curl_s}||",
    "--row", f"warm ensure_image, median of 1000|ms|{warm_med}|||at_most:5|",
    "--row", f"warm ensure_image, p99|ms|{warm_p99}|||at_most:5|",
    "--note", f"image: {cells.get('image', '?')}"], check=True)
PY
      ;;
    snapshot) bash bench/snapshot/run.sh ;;
    nova)
      bash bench/nova/run.sh | tee "$BENCH_OUT/nova.md" &&
        python3 - "$BENCH_OUT/nova.md" "$BENCH_OUT/nova.json" <<'PY'
import subprocess, sys
md, out = sys.argv[1:]
rows = {}
for line in open(md):
    c = [x.strip() for x in line.strip().strip("|").split("|")]
    if len(c) == 5 and c[1].isdigit():
        rows[c[0]] = (int(c[1]), float(c[2]))
def pick(prefix):
    return next(v for k, v in rows.items() if k.startswith(prefix))
sp, api_sp = pick("spawn -> RUNNING"), pick("create -> running")
de, api_de = pick("destroy (driver)"), pick("delete (API)")
gi = pick("get_info"); show = pick("GET /v1/instances")
subprocess.run([sys.executable, "bench/emit.py", out, "--area", "nova",
    "--title", "Nova driver (FatboxDriver) over fatboxd's API", "--command", "bench/nova/run.sh",
    "--row", f"spawn → RUNNING through the driver (mean of {sp[0]})|ms|{sp[1]}|create → running, direct API|{api_sp[1]}||",
    "--row", f"destroy through the driver (mean of {de[0]})|ms|{de[1]}|delete, direct API|{api_de[1]}||",
    "--row", f"get_info (mean of {gi[0]})|ms|{gi[1]}|GET /v1/instances/ID, direct|{show[1]}||",
    "--note", "The driver is a thin blocking client over the unix socket; the anchor is the same call made directly."], check=True)
PY
      ;;
  esac
  rc=$?
  if [ $rc -ne 0 ] || [ ! -s "$BENCH_OUT/$area.json" ]; then
    FAILED+=("$area (exit $rc)")
  fi
done

step "report"
"$CARGO_TARGET_DIR/release/fatbox-bench-report" --results "$BENCH_OUT" --out bench/REPORT.md \
  --charts bench/charts ${QUICK:+--quick} || exit 1
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "bench/run.sh: these areas failed and are missing from the report: ${FAILED[*]}" >&2
  exit 1
fi
