# Breakout attempts run inside a guest as its root (via `fatbox exec`), one line each:
#   RESULT|attempt|denied (1/0)|detail
# Writes that could succeed write back the value already there, so a failure of isolation
# cannot change the host. Env from the host: P (probe binary), MAJ MIN (the loop device
# backing this guest's disk), HOST_PID (fatboxd), SOCKETS (paths), SNIFF (seconds).
out() { printf 'RESULT|%s|%s|%s\n' "$1" "$2" "$(printf '%s' "$3" | tr '\n' ' ' | cut -c1-300)"; }
try() { r=$(sh -c "$1" 2>&1); echo "rc=$? $r"; }
ok() { case "$1" in rc=0*) return 0;; *) return 1;; esac; }
den() { for x in "$@"; do ok "$x" && { echo 0; return; }; done; echo 1; }

# 1. CVE-2022-0492: a fresh cgroup v1 hierarchy (rdma, else a named one), directly and from
# a nested user+cgroup namespace; then write its release_agent.
cg='for o in rdma none,name=fbxprobe; do mount -t cgroup -o $o cgroup DIR 2>/dev/null && break; done; mountpoint -q DIR && cat DIR/release_agent > DIR.ra && cat DIR.ra > DIR/release_agent'
mkdir -p /tmp/cg1 /tmp/cg2
a=$(try "$(echo "$cg" | sed 's|DIR|/tmp/cg1|g')")
b=$(try "unshare -UrmC --propagation private sh -c '$(echo "$cg" | sed 's|DIR|/tmp/cg2|g')'")
umount /tmp/cg1 2>/dev/null
out "cgroup v1 release_agent (CVE-2022-0492)" "$(den "$a" "$b")" "direct: $a | nested userns: $b"

# 2. /proc/sys/kernel/*: as mounted, after a remount rw, through a fresh proc mount.
a=$(try 'cat /proc/sys/kernel/core_pattern > /tmp/cp && cat /tmp/cp > /proc/sys/kernel/core_pattern')
b=$(try 'mount -o remount,rw,bind /proc/sys && cat /tmp/cp > /proc/sys/kernel/core_pattern')
c=$(try 'mkdir -p /tmp/p && mount -t proc proc /tmp/p && cat /tmp/cp > /tmp/p/sys/kernel/core_pattern')
umount /tmp/p 2>/dev/null
out "write /proc/sys/kernel/core_pattern" "$(den "$a" "$b" "$c")" "$a | after remount: $b | fresh proc: $c"

# 3. /proc/sysrq-trigger ('h' only prints the help; absent when the kernel has no sysrq).
[ -e /proc/sysrq-trigger ] || sysrq_note="(no sysrq-trigger in this kernel) "
a=$(try 'echo h > /proc/sysrq-trigger')
b=$(try 'mkdir -p /tmp/p && mount -t proc proc /tmp/p && echo h > /tmp/p/sysrq-trigger')
umount /tmp/p 2>/dev/null
out "write /proc/sysrq-trigger" "$(den "$a" "$b")" "$sysrq_note$a | fresh proc: $b"

# 4. /sys: a host-wide knob, as mounted and after a remount rw.
thp=/sys/kernel/mm/transparent_hugepage/enabled
if [ -e $thp ]; then
  cur=$(sed 's/.*\[\(.*\)\].*/\1/' $thp)
  a=$(try "echo $cur > $thp")
  b=$(try "mount -o remount,rw /sys && echo $cur > $thp")
  out "write /sys/kernel/mm/*" "$(den "$a" "$b")" "$a | after remount: $b"
else
  out "write /sys/kernel/mm/*" 1 "$thp not visible"
fi

# 5. mknod + open a host block device (the loop device backing this guest's disk).
blocks=$(find /dev -type b 2>/dev/null | head -3)
a=$(try "mknod /tmp/blk b $MAJ $MIN && head -c 512 /tmp/blk | wc -c")
b=$(try "mknod /dev/blk b $MAJ $MIN && head -c 512 /dev/blk | wc -c")
d=1; [ -n "$blocks" ] && d=0; [ "$(den "$a" "$b")" = 1 ] || d=0
out "mknod + open host block device ($MAJ:$MIN)" "$d" "block nodes in /dev: ${blocks:-none} | $a | in /dev: $b"

