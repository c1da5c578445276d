"""The floor of the benchmark: the cheapest BPF that looks at the same packets.

Four raw tracepoints (the tool's start, queue, transmit and VM-read hooks), each
reading skb->dev->ifindex and comparing it with the tap's and the physical device's.
Whatever the tool adds above this is the price of following packets.

Two variants on the same four tracepoints measure what no tracer can avoid, for the
BPF run-time breakdown (kernel.bpf_stats_enabled): "empty", programs that return at
once (what running a program costs at all), and "clock", programs that only read the
clock, bpf_ktime_get_ns(), once (what one timestamp costs on top).

usage: floor.py SKB_DEV_OFFSET DEV_IFINDEX_OFFSET TAP_IFINDEX PHY_IFINDEX [VARIANT]
VARIANT: floor (default), empty or clock.
Prints "Attached" on stderr when attached, "hits N" on stdout when stopped (SIGINT/TERM;
the floor only: the variants count nothing).
"""
import signal
import sys
import time

from bcc import BPF

PROGRAM = """
#define SKB_DEV %d
#define DEV_IFINDEX %d
#define TAP_IF %d
#define PHY_IF %d
#define VARIANT_EMPTY %d
#define VARIANT_CLOCK %d
BPF_PERCPU_ARRAY(hits, u64, 1);
BPF_PERCPU_ARRAY(clock, u64, 1);
static __always_inline int check(struct bpf_raw_tracepoint_args *ctx)
{
#if VARIANT_EMPTY
    return 0;
#endif
#if VARIANT_CLOCK
    u32 z = 0;
    u64 *t = clock.lookup(&z);      // kept, so that the compiler keeps the read
    if (t)
        *t = bpf_ktime_get_ns();
    return 0;
#endif
    void *dev = 0;
    u32 idx = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), (u8 *)ctx->args[0] + SKB_DEV);
    bpf_probe_read_kernel(&idx, sizeof(idx), (u8 *)dev + DEV_IFINDEX);
    if (idx == TAP_IF || idx == PHY_IF) {
        u32 zero = 0;
        u64 *v = hits.lookup(&zero);
        if (v)
            (*v)++;
    }
    return 0;
}
RAW_TRACEPOINT_PROBE(netif_receive_skb) { return check(ctx); }
RAW_TRACEPOINT_PROBE(net_dev_queue) { return check(ctx); }
RAW_TRACEPOINT_PROBE(net_dev_start_xmit) { return check(ctx); }
RAW_TRACEPOINT_PROBE(skb_copy_datagram_iovec) { return check(ctx); }
"""


VARIANTS = ("floor", "empty", "clock")


def main():
    offsets = tuple(int(a) for a in sys.argv[1:5])
    variant = sys.argv[5] if len(sys.argv) > 5 else "floor"
    if variant not in VARIANTS:
        sys.stderr.write("floor.py: unknown variant %r (floor, empty, clock)\n" % variant)
        sys.exit(2)
    stop = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *a: stop.append(1))
    b = BPF(text=PROGRAM % (offsets + (variant == "empty", variant == "clock")))
    sys.stderr.write("Attached 4 raw tracepoints (%s)\n" % variant)
    sys.stderr.flush()
    while not stop:
        time.sleep(0.1)
    if variant == "floor":
        print("hits %d" % sum(v for v in b["hits"][0]))


if __name__ == "__main__":
    main()
