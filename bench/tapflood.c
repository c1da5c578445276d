/*
 * tapflood - write 64-byte UDP/IPv4 Ethernet frames into a tap device as a VM would
 * (or into a macvtap, through its /dev/tapN; or read a tap dry, as a receiving VM).
 *
 * Part of the overhead benchmark of vm_network_latency.py (bench/overhead.py).
 *
 * A frame written into a tap enters the host through tun_get_user(), which runs
 * netif_receive_skb() -> bridge -> veth xmit -> the peer's backlog in the writer's
 * own thread (softirq work done on local_bh_enable), so the CPU time of this
 * process per frame is what the host path costs, tracers included.
 *
 * Build: gcc -O2 -Wall -o tapflood tapflood.c
 *
 * One-shot:  tapflood -i vnbtap0 [-n FRAMES] [-p NPORTS] [-r RATE] [options]
 * Server:    tapflood -i vnbtap0 --serve [options]
 *   creates the tap (IFF_TAP|IFF_NO_PI) and prints "created ifindex=N"; then reads
 *   commands on stdin, one per line, and answers with one line each:
 *     up                    bring the tap up (lets the caller configure it first,
 *                           e.g. disable IPv6, before any frame can leave it)
 *                           -> "ready ifindex=N"
 *     flood N NPORTS RATE   N frames, source ports 5000..5000+NPORTS-1 in turn,
 *                           RATE frames/s (0 = as fast as possible)
 *                           -> "result frames=.. errors=.. cpu_ns_per_frame=..
 *                               pps=.. wall_s=.. cpu_s=.. t_start=.. t_end=.."
 *     tick INTERVAL_US      one frame every INTERVAL_US until the next line arrives
 *                           on stdin (that line is consumed)
 *                           -> "ticked frames=.. t_first=.."
 *     quit                  exit
 *   Times t_* are wall-clock seconds (CLOCK_REALTIME).
 * Drain:     tapflood -i vnbtap3 --drain
 *   a receiving VM: creates the tap, prints "created ifindex=N", and after "up" reads
 *   every frame the host puts in it; "count" on stdin -> "drained frames=.. cpu_s=.."
 *   (the CPU time of its reads: tun_put_user and the vm_read probe run there).
 * -i NAME may be a macvtap: its queue is opened through /dev/tap<ifindex> (made from
 * sysfs if devtmpfs has not), without the virtio-net header (TUNSETIFF IFF_NO_PI).
 *
 * Options: --src-mac, --dst-mac, --src-ip, --dst-ip, --src-port, --dst-port.
 * Defaults: 52:54:00:78:00:02 10.78.0.2:5000 -> 52:54:00:78:00:03 10.78.0.3:9000.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define FRAME_LEN 64
#define MAX_PORTS 4096

static uint8_t src_mac[6] = {0x52, 0x54, 0x00, 0x78, 0x00, 0x02};
static uint8_t dst_mac[6] = {0x52, 0x54, 0x00, 0x78, 0x00, 0x03};
static struct in_addr src_ip, dst_ip;
static unsigned src_port = 5000, dst_port = 9000;
static uint8_t frames[MAX_PORTS][FRAME_LEN];
static int built_ports;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int parse_mac(const char *s, uint8_t *mac)
{
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
        return -1;
    for (int i = 0; i < 6; i++) {
        if (v[i] > 255)
            return -1;
        mac[i] = (uint8_t)v[i];
    }
    return 0;
}

static uint16_t ip_checksum(const uint8_t *p, int len)
{
    uint32_t sum = 0;
    for (int i = 0; i < len; i += 2)
        sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* frame i: source port src_port + i; 14 Ethernet + 20 IPv4 + 8 UDP + 22 payload */
