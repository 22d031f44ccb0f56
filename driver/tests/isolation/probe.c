/* Syscall-level breakout probes for driver/tests/isolation.rs, built static on the host and
 * copied into the guest (the fixture's python3 is python3-minimal, without ctypes).
 * probe sys NAME [ARG]   one attempt; prints "ok" (exit 0) or the errno name (exit 1)
 * probe sniff SECONDS    packets carrying 16 x 0x7a seen on an AF_PACKET socket
 * probe sniff SECONDS [--promisc] HEX...
 *                        per marker (hex bytes) the packets carrying it, then all packets;
 *                        --promisc first puts every interface it can see in promiscuous mode
 *                        (PACKET_MR_PROMISC) and prints how many took it, last
 * probe connect PATH     connect to a unix socket */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct fh { unsigned int bytes; int type; unsigned char h[128]; };

static int report(long r) {
    if (r >= 0) { puts("ok"); return 0; }
    const char *n = strerrorname_np(errno);
    puts(n ? n : "error");
    return 1;
}

static long attempt(const char *what, const char *arg) {
    errno = 0;
    if (!strcmp(what, "finit_module")) {
        int fd = open("/bin/true", O_RDONLY);
        return syscall(SYS_finit_module, fd, "", 0);
    }
    if (!strcmp(what, "init_module")) {
        static char img[64] = "\177ELF";
        return syscall(SYS_init_module, img, sizeof img, "");
    }
    if (!strcmp(what, "delete_module")) return syscall(SYS_delete_module, "loop", 0);
    if (!strcmp(what, "kexec_load")) return syscall(SYS_kexec_load, 0, 0, NULL, 0);
    if (!strcmp(what, "keyctl")) return syscall(SYS_keyctl, 0, 0, 0, 0, 0);
    if (!strcmp(what, "bpf")) return syscall(SYS_bpf, 0, NULL, 0);
    if (!strcmp(what, "swapon")) return syscall(SYS_swapon, "/tmp/nope", 0);
    if (!strcmp(what, "iopl")) return syscall(SYS_iopl, 3);
    if (!strcmp(what, "clock_settime")) {
        struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
        return syscall(SYS_clock_settime, CLOCK_REALTIME, &ts);
    }
    if (!strcmp(what, "settimeofday")) {
        struct timeval tv; gettimeofday(&tv, NULL);
        return syscall(SYS_settimeofday, &tv, NULL);
    }
    if (!strcmp(what, "open_by_handle_own")) {
        struct fh h = { .bytes = 128 };
        int mid;
        if (syscall(SYS_name_to_handle_at, AT_FDCWD, "/", &h, &mid, 0) < 0) return -1;
        int root = open("/", O_RDONLY);
        return syscall(SYS_open_by_handle_at, root, &h, O_RDONLY);
    }
    if (!strcmp(what, "open_by_handle_forged")) {
        /* shocker: ext4 root directory, inode 2, generation 0 */
        struct fh h = { .bytes = 8, .type = 1 };
        h.h[0] = 2;
        int root = open("/", O_RDONLY);
        return syscall(SYS_open_by_handle_at, root, &h, O_RDONLY);
    }
    if (!strcmp(what, "ptrace")) return syscall(SYS_ptrace, 16 /* ATTACH */, atoi(arg ? arg : "0"), 0, 0);
    errno = EINVAL;
    return -1;
}

static double since(const struct timespec *t0) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

/* argv: SECONDS [--promisc] HEX... */
static int sniff_markers(int argc, char **argv) {
    enum { MAXM = 8 };
    unsigned char pat[MAXM][32]; size_t plen[MAXM]; int seen[MAXM] = { 0 };
    int n = 0, promisc = 0, promisc_ok = 0, total = 0;
    double limit = atof(argv[0]);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--promisc")) { promisc = 1; continue; }
        size_t l = strlen(argv[i]) / 2;
        if (n == MAXM || l == 0 || l > sizeof pat[0]) { fprintf(stderr, "bad marker\n"); return 2; }
        for (size_t j = 0; j < l; j++) sscanf(argv[i] + 2 * j, "%2hhx", &pat[n][j]);
        plen[n++] = l;
    }
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) { printf("socket refused: %s\n", strerrorname_np(errno)); return 1; }
    if (promisc) {
        struct if_nameindex *ifs = if_nameindex();
        for (struct if_nameindex *i = ifs; i && i->if_index; i++) {
            struct packet_mreq mr = { .mr_ifindex = (int)i->if_index, .mr_type = PACKET_MR_PROMISC };
            if (setsockopt(s, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof mr) == 0) promisc_ok++;
        }
        if (ifs) if_freenameindex(ifs);
    }
    struct timeval tv = { 0, 100000 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct timespec t0; clock_gettime(CLOCK_MONOTONIC, &t0);
    static unsigned char buf[65536];
    while (since(&t0) < limit) {
        ssize_t r = recv(s, buf, sizeof buf, 0);
        if (r <= 0) continue;
        total++;
        for (int m = 0; m < n; m++)
            if (memmem(buf, (size_t)r, pat[m], plen[m])) seen[m]++;
    }
    for (int m = 0; m < n; m++) printf("%d ", seen[m]);
    printf("%d", total);
    if (promisc) printf(" %d", promisc_ok);
    printf("\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "sys")) return report(attempt(argv[2], argc > 3 ? argv[3] : NULL));
    if (argc >= 4 && !strcmp(argv[1], "sniff")) return sniff_markers(argc - 2, argv + 2);
    if (argc >= 3 && !strcmp(argv[1], "sniff")) {
        int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
        if (s < 0) { printf("socket refused: %s\n", strerrorname_np(errno)); return 1; }
        struct timeval tv = { 0, 100000 };
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
        double limit = atof(argv[2]);
        int seen = 0, total = 0;
        unsigned char pat[16]; memset(pat, 0x7a, sizeof pat);
        static unsigned char buf[65536];
        for (;;) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > limit) break;
            ssize_t n = recv(s, buf, sizeof buf, 0);
            if (n <= 0) continue;
            total++;
            if (memmem(buf, (size_t)n, pat, sizeof pat)) seen++;
        }
        printf("%d %d\n", seen, total);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = { .sun_family = AF_UNIX };
        strncpy(a.sun_path, argv[2], sizeof a.sun_path - 1);
        return report(connect(s, (struct sockaddr *)&a, sizeof a));
    }
    fprintf(stderr, "usage: probe sys NAME [ARG] | sniff SECONDS [[--promisc] HEX...] | connect PATH\n");
    return 2;
}
