"""This host's kernel, without traffic: struct layouts from its BTF against pahole,
what its BPF can do, the C bucketing run in it (BPF_PROG_TEST_RUN), the program
through its verifier, the stages it has."""
import ctypes
import errno
import json
import os
import random
import re
import signal
import struct
import subprocess

import pytest

from tests.harness.tool import FUZZ_OPTIONS, PYTHON, ROOT, TOOL, run_tool
from tests.harness.tracing import exact_percentile

pytestmark = pytest.mark.host

BTF_PATH = "/sys/kernel/btf/vmlinux"

needs_btf = pytest.mark.skipif(not os.path.exists(BTF_PATH), reason="kernel has no BTF")


# ---------------------------------------------------------------------------
# Struct layouts: the running kernel's BTF against pahole
# ---------------------------------------------------------------------------

def pahole_members(struct_name):
    """{member: (offset, size)} as pahole prints them, nested anonymous members included."""
    out = subprocess.run(["pahole", "-C", struct_name, BTF_PATH], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, universal_newlines=True, check=True).stdout
    members = {}
    for line in out.splitlines():
        m = re.match(r"^\s+.*?[\s\*]([A-Za-z_][A-Za-z0-9_]*)(\[\d+\])*;\s+/\*\s+(\d+)\s+(\d+)\s+\*/",
                     line)
        if m and m.group(1) not in members:
            members[m.group(1)] = (int(m.group(3)), int(m.group(4)))
    return members


@pytest.fixture(scope="module")
def btf(tool):
    return tool.BTF.from_file(BTF_PATH)


@needs_btf
@pytest.mark.parametrize("struct_name,member", [
    ("sk_buff", "dev"), ("sk_buff", "len"), ("sk_buff", "data_len"), ("sk_buff", "protocol"),
    ("sk_buff", "transport_header"), ("sk_buff", "network_header"), ("sk_buff", "mac_header"),
    ("sk_buff", "head"), ("sk_buff", "data"), ("sk_buff", "vlan_tci"),
    ("net_device", "ifindex"), ("net_device", "name"), ("net_device", "nd_net"),
    ("net", "ns"), ("ns_common", "inum"),
])
def test_btf_offsets_match_pahole(btf, struct_name, member):
    expected = pahole_members(struct_name)[member]
    assert btf.offset(struct_name, member) == expected


@needs_btf
def test_btf_nested_paths_match_pahole(btf):
    net_ns = pahole_members("net")["ns"][0]
    inum = pahole_members("ns_common")["inum"]
    assert btf.offset("net", "ns.inum") == (net_ns + inum[0], inum[1])
    nd_net = pahole_members("net_device")["nd_net"][0]
    assert btf.offset("net_device", "nd_net.net") == (nd_net + pahole_members(
        "possible_net_t")["net"][0], 8)


@needs_btf
def headers_offset(tool, struct_name, member):
    """offsetof() as BCC compiles it from the installed kernel headers, read back from
    the kernel after a BPF_PROG_TEST_RUN of a program that stores it."""
    import bcc
    text = ("#include <linux/skbuff.h>\n#include <linux/netdevice.h>\n"
            "BPF_ARRAY(out, u64, 1);\n"
            "int get_offset(struct bpf_raw_tracepoint_args *ctx)\n{\n    u32 k = 0;\n"
            "    u64 *v = out.lookup(&k);\n    if (v)\n"
            "        *v = offsetof(struct %s, %s);\n    return 0;\n}\n" % (struct_name, member))
    b = bcc.BPF(text=text.encode())
    try:
        fd = b.load_func(b"get_offset", bcc.BPF.RAW_TRACEPOINT).fd
        ctx = ctypes.create_string_buffer(8)
        attr = struct.pack("<IIIIQQIIIIQQII", fd, 0, 0, 0, 0, 0, 0, 0, 8, 0,
                           ctypes.addressof(ctx), 0, 0, 0)
        assert tool.bpf_call(10, attr) == 0
        return b[b"out"][ctypes.c_int(0)].value
    finally:
        b.cleanup()


