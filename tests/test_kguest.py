"""The kguest lane: the real tool in QEMU guests whose kernels have kprobes and the Open
vSwitch kernel datapath, which this machine's own kernel lacks: one lane per Debian
release of the kernel matrix, each with its own kernel, BCC and Python:

  bullseye  Linux 5.10, BCC 0.18, Python 3.9   (no OVS tracepoints, no drop reasons)
  bookworm  Linux 6.1,  BCC 0.26, Python 3.11
  trixie    Linux 6.12, BCC 0.31, Python 3.13

KGUEST_SUITES=bullseye,trixie (or ``./test_vm_latency.sh kguest SUITE``) picks some.
tests/kguest/run_lane.sh runs once per release (11 to 14 minutes, plus one or two to
build the cached guest image the first time), and every test below runs on each. In
the guest, every traced run starts instances of the tool side by side on the same
traffic, ``--attach kprobe`` and ``--attach tracepoint`` (the mix run also ``--attach
auto`` and ``--attach tp_btf``), all ``--output json --vm-dev vnltap0 --phy-dev vnlphy0 --verbose``, with
tcpdump --immediate-mode on the devices. What each method traces on that kernel comes
from the tool's own ``--list-stages --output json --attach METHOD`` in the guest; the
kernel's own tracefs (openvswitch events, kfree_skb's format) says which of those
answers are right. The guest only records; the
tests here decide, comparing what the tool reported with oracles that do not come from
the tool: tcpdump's captures (parsed here), the traffic generators' own counts,
ovs-dpctl's lookup counters, bpftool's list of loaded programs, tracefs' kprobe_events.

Topologies: A = Open vSwitch bridge ovsbr0 (kernel datapath), B = Linux bridge vnlbr0;
G = OVS with a Geneve port; V = the Linux bridge on VLAN 100 of an active-backup bond of
vnlphy0 and vnlphy1; O = OVS with a balance-xor bond port and a second VM's tap
vnltap1 (10.77.0.4); M = the VM on a macvtap vnlmvt0 of vnlphy0 (no switch). A and B
with the tap vnltap0 (held by vmstub, a stand-in for the VM's QEMU, whose "guest" is
namespace vm, 10.77.0.2) and the veth vnlphy0 (the "NIC"; its peer is namespace remote,
10.77.0.3). Runs per topology, in results/runs/<A|B>-<run>/:
  mix    VM <-> remote: 5 pings, 10 UDP datagrams echoed back, one TCP connection with
         3 echoed messages; on A the datapath flows are deleted before each protocol
  netem  8 pings with `tc qdisc add dev vnlphy0 root netem delay 20ms`
  host   remote -> the host's own address 10.77.0.1 on the switch: 5 pings, 10 UDP, TCP
  drop   5 pings into `netem loss 100%` on vnlphy0, the tool with --drops
and after A, an --attach kprobe instance killed with SIGKILL (results/sigkill/).

KGUEST_RESULTS=DIR checks the results of an earlier `run_lane.sh --results DIR` instead of
running the lane (the same checks; nothing is skipped).
"""
import collections
import json
import math
import os
import re
import shutil
import signal
import statistics

import pytest

from tests.harness.kguest import Lane, counter_diff, flow_key, fmt_key, run_lane

pytestmark = pytest.mark.kguest

TAP, PHY = "vnltap0", "vnlphy0"
VM, REMOTE, HOST = "10.77.0.2", "10.77.0.3", "10.77.0.1"
# topologies V and O: the bond's second "NIC"; O: the second VM; M: the VM's macvtap
PHY2, TAP2, VM2, MVT = "vnlphy1", "vnltap1", "10.77.0.4", "vnlmvt0"
UPLINK = {"V": ["vnlbond0.100", "vnlbond0"], "O": ["vnlbond0"]}   # above the NICs
PHYS = {"V": (PHY, PHY2), "O": (PHY, PHY2)}
SWITCH = {"V": "B", "O": "A"}       # V: a Linux bridge, O: OVS
UND_LOCAL, UND_REMOTE = "10.88.0.1", "10.88.0.2"     # topology G's underlay
METHODS = ("kprobe", "tracepoint")      # in every run
# the mix run also has --attach auto and --attach tp_btf (BTF-typed tracepoints) instances
ALL_METHODS = METHODS + ("auto", "tp_btf")
# where each release's kernel loads tp_btf programs (BPF_PROG_TYPE_TRACING, 5.5+, with
# its vmlinux BTF): the stages that read sk_buff fields attach typed there
TP_BTF_STAGES = ("tap_rx", "mvt_queue", "mvt_xmit", "phy_rx", "decap", "encap", "phy_queue",
                 "phy_xmit", "tap_queue", "tap_xmit")
TOPOS = ("A", "B")
# The releases of the matrix and what each must have run: kernel, BCC, Python.
SUITE_VERSIONS = {
    "bullseye": ("5.10.", "0.18.", "3.9."),
    "bookworm": ("6.1.", "0.26.", "3.11."),
    "trixie": ("6.12.", "0.31.", "3.13."),
}
SUITES = [x for x in os.environ.get("KGUEST_SUITES", ",".join(SUITE_VERSIONS)).split(",") if x]
PROTOCOLS = ("icmp", "udp", "tcp")
LOSS_COUNTERS = ("dropped", "left_path", "in_flight", "not_tracked", "lost", "vanished",
                 "in_upcall")

# --- kprobe against tracepoint (point 2) -------------------------------------------
# The two instances see each packet at the same or adjacent kernel points: their totals
# differ by (gap at the end) - (gap at the start), a gap being the time between the two
# instances' handlers on that packet. Measured in this guest (TCG, ~20-100x slower than
# native) over 5 lanes, 620 paired packets: at the start 5-70 us (one handler: parse, map
# insert), at the end 3-270 us (at phy_xmit a handler completes the packet, writes the
# ring buffer and wakes its reader). |kprobe - tracepoint|: median 79 us, p90 234 us,
# p99 2.8 ms, max 6.5 ms; 53 of 620 over 600 us, 17 over 2 ms.
# What makes the large ones: whatever runs between the two handlers adds its whole
# duration: TCG translating code run for the first time (the first packets after
# attaching: 0.3-0.7 ms); an interrupt and its work, above all the first instance's ring
# buffer wake-up at phy_xmit, which delays the second instance's stamp by ~2 ms on a good
# share of the TX packets of a netem run (tcpdump's copy of the frame, taken in the same
# kernel function, shows which instance was late); a softirq between the kprobe on
# skb_copy_datagram_iter and the tracepoint inside it (RX); the host descheduling a vCPU
# thread (2 host cores for 2 vCPUs, QEMU's I/O thread and whatever else runs here).
# Hence:
#   every packet: |kprobe - tracepoint| <= max(10%, 10 ms): one such stall at most, 1.5x
#     the largest seen (10% only matters above 100 ms; the totals here are 0.05-25 ms);
#     both records finish within 10 ms of each other (the packets of a UDP or ICMP flow
#     are 50-200 ms apart: a record paired with the wrong packet would show) and agree
#     on whether the packet went up to ovs-vswitchd;
#   every run: the median |kprobe - tracepoint| <= 1 ms (measured per run: 66-484 us,
#     the top one a netem run where half the TX packets carried a ~2 ms wake-up): a stage
#     hooked at another point of the path, or an end stage one method misses, shifts
#     every packet of its kind and shows here.
AGREE_REL = 0.10
AGREE_STALL_US = 10000.0
AGREE_MEDIAN_US = 1000.0

# --- netem (point 6) ------------------------------------------------------------------
# netem holds each packet 20 ms between enqueue (phy_queue: __dev_queue_xmit / the
# net_dev_queue tracepoint) and its dequeue for the driver (phy_xmit: net_dev_start_xmit).
# Measured here 20.2-21.0 ms for most packets (the qdisc's timer fires a few hundred us
# late under TCG), but 24 of 128 records (4 lanes) showed 22-25 ms, in one method or
# both: their stamp at phy_xmit was late (the other instance's completion and ring-buffer
# wake-up ran first, or a stall, as for point 2), while tcpdump on vnlphy0, which copies
# the frame in the same kernel function (xmit_one: dev_queue_xmit_nit, then the
# net_dev_start_xmit tracepoint), had it 20.1-21.1 ms after the enqueue. So each TX record is
# judged with its phy_xmit stamp taken back to tcpdump's copy: phy_queue->phy_xmit -
# (record's end - tcpdump's time) must be within 10% of 20 ms, and that lag must be a
# handler's or a stall's (-1 ms .. 10 ms; below zero only through the tool's conversion
# of its clock to wall time: tens of us). The raw values are printed (pytest -rA).
# The upper bound is 10% over the time tcpdump itself saw the packet take from the tap to
# the NIC's driver (the queue's share cannot be more): netem under TCG was seen to hold a
# packet 22.7 ms instead of 20 (5.10 guest; tcpdump and both methods agreed on it), and
# the tool must report what the qdisc did, not what it was configured to do.
# The other TX segments stay small: each under half the delay for every packet, their
# median (per method) under a quarter, so no sizeable part of the 20 ms can sit there.
# Measured: 0.03-5.6 ms, medians 0.1-2.3 ms (an ICMP echo takes up to ~5 ms from tap to
# switch under TCG after the 200 ms pause between pings; tcpdump shows the same; on
# 7 Dec 3 packets in 8 took 2-5.6 ms, both methods agreeing to 150 us per packet: the
# median of the one segment --attach tracepoint has there was 2.3 ms, over the tenth
# this bound was then).
NETEM_US = 20000.0
NETEM_REL = 0.10
NETEM_LAG_MIN_US = -1000.0
NETEM_OTHER_MAX_US = 0.5 * NETEM_US
NETEM_OTHER_MEDIAN_US = 0.25 * NETEM_US

# --- time (point 8) -------------------------------------------------------------------
LANE_BUDGET_S = 15 * 60
COLD_BUILD_ALLOWANCE_S = 180    # a cold image build measured 59 s; 3x that, as margin
GUEST_CRASH = "Kernel panic - not syncing"   # in the console tail run_lane.sh prints


