"""One packet across two hosts, on two real kernels with two clocks.

Case J of the kguest lane (tests/kguest/guest/guest_lane.sh, run_lane.sh --join): two
QEMU guests at once, host a on Debian bookworm's kernel (6.1), host b on bullseye's
(5.10), whose virtio-net NICs are one QEMU socket link (UDP on this host's loopback).
Each has a stand-in VM on a tap behind a Linux bridge with its NIC and runs the tool
with --write-events while the VMs ping each other and a's VM sends UDP and TCP to b's,
which echoes them; one UDP packet is dropped by a tc filter on b's NIC; b's wall clock
is set 5 minutes ahead before its run. Here the real tool joins the two recordings, and
tcpdump's captures on both NICs say which packets crossed.

KGUEST_JOIN_RESULTS=DIR_A,DIR_B checks the results of an earlier run instead.
"""
import collections
import json
import os
import re
import subprocess

import pytest

from tests.harness.kguest import run_join
from tests.harness.pcap import parse_frame, read_pcap
from tests.harness.tool import PYTHON, TOOL
from tests.test_kguest import SUITES

pytestmark = pytest.mark.kguest

HOST_SUITES = ("bookworm", "bullseye")         # host a, host b
A_VM, B_VM = "10.78.0.1", "10.78.0.2"           # the stand-in VMs (guest_lane.sh, case J)
DROP_LEN = 1028                                 # the UDP packet b's NIC drops
WALL_AHEAD_S = 300                              # b's wall clock, set ahead before its run
# each guest's wall clock starts from the emulated RTC, in whole seconds
WALL_AT_BOOT_S = 1.0


class Host(object):
    def __init__(self, root, role):
        self.root, self.role = root, role
        self.dir = os.path.join(root, "J")

    def read(self, name):
        path = os.path.join(self.dir, name)
        assert os.path.exists(path), "host %s wrote no %s" % (self.role, path)
        with open(path) as f:
            return f.read()

    @property
    def recording(self):
        return os.path.join(self.dir, "host-%s.vnl" % self.role)

    def captured(self):
        """The VMs' packets tcpdump saw on the NIC, each as what identifies it."""
        nic = self.read("nic").strip()
        stats = self.read(nic + ".tcpdump.stderr")
        assert re.search(r"\b0 packets dropped by kernel", stats), stats
        out = []
        for _ts, frame in read_pcap(os.path.join(self.dir, nic + ".pcap")):
            p = parse_frame(frame)
            if p and {p["src_ip"], p["dst_ip"]} == {A_VM, B_VM}:
                out.append(p)
        return out


def identity(p):
    return (p["protocol"], p["src_ip"], p["dst_ip"], p["src_port"], p["dst_port"],
            p["icmp_type"], p["icmp_id"], p["icmp_seq"], p["ip_id"], p["tcp_seq"])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reuse = os.environ.get("KGUEST_JOIN_RESULTS")
    if reuse:
        dirs = reuse.split(",")
    else:
        missing = [s for s in HOST_SUITES if s not in SUITES]
        if missing:
            pytest.skip("KGUEST JOIN NOT RUN (this is a skip, not a pass): it needs the "
                        "%s lanes, KGUEST_SUITES leaves out %s" % (", ".join(HOST_SUITES),
                                                                   ", ".join(missing)))
        if os.geteuid() != 0:
            pytest.skip("KGUEST JOIN NOT RUN (this is a skip, not a pass): run_lane.sh "
                        "needs root")
        dirs = [str(tmp_path_factory.mktemp("kguest-join-" + r)) for r in "ab"]
        for d, (rc, output) in zip(dirs, run_join(HOST_SUITES, dirs)):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "lane-output.txt"), "w") as f:
                f.write(output)
            print("kguest join: exit %s, results in %s" % (rc, d))
    out = []
    for d, role in zip(dirs, "ab"):
        steps = os.path.join(d, "steps.tsv")
        if not os.path.exists(steps):
            log = os.path.join(d, "lane-output.txt")
            pytest.fail("guest %s gave no results; its last lines:\n%s" % (
                role, open(log).read()[-4000:] if os.path.exists(log) else "(none)"))
        out.append(Host(d, role))
    return out


