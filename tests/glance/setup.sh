#!/usr/bin/env bash
# Creates (or reuses) a venv with the real Glance (and Keystone) from PyPI for the image-bridge
# tests, keyed by the hash of requirements.txt, and prints its path on the last line.
# Guarded by a lock so concurrent callers wait for one build.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
req="$here/requirements.txt"
py="${FATBOX_PYTHON:-python3}"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
hash="$( (cat "$req"; echo "$pyver") | sha256sum | cut -c1-16)"
root=/var/cache/fatbox-venv
venv="$root/glance-$hash"
mkdir -p "$root"
exec 9>"$root/.glance.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "tests/glance/setup.sh: building $venv (python $pyver)" >&2
  rm -rf "$venv" "$venv.tmp"
  "$py" -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install -q --upgrade pip >&2
  "$venv.tmp/bin/pip" install -q -r "$req" >&2
  # venv scripts carry absolute shebangs: build under the final name's twin, then fix them.
  grep -rl --null "$venv.tmp" "$venv.tmp/bin" | xargs -0 -r sed -i "s|$venv.tmp|$venv|g"
  mv "$venv.tmp" "$venv"
  "$venv/bin/python" -c 'import glance, keystone, gunicorn' >&2
  touch "$venv/.complete"
fi
echo "$venv"