@pytest.fixture(scope="module", params=SUITES)
def lane(request, tmp_path_factory):
    suite = request.param
    reuse = os.environ.get("KGUEST_RESULTS")
    if reuse:
        results, rc = reuse, None
        out_file = os.path.join(reuse, "lane-output.txt")
        output = open(out_file).read() if os.path.exists(out_file) else ""
    else:
        if os.geteuid() != 0:
            pytest.skip("KGUEST LANE NOT RUN (this is a skip, not a pass): run_lane.sh "
                        "needs root (QEMU, mmdebstrap, network namespaces)")
        results = str(tmp_path_factory.mktemp("kguest-" + suite))
        rc, output = run_lane(suite, results)
        if rc == 2 and GUEST_CRASH in output:
            # The guest kernel itself died (seen once on 6.12: "Oops: int3" in a timer
            # while the kernel patched its own code, which multi-threaded TCG can race
            # on). Nothing of the tool ran to judge: the lane runs once more, and says so.
            print("kguest lane %s: the guest kernel crashed under emulation; running the "
                  "lane again. Its output:\n%s" % (suite, output[-3000:]))
            shutil.rmtree(results, True)
            rc, output = run_lane(suite, results)
        os.makedirs(results, exist_ok=True)
        with open(os.path.join(results, "lane-output.txt"), "w") as f:
            f.write(output)
        print("kguest lane %s: exit %s, results in %s" % (suite, rc, results))
        if rc != 0 and not shutil.which("qemu-system-x86_64"):
            pytest.skip("KGUEST LANE NOT RUN (this is a skip, not a pass): QEMU cannot run "
                        "here, no qemu-system-x86_64 even after the lane's own install step "
                        "(build_image.sh installs qemu-system-x86). Lane output:\n%s"
                        % output[-3000:])
    if not os.path.exists(os.path.join(results, "steps.tsv")):
        pytest.fail("the guest gave no results (run_lane.sh exit %s); its last lines:\n%s"
                    % (rc, output[-4000:]))
    return Lane(suite, results, output, rc)


# =========================================================================== checks

def expected_stages(traced, topo, direction, upcall=False, host=False):
    """The stages a packet passes here, of those the method traces on this kernel
    (traced, from --list-stages): bridge only when the bridge forwards (not for the
    host's own traffic); ovs_dp on OVS, ovs_upcall before it when the packet went up to
    ovs-vswitchd; host_rcv (kprobes) ends the host's own traffic."""
    if topo == "M":     # a macvtap: its own queue (TX), its ring (RX), no switch
        if direction == "tx":
            return ["mvt_queue", "mvt_xmit", "phy_queue", "phy_xmit"]
        return ["phy_rx"] + (["mvt_ring"] if "mvt_ring" in traced else []) + ["vm_read"]
    topo = SWITCH.get(topo, topo)
    stages = ["tap_rx" if direction in ("tx", "vm2vm") else "phy_rx"]
    if topo == "B" and "bridge" in traced and not host:
        stages.append("bridge")
    if topo == "A":
        stages += (["ovs_upcall"] if upcall else []) + (["ovs_dp"] if "ovs_dp" in traced else [])
    if host:
        stages.append("host_rcv")
    elif direction == "tx":
        stages += ["phy_queue", "phy_xmit"]
    else:
        stages += ["tap_queue", "tap_xmit", "vm_read"]
    return stages


def shape_problems(rec, topo, traced, vmstub_pid=None, host=False, vhost=False):
    """What is wrong with one packet record (empty list: nothing). vhost: vhost-net with
    its kprobes, where a TX record may start with the guest's kick and an RX one end
    with the guest's signal."""
    out = []
    stages = rec.get("stages") or []
    if "ovs_upcall" in stages and (topo != "A" or "ovs_upcall" not in traced):
        out.append("ovs_upcall without OVS or without its probe")
    kicked = stages[:1] == ["vhost_kick"]
    if kicked and not (vhost and rec.get("direction") == "tx"):
        out.append("vhost_kick without vhost-net's kprobes, or not TX")
    signalled = stages[-1:] == ["vhost_signal"]
    if signalled and not (vhost and rec.get("direction") == "rx"):
        out.append("vhost_signal without vhost-net's kprobes, or not RX")
    want = expected_stages(traced, topo, rec.get("direction"), "ovs_upcall" in stages, host)
    if stages[1 if kicked else 0:-1 if signalled else None] != want:
        out.append("stages %s, want %s" % (stages, want))
    segs = rec.get("segments") or []
    if [(s["from"], s["to"]) for s in segs] != list(zip(stages, stages[1:])):
        out.append("segments %s do not follow the stages" % [(s["from"], s["to"]) for s in segs])
    if any(s["us"] < 0 for s in segs):
        out.append("negative segment")
    if abs(sum(s["us"] for s in segs) - rec.get("total_us", -1)) > 0.002 * len(segs) + 0.01:
        out.append("segments add up to %.3f, total_us %.3f" % (
            sum(s["us"] for s in segs), rec.get("total_us", -1)))
    if rec.get("direction") == "vm2vm":
        ends = (rec.get("vm_dev"), rec.get("peer_vm_dev"), rec.get("phy_dev"))
        if ends not in ((TAP, TAP2, None), (TAP2, TAP, None)):
            out.append("vm_dev/peer_vm_dev/phy_dev %s" % (ends,))
        # the receiver's stand-in read the frame (vmstub_pid: {tap: its stub's pid})
        if vmstub_pid and (rec.get("pid"), rec.get("comm")) != (
                vmstub_pid.get(rec.get("peer_vm_dev")), "vmstub"):
            out.append("pid/comm %s/%s, want the receiver's vmstub %s" % (
                rec.get("pid"), rec.get("comm"), vmstub_pid))
        return out
    if rec.get("phy_dev") not in PHYS.get(topo, (PHY,)):
        out.append("phy_dev %r" % rec.get("phy_dev"))
    if rec.get("uplink") != UPLINK.get(topo):
        out.append("uplink %r, want %r" % (rec.get("uplink"), UPLINK.get(topo)))
    if host:
        if (rec.get("direction"), rec.get("src_ip"), rec.get("dst_ip")) != ("rx", REMOTE, HOST):
            out.append("not remote -> host rx")
    else:
        if rec.get("vm_dev") != (MVT if topo == "M" else TAP):
            out.append("vm_dev %r" % rec.get("vm_dev"))
        # the process on the VM's side of the tap wrote (tx) or read (rx) the frame
        if vmstub_pid and (rec.get("pid"), rec.get("comm")) != (vmstub_pid, "vmstub"):
            out.append("pid/comm %s/%s, want %s/vmstub" % (rec.get("pid"), rec.get("comm"), vmstub_pid))
    return out


def assert_shapes(lane, out, topo, vmstub_pid=None, host=False, vhost=False):
    bad = []
    traced = lane.traced(out.method)
    for rec in out.packets:
        p = shape_problems(rec, topo, traced, vmstub_pid, host, vhost)
        if p:
            bad.append("%s: %s" % (fmt_key(flow_key(rec)), "; ".join(p)))
    assert not bad, "%s: %d of %d records malformed:\n  %s" % (
        out.label, len(bad), len(out.packets), "\n  ".join(bad[:12]))


def assert_everything_accounted(out, n, left_path=0):
    """Every one of the n packets reported, or (left_path of them) counted as having left
    the traced path after the stage where it entered: the packets a method without the
    ovs_upcall probe loses to ovs-vswitchd, which sends back a new sk_buff."""
    s = out.summary
    problems = ["%s=%s" % (k, s.get(k)) for k in LOSS_COUNTERS
                if s.get(k) != (left_path if k == "left_path" else 0)]
    reported = n - left_path
    if not (s.get("reported") == s.get("completed") == reported == len(out.packets) and
            s.get("started") == n):
        problems.append("reported=%s started=%s completed=%s records=%d oracle=%d left=%d" % (
            s.get("reported"), s.get("started"), s.get("completed"), len(out.packets), n,
            left_path))
    fates = [f for f in s.get("fates") or [] if not (
        f["fate"] == "left_path" and f["last_stage"] in ("tap_rx", "phy_rx"))]
    assert not problems and not fates, "%s: summary does not account for every " \
        "packet as reported: %s; fates %s" % (out.label, ", ".join(problems), s.get("fates"))
    assert out.rc == 0, "%s: exit status %s; stderr:\n%s" % (out.label, out.rc, out.stderr[-2000:])


def one(items, what):
    assert len(items) == 1, "oracle: want one %s entry, have %s" % (what, items)
    return items[0]


def check_generators_against_capture(run, wire):
    """The oracle itself: tcpdump saw what the generators say they sent and received."""
    by = collections.Counter((p["protocol"], p["direction"]) for p in wire)
    pings = run.oracle_of("ping")
    assert pings, "%s: no ping oracle" % run.name
    # the VM's pings send requests (tx) and get replies (rx); the remote's the other way
    # round (B-vhost: the remote pings the VM while a hog starves its vhost worker)
    want_tx = sum(p["transmitted"] if p["from"] != "remote" else p["received"] for p in pings)
    want_rx = sum(p["received"] if p["from"] != "remote" else p["transmitted"] for p in pings)
    problems = []
    if (by[("icmp", "tx")], by[("icmp", "rx")]) != (want_tx, want_rx):
        problems.append("ICMP on the tap tx/rx %d/%d, pings %s" % (
            by[("icmp", "tx")], by[("icmp", "rx")], pings))
    for ping in pings:
        if ping["transmitted"] != ping["received"] or not ping["transmitted"]:
            problems.append("ping lost packets: %s" % ping)
    if run.name.endswith(("-mix", "-vhost", "-overlay")):
        burst = one(run.oracle_of("udp_burst"), "udp_burst")["udp_burst"]
        echoed = one(run.oracle_of("udp_server"), "udp_server")["udp_server"]["echoed"]
        if (by[("udp", "tx")], by[("udp", "rx")]) != (burst["sent"], burst["replies"]) or \
                echoed != burst["sent"]:
            problems.append("UDP on the tap tx/rx %d/%d, sent/echoed/replies %d/%d/%d" % (
                by[("udp", "tx")], by[("udp", "rx")], burst["sent"], echoed, burst["replies"]))
    if run.name.endswith("-mix"):
        tcp = one(run.oracle_of("tcp_client"), "tcp_client")["tcp_client"]
        if tcp["echoed_ok"] != tcp["messages"]:
            problems.append("TCP echoes %s" % tcp)
        # handshake + each message and its echo + close: at least messages + 2 each way
        if by[("tcp", "tx")] < tcp["messages"] + 2 or by[("tcp", "rx")] < tcp["messages"] + 2:
            problems.append("TCP on the tap tx/rx %d/%d for %d messages" % (
                by[("tcp", "tx")], by[("tcp", "rx")], tcp["messages"]))
    others = [p for p in wire if p["direction"] == "other"]
    if others:
        problems.append("foreign IPv4 on the tap: %s" % others[:3])
    assert not problems, "%s: the oracle is not sound:\n  %s" % (run.name, "\n  ".join(problems))


