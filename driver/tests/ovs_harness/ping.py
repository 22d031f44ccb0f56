# One ICMP echo over a raw socket (iputils-ping is not installed on the CI image).
# usage: python3 -c "$(cat ping.py)" DST [TIMEOUT]; exit 0 when DST answered.
import os, socket, struct, sys, time


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return (~s) & 0xFFFF


dst = sys.argv[1]
timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(timeout)
ident = os.getpid() & 0xFFFF
body = b"fatbox-ping"
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + body
pkt = struct.pack("!BBHHH", 8, 0, csum(pkt), ident, 1) + body
s.sendto(pkt, (dst, 0))
end = time.time() + timeout
while time.time() < end:
    try:
        d, a = s.recvfrom(1500)
    except socket.timeout:
        break
    ihl = (d[0] & 15) * 4
    t, _, _, i, _ = struct.unpack("!BBHHH", d[ihl:ihl + 8])
    if t == 0 and i == ident and a[0] == dst:
        sys.exit(0)
sys.exit(1)