# 6. mount a host block device (/dev/vda, the node above), also from a nested userns.
mkdir -p /tmp/m
a=$(try 'mount -t ext4 /dev/vda /tmp/m')
b=$(try 'mount -t ext4 /tmp/blk /tmp/m')
c=$(try "unshare -Urm sh -c 'mount -t ext4 /dev/vda /tmp/m'")
umount /tmp/m 2>/dev/null
out "mount host block device" "$(den "$a" "$b" "$c")" "$a | $b | nested: $c"

# 7. load / unload a kernel module. EPERM = refused before the kernel read the image
# (ENOEXEC would mean the permission check had passed).
f=$($P sys finit_module); i=$($P sys init_module); dm=$($P sys delete_module)
ins=$(try 'insmod /bin/true')
d=0; [ "$f$i$dm" = EPERMEPERMEPERM ] && ! ok "$ins" && d=1
out "load kernel module" "$d" "finit_module $f, init_module $i, delete_module $dm, insmod: $ins"

# 8. open_by_handle_at (shocker): our own root's handle and a forged ext4 root (ino 2).
o=$($P sys open_by_handle_own); g=$($P sys open_by_handle_forged)
d=0; [ "$o" != ok ] && [ "$g" != ok ] && d=1
out "open_by_handle_at on the root" "$d" "own root: $o; forged inode 2: $g"

# 9. ptrace a host process: its pid is not in this pid namespace.
if [ -e /proc/$HOST_PID ] && ! grep -q fatboxd /proc/$HOST_PID/cmdline 2>/dev/null; then
  out "ptrace a host process" 1 "pid $HOST_PID is a guest process here; the host's is unreachable"
else
  t=$($P sys ptrace $HOST_PID); d=0; [ "$t" != ok ] && [ ! -e /proc/$HOST_PID ] && d=1
  out "ptrace a host process (fatboxd, host pid $HOST_PID)" "$d" "/proc/$HOST_PID: $( [ -e /proc/$HOST_PID ] && echo visible || echo absent); PTRACE_ATTACH $t"
fi

# 10. raw sniffing: only our own interfaces; an AF_PACKET socket sees none of the host's
# loopback ping (payload 0x7a) running during the capture window.
ifs=$(ls /sys/class/net | tr '\n' ' ')
s=$($P sniff "${SNIFF:-1.5}")
d=0; case "$s" in "0 "*) d=1;; esac
for i in $ifs; do case $i in lo|eth*) ;; *) d=0;; esac; done
out "raw socket sniffing of host traffic" "$d" "interfaces: $ifs; host ping packets seen / all packets: $s"

# 11. the fatboxd API socket and the OVSDB socket are not in this mount namespace.
found=""
for p in $SOCKETS; do
  [ -e "$p" ] && found="$found $p"
  [ "$($P connect "$p")" = ok ] && found="$found $p(connected)"
done
d=1; [ -n "$found" ] && d=0
out "reach the fatboxd / OVSDB sockets" "$d" "reachable:${found:- none} (tried $SOCKETS)"

# 12. change the system time.
a=$(try "date -s '2001-01-01 00:00:00'")
cs=$($P sys clock_settime); st=$($P sys settimeofday)
d=0; ! ok "$a" && [ "$cs" != ok ] && [ "$st" != ok ] && d=1
out "change the system time" "$d" "date -s: $a | clock_settime $cs | settimeofday $st"

# 13. other host-wide calls the seccomp profile refuses.
k=$($P sys kexec_load); kc=$($P sys keyctl); bp=$($P sys bpf); sw=$($P sys swapon); io=$($P sys iopl)
d=0; [ "$k$kc$bp$sw$io" = EPERMEPERMEPERMEPERMEPERM ] && d=1
out "kexec_load / keyctl / bpf / swapon / iopl" "$d" "$k $kc $bp $sw $io"