# ====================================================================== the tests

def test_every_lane_step_passed(lane):
    """The guest's own steps: modules, OVS, topologies, connectivity, each run finished."""
    steps = [l.split("\t") for l in lane.read("steps.tsv").splitlines() if l.strip()]
    failed = ["%s: %s" % (s[0], s[2][:300] if len(s) > 2 else "") for s in steps if s[1] != "PASS"]
    names = [s[0] for s in steps]
    # (--explain's histogram-mode verifier step: on 5.10 only, guest_lane.sh says why)
    required = (["tool.explain_verifier"] if lane.suite == "bullseye" else []) + [
        "run.A-mix", "run.A-netem", "run.A-drop", "run.A-host", "sigkill", "run.B-mix",
        "run.B-netem", "run.B-drop", "run.B-host", "run.B-cost", "run.B-cost-reversed",
        "run.B-vhost", "run.G-overlay", "run.O-mix", "run.O-vm2vm", "run.V-mix",
        "run.V-failover", "run.M-mix"]
    missing = [n for n in required if n not in names]
    assert not failed and not missing, "guest steps failed: %s; never reached: %s" % (
        failed, missing)


def upcalls_lost_to(lane, run, method):
    """How many packets of the run went up to ovs-vswitchd (the datapath's miss counter)
    while the method has no probe that follows them back (5.10's tracepoints): 0 where
    it follows them."""
    if run.topo not in ("A", "G", "O") or "ovs_upcall" in lane.traced(method):
        return 0
    lk = dict((o["when"], o) for o in run.oracle_of("ovs_lookups"))
    return lk["after"]["missed"] - lk["before"]["missed"]


@pytest.mark.parametrize("run_kind,method", [("mix", m) for m in ALL_METHODS] +
                         [("netem", m) for m in METHODS])
@pytest.mark.parametrize("topo", TOPOS)
def test_record_counts_match_the_wire(lane, topo, method, run_kind):
    """Point 1: per (protocol, direction) exactly the packets tcpdump saw on vnltap0, the
    same packets (addresses, ports, ICMP id/seq), all accounted for in the summary.
    Where the method cannot follow an upcall (no ovs_upcall probe), the packets that went
    up to ovs-vswitchd are not reported but counted as having left the path, exactly as
    many as the datapath missed, each the first of its flow after the flows were deleted."""
    run = lane.run("%s-%s" % (topo, run_kind))
    out = run.out[method]
    lost_to_upcalls = upcalls_lost_to(lane, run, method)
    wire = run.capture(TAP)
    check_generators_against_capture(run, wire)
    # what crossed the tap also crossed the NIC: the switch passed every frame both ways
    phy = [p for p in run.capture(PHY) if p["direction"] != "other"]
    assert collections.Counter(map(flow_key, phy)) == collections.Counter(map(flow_key, wire)), \
        "%s: the capture on %s differs from the one on %s:\n%s" % (
            run.name, PHY, TAP, counter_diff(collections.Counter(map(flow_key, phy)),
                                             collections.Counter(map(flow_key, wire))))
    want = collections.Counter("%s %s" % (p["protocol"], p["direction"]) for p in wire)
    got = collections.Counter("%s %s" % (r["protocol"], r["direction"]) for r in out.packets)
    kinds = [("%s %s" % (p, d)) for p in (PROTOCOLS if run_kind == "mix" else ("icmp",))
             for d in ("tx", "rx")]
    assert all(want[k] > 0 for k in kinds), "%s: no traffic of some kind on the tap: %s" % (
        run.name, dict(want))
    got_k = collections.Counter(map(flow_key, out.packets))
    want_k = collections.Counter(map(flow_key, wire))
    if lost_to_upcalls:
        # which packets went to ovs-vswitchd: those the kprobe instance (which follows
        # upcalls, checked against the same miss counter below) reported with ovs_upcall
        up = [flow_key(r) for r in run.out["kprobe"].packets if "ovs_upcall" in r["stages"]]
        assert len(up) == lost_to_upcalls, "%s: %d upcalls in the kprobe records, %d " \
            "misses" % (run.name, len(up), lost_to_upcalls)
        want = want - collections.Counter("%s %s" % (k[1], k[0]) for k in up)
        want_k = want_k - collections.Counter(up)
    assert got == want, "%s: records per (protocol, direction) differ from tcpdump on %s:\n%s" \
        % (out.label, TAP, counter_diff(got, want))
    assert got_k == want_k, "%s: records are not the packets on the wire:\n%s" % (
        out.label, counter_diff(got_k, want_k))
    assert_everything_accounted(out, len(wire), left_path=lost_to_upcalls)
    assert_shapes(lane, out, topo, run.meta.get("vmstub_pid"))


def _pairs(lane, run, methods=METHODS):
    """Two methods' records of one packet (kprobe and tracepoint unless told), paired by
    flow and order in the flow. Packets only the kprobe instance could follow through
    ovs-vswitchd (a kernel without the ovs_dp_upcall tracepoint) are left out."""
    flows = {}
    skip_upcalls = "ovs_upcall" not in lane.traced("tracepoint")
    for m in methods:
        g = collections.OrderedDict()
        for r in run.out[m].packets:
            if not (skip_upcalls and "ovs_upcall" in r["stages"]):
                g.setdefault(flow_key(r), []).append(r)
        flows[m] = g
    k, t = flows[methods[0]], flows[methods[1]]
    assert set(k) == set(t), "%s: flows only one method saw: %s %s, %s %s" % (
        run.name, methods[0], [fmt_key(x) for x in set(k) - set(t)], methods[1],
        [fmt_key(x) for x in set(t) - set(k)])
    pairs = []
    for key in k:
        assert len(k[key]) == len(t[key]), "%s: flow %s has %d %s and %d %s records" % (
            run.name, fmt_key(key), len(k[key]), methods[0], len(t[key]), methods[1])
        pairs += [(key, i, a, b) for i, (a, b) in enumerate(zip(k[key], t[key]))]
    return pairs


@pytest.mark.parametrize("run_name,methods",
                         [(r, METHODS) for r in ("A-mix", "A-netem", "B-mix", "B-netem")] +
                         [(r, ("tp_btf", "tracepoint")) for r in ("A-mix", "B-mix")])
def test_methods_agree_per_packet(lane, run_name, methods):
    """Point 2: both instances ran side by side on the same packets; paired by direction,
    protocol, addresses, ports or ICMP id/seq and order within the flow, their totals
    agree within the bounds explained at AGREE_* above. tp_btf and raw tracepoints sit
    at the same points: their records also pass the same stages."""
    run = lane.run(run_name)
    pairs = _pairs(lane, run, methods)
    same_points = "kprobe" not in methods
    assert pairs, "%s: no packets" % run_name
    bad, diffs = [], []
    # The run's first packet is the first to run both instances' freshly loaded programs
    # (and the first ring-buffer wake-ups); under emulation that once cost ~19 ms between
    # the two instances' stamps. Real hardware has no such cost: the first packet is
    # still paired and checked for the upcall, not held to the time bounds.
    first = min(pairs, key=lambda p: p[2]["timestamp"] - p[2]["total_us"] / 1e6)
    for key, i, a, b in pairs:
        d = a["total_us"] - b["total_us"]
        end_gap = (a["timestamp"] - b["timestamp"]) * 1e6
        diffs.append(abs(d))
        bound = max(AGREE_REL * max(a["total_us"], b["total_us"]), AGREE_STALL_US)
        what = "%s #%d: %s %.1f us, %s %.1f us" % (fmt_key(key), i, methods[0], a["total_us"],
                                                  methods[1], b["total_us"])
        if same_points and a["stages"] != b["stages"]:
            bad.append("%s: stages differ: %s / %s" % (what, a["stages"], b["stages"]))
        if (key, i) == first[:2]:
            pass
        elif abs(d) > bound:
            bad.append("%s: differ by %.1f us > max(10%%, %.0f us)" % (what, d, AGREE_STALL_US))
        if abs(end_gap) > AGREE_STALL_US and (key, i) != first[:2]:
            bad.append("%s: finished %.1f us apart: not the same packet" % (what, end_gap))
        if ("ovs_upcall" in a["stages"]) != ("ovs_upcall" in b["stages"]):
            bad.append("%s: upcall seen by one method only: %s / %s" % (what, a["stages"], b["stages"]))
    srt = sorted(diffs)
    spread = "%d packets, |%s - %s| median %.1f us, p90 %.1f us, max %.1f us, " \
        "%d over 600 us" % (len(diffs), methods[0], methods[1], statistics.median(diffs),
                            srt[int(0.9 * (len(srt) - 1))], srt[-1],
                            sum(1 for x in diffs if x > 600))
    print("%s: %s" % (run_name, spread))
    assert not bad, "%s (%s):\n  %s" % (run_name, spread, "\n  ".join(bad))
    assert statistics.median(diffs) <= AGREE_MEDIAN_US, "%s: the methods differ systematically: " \
        "median |difference| over %.0f us: %s" % (run_name, AGREE_MEDIAN_US, spread)


