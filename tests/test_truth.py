"""Numbers that can be trusted: known delays land in the right segment, every packet that
entered the path is accounted for, and the tool stays safe under load and abuse.
"""
import os
import re
import signal
import subprocess
import time

import pytest

from tests.harness.lab import Lab
from tests.harness.tapwriter import TapWriter, ether, icmp, ipv4, udp
from tests.harness.tracing import wait_qdisc_empty

pytestmark = pytest.mark.lab

TAP, PHY, BRIDGE = Lab.TAP, Lab.PHY, Lab.BRIDGE
VM, REMOTE = Lab.GUEST_IP, Lab.REMOTE_IP
DEVS = ("--vm-dev", TAP, "--phy-dev", PHY)
STAND_IN = "vnltap1"          # a second 'VM': a process writing frames into its own tap
STAND_IN_MAC, STAND_IN_IP = "52:54:00:77:00:09", "10.77.0.9"
ACCOUNTED = ("reported", "below_threshold", "dropped", "left_path", "in_flight",
             "not_tracked", "lost", "vanished")


@pytest.fixture
def qdisc():
    added = []

    def add(dev, *spec):
        subprocess.run(["tc", "qdisc", "replace", "dev", dev, "root"] + list(spec), check=True)
        added.append(dev)
    yield add
    for dev in added:
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "root"], stderr=subprocess.DEVNULL)


@pytest.fixture
def paused(lab):
    """Pause the VM (QEMU stops reading its tap); always resumed afterwards."""
    yield lab
    if lab.vm_status() != "running":
        lab.resume_vm()


def rx_packets(dev):
    with open("/sys/class/net/%s/statistics/rx_packets" % dev) as f:
        return int(f.read())


def accounted(summary):
    return sum(summary[k] for k in ACCOUNTED)


def text_summary(trace):
    """The numbers of the text summary line, by name."""
    line = [l for l in trace.stdout.splitlines() if l.startswith("Summary:")][-1]
    nums = [int(n) for n in re.findall(r"\d+", line)]
    return dict(zip(["reported", "reported_tx", "reported_rx", "below_threshold", "dropped",
                     "left_path", "in_flight", "not_tracked", "lost", "vanished"], nums))


def segment(rec, a, b):
    return [s["us"] for s in rec["segments"] if (s["from"], s["to"]) == (a, b)][0]


def remote_send(lab, count, dport, sport, gap_us=0):
    r = lab.remote_run(lab.host_traffic, "udp", VM, dport, count, sport, gap_us, check=True)
    assert r.stdout.strip() == "sent %d" % count


def burst_into_stopped_vm(lab, count, dport, sport, gap_us, stopped, settle):
    """The remote sends a burst while QEMU is stopped (the tap's ring fills), then the VM
    runs again; returns how many frames the host received on its NIC meanwhile."""
    before = rx_packets(PHY)
    lab.pause_vm()
    remote_send(lab, count, dport, sport, gap_us)
    time.sleep(stopped)
    lab.resume_vm()
    time.sleep(settle)
    return rx_packets(PHY) - before


# ---------------------------------------------------------------------------
# Ground truth: known delays, in the right segment
# ---------------------------------------------------------------------------

@pytest.fixture
def stand_in(lab):
    """A second 'VM' on the bridge that reads its tap only when the test says so.

    (A paused QEMU is no use here: it still takes the first frame into its own queue.)"""
    with TapWriter(STAND_IN, BRIDGE) as vm:
        subprocess.run(["bridge", "fdb", "replace", STAND_IN_MAC, "dev", STAND_IN, "master",
                        "static"], check=True)
        subprocess.run(["ip", "-n", Lab.NS, "neigh", "replace", STAND_IN_IP, "lladdr",
                        STAND_IN_MAC, "dev", Lab.NS_DEV, "nud", "permanent"], check=True)
        vm.drain()
        yield vm
        subprocess.run(["ip", "-n", Lab.NS, "neigh", "del", STAND_IN_IP, "dev", Lab.NS_DEV],
                       stderr=subprocess.DEVNULL)