def test_layout_differs_from_the_mismatched_headers_here(tool, btf):
    # The trap LAB_FACTS measured: the installed headers are another kernel's, and their
    # layout of sk_buff is not this kernel's. The tool's layout is BTF's (pahole agrees),
    # and differs from what the headers would have given.
    release = os.uname()[2]
    headers = tool.headers_release("/lib/modules/%s/build" % release)
    if headers == release:
        pytest.skip("the headers here match the running kernel: no trap to avoid")
    layout = tool.layout_from_btf(btf)
    assert layout.source == "BTF" and layout.netns
    pahole = pahole_members("sk_buff")
    differ = []
    for macro, member in (("SKB_HEAD", "head"), ("SKB_MAC_HEADER", "mac_header")):
        assert layout.offsets[macro] == pahole[member][0]
        from_headers = headers_offset(tool, "sk_buff", member)
        if from_headers != layout.offsets[macro]:
            differ.append((member, from_headers, layout.offsets[macro]))
    assert differ, "headers %s give this kernel's sk_buff layout" % headers
    print("headers %s against BTF: %s" % (headers, differ))


@needs_btf
def test_btf_drop_reasons_match_tracefs(tool, btf):
    layout = tool.layout_from_btf(btf)
    assert layout.kfree_skb_reason
    fmt_path = "/sys/kernel/tracing/events/skb/kfree_skb/format"
    if not os.path.exists(fmt_path):
        tool.tracefs_dir()
    with open(fmt_path) as f:
        pairs = re.findall(r"\{ (\d+), \"([A-Z0-9_]+)\" \}", f.read())
    assert len(pairs) > 10
    for value, name in pairs:
        if name != "MAX":
            assert layout.drop_reasons[int(value)] == "SKB_DROP_REASON_" + name


@needs_btf
def test_btf_tracepoint_prototypes(btf):
    assert btf.tracepoint_params("netif_receive_skb") == ["struct sk_buff *"]
    assert btf.tracepoint_params("kfree_skb")[:3] == [
        "struct sk_buff *", "void *", "enum skb_drop_reason"]
    assert btf.tracepoint_params("no_such_tracepoint_here") is None


def test_btf_rejects_garbage(tool):
    with pytest.raises(tool.BTFError):
        tool.BTF(b"\0" * 64)


def test_drop_reasons_from_tracefs_match_btf(tool, btf):
    # the no-BTF path reads drop reasons from the tracepoint's format: same table
    from_tracefs = tool.drop_reasons_from_tracefs()
    from_btf = btf.enum_values("skb_drop_reason")
    assert from_tracefs and len(from_tracefs) > 50
    assert all(from_btf[code] == name for code, name in from_tracefs.items())


def test_refuses_mismatched_headers_without_btf():
    # no BTF and the installed headers are for another kernel: refuse, do not guess
    release = os.uname()[2]
    build = "/lib/modules/%s/build/include/generated/utsrelease.h" % release
    with open(build) as f:
        headers = re.search(r'"(.+)"', f.read()).group(1)
    if headers == release:
        pytest.skip("the headers here match the running kernel")
    r = run_tool("--btf", "none", "--timeout", "1", timeout=60)
    assert r.returncode == 2
    assert "not the running kernel" in r.stderr and headers in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# What this kernel's BPF can do, asked of it
# ---------------------------------------------------------------------------

def test_bpf_refused_to_the_process_exits_2():
    # root, but without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (as in a container that
    # drops them): the kernel says EPERM to the first trial load, and the tool says why
    r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-sys_admin,-perfmon",
                        PYTHON, TOOL, "--timeout", "1"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "refuses to load BPF programs" in r.stderr and "CAP_BPF" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_kernel_features_are_asked_of_the_kernel(tool):
    # this kernel (6.18) has both; an unknown helper id is refused by the same trial
    caps = tool.probe_capabilities()
    assert caps.ringbuf and caps.probe_read_kernel
    assert tool._try_raw_tracepoint_program(0x7fff) == -errno.EINVAL
    assert tool._try_raw_tracepoint_program(tool.BPF_FUNC_probe_read_kernel) >= 0
    assert not tool.probe_capabilities(force_perf_buffer=True).ringbuf


