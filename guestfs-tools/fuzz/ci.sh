#!/bin/sh
# Build every fuzz target and run each for SECONDS (default 30). Needs the nightly toolchain
# and cargo-fuzz (cargo install cargo-fuzz). Exits non-zero on the first crash.
set -eu
SECONDS_PER_TARGET=${1:-30}
cd "$(dirname "$0")"
# Outside the clone so that CI reruns on one machine reuse the (slow) instrumented build.
export CARGO_TARGET_DIR="${FATBOX_FUZZ_TARGET_DIR:-/var/cache/fatbox-fuzz-target}"
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz smoke SKIPPED: no nightly toolchain on this machine (libFuzzer needs it)" >&2
    exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz --version 0.13.2
fi
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    # Same limits as long-run.sh (128 KiB keeps input copies off ASan's mmap path).
    case $target in
        partitions|oci_layer) max_len=65536 ;;
        ext4) max_len=262144 ;;
        *) max_len=131072 ;;
    esac
    dict=""
    [ -f "dicts/$target.dict" ] && dict="-dict=dicts/$target.dict"
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    # -rss_limit_mb/-malloc_limit_mb catch allocations proportional to hostile sizes.
    cargo +nightly fuzz run -O "$target" "corpus/$target" seeds/"$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -max_len="$max_len" -print_final_stats=1 $dict
done
