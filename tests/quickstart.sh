#!/usr/bin/env bash
# Acceptance of the quick start (root): `./quickstart.sh` succeeds twice in a row (it is
# re-runnable) and ends with the ssh login; `./quickstart.sh --clean` then leaves no fatbox
# mount, loop device, netns, OVS daemon, cgroup, link or process behind. Run by tests/run.sh.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
LOG=$(mktemp /tmp/fatbox-quickstart-test.XXXXXX)
fail=0
check() { # DESCRIPTION COMMAND... : the command prints leftovers, if any
  local what=$1; shift
  local out; out=$("$@" 2>/dev/null || true)
  if [ -n "$out" ]; then echo "quickstart test: left after --clean: $what:"; echo "$out" | sed 's/^/    /'; fail=1; fi
}
trap './quickstart.sh --clean >/dev/null 2>&1 || true; rm -f "$LOG"' EXIT

for run in 1 2; do
  echo "quickstart test: run $run" >&2
  if ! ./quickstart.sh >"$LOG" 2>&1; then
    echo "quickstart test: run $run failed; its output:" >&2; tail -n 60 "$LOG" >&2; exit 1
  fi
  grep -q "^logged in to qs-1 as root over ssh" "$LOG" || { echo "quickstart test: run $run: no ssh login in the output" >&2; tail -n 40 "$LOG" >&2; exit 1; }
  grep -q "^system: running" "$LOG" || { echo "quickstart test: run $run: guest not running" >&2; exit 1; }
done
echo "quickstart test: clean" >&2
./quickstart.sh --clean >"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }

check "mounts" grep -E ' (/var/lib/fatbox/quickstart|/run/fatbox/quickstart)' /proc/self/mounts
check "loop devices" sh -c "losetup -a | grep /var/lib/fatbox/quickstart"
check "network namespace" sh -c "ip netns list | grep -w fatbox-qs-ops"
check "links" sh -c "ip -o link show | grep -E ': (qs-ops0|tap[0-9a-f-]+|ovs-netdev)[:@]'"
check "OVS daemons" pgrep -af "/run/fatbox/quickstart.ovs"
check "fatbox processes" pgrep -af "quickstart.sock|/var/lib/fatbox/quickstart|/run/fatbox/quickstart"
check "cgroups" find /sys/fs/cgroup -maxdepth 3 -type d -name 'fatbox-quickstart*'
check "state" sh -c "ls -d /var/lib/fatbox/quickstart /run/fatbox/quickstart* 2>/dev/null"
[ $fail = 0 ] && echo "quickstart test: OK (two runs, ssh login, clean leaves nothing)"
exit $fail