def join(hosts, output="json"):
    r = subprocess.run([PYTHON, TOOL, "--read-events", hosts[0].recording, "--read-events",
                        hosts[1].recording, "--output", output], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def joined(hosts):
    objs = [json.loads(line) for line in join(hosts).stdout.splitlines()]
    summaries = [o for o in objs if o["type"] == "join_summary"]
    assert len(summaries) == 1
    return [o for o in objs if o["type"] == "joined"], summaries[0]


def test_both_guests_ran_their_half(hosts):
    for h in hosts:
        steps = dict(l.split("\t")[:2] for l in h.read("../steps.tsv").splitlines() if l)
        assert steps.get("J.topology") == "PASS" and steps.get("J.run") == "PASS", \
            (h.role, h.read("../steps.tsv"))


def test_the_joined_records_are_the_packets_both_nics_saw(hosts, joined):
    """Count and identity: each packet tcpdump saw leave one host's NIC and arrive on the
    other's is one joined record (the one b's NIC drops is not), and nothing else is."""
    records, summary = joined
    a_pcap, b_pcap = (h.captured() for h in hosts)
    dropped = [p for p in b_pcap if p["ip_len"] == DROP_LEN]
    assert len(dropped) == 1, "b's capture of the dropped packet: %s" % dropped
    for src, sent, received, name in ((A_VM, a_pcap, b_pcap, "a -> b"),
                                      (B_VM, b_pcap, a_pcap, "b -> a")):
        want = collections.Counter(identity(p) for p in sent if p["src_ip"] == src) & \
            collections.Counter(identity(p) for p in received if p["src_ip"] == src and
                                p["ip_len"] != DROP_LEN)
        got = collections.Counter(identity(r) for r in records if r["src_ip"] == src)
        assert got == want, "%s: joined but not on both wires: %s; on both wires, not " \
            "joined: %s" % (name, sorted(got - want, key=str), sorted(want - got, key=str))
        # every kind of traffic crossed both ways
        assert set(r["protocol"] for r in records if r["src_ip"] == src) == \
            {"icmp", "udp", "tcp"}, name
    # the pings: 10 each way, request and reply
    echoes = collections.Counter((r["src_ip"], r["icmp_type"]) for r in records
                                 if r["protocol"] == "icmp")
    assert echoes == {(A_VM, 8): 10, (B_VM, 0): 10, (B_VM, 8): 10, (A_VM, 0): 10}, echoes
    for r in records:
        sender, receiver = (("kguest-a", "kguest-b") if r["src_ip"] == A_VM else
                            ("kguest-b", "kguest-a"))
        assert (r["from"]["host"], r["to"]["host"]) == (sender, receiver)
        assert r["from"]["vm_dev"] == r["to"]["vm_dev"] == "vnltap0"
        assert (r["from"]["direction"], r["to"]["direction"]) == ("tx", "rx")
    assert summary["joined"] == len(records)


def test_the_packet_dropped_on_b_is_seen_on_a_only(hosts, joined):
    records, summary = joined
    [dropped] = [p for p in hosts[0].captured() if p["ip_len"] == DROP_LEN]
    assert not [r for r in records if identity(r) == identity(dropped)]
    pairs = dict(((p["from"], p["to"]), p) for p in summary["pairs"])
    assert pairs[("kguest-a", "kguest-b")]["sent_only"] == 1, pairs
    assert pairs[("kguest-b", "kguest-a")]["sent_only"] == 0, pairs


def test_the_wire_time_is_positive_and_below_the_round_trip(hosts, joined):
    records, _s = joined
    for r in records:
        assert r["wire"] == "phy_xmit->phy_rx"
        assert r["wire_max_us"] > 0
        assert r["wire_us"] is None or r["wire_us"] >= r["clock_uncertainty_us"] > 0
    # each of a's pings: the request's wire time below the round trip ping measured
    rtts = dict((int(m.group(1)), float(m.group(2)) * 1000) for m in re.finditer(
        r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms", hosts[0].read("ping.txt")))
    assert len(rtts) == 10
    requests = [r for r in records if r["protocol"] == "icmp" and r["icmp_type"] == 8 and
                r["src_ip"] == A_VM]
    assert len(requests) == 10
    for r in requests:
        wire = r["wire_us"] if r["wire_us"] is not None else r["wire_max_us"]
        assert 0 < wire < rtts[r["icmp_seq"]], (r["wire_us"], r["wire_max_us"], rtts)


def test_the_clocks_offset_is_found_though_one_wall_clock_is_minutes_off(joined):
    _r, summary = joined
    [clock] = summary["clocks"]
    assert clock["hosts"] == ["kguest-a", "kguest-b"] and clock["source"] == "estimated"
    assert clock["consistent"], clock
    assert abs(clock["wall_clock_ahead_us"] / 1e6 - WALL_AHEAD_S) < WALL_AT_BOOT_S + 0.5, \
        clock
    # the uncertainty is half the shortest round trip's wire time: well below a ping's
    assert 0 < clock["uncertainty_us"] < 2000, clock


def test_the_text_output_names_both_hosts_and_no_negative_time(hosts, joined):
    records, _s = joined
    text = join(hosts, "text").stdout
    assert "Joined: %d packets across hosts (kguest-a -> kguest-b " % len(records) in text
    assert "kguest-a vnltap0 -> kguest-b vnltap0" in text
    assert not re.search(r": -\d", text), text[:2000]
