/*
 * vhoststub - a stand-in for a VM whose QEMU uses vhost-net, for the kguest test lane.
 *
 * Like vmstub it holds the tap and bridges it to an AF_PACKET socket on a veth whose
 * peer is the "VM"'s NIC in a namespace; but it never reads or writes the tap itself.
 * As QEMU does with vhost=on, it hands the tap to the kernel's vhost-net worker:
 * VHOST_SET_OWNER, a memory table, two split virtqueues (0: RX, host -> VM; 1: TX,
 * VM -> host) with kick and call eventfds, VHOST_NET_SET_BACKEND. The worker thread
 * (vhost-PID) then copies frames between the tap and the rings: TX frames enter the
 * host through tun_sendmsg -> tun_get_user in the worker, RX frames leave the tap
 * through tun_recvmsg -> tun_put_user in the worker.
 *
 * usage: vhoststub TAPNAME LINKDEV READYFILE [-name guest=NAME ...]
 *   (the -name argument is only there to be found in /proc/PID/cmdline, as QEMU's is)
 * With VHOSTSTUB_LOG=FILE, each TX kick is a line "tx BEFORE AFTER": the wall clock
 * (CLOCK_REALTIME, ns) just before and just after its eventfd write, which the tool's
 * vhost_kick stage must fall between; each read of the RX call eventfd a line "call
 * BEFORE AFTER COUNT": how many times the worker signalled it since the last read (the
 * tool's vhost_signal stage is one of those signals); and each ICMP frame the worker
 * put in the RX ring a line "rx SEEN TYPE ID SEQ": the wall clock when vhoststub found
 * it there.
 * Runs until SIGTERM/SIGINT. Build: gcc -O2 -static -o vhoststub vhoststub.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <linux/vhost.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>
#include <net/ethernet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define QSZ     256                         /* descriptors per ring */
#define BUFSZ   2048                        /* one frame and its virtio-net header */
#define HDR     sizeof(struct virtio_net_hdr)   /* the tap adds/strips it (IFF_VNET_HDR) */
#define RINGSZ  (3 * 4096)                  /* desc (4 KiB), avail, used: a page each */
#define MEMSZ   (2 * RINGSZ + 2 * QSZ * BUFSZ)

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

struct queue {
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    unsigned char *bufs;
    int kick, call;
    uint16_t avail_idx, last_used;
};

static void die(const char *what) { perror(what); exit(1); }

#include "stub_link.h"      /* ifindex_of(), set_up() */

static FILE *stublog;

static long long wall_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void kick(struct queue *q)
{
    uint64_t one = 1;
    if (write(q->kick, &one, sizeof(one)) != sizeof(one)) perror("kick");
}

/* A TX kick, logged (VHOSTSTUB_KICKLOG) with the wall clock around the write */
static void kick_tx(struct queue *q)
{
    long long before = wall_ns();
    kick(q);
    if (stublog) {
        long long after = wall_ns();
        fprintf(stublog, "tx %lld %lld\n", before, after);
        fflush(stublog);
    }
}

/* An IPv4 ICMP frame the worker put in the RX ring, logged (VHOSTSTUB_LOG) with the
 * time it was found there, its ICMP type, identifier and sequence number */
static void log_rx_icmp(const unsigned char *f, uint32_t len)
{
    if (!stublog || len < 14 + 20 + 8 || f[12] != 0x08 || f[13] != 0x00 || f[14 + 9] != 1)
        return;
    uint32_t ihl = (f[14] & 0x0f) * 4u;
    if (ihl < 20 || len < 14 + ihl + 8)
        return;
    const unsigned char *icmp = f + 14 + ihl;
    fprintf(stublog, "rx %lld %u %u %u\n", wall_ns(), icmp[0], (unsigned)(icmp[4] << 8 | icmp[5]),
            (unsigned)(icmp[6] << 8 | icmp[7]));
    fflush(stublog);
}

/* Offer descriptor id to the device (the worker) on queue q. */
static void offer(struct queue *q, uint16_t id)
{
    q->avail->ring[q->avail_idx % QSZ] = id;
    __sync_synchronize();               /* the ring entry before the index */
    q->avail->idx = ++q->avail_idx;
    __sync_synchronize();
}

