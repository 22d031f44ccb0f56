#!/usr/bin/env bash
# Runs Nova's own test_virt_drivers.py driver tests against FatboxDriver (a report, not a
# gate: see nova_virt_drivers.py). Usage: run-nova-virt-tests.sh [pytest -k expression]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$(bash "$HERE/setup.sh" | tail -n1)
cd "$HERE"
# Nova's tests destroy running guests that are still booting; a guest's systemd may hold a
# clean stop until its start jobs end. The report does not test clean shutdown: kill sooner.
export FATBOX_TEST_STOP_TIMEOUT=${FATBOX_TEST_STOP_TIMEOUT:-3}
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -W ignore -q -rfE \
    ${1:+-k "$1"} nova_virt_drivers.py
