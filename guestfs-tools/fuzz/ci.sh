#!/bin/sh
# Build every fuzz target and run each for SECONDS (default 30). Needs the nightly toolchain
# and cargo-fuzz (cargo install cargo-fuzz). Exits non-zero on the first crash.
set -eu
SECONDS_PER_TARGET=${1:-30}
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$(pwd)/target}"
cargo +nightly fuzz build -O
for target in $(cargo +nightly fuzz list); do
    mkdir -p "corpus/$target"
    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    # -rss_limit_mb/-malloc_limit_mb catch allocations proportional to hostile sizes.
    cargo +nightly fuzz run -O "$target" "corpus/$target" seeds/"$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -max_len=1048576 -print_final_stats=1
done