static void setup_queue(int vh, unsigned idx, struct queue *q, unsigned char *ring,
                        unsigned char *bufs, int tap)
{
    q->desc = (struct vring_desc *)ring;
    q->avail = (struct vring_avail *)(ring + 4096);
    q->used = (struct vring_used *)(ring + 8192);
    q->bufs = bufs;
    q->kick = eventfd(0, EFD_NONBLOCK);
    q->call = eventfd(0, EFD_NONBLOCK);
    if (q->kick < 0 || q->call < 0) die("eventfd");
    struct vhost_vring_state num = { .index = idx, .num = QSZ };
    struct vhost_vring_state base = { .index = idx, .num = 0 };
    struct vhost_vring_addr addr = {
        .index = idx, .flags = 0,
        .desc_user_addr = (uint64_t)(uintptr_t)q->desc,
        .used_user_addr = (uint64_t)(uintptr_t)q->used,
        .avail_user_addr = (uint64_t)(uintptr_t)q->avail,
    };
    struct vhost_vring_file kf = { .index = idx, .fd = q->kick };
    struct vhost_vring_file cf = { .index = idx, .fd = q->call };
    struct vhost_vring_file backend = { .index = idx, .fd = tap };
    if (ioctl(vh, VHOST_SET_VRING_NUM, &num) < 0) die("VHOST_SET_VRING_NUM");
    if (ioctl(vh, VHOST_SET_VRING_BASE, &base) < 0) die("VHOST_SET_VRING_BASE");
    if (ioctl(vh, VHOST_SET_VRING_ADDR, &addr) < 0) die("VHOST_SET_VRING_ADDR");
    if (ioctl(vh, VHOST_SET_VRING_KICK, &kf) < 0) die("VHOST_SET_VRING_KICK");
    if (ioctl(vh, VHOST_SET_VRING_CALL, &cf) < 0) die("VHOST_SET_VRING_CALL");
    if (ioctl(vh, VHOST_NET_SET_BACKEND, &backend) < 0) die("VHOST_NET_SET_BACKEND");
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s TAPNAME LINKDEV READYFILE [-name guest=NAME]\n", argv[0]);
        return 2;
    }
    const char *tapname = argv[1], *linkdev = argv[2];

    /* the tap, with the virtio-net header the worker passes through (features 0:
     * the socket, not vhost, handles the header) */
    int tap = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    if (tap < 0) die("open /dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    strncpy(ifr.ifr_name, tapname, IFNAMSIZ - 1);
    if (ioctl(tap, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    int hdrsz = HDR;
    if (ioctl(tap, TUNSETVNETHDRSZ, &hdrsz) < 0) die("TUNSETVNETHDRSZ");
    if (set_up(tapname) < 0) die("bringing the tap up");

    int vh = open("/dev/vhost-net", O_RDWR);
    if (vh < 0) die("open /dev/vhost-net");
    if (ioctl(vh, VHOST_SET_OWNER) < 0) die("VHOST_SET_OWNER");
    uint64_t features = 0;
    if (ioctl(vh, VHOST_SET_FEATURES, &features) < 0) die("VHOST_SET_FEATURES");

    /* one memory region; "guest physical" addresses are this process's own */
    unsigned char *mem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    memset(mem, 0, MEMSZ);
    struct { struct vhost_memory m; struct vhost_memory_region r; } table;
    memset(&table, 0, sizeof(table));
    table.m.nregions = 1;
    table.r.guest_phys_addr = (uint64_t)(uintptr_t)mem;
    table.r.memory_size = MEMSZ;
    table.r.userspace_addr = (uint64_t)(uintptr_t)mem;
    if (ioctl(vh, VHOST_SET_MEM_TABLE, &table) < 0) die("VHOST_SET_MEM_TABLE");

    struct queue rx, tx;
    unsigned char *bufs = mem + 2 * RINGSZ;
    setup_queue(vh, 0, &rx, mem, bufs, tap);
    setup_queue(vh, 1, &tx, mem + RINGSZ, bufs + QSZ * BUFSZ, tap);

    /* every RX descriptor: a buffer the worker may fill with a frame for the VM */
    for (uint16_t i = 0; i < QSZ; i++) {
        rx.desc[i].addr = (uint64_t)(uintptr_t)(rx.bufs + (size_t)i * BUFSZ);
        rx.desc[i].len = BUFSZ;
        rx.desc[i].flags = VRING_DESC_F_WRITE;
        offer(&rx, i);
    }
    kick(&rx);

    int ps = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (ps < 0) die("socket(AF_PACKET)");
    int one = 1;
    setsockopt(ps, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex_of(linkdev);
    if (!sll.sll_ifindex) { fprintf(stderr, "no device %s\n", linkdev); return 1; }
    if (bind(ps, (struct sockaddr *)&sll, sizeof(sll)) < 0) die("bind AF_PACKET");
    if (set_up(linkdev) < 0) die("bringing the link up");

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (getenv("VHOSTSTUB_LOG") && !(stublog = fopen(getenv("VHOSTSTUB_LOG"), "w")))
        die("VHOSTSTUB_LOG");
    FILE *f = fopen(argv[3], "w");
    if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
    fprintf(stderr, "vhoststub: %s <-> %s through vhost-net (pid %d)\n", tapname, linkdev,
            (int)getpid());

    unsigned long to_host = 0, to_vm = 0, tx_busy = 0;
    uint16_t tx_next = 0, tx_outstanding = 0;
    unsigned char frame[BUFSZ];
    struct pollfd pfd[3] = { { .fd = ps, .events = POLLIN }, { .fd = rx.call, .events = POLLIN },
                             { .fd = tx.call, .events = POLLIN } };
    while (!stop) {
        int n = poll(pfd, 3, 500);
        if (n < 0) { if (errno == EINTR) continue; perror("poll"); break; }
        uint64_t ev;
        if (pfd[1].revents & POLLIN) {
            long long before = wall_ns();
            if (read(rx.call, &ev, sizeof(ev)) < 0) {
                if (errno != EAGAIN)
                    perror("read rx call");
            } else if (stublog) {
                fprintf(stublog, "call %lld %lld %llu\n", before, wall_ns(),
                        (unsigned long long)ev);
                fflush(stublog);
            }
        }
        if (pfd[2].revents & POLLIN && read(tx.call, &ev, sizeof(ev)) < 0 && errno != EAGAIN)
            perror("read tx call");
        /* host -> VM: frames the worker put in the RX buffers */
        int rx_done = 0;
        while (rx.last_used != ((volatile struct vring_used *)rx.used)->idx) {
            __sync_synchronize();
            struct vring_used_elem e = rx.used->ring[rx.last_used % QSZ];
            rx.last_used++;
            if (e.len > HDR) {
                log_rx_icmp(rx.bufs + (size_t)e.id * BUFSZ + HDR, e.len - HDR);
                if (send(ps, rx.bufs + (size_t)e.id * BUFSZ + HDR, e.len - HDR, 0) < 0 &&
                    errno != ENOBUFS)
                    perror("send to link");
                else
                    to_vm++;
            }
            offer(&rx, (uint16_t)e.id);
            rx_done = 1;
        }
        if (rx_done)
            kick(&rx);
        /* TX buffers the worker has sent: free again */
        while (tx.last_used != ((volatile struct vring_used *)tx.used)->idx) {
            __sync_synchronize();
            tx.last_used++;
            tx_outstanding--;
        }
        /* VM -> host: each frame from the VM's NIC into a TX buffer, then a kick */
        if (pfd[0].revents & POLLIN) {
            struct sockaddr_ll from;
            socklen_t fl = sizeof(from);
            ssize_t len = recvfrom(ps, frame, sizeof(frame) - HDR, 0,
                                   (struct sockaddr *)&from, &fl);
            if (len > 0 && from.sll_pkttype != PACKET_OUTGOING) {
                if (tx_outstanding == QSZ) {
                    tx_busy++;          /* the worker is behind: this frame is dropped */
                    continue;
                }
                uint16_t id = tx_next++ % QSZ;
                unsigned char *b = tx.bufs + (size_t)id * BUFSZ;
                memset(b, 0, HDR);
                memcpy(b + HDR, frame, (size_t)len);
                tx.desc[id].addr = (uint64_t)(uintptr_t)b;
                tx.desc[id].len = (uint32_t)(HDR + len);
                tx.desc[id].flags = 0;
                tx_outstanding++;
                offer(&tx, id);
                kick_tx(&tx);
                to_host++;
            }
        }
    }
    fprintf(stderr, "vhoststub: exiting, %lu frames vm->host, %lu host->vm, %lu dropped "
            "(TX ring full)\n", to_host, to_vm, tx_busy);
    return 0;
}
