#!/usr/bin/env bash
# Installs what the tests and the quick start need on a fresh Debian bookworm machine (root).
# Idempotent and quick when everything is there already.
set -euo pipefail
pkgs=(debootstrap fdisk e2fsprogs qemu-utils zstd attr acl libcap2-bin python3 systemd-container
      fuse3 lxcfs openvswitch-switch iproute2 procps psmisc util-linux openssh-client skopeo umoci
      fonts-dejavu-core iputils-ping python3-venv shellcheck curl xfsprogs btrfs-progs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Several installers (CI steps, helpers, the quick start) may run at once: wait for dpkg's lock.
  for _ in $(seq 60); do
    apt-get -o DPkg::Lock::Timeout=900 update -qq && break
    sleep 10  # the lists lock has no timeout option: another apt-get update is running
  done
  # openvswitch-switch's postinst tries to start OVS through the init system; on a machine
  # whose PID 1 is not systemd that fails harmlessly, our harness starts its own daemons.
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
