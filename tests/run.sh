#!/usr/bin/env bash
# The test command (README): installs what the tests need, builds (or reuses) the guest-image
# fixtures, then runs the whole workspace's tests. Runs as root: the tests create loop-free
# images, cgroups, mount namespaces, FUSE mounts and OVS daemons, and clean them up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "tests/run.sh: run as root (the tests create cgroups, namespaces and mounts)" >&2
  exit 2
fi
bash tests/deps.sh
echo "== guest-image fixtures" >&2
FATBOX_FIXTURES=$(bash tests/fixtures/build-guest-images.sh | tail -n 1)
export FATBOX_FIXTURES
echo "fixtures: $FATBOX_FIXTURES" >&2
echo "== Glance venv (image-bridge tests)" >&2
bash tests/glance/setup.sh >/dev/null
echo "== cargo test" >&2
cargo test --workspace --release --no-fail-fast -- --test-threads="${FATBOX_TEST_THREADS:-2}"
echo "== nova driver (real nova from PyPI, real fatboxd)" >&2
NOVA_VENV=$(bash tests/nova/setup.sh | tail -n 1)
(cd tests/nova && "$NOVA_VENV/bin/python" -m pytest -p no:cacheprovider -W ignore -q -rfEs \
  test_fatbox_driver.py test_serial_console.py)
echo "== devstack plugin" >&2
bash tests/devstack/test_plugin.sh
if [ -x guestfs-tools/fuzz/ci.sh ] || [ -f guestfs-tools/fuzz/ci.sh ]; then
  echo "== fuzz smoke" >&2
  bash guestfs-tools/fuzz/ci.sh "${FATBOX_FUZZ_SECONDS:-20}"
fi
echo "== quick start (README's first command: two runs, ssh login, --clean leaves nothing)" >&2
bash tests/quickstart.sh
