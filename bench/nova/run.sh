#!/usr/bin/env bash
# Nova driver benchmark (root): real fatboxd + fixture image, see bench_driver.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=$(bash "$ROOT/tests/nova/setup.sh" | tail -n1)
FATBOX_FIXTURES=${FATBOX_FIXTURES:-$(bash "$ROOT/tests/fixtures/build-guest-images.sh" | tail -n1)}
export FATBOX_FIXTURES
cd "$ROOT/bench/nova"
PYTHONPATH="$ROOT/tests/nova" exec "$VENV/bin/python" -m pytest -p no:cacheprovider -W ignore \
    -q -s --rootdir "$ROOT/tests/nova" -c /dev/null -p conftest bench_driver.py
