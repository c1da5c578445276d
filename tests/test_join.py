"""Joining two hosts' recordings (--read-events A --read-events B): the matching of one
packet's records by what stays the same on the wire, and the clocks' offset estimated
from the packets, on synthetic recordings whose true offset and wire times are known.
(The same on two real kernels: tests/test_kguest.py.)"""
import json
import re

import pytest

from tests.test_records import (WALL, ip, raw, recording_final, recording_meta, run_main,
                                write_recording)

pytestmark = pytest.mark.offline

THETA = 312 * 10 ** 9 + 500777       # host B's monotonic clock minus host A's, in ns
WALL_AHEAD_S = 300.0                 # B's wall clock is 5 minutes ahead of A's
A_IP, B_IP = "10.0.0.1", "10.0.0.2"
A_TAP, B_TAP = 7, 9


def host_meta(tool, name, boot, wall_offset):
    return recording_meta(tool, wall_offset=wall_offset,
                          host={"hostname": name, "boot_id": boot, "kernel": "6.1",
                                "machine": "x86_64"})


def names(tap, vm):
    return [{"kind": "names", "names": {str(tap): "vnet0", "3": "eth1"}, "uplinks": {}},
            {"kind": "vms", "vms": {str(tap): [vm, None, 4242, "qemu-system-x86"]}}]


class TwoHosts(object):
    """Host A's and host B's records of the same packets, each in its own clock: A's
    monotonic t is B's t + THETA; B's wall clock WALL_AHEAD_S ahead of A's."""

    def __init__(self, tool):
        self.tool = tool
        self.a, self.b = [], []         # raw events
        self.truth = []                 # (sender, wire ns) of each packet sent

    def tx(self, start, **flow):
        """A TX record that ends at the NIC at start + 12 us (sender's clock)."""
        t = self.tool
        return raw(t, ts={"tap_rx": start, "phy_queue": start + 10000,
                          "phy_xmit": start + 12000},
                   dir=t.Dir.TX, last=t.STAGE_BY_NAME["phy_xmit"].sid, type=t.Ev.PACKET,
                   phy_ifindex=3, pid=4242, tid=4243, **flow)

    def rx(self, nic, **flow):
        t = self.tool
        return raw(t, ts={"phy_rx": nic, "tap_queue": nic + 5000, "tap_xmit": nic + 6000,
                          "vm_read": nic + 30000},
                   dir=t.Dir.RX, last=t.STAGE_BY_NAME["vm_read"].sid, type=t.Ev.PACKET,
                   phy_ifindex=3, pid=4242, tid=4244, **flow)

    def send(self, sender, at, wire, lost=False, **flow):
        """A packet `sender` ("a" or "b") sent at `at` (A's clock), `wire` ns on the
        wire; lost: never seen arriving."""
        src, dst = (self.a, self.b) if sender == "a" else (self.b, self.a)
        shift = {"a": 0, "b": THETA}
        tap_src, tap_dst = (A_TAP, B_TAP) if sender == "a" else (B_TAP, A_TAP)
        src.append(self.tx(at + shift[sender], vm_ifindex=tap_src, **flow))
        if not lost:
            other = "b" if sender == "a" else "a"
            dst.append(self.rx(at + 12000 + wire + shift[other], vm_ifindex=tap_dst, **flow))
        self.truth.append((sender, wire))

    def ping(self, sender, at, ident, seq, ip_id, wire_there=40000, wire_back=45000):
        s, d = (A_IP, B_IP) if sender == "a" else (B_IP, A_IP)
        echo = dict(proto=1, ip_version=4, sport=ident, dport=seq)
        self.send(sender, at, wire_there, saddr=ip(s), daddr=ip(d), icmp_type=8,
                  ip_id=ip_id, **echo)
        self.send("b" if sender == "a" else "a", at + 200000, wire_back, saddr=ip(d),
                  daddr=ip(s), icmp_type=0, ip_id=ip_id + 1000, **echo)

    def write(self, tmp_path, b_host="hv-b", b_boot="bbbb", a_final=True):
        ev = lambda events: [{"kind": "event", "raw": e.hex()} for e in events]  # noqa
        pa, pb = str(tmp_path / "a.vnl"), str(tmp_path / "b.vnl")
        wall_a = WALL
        # wall = monotonic + wall_offset: B's wall clock WALL_AHEAD_S ahead at one instant
        wall_b = WALL + WALL_AHEAD_S - THETA / 1e9
        write_recording(self.tool, pa, names(A_TAP, "web-03") + ev(self.a),
                        meta=host_meta(self.tool, "hv-a", "aaaa", wall_a), final=a_final)
        write_recording(self.tool, pb, names(B_TAP, "db-01") + ev(self.b),
                        meta=host_meta(self.tool, b_host, b_boot, wall_b))
        return pa, pb


