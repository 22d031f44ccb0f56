#!/usr/bin/env bash
# Builds (or reuses) a venv with nova from PyPI and the fatbox Nova driver installed into it.
# The venv lives in /var/cache/fatbox-venv/nova-<hash of this script + requirements.txt>;
# the driver package (driver/nova) is reinstalled every time, it is quick and changes often.
# The LAST stdout line is the venv's directory; progress goes to stderr.
set -euo pipefail
exec 3>&1 1>&2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${FATBOX_VENV_CACHE:-/var/cache/fatbox-venv}
PY=${FATBOX_PYTHON:-/usr/bin/python3}
HASH=$(cat "$HERE/setup.sh" "$HERE/requirements.txt" | sha256sum | cut -c1-16)
VENV=$CACHE/nova-$HASH
mkdir -p "$CACHE"
exec 9>"$VENV.lock"
flock 9
if [[ ! -e $VENV/.complete ]]; then
    # A venv's scripts carry its absolute path, so it is built in place; .complete marks a
    # finished one and anything else found here is a crashed build.
    rm -rf -- "$VENV"
    echo "tests/nova/setup.sh: building $VENV (nova from PyPI, a few minutes)" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip wheel
    "$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
    touch "$VENV/.complete"
fi
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$ROOT/driver/nova"
"$VENV/bin/python" -c 'import nova.virt.fatbox.driver' >&2
echo "$VENV" >&3
