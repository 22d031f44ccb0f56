#!/bin/sh
# Plug latency of the network module vs `ip` + `ovs-vsctl`, in the same run, on a private
# ovsdb-server/ovs-vswitchd (netdev datapath). Needs root and openvswitch-switch.
set -eu
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
exec cargo test --release -p driver --test network_bench -- --ignored --nocapture --test-threads=1 "$@"
