#!/usr/bin/env bash
# fatbox quick start: from a fresh Debian bookworm machine (root) to a real VM disk turned into
# a container image that boots systemd. Re-runnable; `./quickstart.sh --clean` removes what it
# made. Until fatboxd lands (issue 4) the boot step uses systemd-nspawn as the runtime.
set -euo pipefail
cd "$(dirname "$0")"
STATE=${FATBOX_QUICKSTART_DIR:-/var/lib/fatbox/quickstart}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() { echo "quickstart: step '$CURRENT' failed: $*" >&2; exit 1; }
CURRENT=start
trap 'fail "command exited with $? (see above)"' ERR

if [ "${1:-}" = "--clean" ]; then
  CURRENT=clean
  step "removing $STATE"
  rm -rf --one-file-system "$STATE"
  echo "clean: nothing of the quick start is left (fixture cache in /var/cache/fatbox-fixtures is kept; remove it by hand if you want)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root" >&2; exit 2; }

CURRENT="install packages"; step "$CURRENT"
bash tests/deps.sh

CURRENT="build fatbox (release)"; step "$CURRENT"
cargo build --release -p guestfs-tools --bin fatbox-img
IMG=target/release/fatbox-img

CURRENT="build or reuse the demo VM disk (debootstrap bookworm, qcow2)"; step "$CURRENT"
FIX=$(bash tests/fixtures/build-guest-images.sh | tail -n 1)
DISK="$FIX/v3.qcow2"
echo "VM disk: $DISK ($(du -h --apparent-size "$DISK" | cut -f1) apparent, $(du -h "$DISK" | cut -f1) on disk)"

CURRENT="inspect the VM disk"; step "$CURRENT"
"$IMG" inspect "$DISK"

CURRENT="convert it to a layered OCI image"; step "$CURRENT"
mkdir -p "$STATE"
rm -rf "$STATE/oci" "$STATE/rootfs"
"$IMG" convert "$DISK" "$STATE/oci" --name debian-12

CURRENT="unpack the image"; step "$CURRENT"
"$IMG" unpack "$STATE/oci" "$STATE/rootfs" --name debian-12

CURRENT="boot it (systemd as PID 1)"; step "$CURRENT"
machine="fatbox-qs-$$"
start=$(date +%s.%N)
systemd-nspawn --register=no --keep-unit --private-network --quiet --console=passive \
  -M "$machine" -b -D "$STATE/rootfs" >"$STATE/console.log" 2>&1 &
nspawn=$!
cleanup() { kill -TERM "$nspawn" 2>/dev/null || true; wait "$nspawn" 2>/dev/null || true; }
trap cleanup EXIT
init=""
for _ in $(seq 1 600); do
  for c in $(pgrep -P "$nspawn" 2>/dev/null); do
    for g in $c $(pgrep -P "$c" 2>/dev/null); do
      if grep -qE '^NSpid:\s+[0-9]+\s+1$' "/proc/$g/status" 2>/dev/null; then init=$g; fi
    done
  done
  [ -n "$init" ] && break
  sleep 0.1
done
[ -n "$init" ] || fail "the container's init did not start (see $STATE/console.log)"
state=$(timeout 120 nsenter -t "$init" -a systemctl is-system-running --wait || true)
end=$(date +%s.%N)
printf 'boot to "%s" in %.2f s\n' "$state" "$(echo "$end - $start" | bc 2>/dev/null || python3 -c "print($end-$start)")"
nsenter -t "$init" -a systemctl --failed --no-legend --plain || true
nsenter -t "$init" -a sh -c 'echo "hostname: $(hostname)"; echo "machine-id: $(cat /etc/machine-id)"; ls /etc/ssh/ssh_host_*_key.pub; systemctl is-active ssh'
[ "$state" = running ] || fail "systemd reports '$state' (see $STATE/console.log)"
echo
echo "quickstart: OK — the VM disk boots as a fat container. Clean up with: ./quickstart.sh --clean"
