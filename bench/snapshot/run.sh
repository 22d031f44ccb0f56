#!/usr/bin/env bash
# snapshot bench: a 10 MiB change on the fixture image (booted from a local Glance),
# snapshotted while it runs — wall time, bytes uploaded, time frozen — against uploading the
# whole image (what a VM snapshot sends); then the pull of that snapshot on a host that has
# the parent. Root. Writes $BENCH_OUT/snapshot.json (default bench/out) via bench/emit.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
export FATBOX_FIXTURES="${FATBOX_FIXTURES:-$(bash tests/fixtures/build-guest-images.sh | tail -n1)}"
OUT="${BENCH_OUT:-$PWD/bench/out}"
mkdir -p "$OUT"
bash tests/glance/setup.sh >/dev/null
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
cargo test --release -p driver --test glance_snapshot -- --ignored --nocapture bench_ 2>&1 | tee "$LOG" | grep '^BENCH ' || {
  tail -n 40 "$LOG" >&2; exit 1; }
v() { sed -n "s/^BENCH $1=//p" "$LOG" | tail -n1; }
printf '| what | value |\n|---|---|\n'
printf '| snapshot of a running instance, 10 MiB change | %s s, %s MiB uploaded, frozen %s ms |\n' "$(v snapshot_s)" "$(v uploaded_mib)" "$(v frozen_ms)"
printf '| of which waiting for the freezer to report FROZEN | %s ms |\n' "$(v freeze_wait_ms)"
printf '| whole-image upload (curl, the VM way) | %s s, %s MiB |\n' "$(v full_upload_s)" "$(v full_upload_mib)"
printf '| pull of the snapshot, parent cached | %s s |\n' "$(v pull_parent_cached_s)"
python3 bench/emit.py "$OUT/snapshot.json" --area snapshot \
  --title "Snapshots to Glance: a 10 MiB change" --command "bench/snapshot/run.sh" \
  --row "bytes uploaded for a 10 MiB change (random data)|MiB|$(v uploaded_mib)|whole image upload (fixture qcow2)|$(v full_upload_mib)|at_most:12|" \
  --row "snapshot of a running instance, POST → image active|s|$(v snapshot_s)|whole image upload with curl|$(v full_upload_s)||" \
  --row "instance frozen while its upper dir is archived|ms|$(v frozen_ms)||||" \
  --row "of which: waiting for the freezer to report FROZEN|ms|$(v freeze_wait_ms)||||" \
  --row "pull of the snapshot on a host with the parent cached|s|$(v pull_parent_cached_s)||||" \
  --note "The layer is the instance's overlay upper dir (tar+zstd); the parent's layers are not uploaded again. Random data does not compress, so the upload is ≈ the change."