def main_status(tool, argv):
    """(exit status, stderr) of the tool's main(), argparse's exits included."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = tool.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def join(tool, paths, *extra, output="json"):
    argv = []
    for p in paths:
        argv += ["--read-events", p]
    code, out, err = run_main(tool, argv + ["--output", output] + list(extra))
    if output != "json":
        return code, out, err
    objs = [json.loads(line) for line in out.splitlines()]
    return code, [o for o in objs if o["type"] == "joined"], \
        [o for o in objs if o["type"] == "join_summary"], err


def test_pings_both_ways_are_joined_and_the_clocks_offset_estimated(tool, tmp_path):
    h = TwoHosts(tool)
    for i in range(10):
        # the wire's time varies; its shortest is 40 us both ways
        h.ping("a", 10 ** 9 + i * 10 ** 8, 77, i, 100 + i, wire_there=40000 + 3000 * i,
               wire_back=40000 + 1000 * (9 - i))
    code, joined, summary, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    assert len(joined) == 20
    assert sorted(set((r["from"]["host"], r["to"]["host"], r["from"]["vm"], r["to"]["vm"])
                      for r in joined)) == [("hv-a", "hv-b", "web-03", "db-01"),
                                            ("hv-b", "hv-a", "db-01", "web-03")]
    [clock] = summary[0]["clocks"]
    # the true offset lies within the estimate's uncertainty, which is half the shortest
    # round trip's wire time (40 + 40 us): 40 us
    assert abs(clock["offset_us"] * 1000 - THETA) <= clock["uncertainty_us"] * 1000
    assert clock["uncertainty_us"] == 40.0 and clock["consistent"]
    assert abs(clock["wall_clock_ahead_us"] - WALL_AHEAD_S * 1e6) <= 40.0
    truth = dict(((r["from"]["host"], r["icmp_seq"], r["icmp_type"]), None) for r in joined)
    assert len(truth) == 20
    for r, (sender, wire) in zip(sorted(joined, key=lambda r: (r["icmp_seq"],
                                                                r["icmp_type"] == 0)),
                                 h.truth):
        assert r["from"]["host"] == ("hv-a" if sender == "a" else "hv-b")
        assert r["wire"] == "phy_xmit->phy_rx"
        # never negative; the true wire time within the stated uncertainty
        assert r["wire_max_us"] >= 0
        if r["wire_us"] is not None:
            assert r["wire_us"] >= r["clock_uncertainty_us"]
            assert abs(r["wire_us"] * 1000 - wire) <= 40000
            assert r["total_us"] == pytest.approx(r["from"]["total_us"] + r["wire_us"] +
                                                  r["to"]["total_us"], abs=0.002)
        assert r["wire_max_us"] * 1000 >= wire - 1
    assert summary[0]["pairs"] == [
        {"from": "hv-a", "to": "hv-b", "joined": 10, "sent_only": 0, "received_only": 0},
        {"from": "hv-b", "to": "hv-a", "joined": 10, "sent_only": 0, "received_only": 0}]


def test_text_output_names_both_hosts_and_never_a_negative_wire(tool, tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100, wire_there=40000, wire_back=40000)
    h.ping("a", 2 * 10 ** 9, 77, 2, 101, wire_there=90000, wire_back=40000)
    # IPv6 UDP has no identity to set the clocks with: joined by its order alone, its
    # 20 us are less than the clocks' uncertainty (half of 40 + 40 us)
    h.send("a", 3 * 10 ** 9, 20000, saddr=ip("fd00::1"), daddr=ip("fd00::2"), proto=17,
           ip_version=6, sport=5000, dport=6000)
    code, out, err = join(tool, h.write(tmp_path), output="text")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].endswith("ICMP 10.0.0.1 -> 10.0.0.2 id=77 seq=1 hv-a web-03 vnet0 -> "
                             "hv-b db-01 vnet0"), lines
    assert lines[1] == "  hv-a: tap_rx->phy_queue: 10.00us | phy_queue->phy_xmit: 2.00us" \
        or lines[1].startswith("  hv-a: tap_rx->phy_queue: 10.00")
    # the shortest wires (40 us) bound the clocks' offset: 40 +/- 40; the 90 us one is
    # 90 +/- 40; the IPv6 one's 20 us only "at most 60"
    assert lines[2] == "  wire phy_xmit->phy_rx: 40.00us +/-40.00us", lines
    assert "  wire phy_xmit->phy_rx: 90.00us +/-40.00us" in lines, out
    assert "  wire phy_xmit->phy_rx: at most 60.00us (the clocks' uncertainty, +/-40.00us, " \
        "is larger)" in lines, out
    assert not [l for l in lines if "wire" in l and ": -" in l]
    assert re.search(r"hv-b's wall clock is 300000000\.\d\dus ahead of hv-a's, "
                     r"\+/-40\.00us \(from the packets both ways\)", out), out
    # in one clock, the first recording's: B's replies 200 us after A's requests
    assert [l[:15] for l in lines if l.startswith("[")] == [
        "[09:58:21.000] ", "[09:58:21.000] ", "[09:58:22.000] ", "[09:58:22.000] ",
        "[09:58:23.000] "], out
    assert "Joined: 5 packets across hosts (hv-a -> hv-b 3, hv-b -> hv-a 2)" in out


def test_a_packet_lost_on_the_way_is_counted_as_seen_on_the_sender_only(tool, tmp_path):
    h = TwoHosts(tool)
    for i in range(5):
        h.ping("a", 10 ** 9 + i * 10 ** 8, 77, i, 100 + i)
    udp = dict(saddr=ip(A_IP), daddr=ip(B_IP), proto=17, ip_version=4, sport=5000,
               dport=6000)
    h.send("a", 3 * 10 ** 9, 50000, ip_id=9, **udp)
    h.send("a", 3 * 10 ** 9 + 10 ** 6, 50000, lost=True, ip_id=10, **udp)
    code, joined, summary, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    assert len(joined) == 11
    pairs = summary[0]["pairs"]
    assert pairs[0]["from"] == "hv-a" and pairs[0]["joined"] == 6 and \
        pairs[0]["sent_only"] == 1
    hosts = dict((x["host"], x) for x in summary[0]["hosts"])
    assert hosts["hv-a"]["not_joined"] == 1 and hosts["hv-b"]["not_joined"] == 0


def test_ip_ids_that_wrapped_around_join_the_packet_sent_last_before_arrival(tool,
                                                                             tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)            # the clocks, from a ping both ways
    udp = dict(saddr=ip(A_IP), daddr=ip(B_IP), proto=17, ip_version=4, sport=5000,
               dport=6000, ip_id=4242)
    # 65536 packets apart, the same id: two seconds apart, different wire times
    h.send("a", 2 * 10 ** 9, 51000, **udp)
    h.send("a", 4 * 10 ** 9, 77000, **udp)
    code, joined, _s, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    udp_joined = [r for r in joined if r["protocol"] == "udp"]
    # the clocks from 40 us there, 45 back: offset 2.5 us short, +/-42.5 us
    assert [(r["ip_id"], r["wire_us"], r["clock_uncertainty_us"]) for r in udp_joined] == \
        [(4242, 53.5, 42.5), (4242, 79.5, 42.5)]


def tcp(seq, **over):
    v = dict(saddr=ip(A_IP), daddr=ip(B_IP), proto=6, ip_version=4, sport=40000,
             dport=5201, tcp_seq=seq)
    v.update(over)
    return v


def test_a_retransmission_joins_the_copy_that_arrived(tool, tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    h.send("a", 2 * 10 ** 9, 40000, lost=True, ip_id=1, **tcp(1000))
    h.send("a", 2 * 10 ** 9 + 200 * 10 ** 6, 61000, ip_id=2, **tcp(1000))   # after RTO
    code, joined, summary, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    [r] = [r for r in joined if r["protocol"] == "tcp"]
    assert r["tcp_seq"] == 1000 and r["ip_id"] == 2
    assert summary[0]["pairs"][0]["sent_only"] == 1


def test_segments_in_flight_together_join_by_their_sequence_not_their_time(tool,
                                                                          tmp_path):
    """Two segments of one flow on the wire at once (10 us apart, 50 us of wire): the
    last one sent before each arrived is the wrong one for the first."""
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    h.send("a", 2 * 10 ** 9, 50000, ip_id=1, **tcp(1000))
    h.send("a", 2 * 10 ** 9 + 10000, 50000, ip_id=2, **tcp(2448))
    code, joined, _s, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    pairs = [(r["tcp_seq"], r["from"]["timestamp"], r["to"]["timestamp"]) for r in joined
             if r["protocol"] == "tcp"]
    assert [p[0] for p in pairs] == [1000, 2448]
    # each sender's record with its own receiver's: 10 us apart on both hosts
    assert round((pairs[1][1] - pairs[0][1]) * 1e6) == 10
    assert round((pairs[1][2] - pairs[0][2]) * 1e6) == 10


def test_gso_segments_each_join_the_packet_they_were_cut_from(tool, tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    # one 3 x 1448-byte GSO packet on A (seq 5000), then the next (seq 9344); B receives
    # the 4 segments
    h.a.append(h.tx(2 * 10 ** 9, vm_ifindex=A_TAP, ip_id=10, **tcp(5000)))
    h.a.append(h.tx(2 * 10 ** 9 + 10 ** 6, vm_ifindex=A_TAP, ip_id=13, **tcp(9344)))
    for i, seq in enumerate((5000, 6448, 7896, 9344)):
        h.b.append(h.rx(2 * 10 ** 9 + 12000 + 50000 + i * 1000 + (10 ** 6 if i == 3 else 0)
                        + THETA, vm_ifindex=B_TAP, ip_id=10 + i, **tcp(seq)))
    code, joined, _s, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    segs = [(r["to"]["vm"], r["tcp_seq"], r["from"]["timestamp"]) for r in joined
            if r["protocol"] == "tcp"]
    assert len(segs) == 4
    # the first three from the first packet (its timestamp), the fourth from the second
    assert len(set(s[2] for s in segs[:3])) == 1 and segs[3][2] != segs[0][2]
    rxs = sorted(r["to"]["timestamp"] for r in joined if r["protocol"] == "tcp")
    assert len(set(rxs)) == 4


def test_tunnels_join_by_the_inner_packet_and_the_network_id(tool, tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    udp = dict(saddr=ip(A_IP), daddr=ip(B_IP), proto=17, ip_version=4, sport=5000,
               dport=6000, ip_id=7, tunnel=1, outer_version=4)
    h.send("a", 2 * 10 ** 9, 50000, vni=100, **udp)
    # the same inner packet in another tenant's network: not that one
    h.b.append(h.rx(2 * 10 ** 9 + 12000 + 55000 + THETA, vm_ifindex=B_TAP, vni=200, **udp))
    code, joined, summary, err = join(tool, h.write(tmp_path))
    assert code == 0, err
    [r] = [r for r in joined if r["protocol"] == "udp"]
    assert r["tunnel"]["vni"] == 100 and r["to"]["tunnel"]["vni"] == 100
    hosts = dict((x["host"], x) for x in summary[0]["hosts"])
    assert hosts["hv-b"]["not_joined"] == 1


def test_a_given_clock_offset_replaces_the_estimate(tool, tmp_path):
    h = TwoHosts(tool)
    # one way only: the packets cannot set the clocks
    for i in range(3):
        h.send("a", 10 ** 9 + i * 10 ** 8, 50000, saddr=ip(A_IP), daddr=ip(B_IP), proto=17,
               ip_version=4, sport=5000, dport=6000, ip_id=i)
    paths = h.write(tmp_path)
    code, joined, summary, err = join(tool, paths)
    assert code == 0, err
    assert len(joined) == 3 and all(r["wire_us"] is None and r["wire_max_us"] is None
                                    for r in joined)
    # no common clock: each record's time is the receiver's own
    assert [r["timestamp"] for r in joined] == [r["to"]["timestamp"] for r in joined]
    code, out, err = join(tool, paths, output="text")
    assert "wire phy_xmit->phy_rx: unknown" in out and "give --clock-offset" in out
    code, joined, summary, err = join(tool, paths, "--clock-offset", str(WALL_AHEAD_S * 1e6))
    assert code == 0, err
    # the recordings' wall clock offsets are floats of seconds since 1970: good to a
    # quarter of a microsecond each, said as the uncertainty
    assert all(abs(r["wire_us"] - 50.0) <= r["clock_uncertainty_us"] <= 0.5 for r in joined)
    assert summary[0]["clocks"][0]["source"] == "given"


@pytest.mark.parametrize("case", ["same host", "no packet shared", "histogram", "old format",
                                  "one file for the offset", "bad offset"])
def test_joins_that_cannot_be_made_are_one_line_and_status_2(tool, tmp_path, case):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    extra = []
    if case == "same host":
        paths = h.write(tmp_path, b_host="hv-a", b_boot="aaaa")
        message = "were recorded on the same host (hv-a, boot aaaa)"
    elif case == "no packet shared":
        h.b = []
        paths = h.write(tmp_path)
        message = "share no packet"
    elif case == "histogram":
        paths = h.write(tmp_path)
        write_recording(tool, paths[1], [], meta=recording_meta(
            tool, mode="histogram", host={"hostname": "hv-b", "boot_id": "b"}))
        message = "histogram mode has no packets to join"
    elif case == "old format":
        paths = h.write(tmp_path)
        write_recording(tool, paths[1], [], meta=recording_meta(
            tool, format=tool.RECORDING_FORMAT - 1))
        message = "this version reads format %d" % tool.RECORDING_FORMAT
    elif case == "one file for the offset":
        paths = h.write(tmp_path)[:1]
        extra = ["--clock-offset", "0"]
        message = "--clock-offset goes with a join of two recordings"
    else:
        paths = h.write(tmp_path)
        extra = ["--clock-offset", "1e300"]
        message = "more than a day"
    argv = []
    for p in paths:
        argv += ["--read-events", p]
    code, err = main_status(tool, argv + extra)
    assert code == 2 and message in err, err
    # (a usage error adds argparse's pointer to -h, as every one of the tool's does)
    assert len([l for l in err.splitlines() if not l.startswith("Try ")]) == 1, err


def test_a_recording_cut_short_joins_what_it_has_with_a_note(tool, tmp_path):
    h = TwoHosts(tool)
    h.ping("a", 10 ** 9, 77, 1, 100)
    h.ping("a", 2 * 10 ** 9, 77, 2, 101)
    pa, pb = h.write(tmp_path, a_final=False)
    # no final counters and no mark of a cut: the file is cut, said in one line
    code, out, err = run_main(tool, ["--read-events", pa, "--read-events", pb])
    assert code == 2 and "before the run did" in err and len(err.splitlines()) == 1, err
    # the recorder's mark (a full disk after A's first ping): what A has joins
    lines = [json.loads(l) for l in open(pa)]
    cut = [lines[0], {"kind": "truncated", "why": "No space left on device",
                      "after_line": 6}] + lines[1:5]
    with open(pa, "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in cut))
    code, joined, summary, err = join(tool, (pa, pb))
    assert code == 0, err
    assert len(joined) == 2 and summary[0]["hosts"][0]["truncated"]
    assert len(err.splitlines()) == 1 and "cut short after line 6 (No space left on " \
        "device): hv-a's packets after it are missing" in err, err


def test_histograms_of_joined_packets_have_each_hosts_segments_the_wire_and_the_total(
        tool, tmp_path):
    h = TwoHosts(tool)
    for i in range(10):
        h.ping("a", 10 ** 9 + i * 10 ** 8, 77, i, 100 + i, wire_there=40000 + 10000 * i,
               wire_back=40000)
    paths = h.write(tmp_path)
    code, out, err = join(tool, paths, "--mode", "histogram", output="text")
    assert code == 0, err
    assert "Latency Distribution (us) - hv-a -> hv-b: 10 packets" in out, out
    titles = [l for l in out.splitlines() if l.startswith(("Stage", "Wire", "Total"))]
    assert titles[:5] == ["Stage: hv-a:tap_rx -> phy_queue", "Stage: hv-a:phy_queue -> phy_xmit",
                          "Wire: phy_xmit -> phy_rx", "Stage: hv-b:phy_rx -> tap_queue",
                          "Stage: hv-b:tap_queue -> tap_xmit"], titles
    code, objs, summary, err = join(tool, paths, "--mode", "histogram")
    assert code == 0 and objs == [], err
    argv = []
    for p in paths:
        argv += ["--read-events", p]
    _c, text, _e = run_main(tool, argv + ["--mode", "histogram", "--output", "json"])
    hists = [json.loads(l) for l in text.splitlines() if '"histogram"' in l]
    wire = [o for o in hists if o["from_host"] == "hv-a" and o["segment"] == "wire"]
    # the offset from 40 us both ways: exact; the wires 40, 50, ... 130 us
    assert wire[0]["count"] == 10 and 80 < wire[0]["p50_us"] < 95, wire
    assert sum(o["count"] for o in hists if o["segment"] == "total") == 20
