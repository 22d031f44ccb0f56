#!/usr/bin/env bash
# fatbox quick start: from a fresh Debian bookworm machine (root) to a real qcow2 VM disk booted
# as a fat container by fatboxd (systemd as PID 1, sshd, flavor limits).
# Re-runnable; `./quickstart.sh --clean` removes everything it made.
# Embedded defaults: state in /var/lib/fatbox/quickstart, API socket /run/fatbox/quickstart.sock.
set -euo pipefail
cd "$(dirname "$0")"
STATE=${FATBOX_QUICKSTART_DIR:-/var/lib/fatbox/quickstart}
RUN=/run/fatbox/quickstart
SOCK=$RUN.sock
BIN=$PWD/target/release
CURRENT=start
step() { CURRENT=$*; printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() { echo "quickstart: step '$CURRENT' failed: $*" >&2; exit 1; }
trap 'fail "command exited with status $? (see above; daemon logs in $RUN.*.log)"' ERR

fatbox() { "$BIN/fatbox" --socket "$SOCK" "$@"; }

start_daemons() {
  mkdir -p "$RUN.d" "$STATE"
  if ! { [ -f "$RUN.procfs.pid" ] && kill -0 "$(cat "$RUN.procfs.pid")" 2>/dev/null; }; then
    "$BIN/fatbox-procfs" serve --mount "$RUN.procfs" --registry "$RUN.d/procfs" \
      --keeper-socket "$RUN.keeper.sock" >"$RUN.procfs.log" 2>&1 &
    echo $! > "$RUN.procfs.pid"
  fi
  cat > "$STATE/fatbox.toml" <<TOML
state_dir = "$STATE"
socket = "$SOCK"
cgroup_parent = "fatbox-quickstart"
[procfs]
enabled = true
mount = "$RUN.procfs"
registry = "$RUN.d/procfs"
TOML
  if ! { [ -f "$RUN.fatboxd.pid" ] && kill -0 "$(cat "$RUN.fatboxd.pid")" 2>/dev/null; }; then
    setsid "$BIN/fatboxd" --config "$STATE/fatbox.toml" >"$RUN.fatboxd.log" 2>&1 < /dev/null &
    echo $! > "$RUN.fatboxd.pid"
  fi
  for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
  [ -S "$SOCK" ] || fail "fatboxd did not open $SOCK (see $RUN.fatboxd.log)"
}

stop_daemons() {
  for d in fatboxd procfs; do
    if [ -f "$RUN.$d.pid" ]; then
      pid=$(cat "$RUN.$d.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$RUN.$d.pid"
    fi
  done
  [ -x "$BIN/fatbox-procfs" ] && "$BIN/fatbox-procfs" shutdown --mount "$RUN.procfs" \
    --keeper-socket "$RUN.keeper.sock" >/dev/null 2>&1 || true
  mountpoint -q "$RUN.procfs" 2>/dev/null && umount -l "$RUN.procfs" || true
}

if [ "${1:-}" = "--clean" ]; then
  step "removing the quick start's instances, daemons and state"
  if [ -S "$SOCK" ] || [ -d "$STATE/instances" ]; then
    start_daemons 2>/dev/null || true
    for n in qs-1 qs-2; do fatbox delete "$n" >/dev/null 2>&1 || true; done
  fi
  stop_daemons
  for cg in /sys/fs/cgroup/*/fatbox-quickstart; do [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true; done
  rm -rf --one-file-system "$STATE" "$RUN.d" "$RUN".*.log "$RUN.procfs" "$SOCK"
  rmdir /run/fatbox 2>/dev/null || true
  echo "clean: no quick-start instance, daemon, mount or state is left"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "quickstart: run as root" >&2; exit 2; }

step "install packages"
bash tests/deps.sh

step "build fatbox (release)"
cargo build --release -q -p guestfs-tools -p driver -p procfs-fuse

step "build or reuse the demo VM disk (debootstrap bookworm → qcow2)"
FIX=$(bash tests/fixtures/build-guest-images.sh | tail -n 1)
DISK="$FIX/v3.qcow2"
echo "VM disk: $DISK"
"$BIN/fatbox-img" inspect "$DISK"

step "start fatbox-procfs and fatboxd"
start_daemons

step "import the VM disk (qcow2 → OCI layers, once)"
if ! fatbox image list --json | grep -q '"debian-12"'; then
  fatbox image import "$DISK" --name debian-12
fi
fatbox image list

step "boot two fat containers (1 vCPU / 512 MiB / 2 GiB, and 2 vCPU / 1 GiB / 3 GiB)"
[ -f "$STATE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/id_ed25519"
for n in qs-1 qs-2; do fatbox delete "$n" >/dev/null 2>&1 || true; done
t0=$(date +%s.%N)
fatbox run --image debian-12 --name qs-1 --vcpus 1 --memory 512 --disk 2 --ssh-key "$STATE/id_ed25519.pub"
t1=$(date +%s.%N)
fatbox run --image debian-12 --name qs-2 --vcpus 2 --memory 1024 --disk 3 --ssh-key "$STATE/id_ed25519.pub"
python3 -c "print(f'qs-1: API call to systemd running in {$t1-$t0:.2f} s')"
fatbox list

for n in qs-1 qs-2; do
  step "inside $n (what an operator sees)"
  fatbox exec "$n" -- sh -c 'echo "hostname: $(hostname)"; echo "system: $(systemctl is-system-running)"; echo "failed units: $(systemctl --failed --no-legend | wc -l)"; echo "machine-id: $(cat /etc/machine-id)"; echo "nproc: $(nproc)"; free -m; df -h /; ss -ltn | grep -q ":22 " && echo "sshd: listening on :22"'
done

echo
echo "quickstart: OK. Try: $BIN/fatbox --socket $SOCK exec qs-1 -- systemctl status"
echo "Clean up with: ./quickstart.sh --clean"