def test_without_bcc_exits_2():
    # -S leaves out site-packages, where BCC's bindings live: as on a host without them
    r = subprocess.run([PYTHON, "-S", TOOL, "--protocol", "icmp", "--timeout", "1"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "python3-bpfcc" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# Histogram buckets: the C in the kernel against bucket_bounds()
# ---------------------------------------------------------------------------

class KernelBuckets(object):
    """The tool's own C bucketing (HIST_ADD_C), run in this kernel: a raw tracepoint
    program that calls hist_add(0, args[0]), executed with BPF_PROG_TEST_RUN (5.10+)
    once per value; the bucket is the one whose counter moved."""

    def __init__(self, tool):
        import bcc
        self.tool = tool
        text = ("#define HIST_SUB_BITS %d\n#define HIST_BUCKETS %d\n"
                "BPF_ARRAY(hist, u64, HIST_BUCKETS);\n%s\n"
                "int test_bucket(struct bpf_raw_tracepoint_args *ctx)\n"
                "{\n    hist_add(0, ctx->args[0]);\n    return 0;\n}\n"
                % (tool.C.HIST_SUB_BITS, tool.C.HIST_BUCKETS, tool.HIST_ADD_C))
        self.bpf = bcc.BPF(text=text.encode())
        self.fd = self.bpf.load_func(b"test_bucket", bcc.BPF.RAW_TRACEPOINT).fd
        self.hist = self.bpf[b"hist"]

    def counts(self):
        return [v.value for v in self.hist.values()]

    def add(self, ns):
        ctx = ctypes.create_string_buffer(struct.pack("<Q", ns), 8)
        attr = struct.pack("<IIIIQQIIIIQQII", self.fd, 0, 0, 0, 0, 0, 0, 0, 8, 0,
                           ctypes.addressof(ctx), 0, 0, 0)
        res = self.tool.bpf_call(10, attr)    # BPF_PROG_TEST_RUN
        assert res == 0, "BPF_PROG_TEST_RUN: %s" % os.strerror(-res)

    def of(self, values):
        """{bucket: count} the kernel made of these values (in nanoseconds)."""
        before = self.counts()
        for ns in values:
            self.add(ns)
        after = self.counts()
        self.hist.clear()
        return dict((b, a - c) for b, (a, c) in enumerate(zip(after, before)) if a != c)

    def bucket(self, ns):
        (b, n), = self.of([ns]).items()
        assert n == 1
        return b


@pytest.fixture(scope="module")
def kernel_buckets(tool):
    return KernelBuckets(tool)


def test_buckets_contain_their_values(tool, kernel_buckets):
    # what the kernel counts a value in is the bucket whose bounds the reports print
    rng = random.Random(7)
    values = [0, 1, 15, 16, 31, 32, 999, 1000, 1023, 1024, 70 * 10 ** 6, 5 * 10 ** 9,
              3600 * 10 ** 9, 2 ** 62]
    values += [rng.randrange(1, 10 ** 12) for _ in range(3000)]
    # below 2^31 / 3 ns the kernel divides by 125 with a multiply and a shift: every
    # remainder, values either side of the switch to a real division, and where v
    # crosses a bucket boundary
    edge = (2 ** 31) // 3
    values += [edge - 2, edge - 1, edge, edge + 1, edge + 2]
    values += [rng.randrange(1, edge) for _ in range(3000)]
    values += [125 * k + r for k in (1, 8, 4095, 5726623) for r in range(125)]
    values += [(1 << b) * 1000 // 1024 + d for b in range(4, 30) for d in (-1, 0, 1)]
    for ns in values:
        bucket = kernel_buckets.bucket(ns)
        # joins bucket in Python what two kernels measured together: the same buckets
        assert tool.bucket_of(ns) == bucket, ns
        lo, hi = tool.bucket_bounds(bucket)
        us = (ns + ns * 3 // 125) / 1024.0
        assert lo <= us < hi, ns
        if 1000 <= ns < 38 * 3600 * 10 ** 9:       # 1 us to 38 hours: fine buckets
            assert (hi - lo) / lo <= 1.0 / 16 + 1e-12   # 16 sub-buckets per octave
        assert bucket < tool.C.HIST_BUCKETS


@pytest.mark.parametrize("seed", range(20))
def test_percentiles_within_ten_percent_of_exact(tool, kernel_buckets, seed):
    rng = random.Random(seed)
    shape = seed % 4
    n = rng.choice([5, 50, 1000, 5000])
    if shape == 0:
        ns = [int(rng.lognormvariate(10, 1.5)) + 1000 for _ in range(n)]
    elif shape == 1:
        ns = [rng.randrange(1000, 2000000) for _ in range(n)]
    elif shape == 2:   # bimodal: fast path and a slow tail
        ns = [rng.choice([rng.randrange(2000, 3000), rng.randrange(70 * 10 ** 6, 71 * 10 ** 6)])
              for _ in range(n)]
    else:
        ns = [rng.choice([5 * 10 ** 9, 20000]) for _ in range(n)]
    buckets = kernel_buckets.of(ns)
    assert sum(buckets.values()) == len(ns)
    for f in (0.5, 0.9, 0.99):
        exact = exact_percentile([v / 1000.0 for v in ns], f)
        est = tool.percentile(buckets, f)
        assert abs(est - exact) <= 0.10 * exact, (f, est, exact)


# ---------------------------------------------------------------------------
# --explain: the C that splits a segment by a thread's scheduling events, in the kernel
# ---------------------------------------------------------------------------

def explain_test_program(tool, body, fn):
    """The tool's own --explain C (EXPLAIN_TYPES_C, EXPLAIN_WALK_C) and a test program
    calling into it, loaded: (the BPF object, the program's fd)."""
    import bcc
    defines = "\n".join("#define %s %s" % (k, v) for k, v in tool.shared_defines())
    text = "%s\n%s\n%s\n%s\n" % (
        defines, tool.record_c_struct("explain", tool.EXPLAIN_FIELDS),
        tool.EXPLAIN_TYPES_C, tool.EXPLAIN_WALK_C) + body
    bpf = bcc.BPF(text=text.encode())
    return bpf, bpf.load_func(fn.encode(), bcc.BPF.RAW_TRACEPOINT).fd


def prog_test_run(tool, fd, *args):
    """BPF_PROG_TEST_RUN of a raw tracepoint program, its arguments these u64s."""
    ctx = ctypes.create_string_buffer(struct.pack("<%dQ" % len(args), *args), 8 * len(args))
    attr = struct.pack("<IIIIQQIIIIQQII", fd, 0, 0, 0, 0, 0, 0, 0, 8 * len(args), 0,
                       ctypes.addressof(ctx), 0, 0, 0)
    res = tool.bpf_call(10, attr)    # BPF_PROG_TEST_RUN
    assert res == 0, "BPF_PROG_TEST_RUN: %s" % os.strerror(-res)


class KernelExplainWalk(object):
    """The tool's own explain_walk() (EXPLAIN_WALK_C), run in this kernel with
    BPF_PROG_TEST_RUN on a thread history written here: (tid, a, b) in, the explanation
    out of a map."""
    TID = 4242

    def __init__(self, tool):
        self.tool = tool
        self.bpf, self.fd = explain_test_program(tool, """
BPF_HASH(threads, u32, struct thist, 4);
BPF_ARRAY(out, struct explain, 1);
int test_walk(struct bpf_raw_tracepoint_args *ctx)
{
    u32 tid = ctx->args[0], zero = 0;
    struct thist *h = threads.lookup(&tid);
    struct explain *x = out.lookup(&zero);
    if (!h || !x)
        return 0;
    __builtin_memset(x, 0, sizeof(*x));
    explain_walk(h, ctx->args[1], ctx->args[2], x);
    return 0;
}
""", "test_walk")
        self.threads, self.out = self.bpf[b"threads"], self.bpf[b"out"]

    def walk(self, events, a, b, irq=0, wait_cpu=0):
        """events: [(ts, cause name, the thread's interrupt ns so far)], oldest first,
        as the scheduler's handlers append them (the ring keeps the last EXPLAIN_RING);
        irq: its interrupt ns now. Returns ({cause: ns}, flags, cpu)."""
        Cause, ring = self.tool.Cause, self.tool.C.EXPLAIN_RING
        leaf = self.threads.Leaf()
        leaf.head = len(events)
        leaf.irq = irq
        leaf.wait_cpu = wait_cpu
        for i, (ts, kind, at_irq) in enumerate(events):
            ev = leaf.ev[i % ring]
            ev.ts, ev.irq, ev.kind = ts, at_irq, getattr(Cause, kind.upper())
        self.threads[self.threads.Key(self.TID)] = leaf
        prog_test_run(self.tool, self.fd, self.TID, a, b)
        x = self.out[ctypes.c_uint32(0)]
        ns = dict((c, x.x_ns[i]) for i, c in enumerate(self.tool.EXPLAIN_CAUSES) if x.x_ns[i])
        return ns, x.x_flags, x.x_cpu


@pytest.fixture(scope="module")
def explain_walk(tool):
    return KernelExplainWalk(tool)


class KernelLongestRunner(object):
    """The tool's own longest_runner() (EXPLAIN_WALK_C), run in this kernel with
    BPF_PROG_TEST_RUN on a CPU's switches written here: (since) in, (tid, task) out."""

    def __init__(self, tool):
        self.tool = tool
        self.bpf, self.fd = explain_test_program(tool, """
BPF_ARRAY(cpus, struct oncpu, 1);
BPF_ARRAY(out, u64, 2);
int test_runner(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0, one = 1;
    struct oncpu *c = cpus.lookup(&zero);
    if (!c)
        return 0;
    u64 task = 0, tid = longest_runner(c, ctx->args[0], &task);
    out.update(&zero, &tid);
    out.update(&one, &task);
    return 0;
}
""", "test_runner")
        self.cpus, self.out = self.bpf[b"cpus"], self.bpf[b"out"]

    def longest(self, switches, since):
        """switches: [(ts, tid of the task switched out then)], oldest first, as
        sched_switch appends them (the ring keeps the last EXPLAIN_RUNNERS); the task
        pointer stands in as tid + 0x1000. Returns the tid named (0: none)."""
        ring = self.tool.C.EXPLAIN_RUNNERS
        leaf = self.cpus.Leaf()
        leaf.head = len(switches)
        for i, (ts, tid) in enumerate(switches):
            r = leaf.ran[i % ring]
            r.until, r.task, r.tid = ts, tid + 0x1000, tid
        self.cpus[ctypes.c_uint32(0)] = leaf
        prog_test_run(self.tool, self.fd, since)
        tid, task = self.out[ctypes.c_uint32(0)].value, self.out[ctypes.c_uint32(1)].value
        assert task == (tid + 0x1000 if tid else 0), (tid, task)
        return tid


@pytest.fixture(scope="module")
def longest_runner(tool):
    return KernelLongestRunner(tool)


def test_behind_is_the_task_that_held_the_cpu_longest_during_the_wait(longest_runner):
    # a hog (7) ran 100 .. 2000, a kworker (9) 2000 .. 2050, then the waiting thread got
    # the CPU from rcu (8, 2050 .. 2060): the hog, not the last one before it
    switches = [(100, 5), (2000, 7), (2050, 9), (2060, 8)]
    assert longest_runner.longest(switches, 500) == 7
    # a wait that began late in the hog's run: only its part of the wait counts
    assert longest_runner.longest(switches, 1990) == 9
    # preempted at 2000 (the thread itself, 5, switched out then): what ran after
    assert longest_runner.longest([(100, 7), (2000, 5), (2300, 9), (2400, 8)], 2000) == 9
    # nothing known before the first switch kept: no name rather than a guess
    assert longest_runner.longest([(2000, 7)], 500) == 0
    assert longest_runner.longest([], 500) == 0


def test_behind_from_a_ring_that_wrapped(tool, longest_runner):
    ring = tool.C.EXPLAIN_RUNNERS
    # the hog (7) ran long early, then more switches than the ring keeps: only the
    # kept ones are candidates (the newest ring - 1 runs), the longest of them
    switches = [(0, 1), (10000, 7)] + [(10000 + 10 * (i + 1), 100 + i) for i in range(ring)]
    switches[-3] = (switches[-4][0] + 40, 555)
    switches[-2] = (switches[-3][0] + 10, 556)
    switches[-1] = (switches[-2][0] + 10, 557)
    assert longest_runner.longest(switches, 0) == 555
    # with the hog still in the ring, it is named
    assert longest_runner.longest(switches[:ring - 1], 0) == 7


def test_a_wait_is_split_into_asleep_run_queue_and_running(tool, explain_walk):
    XF = tool.XF
    # asleep from 100, woken at 1000, on its CPU at 5000; the segment 500 .. 6000
    ns, flags, cpu = explain_walk.walk([(100, "asleep", 0), (1000, "run_queue", 0),
                                        (5000, "running", 0)], 500, 6000, wait_cpu=1)
    assert ns == {"asleep": 500, "run_queue": 4000, "running": 1000}
    assert (flags, cpu) == (XF.FOLLOWED, 1)
    # the wake-up came before the segment started: only its part of the wait counts
    ns, _f, _c = explain_walk.walk([(0, "asleep", 0), (100, "run_queue", 0),
                                    (900, "running", 0)], 500, 1000)
    assert ns == {"run_queue": 400, "running": 100}
    # a segment inside one state
    ns, _f, _c = explain_walk.walk([(0, "running", 0)], 500, 1000)
    assert ns == {"running": 500}


def test_a_stopped_thread_and_preemption_back_to_back(tool, explain_walk):
    # running, stopped (SIGSTOP) at 100, runnable at 700 (SIGCONT), on its CPU at 800
    ns, _f, _c = explain_walk.walk([(0, "running", 0), (100, "stopped", 0),
                                    (700, "run_queue", 0), (800, "running", 0)], 50, 1000)
    assert ns == {"running": 250, "stopped": 600, "run_queue": 100}
    # preempted (runnable) at 300, back at 450: interleaved running and waiting
    ns, _f, _c = explain_walk.walk([(0, "running", 0), (300, "run_queue", 0),
                                    (450, "running", 0), (600, "run_queue", 0),
                                    (650, "running", 0)], 200, 700)
    assert ns == {"running": 100 + 150 + 50, "run_queue": 150 + 50}


def test_interrupts_are_taken_out_of_running(tool, explain_walk):
    # on its CPU since 200, when its interrupt time was 50; 300 now: 250 of interrupts
    ns, _f, _c = explain_walk.walk([(0, "asleep", 0), (200, "running", 50)], 250, 1000,
                                   irq=300)
    assert ns == {"running": 500, "irq": 250}
    # never more interrupt time than running time
    ns, _f, _c = explain_walk.walk([(0, "asleep", 0), (900, "running", 0)], 100, 1000,
                                   irq=5000)
    assert ns == {"asleep": 800, "irq": 100}


def test_a_segment_that_ended_before_the_threads_last_events(tool, explain_walk):
    """A packet's longest wait in the middle of its path (a qdisc, say): the thread
    that ended it went on (asleep at 4000, running again at 6000) before the packet
    completed. Only 500 .. 3000 counts; interrupts up to its first event after 3000."""
    events = [(0, "asleep", 0), (1000, "run_queue", 0), (2000, "running", 0),
              (4000, "asleep", 70), (6000, "running", 70)]
    ns, flags, _c = explain_walk.walk(events, 500, 3000, irq=100)
    assert ns == {"asleep": 500, "run_queue": 1000, "running": 930, "irq": 70}
    assert flags == tool.XF.FOLLOWED
    # a segment wholly between two of its events
    ns, _f, _c = explain_walk.walk(events, 4500, 5500, irq=100)
    assert ns == {"asleep": 1000}


def test_history_that_does_not_reach_back_is_partial(tool, explain_walk):
    XF = tool.XF
    ns, flags, _c = explain_walk.walk([(800, "running", 0)], 500, 1000)
    assert (ns, flags) == ({"running": 200, "unknown": 300}, XF.FOLLOWED | XF.PARTIAL)
    # more events than the ring keeps: the oldest are gone, the segment's start with them
    ring = tool.C.EXPLAIN_RING
    events = [(1000 + 10 * i, "running" if i % 2 else "run_queue", 0) for i in range(ring + 8)]
    ns, flags, _c = explain_walk.walk(events, 1000, 1000 + 10 * (ring + 8))
    kept_from = 1000 + 10 * 8
    assert ns["unknown"] == kept_from - 1000 and flags & XF.PARTIAL
    assert ns["running"] + ns["run_queue"] == 10 * ring
    # and never a negative share from events out of order (a wake-up stamped late)
    ns, _f, _c = explain_walk.walk([(0, "asleep", 0), (600, "run_queue", 0),
                                    (500, "running", 0)], 100, 1000)
    assert sum(ns.values()) == 900 and all(v > 0 for v in ns.values()), ns


def test_log2_rows_count_every_packet(tool, kernel_buckets):
    buckets = kernel_buckets.of([600, 1500, 2500, 70 * 10 ** 6])
    rows = tool.log2_rows(buckets)
    assert sum(c for _lo, _hi, c in rows) == 4
    assert rows[0][0] == 0.5 and rows[1] == (1.0, 2.0, 1)


# ---------------------------------------------------------------------------
# The program: generated, verified, and the stages this kernel has
# ---------------------------------------------------------------------------

def test_ebpf_prints_the_program_with_btf_offsets():
    r = run_tool("--ebpf", "--protocol", "udp", "--dst-port", "53", "--attach", "tracepoint")
    assert r.returncode == 0, r.stderr
    assert "#define FILTER_PROTO 17" in r.stdout and "#define FILTER_DPORT 53" in r.stdout
    # the offsets are the running kernel's (pahole reads the same BTF independently)
    for macro, struct_name, member in (("SKB_HEAD", "sk_buff", "head"),
                                       ("SKB_DEV", "sk_buff", "dev"),
                                       ("DEV_IFINDEX", "net_device", "ifindex")):
        assert "#define %s %d\n" % (macro, pahole_members(struct_name)[member][0]) in r.stdout
    assert "int rtp_net_netif_receive_skb" in r.stdout
    assert "linux/skbuff.h" not in r.stdout   # layouts from BTF, no header structs


def tp_btf_refused(r):
    """The tool's one line when this kernel will not load tp_btf programs, or None."""
    return r.stderr.strip() if r.returncode == 2 and "--attach tp_btf: " in r.stderr else None


def test_ebpf_tp_btf_programs_take_the_typed_skb_and_keep_the_frees_raw():
    r = run_tool("--ebpf", "--attach", "tp_btf")
    if tp_btf_refused(r):
        pytest.skip(tp_btf_refused(r))
    assert r.returncode == 0, r.stderr
    # the skb is the u64 argument (BCC leaves a plain u64 ctx alone), told it is typed
    assert "int tpb_net_netif_receive_skb(u64 *ctx)\n{\n    u64 arg = ctx[0];" in r.stdout
    assert "return on_receive(ctx, skb, 0, " in r.stdout
    assert "return on_device(ctx, skb, 0, " in r.stdout
    # the frees want only the address: raw tracepoints, whatever --attach says
    assert "int rtp_kfree_skb(struct bpf_raw_tracepoint_args *ctx)" in r.stdout
    assert "int rtp_net_" not in r.stdout


@pytest.mark.parametrize("mode", ["detailed", "histogram"])
@pytest.mark.parametrize("attach", ["kprobe", "tracepoint", "tp_btf"])
def test_program_passes_the_verifier(tool, mode, attach):
    # every stage's program, OVS and upcalls included, loads on this kernel, even
    # though it cannot attach kprobes and has no openvswitch module (tp_btf: the OVS
    # stages' tracepoints are the module's, attached raw; the rest typed)
    r = run_tool("--dry-run", "--attach", attach, "--mode", mode, "--drops", timeout=120)
    if attach == "tp_btf" and tp_btf_refused(r):
        pytest.skip(tp_btf_refused(r))
    assert r.returncode == 0, r.stderr
    n = int(re.search(r"(\d+) BPF programs \(%s\) passed the kernel verifier" % attach,
                      r.stderr).group(1))
    if attach == "kprobe":
        # a function's entry and its return (argument 0) are two points; and the
        # vhost_signal stage's drain, which its return probes run by a tail call
        points = set((f, a) for st in tool.STAGES for f, a in st.kprobes)
        points |= set(st.tracepoint for st in tool.STAGES if not st.kprobes)
        points.add("vhost_drain")
    else:
        points = set(st.tracepoint[:2] for st in tool.STAGES if st.tracepoint)
    assert n == len(points) + 2      # + kfree_skb and consume_skb, the packet fates


def test_kprobe_attach_refused_cleanly_without_kprobes(tool):
    ok, _why = tool.kprobes_available()
    if ok:
        pytest.skip("this kernel has kprobes")
    r = run_tool("--attach", "kprobe", "--timeout", "1", timeout=60)
    assert r.returncode == 2
    assert "kprobe" in r.stderr and "Traceback" not in r.stderr


def test_list_stages_json_names_every_stage():
    r = run_tool("--list-stages", "--output", "json")
    assert r.returncode == 0, r.stderr
    stages = [json.loads(l) for l in r.stdout.splitlines()]
    # the README's table of stages ("The path and its stages"): the same stages, in the
    # same order (each direction's path order), in the same directions
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## The path and its stages"):]
    section = section[:section.index("\n## ", 3)]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M)
    everywhere = {"tx", "rx", "vm2vm"}
    readme = [(name, everywhere if where.strip() == "all" else
               set(w.strip().lower() for w in where.split(","))) for name, where in rows]
    listed = [(s["name"], everywhere if s["direction"] == "all" else
               set(s["direction"].split(","))) for s in stages]
    assert listed == readme
    by = {s["name"]: s for s in stages}
    assert by["tap_rx"]["probe"] == "net:netif_receive_skb"
    for s in stages:
        assert s["method"] or s["reason"]   # traced, or says why not


def test_list_stages_with_dry_run_says_what_this_kernel_has(tool):
    """--dry-run plans every probe point as if it existed (for the verifier); with
    --list-stages it must not: a kernel without kprobes has no bridge stage."""
    kprobes, _why = tool.kprobes_available()
    r = run_tool("--list-stages", "--dry-run", "--output", "json")
    assert r.returncode == 0, r.stderr
    by = dict((s["name"], s) for s in map(json.loads, r.stdout.splitlines()))
    plain = dict((s["name"], s) for s in map(json.loads, run_tool(
        "--list-stages", "--output", "json").stdout.splitlines()))
    assert by == plain
    if not kprobes:
        assert by["bridge"]["method"] is None and "no kprobe support" in by["bridge"]["reason"]


# ---------------------------------------------------------------------------
# The tool as a process, up to its kernel's limits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(40))
def test_fuzzed_command_lines_as_a_process(seed):
    import random
    rng = random.Random(seed)
    argv = []
    for _ in range(rng.randrange(1, 5)):
        argv.append(rng.choice(FUZZ_OPTIONS))
        argv.append(rng.choice(["udp", "rx", "-3", "0", "70000", "10.1.2.3", "lo", "x" * 20,
                                "histogram", "json", "2", "icmp"]))
    r = run_tool(*(argv + ["--list-stages"]), timeout=60)
    assert r.returncode in (0, 2), r.stderr
    assert "Traceback" not in r.stderr


def test_ctrl_c_before_tracing_exits_130():
    # SIGINT as a terminal's Ctrl-C finds it (a suite started as a background job
    # would hand it an ignored SIGINT)
    proc = subprocess.Popen([PYTHON, TOOL, "--verbose"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # its first line (the layouts it read from BTF): the tool's own code runs, long
    # before BCC's compile is done (a fixed delay raced Python compiling the file on a
    # loaded machine: a Ctrl-C then is Python's, before any line of the tool ran)
    first = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = first + err
    assert first.startswith("struct layouts"), err
    assert "Tracing" not in err and "Traceback" not in err, err
    assert proc.returncode == 130
