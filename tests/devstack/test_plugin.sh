#!/usr/bin/env bash
# Tests the DevStack plugin's config-writing functions against a temp dir: fatbox.toml (parsed
# as TOML, keys fatboxd reads), the systemd units (KillMode=process, paths; systemd-analyze
# verify when available), nova.conf through an iniset with DevStack's semantics, and the
# settings hook that installs lib/nova_plugins/hypervisor-fatbox. Prints "N passed, N failed".
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: $what" >&2
    fi
}

# DevStack's iniset (inc/ini-config): set KEY in [SECTION], creating either as needed.
iniset() {
    python3 - "$@" <<'PY'
import configparser, sys
path, section, key, value = sys.argv[1:5]
c = configparser.RawConfigParser()
c.optionxform = str
c.read(path)
if section != "DEFAULT" and not c.has_section(section):
    c.add_section(section)
c.set(section, key, value)
with open(path, "w") as f:
    c.write(f)
PY
}

export DEST=$T/opt FATBOX_DIR=$ROOT FATBOX_SUDO="" FATBOX_STATE_DIR=$T/state \
    FATBOX_RUN_DIR=$T/run FATBOX_SYSTEMD_DIR=$T/units FATBOX_OVS_STANDALONE=False \
    FATBOX_PROCFS=True FATBOX_CONF_DIR=$T/etc
# shellcheck source=devstack/lib/fatbox
source "$ROOT/devstack/lib/fatbox"

# fatbox.toml
fatbox_write_config "$T/etc/fatbox.toml"
check "fatbox.toml parses with the keys fatboxd reads" python3 - "$T" <<'PY'
import sys, tomllib
t = sys.argv[1]
c = tomllib.load(open(f"{t}/etc/fatbox.toml", "rb"))
assert c["state_dir"] == f"{t}/state", c
assert c["socket"] == f"{t}/run/fatboxd.sock", c
assert c["cgroup_parent"] == "fatbox"
assert c["procfs"] == {"enabled": True, "mount": f"{t}/run/procfs", "registry": f"{t}/run/procfs.d"}
assert c["network"]["standalone"] is False and c["network"]["integration_bridge"] == "br-int"
PY
check "no temp file left" test ! -e "$T/etc/fatbox.toml.tmp"
FATBOX_PROCFS=False fatbox_write_config "$T/etc/fatbox.toml"
check "booleans follow DevStack's False" grep -q '^enabled = false$' "$T/etc/fatbox.toml"

# systemd units
fatbox_write_units "$T/units"
check "fatboxd unit keeps instances on stop" grep -qx 'KillMode=process' "$T/units/fatboxd.service"
check "fatboxd unit reads the written config" \
    grep -qx "ExecStart=/usr/local/bin/fatboxd --config $T/etc/fatbox.toml" "$T/units/fatboxd.service"
check "procfs unit" grep -q "fatbox-procfs serve --mount $T/run/procfs" "$T/units/fatbox-procfs.service"
if command -v systemd-analyze >/dev/null; then
    # verify wants the ExecStart binaries to exist.
    mkdir -p "$T/bin"
    for b in fatboxd fatbox-procfs; do printf '#!/bin/sh\n' >"$T/bin/$b" && chmod +x "$T/bin/$b"; done
    FATBOX_BIN_DIR=$T/bin fatbox_write_units "$T/units-verify"
    out=$(cd "$T/units-verify" && systemd-analyze verify --man=no ./fatboxd.service ./fatbox-procfs.service 2>&1)
    # Outside a booted systemd, verify still parses units; only unit syntax errors count.
    check "systemd-analyze verify: $out" test -z "$(grep -Ei 'unknown|invalid|failed to parse' <<<"$out")"
fi

# nova.conf
printf '[DEFAULT]\ndebug = True\n\n[libvirt]\nvirt_type = kvm\n' >"$T/nova.conf"
fatbox_configure_nova "$T/nova.conf"
check "nova.conf has compute_driver and [fatbox]" python3 - "$T" <<'PY'
import configparser, sys
t = sys.argv[1]
c = configparser.RawConfigParser()
c.read(f"{t}/nova.conf")
assert c.get("DEFAULT", "compute_driver") == "fatbox.FatboxDriver"
assert c.get("fatbox", "socket") == f"{t}/run/fatboxd.sock"
assert c.get("fatbox", "config_drive") == "True"
assert c.get("DEFAULT", "debug") == "True"  # kept
assert c.get("DEFAULT", "vif_plugging_is_fatal") == "True"
PY
check "the [fatbox] keys exist in the driver's options" python3 - "$ROOT" <<'PY'
import ast, sys
src = open(f"{sys.argv[1]}/driver/nova/nova/virt/fatbox/conf.py").read()
names = {n.args[0].value for n in ast.walk(ast.parse(src))
         if isinstance(n, ast.Call) and getattr(n.func, "attr", "").endswith("Opt") and n.args}
assert {"socket", "config_drive"} <= names, names
PY

# settings: VIRT_DRIVER=fatbox puts the hypervisor plugin where lib/nova looks.
mkdir -p "$T/devstack/lib/nova_plugins"
(
    # shellcheck disable=SC2034
    TOP_DIR=$T/devstack VIRT_DRIVER=fatbox
    # shellcheck source=devstack/settings
    source "$ROOT/devstack/settings"
)
check "hypervisor-fatbox installed" test -f "$T/devstack/lib/nova_plugins/hypervisor-fatbox"
check "hypervisor-fatbox defines lib/nova's hooks" bash -c "
    DEST=$T/opt FATBOX_DIR=$ROOT source $T/devstack/lib/nova_plugins/hypervisor-fatbox &&
    declare -F configure_nova_hypervisor install_nova_hypervisor start_nova_hypervisor \
        stop_nova_hypervisor cleanup_nova_hypervisor >/dev/null"

if command -v shellcheck >/dev/null; then
    check "shellcheck" shellcheck -x "$ROOT/devstack/plugin.sh" "$ROOT/devstack/settings" \
        "$ROOT/devstack/lib/fatbox" "$ROOT/devstack/nova_plugins/hypervisor-fatbox" \
        "$ROOT/tests/nova/setup.sh" "$ROOT/tests/devstack/test_plugin.sh"
fi

echo "devstack: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