ONE_SHOT_SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 40100))
print("ready", flush=True)
for _ in sys.stdin:
    s.sendto(b"held by the VM", (sys.argv[2], 9100))
    print("sent", flush=True)
"""


@pytest.mark.parametrize("hold", [0.070, 5.0])
def test_vm_not_reading_is_the_tap_to_vm_segment(lab, stand_in, traces, hold):
    # a sender already running in the remote namespace: one line in, one datagram out,
    # so the moment of sending is known to within a pipe round trip
    sender = lab.remote("/usr/bin/python3", "-c", ONE_SHOT_SENDER, REMOTE, STAND_IN_IP,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert sender.stdout.readline().strip() == b"ready"
    t = traces("--vm-dev", STAND_IN, "--phy-dev", PHY, "--direction", "rx",
               "--protocol", "udp", "--dst-port", "9100")
    before_send = time.monotonic()
    sender.stdin.write(b"go\n")
    sender.stdin.flush()
    assert sender.stdout.readline().strip() == b"sent"
    after_send = time.monotonic()
    sender.stdin.close()
    sender.wait(10)
    time.sleep(max(0.0, hold - (time.monotonic() - after_send)))
    before_read = time.monotonic()
    assert stand_in.drain() == 1
    after_read = time.monotonic()
    t.stop()
    recs = t.packets()
    assert len(recs) == 1
    assert recs[0]["stages"] == ["phy_rx", "tap_queue", "tap_xmit", "vm_read"]
    wait = segment(recs[0], "tap_xmit", "vm_read") / 1e6
    # the frame reached the tap between before_send and after_send, and was read
    # between before_read and after_read: the true wait lies in between
    shortest, longest = before_read - after_send, after_read - before_send
    slack = max(0.10 * hold, 20e-6)
    assert shortest - slack <= wait <= longest + slack, (wait, shortest, longest)
    assert longest - shortest < 0.05 * hold + 0.01   # the bounds themselves are tight
    assert recs[0]["total_us"] / 1e6 == pytest.approx(wait, abs=0.001)


def test_qdisc_queue_wait_matches_the_token_bucket(lab, traces, qdisc):
    rate = 10 * 1000 * 1000 // 8      # 10 mbit/s in bytes/s
    burst = 1500
    frame = 1250                      # 14 + 20 + 8 + 1208 payload: 1 ms per packet at 10 mbit
    qdisc(PHY, "tbf", "rate", "10mbit", "burst", str(burst), "limit", "200000")
    sink = lab.start_udp_sink(9101)
    t = traces(*(DEVS + ("--direction", "tx", "--protocol", "udp", "--dst-port", "9101")))
    out = lab.guest("vnl-traffic udp %s 9101 30 40101 0 1208" % REMOTE)[1]
    assert out.strip() == "sent 30"
    assert sink.wait_count(30) == 30
    t.stop()
    sink.stop()
    recs = sorted(t.packets(), key=lambda r: r["timestamp"])
    assert len(recs) == 30
    # replay the token bucket on the arrival times the packets had at the qdisc
    tokens, last, late = float(burst), None, []
    for i, rec in enumerate(recs):
        wait_us = segment(rec, "phy_queue", "phy_xmit")
        arrival = rec["timestamp"] - wait_us / 1e6
        now = arrival if last is None else max(arrival, last)
        if last is not None:
            tokens = min(burst, tokens + (now - last) * rate)
        if tokens < frame:
            now += (frame - tokens) / rate
            tokens = float(frame)
        tokens -= frame
        last = now
        expected_us = (now - arrival) * 1e6
        # + 200 us: tbf releases a packet from its watchdog hrtimer and the TX softirq,
        # which run late on a busy 2-core VM: up to 60 us seen in development, 86 and
        # 157 us once each in CI-like full runs (one packet of 30); a segment in the
        # wrong place would be off by milliseconds
        if abs(wait_us - expected_us) > max(0.10 * expected_us, 20) + 200:
            late.append((i, wait_us, round(expected_us, 1)))
    # a timer can run later still, once (453 us for one packet of 30 in a full run):
    # two packets may be late, never early, by less than the millisecond a packet takes
    # at this rate; everything else within the bounds above
    assert len(late) <= 2 and all(0 < w - e < 1000 for _i, w, e in late), late
    assert segment(recs[-1], "phy_queue", "phy_xmit") > 20000   # the queue really built up


# ---------------------------------------------------------------------------
# Nothing lost silently: sent = reported + counted
# ---------------------------------------------------------------------------

def test_full_tap_queue_conservation_and_drop_reports(paused, traces):
    lab = paused
    args = DEVS + ("--direction", "rx", "--protocol", "udp", "--dst-port", "9200")
    as_json = traces(*(args + ("--drops",)))
    as_text = traces(*args, output="text")
    entered = burst_into_stopped_vm(lab, 3000, 9200, 40200, 20, stopped=0.5, settle=2)
    for t in (as_json, as_text):
        t.stop(settle=0)
    s = as_json.summary()
    assert s["started"] == entered
    assert accounted(s) == entered
    assert s["dropped"] > 500 and s["reported"] > 500
    drops = [o for o in as_json.objects() if o["type"] == "drop"]
    assert len(drops) == s["dropped"]
    assert {(d["reason"], d["last_stage"], d["direction"]) for d in drops} == \
        {("FULL_RING", "tap_xmit", "rx")}
    assert all(d["location"].startswith("tun_net_xmit") for d in drops)
    assert s["fates"] == [{"direction": "rx", "fate": "dropped", "reason": "FULL_RING",
                           "last_stage": "tap_xmit", "count": s["dropped"]}]
    ts = text_summary(as_text)
    assert sum(ts[k] for k in ACCOUNTED) == entered
    assert ts["dropped"] == s["dropped"]
    assert "RX dropped (FULL_RING) after tap_xmit: %d" % ts["dropped"] in as_text.stdout


def test_qdisc_limit_conservation(lab, traces, qdisc):
    qdisc(PHY, "tbf", "rate", "1mbit", "burst", "1600", "limit", "4000")
    t = traces(*(DEVS + ("--direction", "tx", "--protocol", "udp", "--dst-port", "9201")))
    before = rx_packets(TAP)
    out = lab.guest("vnl-traffic udp %s 9201 1000 40201" % REMOTE, timeout=120)[1]
    assert out.strip() == "sent 1000"
    time.sleep(0.5)
    waiting = wait_qdisc_empty(PHY)         # the queue empties at 1 mbit/s
    entered = rx_packets(TAP) - before      # frames the host took from the VM
    t.stop()
    s = t.summary()
    assert s["started"] == entered and accounted(s) == entered
    assert waiting == 0 and s["dropped"] > 0, (waiting, s)
    # the queue is empty: what the tool still holds is only what the kernel did not show
    # it leaving (see test_vm's histogram test): at most a few, all after phy_queue
    # (6 of the 112 that left the queue once in a full run; the cause is not found)
    assert s["in_flight"] <= 10 and all(p["last_stage"] == "phy_queue"
                                       for p in s["in_flight_examples"]), s
    assert {(f["reason"], f["last_stage"]) for f in s["fates"]} == {("QDISC_DROP", "phy_queue")}


def test_full_tracking_table_is_counted(paused, traces):
    lab = paused
    t = traces(*(DEVS + ("--direction", "rx", "--protocol", "udp", "--dst-port", "9202",
                         "--max-inflight", "100")))
    entered = burst_into_stopped_vm(lab, 500, 9202, 40202, 50, stopped=0.3, settle=1.5)
    t.stop()
    s = t.summary()
    # 100 slots, four per sk_buff hash: at most 100 held at once (a full hash may turn
    # one away before the table is full: counted the same)
    assert s["not_tracked"] >= entered - 100 - 16   # per-CPU free lists may keep a few
    assert 90 <= s["started"] <= 100 + 16, s     # the hash spreads sk_buffs over the slots
    assert s["started"] + s["not_tracked"] == entered
    assert accounted(s) == entered


@pytest.mark.parametrize("buffer", ["ring", "perf"])
def test_output_overrun_is_counted_not_hidden(lab, traces, buffer):
    """More events than the ring buffer (or, on kernels before 5.8, the perf buffer)
    and Python can take: losses are counted."""
    with TapWriter(STAND_IN, BRIDGE) as vm:
        t = traces("--vm-dev", STAND_IN, "--phy-dev", PHY, "--direction", "tx",
                   *(["--perf-buffer"] if buffer == "perf" else []))
        quiet = traces("--vm-dev", STAND_IN, "--phy-dev", PHY, "--direction", "tx",
                       "--latency-threshold", "10000000")
        before = vm.rx_packets()
        rss_before = tool_memory_kb(t.proc.pid, "VmRSS")
        frame = ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x0800,
                      ipv4(STAND_IN_IP, REMOTE, 17, udp(40300, 9300, b"x" * 18)))
        # the reader stalls as behind a frozen terminal (it now keeps up with this
        # writer): 300,000 events are far more than either buffer holds
        os.kill(t.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(300000):
                vm.write(frame)
        finally:
            os.kill(t.proc.pid, signal.SIGCONT)
        entered = vm.rx_packets() - before
        time.sleep(1)
        peak_kb = tool_memory_kb(t.proc.pid)
        grown_kb = tool_memory_kb(t.proc.pid, "VmRSS") - rss_before
        t.stop(settle=0)
        quiet.stop(settle=0)
    s = t.summary()
    assert accounted(s) == entered
    assert s["lost"] > 0 and s["reported"] > 0, s
    # losses are counted, nothing piles up in memory: the flood of 300,000 events
    # leaves the resident size where it was (the peak is BCC's compiler, at start)
    assert grown_kb < 16 * 1024, grown_kb
    assert peak_kb < 170 * 1024, peak_kb
    q = quiet.summary()
    assert accounted(q) == entered and q["lost"] == 0 and q["below_threshold"] == entered


# ---------------------------------------------------------------------------
# Abuse: malformed frames, a million flows, kills, fuzzed command lines
# ---------------------------------------------------------------------------

def test_malformed_frames_are_never_reported(lab, traces):
    src, dst = STAND_IN_MAC, Lab.REMOTE_MAC
    good_udp = ipv4(STAND_IN_IP, REMOTE, 17, udp(40400, 9400, b"ok"))
    frames = {
        "valid udp": (ether(dst, src, 0x0800, good_udp), True),
        "valid icmp": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 1,
                                                     icmp(8, 77, 5))), True),
        "802.1Q udp": (ether(dst, src, 0x0800, good_udp, vlans=[(0x8100, 42)]), True),
        "QinQ udp": (ether(dst, src, 0x0800, good_udp, vlans=[(0x88a8, 7), (0x8100, 8)]), True),
        "ip options": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 17, udp(40400, 9400),
                                                     ihl=6, options=b"\x01\x01\x01\x00")), True),
        "truncated ip": (ether(dst, src, 0x0800, good_udp[:24]), False),
        "tot_len too big": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 17,
                                                          udp(40400, 9400), tot_len=1400)), False),
        "ihl 4": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 17, udp(40400, 9400),
                                                ihl=4)), False),
        "ihl 15, short": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 17,
                                                        udp(40400, 9400), ihl=15)), False),
        "ipv6": (ether(dst, src, 0x86dd, b"\x60" + b"\0" * 60), False),
        "arp": (ether(dst, src, 0x0806, b"\0\1\x08\0\6\4\0\1" + b"\0" * 20), False),
        "version 5": (ether(dst, src, 0x0800, b"\x55" + good_udp[1:]), False),
        "fragment": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 17, b"\0" * 16,
                                                   frag=100)), False),
        "gre": (ether(dst, src, 0x0800, ipv4(STAND_IN_IP, REMOTE, 47, b"\0" * 16)), False),
        "header only": (ether(dst, src, 0x0800, b""), False),
        "runt": (ether(dst, src, 0x0800, b"\x45\0"), False),
    }
    with TapWriter(STAND_IN, BRIDGE) as vm:
        t = traces("--vm-dev", STAND_IN, "--phy-dev", PHY)
        for frame, _ok in frames.values():
            vm.write(frame)
        t.stop()
    recs = t.packets()
    expected = [name for name, (_f, ok) in frames.items() if ok]
    assert len(recs) == len(expected), [r["protocol"] for r in recs]
    assert t.summary()["started"] == len(expected)
    for r in recs:
        assert r["direction"] == "tx" and r["src_ip"] == STAND_IN_IP and r["dst_ip"] == REMOTE
        assert r["vm_dev"] == STAND_IN and r["phy_dev"] == PHY
        if r["protocol"] == "udp":
            assert (r["src_port"], r["dst_port"]) == (40400, 9400)
        else:
            assert (r["protocol"], r["icmp_type"], r["icmp_id"], r["icmp_seq"]) == \
                ("icmp", 8, 77, 5)
    assert sorted(r["vlan"] for r in recs if r["vlan"] is not None) == [7, 42]


def tool_memory_kb(pid, what="VmHWM"):
    """The tool's peak (VmHWM) or current (VmRSS) resident memory."""
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"%s:\s+(\d+)" % what, f.read()).group(1))


