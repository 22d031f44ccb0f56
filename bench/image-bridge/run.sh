#!/usr/bin/env bash
# image-bridge bench: cold pull+convert from a local Glance vs curl of the same file, and
# warm-cache ensure_image latency. Root. BENCH_IMAGE=FILE.qcow2|.raw overrides the fixture.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FATBOX_FIXTURES="${FATBOX_FIXTURES:-$(bash tests/fixtures/build-guest-images.sh | tail -n1)}"
bash tests/glance/setup.sh >/dev/null
cargo test --release -p image-bridge --test bench -- --ignored --nocapture 2>&1 | grep '^|'