static void build_frames(int nports)
{
    if (nports < 1)
        nports = 1;
    if (nports > MAX_PORTS)
        nports = MAX_PORTS;
    for (int i = 0; i < nports; i++) {
        uint8_t *f = frames[i];
        memset(f, 0, FRAME_LEN);
        memcpy(f, dst_mac, 6);
        memcpy(f + 6, src_mac, 6);
        f[12] = 0x08; f[13] = 0x00;                 /* IPv4 */
        uint8_t *ip = f + 14;
        ip[0] = 0x45;                               /* v4, 20 bytes */
        uint16_t tot = FRAME_LEN - 14;
        ip[2] = tot >> 8; ip[3] = tot & 0xff;
        ip[4] = 0x12; ip[5] = 0x34;                 /* id */
        ip[6] = 0x40;                               /* DF */
        ip[8] = 64;                                 /* ttl */
        ip[9] = 17;                                 /* UDP */
        memcpy(ip + 12, &src_ip, 4);
        memcpy(ip + 16, &dst_ip, 4);
        uint16_t c = ip_checksum(ip, 20);
        ip[10] = c >> 8; ip[11] = c & 0xff;
        uint8_t *udp = ip + 20;
        unsigned sp = (src_port + (unsigned)i) & 0xffff;
        udp[0] = sp >> 8; udp[1] = sp & 0xff;
        udp[2] = dst_port >> 8; udp[3] = dst_port & 0xff;
        uint16_t ulen = tot - 20;
        udp[4] = ulen >> 8; udp[5] = ulen & 0xff;
        /* UDP checksum 0: none (allowed for IPv4) */
        memcpy(udp + 8, "vm-network-latency-b", 20);
    }
    built_ports = nports;
}

static void tap_up(const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("socket");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        die("SIOCGIFFLAGS");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        die("SIOCSIFFLAGS");
    close(s);
}

static int ifindex_of(const char *name)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("socket");
    if (ioctl(s, SIOCGIFINDEX, &ifr) < 0)
        die("SIOCGIFINDEX");
    close(s);
    return ifr.ifr_ifindex;
}

/* a macvtap's queue, as libvirt hands it to QEMU: /dev/tap<ifindex> */
static int open_macvtap(const char *name, int ifindex)
{
    char node[64], path[128], dev[32];
    unsigned maj, min;
    snprintf(node, sizeof(node), "/dev/tap%d", ifindex);
    int fd = open(node, O_RDWR | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        snprintf(path, sizeof(path), "/sys/class/net/%s/macvtap/tap%d/dev", name, ifindex);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(dev, sizeof(dev), f) || sscanf(dev, "%u:%u", &maj, &min) != 2)
            die(path);
        fclose(f);
        if (mknod(node, S_IFCHR | 0600, makedev(maj, min)) < 0)
            die(node);
        fd = open(node, O_RDWR | O_CLOEXEC);
    }
    if (fd < 0)
        die(node);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;            /* no virtio-net header */
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF on the macvtap");
    return fd;
}

