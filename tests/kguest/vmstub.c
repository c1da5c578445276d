/*
 * vmstub - a stand-in for a VM's QEMU process, for the kguest test lane.
 *
 * Holds the tap device (as QEMU does: it opens /dev/net/tun, so frames the host
 * sends towards the "VM" go through tun_net_xmit and are read from the fd, and
 * frames the "VM" sends enter the host through tun_get_user), and copies frames
 * between the tap and an AF_PACKET socket bound to a veth whose peer sits in a
 * network namespace holding the VM's address. Traffic started in that namespace
 * therefore reaches the host exactly as traffic from a guest would.
 *
 * A macvtap (libvirt's <interface type='direct'>) is held the same way through its
 * character device /dev/tapN (N its ifindex), without the virtio-net header a macvtap
 * queue has by default (TUNSETIFF IFF_TAP | IFF_NO_PI), so frames are plain Ethernet.
 *
 * usage: vmstub TAPNAME LINKDEV [READYFILE]
 *   TAPNAME   tap to create/attach (e.g. vnltap0), or an existing macvtap (vnlmvt0);
 *             it is brought up here
 *   LINKDEV   existing veth in this namespace (e.g. vnlvm0) whose peer is the VM's NIC
 *   READYFILE written once both ends are open and the tap is up
 * Runs until SIGTERM/SIGINT. Build: gcc -O2 -static -o vmstub vmstub.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/ethernet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

#include "stub_link.h"      /* ifindex_of(), set_up() */

/* A macvtap's queue: /dev/tapN, made from sysfs' MAJ:MIN if devtmpfs has not. */
static int open_macvtap(const char *name)
{
    char path[128], node[64], dev[32];
    unsigned maj, min;
    int ifindex = ifindex_of(name);
    snprintf(node, sizeof(node), "/dev/tap%d", ifindex);
    int fd = open(node, O_RDWR);
    if (fd < 0 && errno == ENOENT) {
        snprintf(path, sizeof(path), "/sys/class/net/%s/macvtap/tap%d/dev", name, ifindex);
        FILE *f = fopen(path, "r");
        if (!f || !fgets(dev, sizeof(dev), f) || sscanf(dev, "%u:%u", &maj, &min) != 2) {
            fprintf(stderr, "no %s\n", path);
            return -1;
        }
        fclose(f);
        if (mknod(node, S_IFCHR | 0600, makedev(maj, min)) < 0) { perror(node); return -1; }
        fd = open(node, O_RDWR);
    }
    if (fd < 0) { perror(node); return -1; }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;        /* no IFF_VNET_HDR */
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF on the macvtap"); return -1; }
    return fd;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s TAPNAME LINKDEV [READYFILE]\n", argv[0]);
        return 2;
    }
    const char *tapname = argv[1], *linkdev = argv[2];

    char sysdir[128];
    struct stat st;
    int tap;
    snprintf(sysdir, sizeof(sysdir), "/sys/class/net/%s/macvtap", tapname);
    if (stat(sysdir, &st) == 0) {
        tap = open_macvtap(tapname);
        if (tap < 0) return 1;
    } else {
        tap = open("/dev/net/tun", O_RDWR);
        if (tap < 0) { perror("open /dev/net/tun"); return 1; }
        struct ifreq ifr;
        memset(&ifr, 0, sizeof(ifr));
        ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
        strncpy(ifr.ifr_name, tapname, IFNAMSIZ - 1);
        if (ioctl(tap, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); return 1; }
    }
    /* A tap that is down returns EIO on read: bring it up before polling it. */
    if (set_up(tapname) < 0) { perror("bringing the tap up"); return 1; }

    int ps = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (ps < 0) { perror("socket(AF_PACKET)"); return 1; }
    int one = 1;
    if (setsockopt(ps, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one)) < 0)
        perror("PACKET_IGNORE_OUTGOING (will filter by pkttype)");
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex_of(linkdev);
    if (!sll.sll_ifindex) { fprintf(stderr, "no device %s\n", linkdev); return 1; }
    if (bind(ps, (struct sockaddr *)&sll, sizeof(sll)) < 0) { perror("bind AF_PACKET"); return 1; }
    if (set_up(linkdev) < 0) { perror("bringing the link up"); return 1; }

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (argc > 3) {
        FILE *f = fopen(argv[3], "w");
        if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
    }
    fprintf(stderr, "vmstub: %s <-> %s (pid %d)\n", tapname, linkdev, (int)getpid());

    unsigned char buf[65536 + 64];
    unsigned long to_host = 0, to_vm = 0;
    struct pollfd pfd[2] = { { .fd = tap, .events = POLLIN }, { .fd = ps, .events = POLLIN } };
    while (!stop) {
        int n = poll(pfd, 2, 500);
        if (n < 0) { if (errno == EINTR) continue; perror("poll"); break; }
        if (pfd[0].revents & POLLIN) {          /* host -> VM: read the tap, send to the VM's NIC */
            ssize_t len = read(tap, buf, sizeof(buf));
            if (len > 0) {
                if (send(ps, buf, (size_t)len, 0) < 0 && errno != ENOBUFS)
                    perror("send to link");
                else
                    to_vm++;
            } else if (len < 0 && errno != EAGAIN && errno != EINTR) {
                perror("read tap"); break;
            }
        }
        if (pfd[1].revents & POLLIN) {          /* VM -> host: frames from the VM's NIC into the tap */
            struct sockaddr_ll from;
            socklen_t fl = sizeof(from);
            ssize_t len = recvfrom(ps, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fl);
            if (len > 0 && from.sll_pkttype != PACKET_OUTGOING) {
                if (write(tap, buf, (size_t)len) < 0)
                    perror("write tap");
                else
                    to_host++;
            }
        }
    }
    fprintf(stderr, "vmstub: exiting, %lu frames vm->host, %lu host->vm\n", to_host, to_vm);
    return 0;
}