def test_a_million_flows_keep_memory_bounded(lab, traces):
    with TapWriter(STAND_IN, BRIDGE) as vm:
        t = traces("--vm-dev", STAND_IN, "--phy-dev", PHY, "--direction", "tx",
                   "--mode", "histogram", "--interval", "2")
        before = vm.rx_packets()
        base = ipv4(STAND_IN_IP, REMOTE, 17, udp(1, 1, b"f" * 18))
        head = ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x0800, b"")
        for i in range(1000000):        # 1,000,000 distinct source/destination port pairs
            sport, dport = 1024 + i % 50000, 1024 + i // 50000
            vm.write(head + base[:20] + bytes(((sport >> 8), sport & 255, dport >> 8,
                                               dport & 255)) + base[24:])
        entered = vm.rx_packets() - before
        time.sleep(2.5)
        peak_kb = tool_memory_kb(t.proc.pid)
        rss_kb = tool_memory_kb(t.proc.pid, "VmRSS")
        t.stop(settle=0)
    s = t.summary()
    assert entered == 1000000
    assert accounted(s) == entered and s["reported"] == entered - s["dropped"]
    # (the peak itself, BCC's compile, is a target: the benchmark's "RSS < 150 MB")
    # the compiler's memory went back to the system once the program was compiled, and
    # a million flows did not take it: the tool holds well under its peak
    assert rss_kb < peak_kb - 15 * 1024, (rss_kb, peak_kb)
    assert len(t.histograms()) >= 2      # kept reporting while the flows went by


def test_sigkill_leaves_nothing_attached(lab, traces):
    t = traces(*DEVS)
    assert len(t.prog_ids) >= 6
    os.kill(t.proc.pid, signal.SIGKILL)
    t.proc.wait(10)
    assert t.leftover_programs() == []   # fds closed by the kernel take the programs along
    again = traces(*DEVS)             # and the next run starts cleanly
    lab.guest("ping -c 1 -W 2 %s" % REMOTE)
    again.stop()
    assert again.summary()["reported"] == 2


def test_a_vm_started_while_tracing_is_picked_up(lab, traces):
    t = traces("--direction", "tx", "--protocol", "udp")   # default devices
    with TapWriter(STAND_IN, BRIDGE) as vm:
        time.sleep(2.5)         # the device list is rescanned every second
        frame = ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x0800,
                      ipv4(STAND_IN_IP, REMOTE, 17, udp(40500, 9500, b"new")))
        for _ in range(5):
            vm.write(frame)
        t.stop()
    recs = t.packets()
    assert len(recs) == 5
    assert {(r["vm_dev"], r["phy_dev"], r["src_port"]) for r in recs} == {(STAND_IN, PHY, 40500)}