def test_ovs_dp_stage_on_every_record_of_topology_a(lane):
    """Point 3: on OVS every record of every run passed ovs_dp, with each method that has
    a probe for it on this kernel (kprobe: ovs_dp_process_packet; tracepoint:
    openvswitch:ovs_do_execute_action, which 5.10 lacks), and each instance said where
    it attached ovs_dp; a method without one says so in a note and shows no OVS stage."""
    problems = []
    n = 0
    has_tp = "ovs_do_execute_action" in lane.ovs_tracepoints()
    want = {"kprobe": "attached kprobe ovs_dp_process_packet -> ovs_dp",
            "tracepoint": "attached tracepoint openvswitch:ovs_do_execute_action -> ovs_dp"}
    want["auto"] = want["tracepoint" if has_tp else "kprobe"]
    want["tp_btf"] = want["tracepoint"]      # a module's tracepoint: attached raw
    for name in ("A-mix", "A-netem", "A-host"):
        run = lane.run(name)
        for m in run.methods:
            traced = "ovs_dp" in lane.traced(m)
            if traced != (m not in ("tracepoint", "tp_btf") or has_tp):
                problems.append("--attach %s plans ovs_dp as %s; the kernel's openvswitch "
                                "tracepoints: %s" % (m, lane.stages(m)["ovs_dp"],
                                                     lane.ovs_tracepoints()))
            for r in run.out[m].packets:
                n += 1
                if ("ovs_dp" in r["stages"]) != traced:
                    problems.append("%s %s: %s stages %s" % (name, m, fmt_key(flow_key(r)), r["stages"]))
            lines = run.out[m].stderr.splitlines()
            if traced and want[m] not in lines:
                problems.append("%s --attach %s: no line %r in stderr" % (name, m, want[m]))
            if not traced and not any(l.startswith("note: stage ovs_dp not traced: ") and
                                      "tracepoint" in l for l in lines):
                problems.append("%s --attach %s: no note why ovs_dp is not traced" % (name, m))
    assert n > 0
    assert not problems, "\n".join(problems[:20])
    for name in ("B-mix", "B-netem", "B-host"):
        for m in lane.run(name).methods:
            seen = set(s for r in lane.run(name).out[m].packets for s in r["stages"])
            assert not seen & {"ovs_dp", "ovs_upcall"}, "%s %s: OVS stages on the Linux bridge" % (name, m)


def test_ovs_upcalls_are_followed(lane):
    """Point 4: with the datapath flows deleted before each protocol, the first packet of
    each flow went up to ovs-vswitchd and back: reported with ovs_upcall then ovs_dp, by
    both methods when the kernel has the openvswitch:ovs_dp_upcall tracepoint; as many
    such records as the datapath counted misses (ovs-dpctl show: lookups missed); every
    packet reported, none left the path or still waiting for vswitchd."""
    run = lane.run("A-mix")
    assert len(run.oracle_of("del_flows")) == 3, "the flows were not deleted before each protocol"
    lk = dict((o["when"], o) for o in run.oracle_of("ovs_lookups"))
    misses = lk["after"]["missed"] - lk["before"]["missed"]
    assert lk["after"]["lost"] == lk["before"]["lost"], "upcalls lost: %s" % lk
    assert misses >= 6, "ovs-dpctl counted %d misses; each protocol's first packet each way " \
        "should have missed" % misses
    has_tp = "ovs_dp_upcall" in lane.ovs_tracepoints()
    traced = ["kprobe", "tracepoint", "auto"] if has_tp else ["kprobe", "auto"]
    k_err, t_err = run.out["kprobe"].stderr.splitlines(), run.out["tracepoint"].stderr.splitlines()
    assert "attached kprobe ovs_dp_upcall -> ovs_upcall" in k_err, "kprobe stderr:\n" + "\n".join(k_err)
    if has_tp:
        assert "attached tracepoint openvswitch:ovs_dp_upcall -> ovs_upcall" in t_err, \
            "the kernel has openvswitch:ovs_dp_upcall; tracepoint stderr:\n" + "\n".join(t_err)
    else:
        assert any(l.startswith("note: stage ovs_upcall not traced") for l in t_err), \
            "no openvswitch:ovs_dp_upcall here, yet no note; stderr:\n" + "\n".join(t_err)
        assert not any("ovs_upcall" in r["stages"] for r in run.out["tracepoint"].packets)
        # each packet ovs-vswitchd took is counted as having left the path where it entered
        s = run.out["tracepoint"].summary
        assert s["left_path"] == misses and s["in_upcall"] == 0, s
        # auto takes the kprobes where the tracepoints are missing
        a_err = run.out["auto"].stderr.splitlines()
        assert "attached kprobe ovs_dp_upcall -> ovs_upcall" in a_err, "\n".join(a_err)
    for m in traced:
        out = run.out[m]
        up = [r for r in out.packets if "ovs_upcall" in r["stages"]]
        for r in up:
            st = r["stages"]
            assert st[st.index("ovs_upcall") + 1] == "ovs_dp", "%s: %s" % (out.label, st)
        assert len(up) == misses, "%s: %d records with ovs_upcall, the datapath missed %d " \
            "times (ovs-dpctl show)" % (out.label, len(up), misses)
        firsts = collections.OrderedDict()
        for r in out.packets:
            firsts.setdefault((r["protocol"], r["direction"]), r)
        assert len(firsts) == 6, "%s: %s" % (out.label, list(firsts))
        not_up = ["%s %s: %s" % (p, d, r["stages"]) for (p, d), r in firsts.items()
                  if "ovs_upcall" not in r["stages"]]
        assert not not_up, "%s: first packet after del-flows not reported as an upcall:\n  %s" % (
            out.label, "\n  ".join(not_up))
        s = out.summary
        assert s["left_path"] == 0 and s["in_upcall"] == 0 and s["reported"] == s["started"], \
            "%s: %s" % (out.label, s)
        print("%s: %d upcalls: %s" % (out.label, len(up), ", ".join(
            "%s %s %.0f us" % (r["protocol"], r["direction"], next(
                g["us"] for g in r["segments"] if g["from"] == "ovs_upcall")) for r in up)))


@pytest.mark.parametrize("topo", TOPOS)
def test_host_local_delivery_ends_in_host_rcv(lane, topo):
    """Point 5: remote -> the host's own address on the switch (ICMP, UDP, TCP): the kprobe
    instance reports every such packet, exactly those tcpdump saw arrive on vnlphy0, RX,
    from phy_rx to host_rcv."""
    run = lane.run("%s-host" % topo)
    arrived = [p for p in run.capture(PHY) if p["dst_ip"] == HOST]
    assert [p for p in run.capture(TAP)] == [], "%s: IPv4 on the tap during host-local " \
        "traffic" % run.name
    ping = one(run.oracle_of("ping"), "ping")
    burst = one(run.oracle_of("udp_burst"), "udp_burst")["udp_burst"]
    echoed = one(run.oracle_of("udp_server"), "udp_server")["udp_server"]["echoed"]
    by = collections.Counter(p["protocol"] for p in arrived)
    assert by["icmp"] == ping["transmitted"] == ping["received"] > 0, (by, ping)
    assert by["udp"] == burst["sent"] == echoed == burst["replies"] > 0, (by, burst, echoed)
    assert by["tcp"] >= 3 + 2, by
    out = run.out["kprobe"]
    got = collections.Counter(r["protocol"] for r in out.packets)
    assert got == by, "%s: host-local records per protocol differ from tcpdump on %s:\n%s" % (
        out.label, PHY, counter_diff(got, by))
    got_k = collections.Counter(map(flow_key, out.packets))
    want_k = collections.Counter(map(flow_key, arrived))
    assert got_k == want_k, "%s:\n%s" % (out.label, counter_diff(got_k, want_k))
    assert all(r["stages"][0] == "phy_rx" and r["stages"][-1] == "host_rcv"
               for r in out.packets), [r["stages"] for r in out.packets]
    assert_shapes(lane, out, topo, host=True)
    assert_everything_accounted(out, len(arrived))
    assert "attached kprobe icmp_rcv -> host_rcv" in out.stderr.splitlines()
    # --attach tracepoint cannot see host_rcv (no tracepoint there): it says so, reports
    # none of these packets, and still counts each one that entered the path somewhere
    # in its summary. (Not all as "left the traced path", as the README says: the host's
    # TCP frees some with kfree_skb ("dropped"), and some with __kfree_skb, which has no
    # tracepoint: those stay "in flight" or, once the sk_buff is reused, "vanished".)
    tp = run.out["tracepoint"]
    assert "note: stage host_rcv not traced: no tracepoint at this point (needs --attach " \
        "kprobe or auto)" in tp.stderr.splitlines(), tp.stderr
    assert tp.packets == [], "%s reported %d records" % (tp.label, len(tp.packets))
    s = tp.summary
    fates = dict((k, s[k]) for k in ("left_path", "dropped", "in_flight", "vanished"))
    assert s["started"] == len(arrived) == sum(fates.values()) and s["reported"] == 0 and \
        s["not_tracked"] == 0 and s["lost"] == 0, "%s: %d host-local packets; summary %s" % (
            tp.label, len(arrived), s)
    print("%s: %d host-local packets, all host_rcv with --attach kprobe; --attach tracepoint: %s"
          % (run.name, len(arrived), fates))