static int open_tap(const char *name, int *ifindex)
{
    char sysdir[128];
    struct stat st;
    snprintf(sysdir, sizeof(sysdir), "/sys/class/net/%s/macvtap", name);
    if (stat(sysdir, &st) == 0) {
        *ifindex = ifindex_of(name);
        return open_macvtap(name, *ifindex);
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF");
    *ifindex = ifindex_of(name);
    return fd;
}

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void flood(int fd, long n, int nports, double rate, FILE *out)
{
    build_frames(nports);
    long errors = 0, sent = 0;
    int k = 0;
    double t_start_wall = now_wall();
    double cpu0 = cpu_seconds();
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double w0 = t0.tv_sec + t0.tv_nsec / 1e9;
    for (long i = 0; i < n; i++) {
        if (rate > 0) {
            /* due time of frame i; sleeping overshoots are caught up in bursts */
            double due = i / rate;
            double lag = due - (now_mono() - w0);
            if (lag > 0) {
                double target = w0 + due;
                struct timespec ts;
                ts.tv_sec = (time_t)target;
                ts.tv_nsec = (long)((target - ts.tv_sec) * 1e9);
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                    ;
            }
        }
        if (write(fd, frames[k], FRAME_LEN) == FRAME_LEN)
            sent++;
        else
            errors++;
        if (++k == built_ports)
            k = 0;
    }
    double wall = now_mono() - w0;
    double cpu = cpu_seconds() - cpu0;
    double t_end_wall = now_wall();
    fprintf(out, "result frames=%ld errors=%ld cpu_ns_per_frame=%.1f pps=%.0f wall_s=%.6f "
            "cpu_s=%.6f t_start=%.6f t_end=%.6f\n",
            sent, errors, n > 0 ? cpu * 1e9 / n : 0.0, wall > 0 ? n / wall : 0.0, wall, cpu,
            t_start_wall, t_end_wall);
    fflush(out);
}

/* one frame every interval_us until a line can be read from stdin */
static void tick(int fd, long interval_us, FILE *out)
{
    build_frames(1);
    long sent = 0;
    double t_first = 0;
    char buf[256];
    for (;;) {
        if (write(fd, frames[0], FRAME_LEN) == FRAME_LEN) {
            if (!sent)
                t_first = now_wall();
            sent++;
        }
        struct pollfd p = {.fd = 0, .events = POLLIN};
        int r = poll(&p, 1, (int)(interval_us / 1000 > 0 ? interval_us / 1000 : 1));
        if (r > 0) {
            if (!fgets(buf, sizeof(buf), stdin))
                break;
            break;
        }
    }
    fprintf(out, "ticked frames=%ld t_first=%.6f\n", sent, t_first);
    fflush(out);
}

/* a receiving VM: read every frame; "count" on stdin answers with the tally */
static void drain(int fd, const char *ifname, FILE *out)
{
    static uint8_t buf[65536];
    long frames = 0;
    char line[256];
    int up = 0;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    for (;;) {
        struct pollfd p[2] = {{.fd = 0, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
        if (poll(p, up ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (up && (p[1].revents & POLLIN)) {
            while (read(fd, buf, sizeof(buf)) > 0)
                frames++;
        }
        if (p[0].revents & (POLLIN | POLLHUP)) {
            if (!fgets(line, sizeof(line), stdin) || strncmp(line, "quit", 4) == 0)
                return;
            if (strncmp(line, "up", 2) == 0) {
                tap_up(ifname);
                up = 1;
                fprintf(out, "ready ifindex=%d\n", ifindex_of(ifname));
            } else if (strncmp(line, "count", 5) == 0) {
                while (read(fd, buf, sizeof(buf)) > 0)
                    frames++;
                fprintf(out, "drained frames=%ld cpu_s=%.6f\n", frames, cpu_seconds());
            } else {
                fprintf(out, "error unknown command\n");
            }
            fflush(out);
        }
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: tapflood -i TAP [-n FRAMES] [-p NPORTS] [-r RATE] [--serve | --drain]\n"
            "                [--src-mac MAC] [--dst-mac MAC] [--src-ip IP] [--dst-ip IP]\n"
            "                [--src-port PORT] [--dst-port PORT]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *ifname = NULL;
    long n = 200000;
    int nports = 1, serve = 0, draining = 0;
    double rate = 0;
    inet_pton(AF_INET, "10.78.0.2", &src_ip);
    inet_pton(AF_INET, "10.78.0.3", &dst_ip);
    static struct option opts[] = {
        {"serve", no_argument, 0, 'S'},
        {"drain", no_argument, 0, 'D'},
        {"src-mac", required_argument, 0, 1},
        {"dst-mac", required_argument, 0, 2},
        {"src-ip", required_argument, 0, 3},
        {"dst-ip", required_argument, 0, 4},
        {"src-port", required_argument, 0, 5},
        {"dst-port", required_argument, 0, 6},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "i:n:p:r:h", opts, NULL)) != -1) {
        switch (c) {
        case 'i': ifname = optarg; break;
        case 'n': n = atol(optarg); break;
        case 'p': nports = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'S': serve = 1; break;
        case 'D': draining = 1; break;
        case 1: if (parse_mac(optarg, src_mac)) usage(); break;
        case 2: if (parse_mac(optarg, dst_mac)) usage(); break;
        case 3: if (inet_pton(AF_INET, optarg, &src_ip) != 1) usage(); break;
        case 4: if (inet_pton(AF_INET, optarg, &dst_ip) != 1) usage(); break;
        case 5: src_port = (unsigned)atoi(optarg) & 0xffff; break;
        case 6: dst_port = (unsigned)atoi(optarg) & 0xffff; break;
        default: usage();
        }
    }
    if (!ifname || strlen(ifname) >= IFNAMSIZ)
        usage();
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);     /* precise sleeps when pacing */
    int ifindex;
    int fd = open_tap(ifname, &ifindex);
    if (draining) {
        printf("created ifindex=%d\n", ifindex);
        fflush(stdout);
        drain(fd, ifname, stdout);
        return 0;
    }
    if (!serve) {
        tap_up(ifname);
        flood(fd, n, nports, rate, stdout);
        return 0;
    }
    printf("created ifindex=%d\n", ifindex);
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        long a = 0, b = 0;
        double r = 0;
        if (sscanf(line, "flood %ld %ld %lf", &a, &b, &r) == 3) {
            flood(fd, a, (int)b, r, stdout);
        } else if (sscanf(line, "tick %ld", &a) == 1) {
            tick(fd, a, stdout);
        } else if (strncmp(line, "up", 2) == 0) {
            tap_up(ifname);
            printf("ready ifindex=%d\n", ifindex);
            fflush(stdout);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("error unknown command\n");
            fflush(stdout);
        }
    }
    close(fd);
    return 0;
}
