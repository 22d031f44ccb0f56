#!/bin/sh
# Long by-hand fuzz run of one target, resumable: the corpus lives outside the clone.
#   ./long-run.sh TARGET [RUNS] [MAX_SECONDS]
# FATBOX_FUZZ_SANITIZER=none runs a `cargo fuzz build -O -s none` build (about 10x the
# executions per second; Rust's bounds checks stay, ASan's
# checks of unsafe code do not) and tags its log "TARGET-nosan" so results.sh counts it apart.
# One fuzzer process (no -jobs) at a time, at the lowest priority: the machine is shared. The final
# libFuzzer stats (stat::number_of_executed_units ...) go to the log, for RESULTS.md.
set -eu
target=$1
runs=${2:-10000000}
secs=${3:-0}
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${FATBOX_FUZZ_TARGET_DIR:-/var/cache/fatbox-fuzz-target}"
corpus="${FATBOX_FUZZ_CORPUS:-/var/cache/fatbox-fuzz-corpus}/$target"
logs="${FATBOX_FUZZ_LOGS:-/var/cache/fatbox-fuzz-corpus/logs}"
mkdir -p "$corpus" "$logs"
# At most 128 KiB: above that every input copy is a fresh mmap under ASan (page faults cost
# more than the parsing). The small seeds (ext4/small112.img, guest_tree/gpt-small.img) fit
# whole; the bigger ones are cut at max_len, their metadata sits at the front. Except ext4:
# capped at 128 KiB its corpus reached 1216 edges instead of 1296 (bigger inputs reach more;
# a journal is at least 1024 blocks) for no measurable gain in speed (933 vs 922 exec/s).
case $target in
    partitions|oci_layer) max_len=65536 ;;
    ext4) max_len=262144 ;;
    *) max_len=131072 ;;
esac
dict=""
[ -f "dicts/$target.dict" ] && dict="-dict=dicts/$target.dict"
tag=$target
[ "${FATBOX_FUZZ_SANITIZER:-address}" = none ] && tag=$target-nosan
log="$logs/$tag-$(date -u +%Y%m%dT%H%M%S).log"
echo "logging to $log"
exec nice -n 19 "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$target" \
    "$corpus" "seeds/$target" -runs="$runs" -max_total_time="$secs" \
    -rss_limit_mb=1024 -malloc_limit_mb=256 -max_len="$max_len" -print_final_stats=1 $dict \
    -artifact_prefix="$logs/$target-" >"$log" 2>&1