@pytest.mark.parametrize("topo", TOPOS)
def test_netem_delay_lands_in_phy_queue_to_phy_xmit(lane, topo):
    """Point 6: netem delay 20ms on vnlphy0, both methods at once: every TX record has the
    delay in phy_queue->phy_xmit (within 10%, judged as explained at NETEM_* above), the
    other segments stay small."""
    run = lane.run("%s-netem" % topo)
    netem = one(run.oracle_of("netem"), "netem")
    assert (netem["dev"], netem["delay_ms"]) == (PHY, NETEM_US / 1000)
    ping = one(run.oracle_of("ping"), "ping")
    tap = dict((flow_key(p), p["ts"]) for p in run.capture(TAP))
    phy = dict((flow_key(p), p["ts"]) for p in run.capture(PHY))
    lo, hi = (1 - NETEM_REL) * NETEM_US, (1 + NETEM_REL) * NETEM_US
    wire_us = dict((k, (phy[k] - t) * 1e6) for k, t in tap.items() if k in phy)
    problems, report = [], []
    # the oracle: tcpdump saw every echo request reach the NIC's driver >= 20 ms after the tap
    for k, t in tap.items():
        if k[0] == "tx" and (k not in phy or (phy[k] - t) * 1e6 < lo):
            problems.append("tcpdump: %s crossed in %s us: netem did not hold it" % (
                fmt_key(k), "%.0f" % ((phy[k] - t) * 1e6) if k in phy else "never"))
    for m in METHODS:
        out = run.out[m]
        tx = [r for r in out.packets if r["direction"] == "tx"]
        assert len(tx) == ping["transmitted"] > 0, "%s: %d TX records, %d pings" % (
            out.label, len(tx), ping["transmitted"])
        qx, lags, others = [], [], []
        # The first packet after the tracers attach is the first to run their freshly
        # loaded programs; under emulation that costs milliseconds between the
        # phy_queue stamp and netem's enqueue (1-2 ms seen, CI caught it twice). Real
        # hardware has no such cost: for that one packet only the lower bound is checked.
        first_seq = min(r["icmp_seq"] for r in tx)
        for r in tx:
            seg = dict(("%s->%s" % (s["from"], s["to"]), s["us"]) for s in r["segments"])
            v = seg.pop("phy_queue->phy_xmit", None)
            if v is None or r["stages"][-1] != "phy_xmit":
                problems.append("%s: no phy_queue->phy_xmit in %s" % (out.label, r["stages"]))
                continue
            lag = (r["timestamp"] - phy[flow_key(r)]) * 1e6
            qx.append(v)
            lags.append(lag)
            others += seg.values()
            what = "%s seq %s: phy_queue->phy_xmit %.1f us, end %.1f us after tcpdump's copy" % (
                out.label, r["icmp_seq"], v, lag)
            if not NETEM_LAG_MIN_US <= lag <= AGREE_STALL_US:
                problems.append("%s: that lag is no handler's or stall's" % what)
            elif not lo <= v - lag <= (max(hi, (1 + NETEM_REL) * wire_us[flow_key(r)])
                                       if r["icmp_seq"] != first_seq else float("inf")):
                problems.append("%s: %.1f us to the driver, not within 10%% of %.0f (tcpdump: "
                                "%.0f us from the tap to the driver)" % (
                                    what, v - lag, NETEM_US, wire_us[flow_key(r)]))
            big = dict((k, u) for k, u in seg.items() if u >= NETEM_OTHER_MAX_US)
            if big:
                problems.append("%s: the delay shows elsewhere: %s" % (what, big))
        if others and statistics.median(others) >= NETEM_OTHER_MEDIAN_US:
            problems.append("%s: the other TX segments' median is %.1f us, not small" % (
                out.label, statistics.median(others)))
        report.append("%s phy_queue->phy_xmit us: %s (median %.0f; end after tcpdump's copy "
                      "%s us); other TX segments median %.0f us, max %.0f us" % (
                          m, " ".join("%.0f" % v for v in qx), statistics.median(qx) if qx else -1,
                          " ".join("%.0f" % v for v in lags),
                          statistics.median(others) if others else -1, max(others) if others else -1))
    print("%s: %s" % (run.name, "; ".join(report)))
    assert not problems, "%s:\n  %s" % ("; ".join(report), "\n  ".join(problems))


@pytest.mark.parametrize("topo", TOPOS)
def test_drops_are_reported_with_the_kernels_reason(lane, topo):
    """Drops with reasons: 5 pings into netem loss 100% on vnlphy0, the tool with --drops.
    tcpdump saw the 5 echo requests leave the VM and none reach the NIC's driver; each
    method reports exactly those 5 as TX drops after phy_queue, with the kernel's drop
    reason where kfree_skb has one (5.17+, read from its tracefs format) and says it has
    none where it has not; the summary counts 5 dropped, nothing else."""
    run = lane.run("%s-drop" % topo)
    loss = one(run.oracle_of("netem_loss"), "netem_loss")
    assert (loss["dev"], loss["loss_percent"]) == (PHY, 100)
    ping = one(run.oracle_of("ping"), "ping")
    wire = run.capture(TAP)
    sent = [flow_key(p) for p in wire if p["direction"] == "tx"]
    assert len(sent) == ping["transmitted"] == 5 and ping["received"] == 0, (ping, wire)
    assert [p for p in wire if p["direction"] == "rx"] == []
    reasons = lane.has_drop_reasons()
    for m in run.methods:
        out = run.out[m]
        drops = [r for r in out.records if r.get("type") == "drop"]
        assert out.packets == [], "%s: %d packet records" % (out.label, len(out.packets))
        assert sorted(map(flow_key, drops)) == sorted(sent), "%s: drops %s, sent %s" % (
            out.label, [fmt_key(flow_key(r)) for r in drops], [fmt_key(k) for k in sent])
        for r in drops:
            assert r["direction"] == "tx" and r["last_stage"] == "phy_queue", r
            assert r["location"] not in ("", "?"), r
            if reasons:
                assert re.match(r"^[A-Z][A-Z0-9_]+$", r["reason"]), r
            else:
                assert r["reason"] == "unknown (kernel has no drop reasons)", r
        s = out.summary
        assert s["dropped"] == s["started"] == 5 and s["reported"] == 0, s
        assert all(s[k] == 0 for k in LOSS_COUNTERS if k != "dropped"), s
        assert [(f["direction"], f["fate"], f["last_stage"], f["count"]) for f in s["fates"]] \
            == [("tx", "dropped", "phy_queue", 5)], s["fates"]
        said = "drop reasons: yes" if reasons else "drop reasons: no"
        assert any(l.startswith(said) for l in out.stderr.splitlines()), out.stderr
        assert out.rc == 0, out.stderr
    print("%s %s: 5 drops after phy_queue, reason %s" % (lane.suite, run.name, drops[0]["reason"]))


def test_vhost_net_records_are_exact_and_name_the_vm(lane):
    """vhost-net: the tap served by the kernel's vhost worker (vhoststub drives
    /dev/vhost-net as QEMU does). Every packet tcpdump saw on the tap is reported once by
    each method, with its VM found from the tap (vhoststub's -name) and the worker
    thread (vhost-PID, a kernel thread before 6.4, a thread of the VMM after) as the
    thread that wrote or read the frame."""
    run = lane.run("B-vhost")
    pid = run.meta["vmstub_pid"]
    wire = run.capture(TAP)
    check_generators_against_capture(run, wire)
    want = collections.Counter(map(flow_key, wire))
    assert want, "no traffic through vhost-net"
    for m in run.methods:
        out = run.out[m]
        got = collections.Counter(map(flow_key, out.packets))
        assert got == want, "%s:\n%s" % (out.label, counter_diff(got, want))
        assert_everything_accounted(out, len(wire))
        assert_shapes(lane, out, "B", vhost=m == "kprobe")
        bad = [r for r in out.packets if (r["vm"], r["vm_pid"], r["thread"]) !=
               ("vhost-vm", pid, "vhost-%d" % pid)]
        assert not bad, "%s: %d records not named vhost-vm / written or read by " \
            "vhost-%d: %s" % (out.label, len(bad), pid, bad[:2])
    print("%s B-vhost: %d packets, pid/comm of the first: %s/%s" % (
        lane.suite, len(wire), run.out["kprobe"].packets[0]["pid"],
        run.out["kprobe"].packets[0]["comm"]))


def assert_behind_the_hog(explains, hog):
    """Three in four waits mostly in the run queue (2 ms or more), at least, are behind the
    hog (pid and name): the task that held CPU 1 longest meanwhile, even where a kworker
    ran between its burst and the worker. The rest name another task that held it longer
    (the tool itself or tcpdump, at the worker's priority: seen for 1 wait in 8 to 18),
    never the worker or the idle task."""
    waits = [x for x in explains if x["us"]["run_queue"] >= 2000]
    assert waits, explains
    hogs = [x for x in waits if x["behind"] == {"pid": hog["hog_pid"], "comm": hog["hog_comm"]}]
    assert len(hogs) >= 0.75 * len(waits), [x["behind"] for x in waits]
    assert all(x["behind"] and x["behind"]["pid"] not in (0, x["tid"]) for x in waits), \
        [x["behind"] for x in waits]


def behind_text(records):
    named = collections.Counter("%s[%d]" % (x["behind"]["comm"], x["behind"]["pid"])
                                for x in (r["explain"] for r in records)
                                if x["us"]["run_queue"] >= 2000 and x["behind"])
    return "run queue behind " + ", ".join("%s %d" % kv for kv in named.most_common())


@pytest.mark.parametrize("method", ("kprobe", "tracepoint"))
def test_explain_names_the_hog_that_starved_the_vhost_worker(lane, method):
    """--explain on vhost-net (B-vhost runs with it): the worker (vhost-PID: a kernel
    thread before 6.4, a thread of the VMM from 6.4) pinned to CPU 1 where a SCHED_FIFO
    hog runs 20 ms bursts 10-50 ms apart, the remote pinging the VM 40 times. The reads that
    waited 2 ms or more are explained at least 80% by the run queue of CPU 1, behind
    the hog, in the worker."""
    run = lane.run("B-vhost")
    hog = run.oracle_of("explain_hog")
    assert len(hog) == 1, run.oracle
    hog = hog[0]
    pid = run.meta["vmstub_pid"]
    out = run.out[method]
    assert out.rc == 0, out.stderr
    # the remote's echo requests into the VM: the hog's part of the run
    rx = [r for r in out.packets if r["direction"] == "rx" and r["icmp_type"] == 8]
    assert len(rx) == 40, "%d echo requests into the VM" % len(rx)
    long = [r for r in rx if r["explain"] and r["explain"]["segment"] == "tap_xmit->vm_read"
            and not r["explain"]["partial"] and
            sum(s["us"] for s in r["segments"] if s["to"] == "vm_read") >= 2000]
    assert len(long) >= 5, [r["explain"] for r in rx]
    waits = run_queue = 0
    for r in long:
        x = r["explain"]
        waits += sum(s["us"] for s in r["segments"] if s["to"] == "vm_read")
        run_queue += x["us"]["run_queue"]
        assert x["followed"] and x["tid"] == hog["worker_tid"], x
        assert x["thread"] == "vhost-%d" % pid, x
        assert x["cpu"] == hog["cpu"] or not x["us"]["run_queue"], x
    # (one of them may be the worker busy, say: the hog's are most, not all)
    assert run_queue >= 0.8 * waits, [r["explain"] for r in long]
    assert_behind_the_hog([r["explain"] for r in long], hog)
    print("%s B-vhost %s: %d of %d reads waited >= 2 ms: %s" % (
        lane.suite, method, len(long), len(rx), behind_text(long)))


