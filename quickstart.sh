#!/usr/bin/env bash
# fatbox quick start: from a fresh Debian bookworm machine (root) to an ssh login in a fat
# container booted by fatboxd from a real qcow2 VM disk (systemd as PID 1, sshd, flavor limits),
# on a local Open vSwitch with two VLANs.
# Re-runnable; `./quickstart.sh --clean` removes everything it made.
# Embedded defaults: state in /var/lib/fatbox/quickstart, API socket /run/fatbox/quickstart.sock,
# a private OVS (userspace datapath) under /run/fatbox/quickstart.ovs with bridge br-int, and an
# "operator" network namespace fatbox-qs-ops on VLAN 100 (10.20.0.1) that the ssh login comes from.
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

OVS=$RUN.ovs
OVSDB=unix:$OVS/db.sock
BRIDGE=br-int
OPS_NS=fatbox-qs-ops
OPS_LINK=qs-ops0
# The OVS test harness (driver/tests/ovs_harness) takes this lock: two userspace-datapath
# vswitchds on one host fight over the `ovs-netdev` tap. Ours holds it while it runs.
OVS_LOCK=/run/fatbox-ovs-harness.lock
vsctl() { ovs-vsctl --db="$OVSDB" --timeout=20 "$@"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_ovs() {
  mkdir -p "$OVS" "$STATE/ovs"
  export OVS_RUNDIR=$OVS OVS_LOGDIR=$OVS OVS_DBDIR=$STATE/ovs
  [ -f "$STATE/ovs/conf.db" ] || ovsdb-tool create "$STATE/ovs/conf.db" /usr/share/openvswitch/vswitch.ovsschema
  if ! alive "$OVS/ovsdb-server.pid"; then
    ovsdb-server "$STATE/ovs/conf.db" --remote="punix:$OVS/db.sock" --pidfile="$OVS/ovsdb-server.pid" \
      --unixctl="$OVS/ovsdb-server.ctl" --log-file="$OVS/ovsdb-server.log" -vconsole:off --detach
    vsctl --no-wait init
  fi
  # TCP over veth does not pass on the userspace datapath here unless this is set before
  # ovs-vswitchd starts.
  vsctl --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
  if ! alive "$OVS/ovs-vswitchd.pid"; then
    exec 9>"$OVS_LOCK"
    flock -n 9 || fail "another userspace OVS (the test suite's harness?) holds $OVS_LOCK; wait for it to finish"
    ovs-vswitchd "$OVSDB" --pidfile="$OVS/ovs-vswitchd.pid" --unixctl="$OVS/ovs-vswitchd.ctl" \
      --log-file="$OVS/ovs-vswitchd.log" -vconsole:off --detach
    exec 9>&-  # the detached vswitchd inherited the locked fd and keeps the lock
  fi
  vsctl --may-exist add-br "$BRIDGE" -- set bridge "$BRIDGE" datapath_type=netdev
}

stop_ovs() {
  for d in ovs-vswitchd ovsdb-server; do
    if alive "$OVS/$d.pid"; then
      pid=$(cat "$OVS/$d.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  ip link del ovs-netdev 2>/dev/null || true
}

# The operator's seat: a netns on VLAN 100, so the demo never touches the host's own routes.
# Made fresh on every run: a rerun boots new instances with new MACs, and a neighbour cache
# left from the last run would point at the old ones.
start_ops_ns() {
  stop_ops_ns
  ip netns add "$OPS_NS"
  ip link add "$OPS_LINK" type veth peer name eth0 netns "$OPS_NS"
  ip link set "$OPS_LINK" up
  ip netns exec "$OPS_NS" ip link set lo up
  ip netns exec "$OPS_NS" ip link set eth0 up
  ip netns exec "$OPS_NS" ip addr replace 10.20.0.1/24 dev eth0
  vsctl --may-exist add-port "$BRIDGE" "$OPS_LINK" tag=100
}

stop_ops_ns() {
  [ -S "$OVS/db.sock" ] && vsctl --if-exists del-port "$BRIDGE" "$OPS_LINK" 2>/dev/null || true
  ip link del "$OPS_LINK" 2>/dev/null || true
  ip netns del "$OPS_NS" 2>/dev/null || true
}

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
[network]
ovsdb = "$OVSDB"
integration_bridge = "$BRIDGE"
standalone = true
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
    for n in qs-1 qs-2 qs-3; do fatbox delete "$n" >/dev/null 2>&1 || true; done
  fi
  stop_daemons
  stop_ops_ns
  stop_ovs
  for cg in /sys/fs/cgroup/*/fatbox-quickstart; do [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true; done
  rm -rf --one-file-system "$STATE" "$RUN.d" "$RUN".*.log "$RUN.procfs" "$SOCK" "$OVS"
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

step "start a local Open vSwitch (userspace datapath, bridge $BRIDGE)"
start_ovs
vsctl show | sed -n 1,4p

step "start fatbox-procfs and fatboxd"
start_daemons

step "import the VM disk (qcow2 → OCI layers, once)"
if ! fatbox image list --json | grep -q '"debian-12"'; then
  fatbox image import "$DISK" --name debian-12
fi
fatbox image list

step "boot three fat containers: qs-1 and qs-2 on VLAN 100, qs-3 on VLAN 200"
[ -f "$STATE/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/id_ed25519"
for n in qs-1 qs-2 qs-3; do fatbox delete "$n" >/dev/null 2>&1 || true; done
boot() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  fatbox run --image debian-12 --name "$name" --ssh-key "$STATE/id_ed25519.pub" "$@" >/dev/null
  t1=$(date +%s.%N)
  python3 -c "print(f'$name: API call to systemd running in {$t1-$t0:.2f} s')"
}
boot qs-1 --vcpus 1 --memory 512 --disk 2 --nic vlan=100,ip=10.20.0.11/24
boot qs-2 --vcpus 2 --memory 1024 --disk 3 --nic vlan=100,ip=10.20.0.12/24
# Same subnet on purpose: only the VLAN keeps qs-3 apart.
boot qs-3 --vcpus 1 --memory 512 --disk 2 --nic vlan=200,ip=10.20.0.13/24
fatbox list

step "network: pings within and across VLANs"
start_ops_ns
ping_check() { # FROM TO EXPECT(ok|blocked) -- FROM is "ops" or an instance name
  local from=$1 to=$2 want=$3 got
  local cmd=(ping -c 1 -W 1 "$to")
  if [ "$from" = ops ]; then
    for _ in 1 2 3; do ip netns exec "$OPS_NS" "${cmd[@]}" >/dev/null 2>&1 && break; done
    if ip netns exec "$OPS_NS" "${cmd[@]}" >/dev/null 2>&1; then got=ok; else got=blocked; fi
  else
    if fatbox exec "$from" -- "${cmd[@]}" >/dev/null 2>&1; then got=ok; else got=blocked; fi
  fi
  printf '  %-5s -> %-11s %-8s (expected %s)\n' "$from" "$to" "$got" "$want"
  [ "$got" = "$want" ] || fail "ping $from -> $to: $got, expected $want"
}
ping_check ops 10.20.0.11 ok
ping_check ops 10.20.0.12 ok
ping_check qs-1 10.20.0.12 ok
ping_check qs-1 10.20.0.13 blocked
ping_check qs-3 10.20.0.11 blocked
ping_check ops 10.20.0.13 blocked

step "ssh login to qs-1 (root@10.20.0.11, key injected at boot) from the operator netns"
SSH=(ip netns exec "$OPS_NS" ssh -i "$STATE/id_ed25519" -o StrictHostKeyChecking=no
     -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=5 -o BatchMode=yes)
for _ in $(seq 1 20); do "${SSH[@]}" root@10.20.0.11 true 2>/dev/null && break; sleep 0.5; done
"${SSH[@]}" root@10.20.0.11 sh -s <<'EOS'
echo "logged in to $(hostname) as $(id -un) over ssh"
echo "system: $(systemctl is-system-running)"
echo "failed units: $(systemctl --failed --no-legend | wc -l)"
echo "machine-id: $(cat /etc/machine-id)"
echo "nproc: $(nproc)"
free -m
df -h /
EOS

for n in qs-2 qs-3; do
  step "inside $n (fatbox exec)"
  fatbox exec "$n" -- sh -c 'echo "hostname: $(hostname)"; echo "system: $(systemctl is-system-running)"; echo "machine-id: $(cat /etc/machine-id)"; echo "nproc: $(nproc)"; free -m | head -2; df -h / | tail -1; ip -br addr show eth0'
done

echo
echo "quickstart: OK. Log in yourself:"
echo "  ip netns exec $OPS_NS ssh -i $STATE/id_ed25519 -o StrictHostKeyChecking=no root@10.20.0.11"
echo "  $BIN/fatbox --socket $SOCK list"
echo "Clean up with: ./quickstart.sh --clean"