def segment(rec, frm, to):
    return sum(s["us"] for s in rec["segments"] if (s["from"], s["to"]) == (frm, to))


def test_vhost_kick_is_the_guests_kick_and_the_workers_pick_up(lane):
    """vhost-net's TX edge as a stage (kprobes: the kick's queueing of the TX work, the
    worker's handle_tx_kick): the VM's frames whose kick the worker took first start at
    vhost_kick, at the time vhoststub kicked (its own clock around the eventfd write);
    every echo request and reply the VM sent alone has one. --attach tracepoint cannot
    see it and says so."""
    run = lane.run("B-vhost")
    kicks = [(int(before) / 1000.0, int(after) / 1000.0) for kind, before, after in
             (line.split()[:3] for line in lane.read("vhost-log.txt").splitlines())
             if kind == "tx"]
    out = run.out["kprobe"]
    tx = [r for r in out.packets if r["direction"] == "tx"]
    kicked = [r for r in tx if "vhost_kick" in r["stages"]]
    # the pings the VM sent before the hog, every 200 ms: each frame alone with its kick
    quiet = [r for r in tx if r["protocol"] == "icmp" and r["icmp_type"] == 8][:5]
    assert len(quiet) == 5 and all(r["stages"][0] == "vhost_kick" for r in quiet), \
        [r["stages"] for r in quiet]
    # (a frame the worker took after another, in the same run, has none: it may have
    # come after the kick; the starved worker's runs take several)
    assert len(kicked) >= 0.5 * len(tx) and len(kicks) >= len(kicked), \
        "%d of %d TX records have the kick; %d kicks" % (len(kicked), len(tx), len(kicks))
    off = []
    for r in kicked:
        assert r["stages"][:2] == ["vhost_kick", "tap_rx"], r["stages"]
        assert segment(r, "vhost_kick", "tap_rx") > 0, r["segments"]
        # the kick's wall-clock time: the record's end less its total (us, rounded);
        # the tool's wall clock offset and the rounding within 20 us
        at = r["timestamp"] * 1e6 - r["total_us"]
        near = min(kicks, key=lambda k: max(k[0] - at, at - k[1], 0))
        off.append(max(near[0] - at, at - near[1], 0))
    assert max(off) <= 20, "kicks %.1f us outside vhoststub's writes (worst)" % max(off)
    t = run.out["tracepoint"]
    assert not [r for r in t.packets if "vhost_kick" in r["stages"]]
    assert any(l.startswith("note: stage vhost_kick not traced: no tracepoint at this point")
               for l in t.stderr.splitlines()), t.stderr[-2000:]
    assert not any("vhost_kick not traced" in l for l in out.stderr.splitlines()), out.stderr
    print("%s B-vhost: %d of %d TX records start at the kick, within %.1f us of vhoststub's"
          % (lane.suite, len(kicked), len(tx), max(off)))


def test_vhost_signal_is_the_guests_notification_of_each_frame(lane):
    """vhost-net's RX edge as a stage (kprobes: the worker's RX pass, its handing of a
    batch to the guest, the call eventfd's signal in it): every frame the worker read
    for the VM (vhoststub never turns its notifications off) ends at vhost_signal, after
    its read. The signals are the call eventfd's: between two of vhoststub's reads of it
    no more batches were signalled than the count the second read returned, and a frame
    that came alone while vhoststub slept was found by it after its signal. Every packet
    is still accounted for (test_vhost_net_records_are_exact_and_name_the_vm), none held
    when the tool stopped. --attach tracepoint cannot see it and says so."""
    run = lane.run("B-vhost")
    seen, calls = {}, []
    for line in lane.read("vhost-log.txt").splitlines():
        f = line.split()
        if f[0] == "rx":
            seen.setdefault(tuple(map(int, f[2:5])), []).append(int(f[1]) / 1000.0)
        elif f[0] == "call":
            calls.append((int(f[1]) / 1000.0, int(f[2]) / 1000.0, int(f[3])))
    out = run.out["kprobe"]
    rx = [r for r in out.packets if r["direction"] == "rx"]
    assert rx and all(r["stages"][-2:] == ["vm_read", "vhost_signal"] for r in rx), \
        [r["stages"] for r in rx if r["stages"][-1:] != ["vhost_signal"]][:5]
    assert all(segment(r, "vm_read", "vhost_signal") >= 0 for r in rx)
    assert out.summary["in_flight"] == 0, out.summary
    # a batch's signal in wall-clock time: its records' end (10 us rounding; the tool's
    # wall clock offset: 20 us in all). Those surely between two reads of the eventfd
    # (after the first had returned, before the second began) were counted by the second
    signals = sorted(set(r["timestamp"] * 1e6 for r in rx))
    assert calls and calls[-1][1] >= signals[-1] - 20, "vhoststub never read the last signal"
    excess, after = [], float("-inf")
    for before, read_after, count in calls:
        n = sum(1 for t in signals if after + 20 < t < before - 20)
        if n > count:
            excess.append((before, n, count))
        after = read_after
    assert not excess, "more signals than the eventfd counted (at, signals, count): %s" \
        % excess[:5]
    # the first 5 echo replies, each alone 200 ms after the last: vhoststub asleep in
    # poll() found each after its signal (within 50 ms)
    icmp = [r for r in rx if r["protocol"] == "icmp"]
    found = {}
    for r in icmp:
        when = seen.get((r["icmp_type"], r["icmp_id"], r["icmp_seq"]))
        assert when and len(when) == 1, "vhoststub found ICMP type %d id %d seq %d %s " \
            "times" % (r["icmp_type"], r["icmp_id"], r["icmp_seq"], len(when or ()))
        found[id(r)] = when[0] - r["timestamp"] * 1e6
    # the remote's 40 echo requests under the hog, the replies to the VM's 45 pings
    assert len(icmp) >= 80, len(icmp)
    quiet = [r for r in icmp if r["icmp_type"] == 0][:5]
    assert all(-20 <= found[id(r)] <= 50000 for r in quiet), [found[id(r)] for r in quiet]
    t = run.out["tracepoint"]
    assert not [r for r in t.packets if "vhost_signal" in r["stages"]]
    assert any(l.startswith("note: stage vhost_signal not traced: no tracepoint at this "
                            "point") for l in t.stderr.splitlines()), t.stderr[-2000:]
    assert not any("vhost_signal not traced" in l for l in out.stderr.splitlines()), \
        out.stderr
    print("%s B-vhost: %d RX records end at the signal (%d batches, %d eventfd reads); "
          "the quiet ones found %s us after it" % (
              lane.suite, len(rx), len(signals), len(calls),
              ", ".join("%.0f" % found[id(r)] for r in quiet)))


def test_explain_names_the_hog_behind_a_late_pick_up_after_a_kick(lane):
    """The VM's pings (TX) while the hog starves the worker: the guest kicked, and the
    worker took the frame 2 ms or more later. That wait, vhost_kick->tap_rx, is the
    longest segment, explained in the worker at least 80% by the run queue of CPU 1,
    behind the hog."""
    run = lane.run("B-vhost")
    hog = one(run.oracle_of("explain_hog"), "explain_hog")
    pid = run.meta["vmstub_pid"]
    out = run.out["kprobe"]
    # the VM's echo requests after the 5 before the hog (the guest's own slowness, a
    # kick's write taking 3 ms say, is not the hog's)
    pings = [r for r in out.packets if r["direction"] == "tx" and
             r["protocol"] == "icmp" and r["icmp_type"] == 8][5:]
    assert len(pings) == 40, "%d echo requests from the VM under the hog" % len(pings)
    late = [r for r in pings if segment(r, "vhost_kick", "tap_rx") >= 2000]
    assert len(late) >= 5, [(segment(r, "vhost_kick", "tap_rx"), r["explain"])
                            for r in pings]
    waits = run_queue = 0
    for r in late:
        x = r["explain"]
        assert x and x["segment"] == "vhost_kick->tap_rx" and not x["partial"], x
        assert x["tid"] == hog["worker_tid"] and x["thread"] == "vhost-%d" % pid, x
        assert x["cpu"] == hog["cpu"] or not x["us"]["run_queue"], x
        waits += segment(r, "vhost_kick", "tap_rx")
        run_queue += x["us"]["run_queue"]
    assert run_queue >= 0.8 * waits, [r["explain"] for r in late]
    assert_behind_the_hog([r["explain"] for r in late], hog)
    print("%s B-vhost: %d pick-ups 2 ms or more after the kick, %.0f%% of it run queue, %s"
          % (lane.suite, len(late), 100.0 * run_queue / waits, behind_text(late)))


def test_geneve_overlay_on_ovs_is_followed_per_packet(lane):
    """The shape of an OVN host: OVS with a Geneve tunnel port (VNI 42; OVS's own
    metadata-mode genev_sys_6081 device) to a namespace terminating the tunnel over the
    underlay vnlphy0. Each method reports exactly the packets tcpdump saw on the tap
    (those that went up to ovs-vswitchd where a method cannot follow them, counted as
    having left the path), keyed by the inner packet, with the tunnel's VNI, device and
    outer addresses, through encap (TX) and decap (RX)."""
    run = lane.run("G-overlay")
    wire = run.capture(TAP)
    check_generators_against_capture(run, wire)
    want_all = collections.Counter(map(flow_key, wire))
    for m in run.methods:
        out = run.out[m]
        lost = upcalls_lost_to(lane, run, m)
        want = want_all
        if lost:
            up = [flow_key(r) for r in run.out["kprobe"].packets if "ovs_upcall" in r["stages"]]
            assert len(up) == lost
            want = want_all - collections.Counter(up)
        got = collections.Counter(map(flow_key, out.packets))
        assert got == want, "%s:\n%s" % (out.label, counter_diff(got, want))
        assert_everything_accounted(out, len(wire), left_path=lost)
        bad = []
        for r in out.packets:
            tun = r.get("tunnel") or {}
            outer = (UND_LOCAL, UND_REMOTE) if r["direction"] == "tx" else (UND_REMOTE, UND_LOCAL)
            st = r["stages"]
            if (tun.get("type"), tun.get("vni"), tun.get("dev")) != ("geneve", 42, "genev_sys_6081") \
                    or (tun.get("outer_src_ip"), tun.get("outer_dst_ip")) != outer:
                bad.append("tunnel %s" % tun)
            elif ("encap" if r["direction"] == "tx" else "decap") not in st or \
                    r["phy_dev"] != PHY or r["vm_dev"] != TAP:
                bad.append("stages %s, devices %s/%s" % (st, r["vm_dev"], r["phy_dev"]))
        assert not bad, "%s: %d of %d records: %s" % (out.label, len(bad), len(out.packets),
                                                       bad[:3])
    print("%s G-overlay: %d packets on the tap; kprobe stages %s" % (
        lane.suite, len(wire), sorted(set(tuple(r["stages"]) for r in run.out["kprobe"].packets))))


# the tracepoints where auto takes the typed programs (the device and receive hooks), and
# the control: kfree_skb, where both instances run the same raw program
COST_TRACEPOINTS = ("netif_receive_skb", "net_dev_queue", "net_dev_start_xmit")
COST_CONTROL = "kfree_skb"


def test_tp_btf_and_raw_tracepoints_cost_side_by_side(lane):
    """Issue 11: BTF-typed and raw tracepoints measured in the same run (topology B, pings
    and a UDP burst, kernel.bpf_stats_enabled while the traffic ran), twice, attached in
    both orders: each instance's program at each tracepoint, found by its link in
    /proc/PID/fdinfo. Both report every datagram of the burst both ways, their programs
    ran as often (the same events: a couple apart at most, where the sysctl flipped
    mid-event), the first started attached first, and the run time per run is printed
    (pytest -rA): per order, and the geometric mean of the two orders' tp_btf/raw ratios,
    next to the control's (the same program in both: what the order alone does)."""
    ratios = collections.defaultdict(list)
    report, problems = [], []
    for name in ("B-cost", "B-cost-reversed"):
        run = lane.run(name)
        cost = json.loads(run.read("prog_cost.json"))
        burst = one(run.oracle_of("udp_burst"), "udp_burst")["udp_burst"]
        assert burst["sent"] == burst["replies"] > 0, burst
        for m in ("tp_btf", "tracepoint"):
            udp = collections.Counter(r["direction"] for r in run.out[m].packets
                                      if r["protocol"] == "udp")
            if (udp["tx"], udp["rx"]) != (burst["sent"], burst["replies"]):
                problems.append("%s: --attach %s reported UDP tx/rx %d/%d of %d/%d" % (
                    name, m, udp["tx"], udp["rx"], burst["sent"], burst["replies"]))
        progs = dict((m, dict((p["tp"], p) for p in cost[m])) for m in ("tp_btf", "tracepoint"))
        first, second = run.methods
        line = []
        for tp in COST_TRACEPOINTS + (COST_CONTROL,):
            typed, raw = progs["tp_btf"].get(tp), progs["tracepoint"].get(tp)
            if not typed or not raw:
                problems.append("%s %s: no program of %s" % (
                    name, tp, "tp_btf" if not typed else "tracepoint"))
                continue
            # the burst alone passes each device and receive hook once a datagram
            low = burst["sent"] if tp != COST_CONTROL else 1
            if min(typed["run_cnt"], raw["run_cnt"]) < low or \
                    abs(typed["run_cnt"] - raw["run_cnt"]) > 2:
                problems.append("%s %s: runs %d (tp_btf) and %d (raw): not the same events"
                                % (name, tp, typed["run_cnt"], raw["run_cnt"]))
                continue
            if progs[first][tp]["link_id"] > progs[second][tp]["link_id"]:
                problems.append("%s %s: --attach %s attached after --attach %s" % (
                    name, tp, first, second))
            t, r = (float(x["run_time_ns"]) / x["run_cnt"] for x in (typed, raw))
            ratios[tp].append(t / r)
            line.append("%s %.0f/%.0f ns (%.2f, %d runs)" % (tp, t, r, t / r, typed["run_cnt"]))
        report.append("%s, %s attached first, tp_btf/raw per run: %s" % (
            name, first, "; ".join(line)))
    means = ["%s %.2f" % (tp, math.sqrt(v[0] * v[1])) for tp, v in sorted(ratios.items())
             if len(v) == 2]
    report.append("geometric mean of both orders, tp_btf/raw: %s (%s: the same program in "
                  "both)" % (", ".join(means), COST_CONTROL))
    print("%s:\n  %s" % (lane.suite, "\n  ".join(report)))
    assert not problems, "%s\n  %s" % ("\n  ".join(report), "\n  ".join(problems))


def test_the_release_ran_its_own_kernel_bcc_and_python(lane):
    """The matrix is what the README claims: this lane's guest ran the release's kernel,
    BCC and Python (read in the guest, not from the tool), and the tool's plan for each
    method there follows what the kernel has: OVS stages by tracepoint only where the
    openvswitch tracepoints exist, a reason for every stage it leaves out."""
    env = dict(l.split(": ", 1) for l in lane.read("guest-env.txt").splitlines() if ": " in l)
    kernel, bcc, python = SUITE_VERSIONS[lane.suite]
    assert env["kernel"].startswith(kernel), env
    assert env["python3-bpfcc"].startswith(bcc), env
    assert env["python3"].startswith(python), env
    ovs_tps = lane.ovs_tracepoints()
    for m in ALL_METHODS:
        stages = lane.stages(m)
        for name, o in stages.items():
            assert bool(o["method"]) != bool(o["reason"]), o   # traced, or says why not
        tp_ovs = [n for n in ("ovs_dp", "ovs_upcall") if stages[n]["method"] == "tracepoint"]
        assert all(stages[n]["probe"].split(":")[1] in ovs_tps for n in tp_ovs), (m, stages)
        if m in ("tracepoint", "tp_btf") and not ovs_tps:
            for n in ("ovs_dp", "ovs_upcall"):
                assert stages[n]["method"] is None and "tracepoint" in stages[n]["reason"], \
                    stages[n]
        # auto takes the typed tracepoints at the stages that read sk_buff fields (the
        # VM's read stays raw: it wants the address only); tp_btf wherever there is one
        # of the kernel's own (OVS's are the module's)
        if m in ("tp_btf", "auto"):
            typed = sorted(n for n, o in stages.items() if o["method"] == "tp_btf")
            want = TP_BTF_STAGES + (("vm_read",) if m == "tp_btf" else ())
            assert typed == sorted(want), (lane.suite, m, typed)
    print("%s: kernel %s, BCC %s, Python %s; openvswitch tracepoints: %s" % (
        lane.suite, env["kernel"], env["python3-bpfcc"], env["python3"], ovs_tps or "none"))


def _bcc_events(text, pid):
    return [l for l in text.splitlines() if re.search(r"_bcc_%d\s" % pid, l + " ")]


def test_sigkill_leaves_nothing_registered(lane):
    """Point 7: a kprobe instance killed with SIGKILL leaves no BPF program loaded (its
    program ids, read from /proc/PID/fdinfo before the kill, are gone from bpftool prog)
    and no kprobe event of its own in kprobe_events; events it would have left must be
    removed by the next run."""
    meta = json.loads(lane.read("sigkill", "meta.json"))
    pid = meta["pid"]
    assert int(lane.read("sigkill", "kprobe.rc").strip()) == 128 + signal.SIGKILL
    ids = [int(x) for x in lane.read("sigkill", "prog_ids.txt").split()]
    assert len(ids) >= 10, "only %d program ids in /proc/%d/fdinfo" % (len(ids), pid)
    running = set(p["id"] for p in json.loads(lane.read("sigkill", "bpftool-prog.running.json")))
    after = set(p["id"] for p in json.loads(lane.read("sigkill", "bpftool-prog.after_kill.json")))
    assert set(ids) <= running, "ids %s not in bpftool prog while it ran" % sorted(set(ids) - running)
    assert not set(ids) & after, "programs of the killed instance still loaded: %s" % sorted(
        set(ids) & after)
    left = _bcc_events(lane.read("sigkill", "kprobe_events.after_kill"), pid)
    if not left:
        # what applies on this kernel: BCC attached every kprobe through the kprobe PMU
        # (perf_event_open), which goes with the process; nothing was in kprobe_events
        assert "kprobes: available (kprobe PMU)" in lane.read("sigkill", "kprobe.stderr")
        assert _bcc_events(lane.read("sigkill", "kprobe_events.running"), pid) == []
        print("SIGKILL: %d programs gone %.2f s after the kill; no kprobe_events entry, while "
              "running or after (kprobe PMU)" % (len(ids), meta["programs_gone_after_s"]))
    else:
        # the legacy interface: its events stay; the next run must remove them
        nxt = lane.run_after("sigkill")
        still = _bcc_events(lane.read("runs", nxt.name, "kprobe_events.attached"), pid)
        assert not still, "the next run left the killed instance's events: %s" % still
        logs = "".join(nxt.out[m].stderr for m in nxt.methods)   # whichever instance came first
        for line in left:
            name = line.split()[0].split("/")[-1]
            assert "removed stale kprobe event %s" % name in logs, name


def test_next_run_removes_stale_kprobe_events(lane):
    """Point 7, the legacy case made to happen: after the kill the lane wrote the event BCC
    writes where there is no kprobe PMU (p:kprobes/p_tun_net_xmit_bcc_<dead pid>); the next
    run of the tool (whichever it is, --verbose) must remove it and say so."""
    planted = lane.read("sigkill", "planted_event.txt").strip()
    assert planted in lane.read("sigkill", "kprobe_events.planted")
    diag = json.loads(lane.read("sigkill", "remove_diag.json"))
    assert diag["present_before"] and not diag["present_after_os_open"], (
        "removing an event with os.open(O_WRONLY|O_APPEND) did not work here: %s" % diag)
    nxt = lane.run_after("sigkill")
    after = lane.read("runs", nxt.name, "kprobe_events.attached")
    logs = "".join(nxt.out[m].stderr for m in nxt.methods)   # whichever instance came first
    assert planted not in after and "removed stale kprobe event %s" % planted in logs, (
        "the next run left %s in kprobe_events (%s); removing it with open(path, 'a'): %s"
        % (planted, after.strip(), diag["python_open_a"]))


def test_lane_time_within_budget(lane):
    """Point 8: the lane prints its total time, and stays within 15 minutes (a cold image
    build may add its 1-3): 11 to 14 minutes since --explain's and the topologies'
    runs, well before run_lane.sh's 17-minute timeout. The whole suite's budget (60
    minutes) is what bounds it: three lanes, the two hosts' case, the rest ~10."""
    t = json.loads(lane.read("times.json"))
    if lane.output:
        assert re.search(r"times: image .* total [0-9.]+s", lane.output), lane.output[-1000:]
    budget = LANE_BUDGET_S + (COLD_BUILD_ALLOWANCE_S if t["image_built"] else 0)
    print("lane: image %.1f s (%s), guest %.1f s, total %.1f s" % (
        t["image_s"], "built" if t["image_built"] else "cached", t["guest_s"], t["total_s"]))
    assert not t["timed_out"] and t["total_s"] <= budget, "lane took %.1f s (budget %d s, " \
        "image %s): %s" % (t["total_s"], budget, "built" if t["image_built"] else "cached", t)


# ============================================ the topologies of issue 23: bonds, macvtap, VM to VM

def nic_wire(run, topo):
    """Counter of (NIC, flow) of every packet tcpdump saw on the topology's NICs."""
    return collections.Counter((dev, flow_key(p)) for dev in PHYS.get(topo, (PHY,))
                               for p in run.capture(dev) if p["direction"] != "other")


def upcalled(run):
    """The flows of the packets that went up to ovs-vswitchd, from the kprobe instance
    (which follows them; checked against the datapath's miss counter elsewhere)."""
    return collections.Counter(flow_key(r) for r in run.out["kprobe"].packets
                               if "ovs_upcall" in r["stages"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("topo", ("V", "O"))
def test_bonded_uplinks_name_the_nic_each_packet_crossed(lane, topo, method):
    """A Linux bridge on VLAN 100 of an active-backup bond (V), OVS with a balance-xor
    bond port (O); the tool given no device options. Each packet tcpdump saw on the tap
    is reported once, naming the NIC (the bond's slave) tcpdump saw it on, with the bond
    and VLAN above it as its uplink; TX ends at the slave's driver, RX starts at the
    slave's receive."""
    run = lane.run("%s-mix" % topo)
    out = run.out[method]
    wire = run.capture(TAP)
    check_generators_against_capture(run, wire)
    lost = upcalls_lost_to(lane, run, method)
    up = upcalled(run) if lost else collections.Counter()
    assert sum(up.values()) == lost
    nics = nic_wire(run, topo)
    assert collections.Counter(k for _dev, k in nics.elements()) == \
        collections.Counter(map(flow_key, wire)), "%s: the NICs did not carry what the tap " \
        "did" % run.name
    want = nics - collections.Counter(dict(((d, k), n) for (d, k), n in nics.items() if up[k]))
    got = collections.Counter((r["phy_dev"], flow_key(r)) for r in out.packets)
    assert got == want, "%s: records by (NIC, packet) differ from tcpdump on %s and %s:\n%s" % (
        out.label, PHY, PHY2, counter_diff(collections.Counter(dict(
            ("%s %s" % (d, fmt_key(k)), n) for (d, k), n in got.items())),
            collections.Counter(dict(("%s %s" % (d, fmt_key(k)), n)
                                     for (d, k), n in want.items()))))
    assert_everything_accounted(out, len(wire), left_path=lost)
    assert_shapes(lane, out, topo, run.meta.get("vmstub_pid"))
    print("%s: NICs of TX %s, of RX %s" % (out.label, sorted(set(
        r["phy_dev"] for r in out.packets if r["direction"] == "tx")), sorted(set(
            r["phy_dev"] for r in out.packets if r["direction"] == "rx"))))


@pytest.mark.parametrize("method", METHODS)
def test_a_bond_fail_over_while_tracing_loses_nothing_silently(lane, method):
    """Pings every 50 ms through the active-backup bond of topology V; midway the active
    slave's link fails (its peer taken down: a pulled cable) and both ends' bonds move to
    the other NIC. Every packet that entered the path (the VM's on the tap, the remote's
    on either NIC) is in the summary; every record is a packet tcpdump saw on the NIC it
    names (RX: and on the tap); TX records name both NICs, before and after; what was
    not reported is counted as dropped or left, nothing in flight, lost or untracked."""
    run = lane.run("V-failover")
    out = run.out[method]
    fo = one(run.oracle_of("failover"), "failover")
    assert (fo["active_before"], fo["active_after"]) == (PHY, PHY2), fo
    tap = [p for p in run.capture(TAP) if p["direction"] != "other"]
    nics = nic_wire(run, "V")
    tap_rx = collections.Counter(flow_key(p) for p in tap if p["direction"] == "rx")
    s = out.summary
    entered = sum(1 for p in tap if p["direction"] == "tx") + \
        sum(n for (_d, k), n in nics.items() if k[0] == "rx")
    assert s["started"] == entered, "%s: started %s, %d packets entered (tcpdump): %s" % (
        out.label, s["started"], entered, s)
    want = collections.Counter(dict(((d, k), n) for (d, k), n in nics.items()
                                    if k[0] == "tx" or tap_rx[k]))
    got = collections.Counter((r["phy_dev"], flow_key(r)) for r in out.packets)
    assert got == want, "%s:\n%s" % (out.label, counter_diff(
        collections.Counter(dict(("%s %s" % (d, fmt_key(k)), n) for (d, k), n in got.items())),
        collections.Counter(dict(("%s %s" % (d, fmt_key(k)), n) for (d, k), n in want.items()))))
    assert set(d for d, k in got if k[0] == "tx") == {PHY, PHY2}, sorted(got)
    assert all(s[k] == 0 for k in ("in_flight", "not_tracked", "lost", "vanished")), s
    assert s["reported"] + s["below_threshold"] + s["dropped"] + s["left_path"] == \
        s["started"] and s["reported"] == len(out.packets), s
    assert_shapes(lane, out, "V", run.meta.get("vmstub_pid"))
    assert out.rc == 0, out.stderr
    print("%s: %d entered, %d reported, %d dropped %s, %d left" % (
        out.label, entered, s["reported"], s["dropped"], [
            (f["direction"], f.get("reason"), f["last_stage"], f["count"])
            for f in s["fates"]], s["left_path"]))


@pytest.mark.parametrize("method", METHODS)
def test_a_vm_on_a_macvtap_is_followed_per_packet(lane, method):
    """Topology M: the VM on a macvtap (bridge mode) of vnlphy0, held through /dev/tapN.
    Each packet tcpdump saw on the macvtap is reported once, as the NIC saw it too; TX
    from the macvtap's queue through its hand-off to macvlan and the NIC's queue and
    driver; RX from the NIC through the macvtap's ring (kprobes: tap_handle_frame) to the
    stand-in's read. Tracepoints alone cannot see the ring, and say so."""
    run = lane.run("M-mix")
    out = run.out[method]
    wire = run.capture(MVT)
    check_generators_against_capture(run, wire)
    nic = collections.Counter(flow_key(p) for p in run.capture(PHY) if p["direction"] != "other")
    assert nic == collections.Counter(map(flow_key, wire))
    got = collections.Counter(map(flow_key, out.packets))
    assert got == nic, "%s:\n%s" % (out.label, counter_diff(got, nic))
    assert_everything_accounted(out, len(wire))
    assert_shapes(lane, out, "M", run.meta.get("vmstub_pid"))
    if "mvt_ring" not in lane.traced(method):
        assert any(l.startswith("note: stage mvt_ring not traced: ")
                   for l in out.stderr.splitlines()), out.stderr
    else:
        assert method == "kprobe"
    print("%s: %s" % (out.label, sorted(set(tuple(r["stages"]) for r in out.packets))))


@pytest.mark.parametrize("method", METHODS)
def test_vm_to_vm_across_ovs_is_one_record_naming_both_vms(lane, method):
    """Topology O: the VM pings a second VM on the same OVS bridge and sends it a UDP
    burst it echoes. Each packet tcpdump saw on the sender's tap is one vm2vm record,
    from the sender's tap through the datapath to the receiver's read, naming both
    taps, read by the receiver's stand-in; none is reported as TX or RX."""
    run = lane.run("O-vm2vm")
    out = run.out[method]
    stubs = one(run.oracle_of("vmstubs"), "vmstubs")
    wire = [p for p in run.capture(TAP) if {p["src_ip"], p["dst_ip"]} == {VM, VM2}]
    assert collections.Counter(map(flow_key, wire)) == collections.Counter(
        flow_key(p) for p in run.capture(TAP2) if p["direction"] != "other")
    by = collections.Counter((p["protocol"], p["direction"]) for p in wire)
    ping = one(run.oracle_of("ping"), "ping")
    burst = one(run.oracle_of("udp_burst"), "udp_burst")["udp_burst"]
    assert (by[("icmp", "tx")], by[("icmp", "rx")]) == (ping["transmitted"], ping["received"]) \
        == (5, 5) and (by[("udp", "tx")], by[("udp", "rx")]) == (burst["sent"],
                                                                burst["replies"]) == (10, 10), by
    lost = upcalls_lost_to(lane, run, method)
    up = upcalled(run) if lost else collections.Counter()

    def as_on_tap0(r):      # the VM's packets to VM2 are "tx" on vnltap0's capture
        return flow_key(dict(r, direction="tx" if r["vm_dev"] == TAP else "rx"))
    got = collections.Counter(map(as_on_tap0, out.packets))
    want = collections.Counter(map(flow_key, wire))
    if lost:
        want = want - collections.Counter(dict(
            ("tx" if k[2] == VM else "rx",) + k[1:] for k in up.elements()))
    assert got == want, "%s:\n%s" % (out.label, counter_diff(got, want))
    assert all(r["direction"] == "vm2vm" for r in out.packets)
    assert_everything_accounted(out, len(wire), left_path=lost)
    assert_shapes(lane, out, "O", dict((TAP if k == TAP else TAP2, v)
                                       for k, v in stubs.items() if k in (TAP, TAP2)))
