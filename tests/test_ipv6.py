"""IPv6: a guest with an IPv6 address (fd77::7) talking to the remote (fd77::3) across
the bridge, and crafted frames with extension headers written into a tap. The oracles:
tcpdump on the tap (tests/harness/pcap.py parses IPv6 too), the traffic generators' counts."""
import collections
import subprocess

import pytest

from tests.harness.lab import Lab
from tests.harness.tapwriter import TapWriter, ether, ipv4, ipv6, udp
from tests.harness.tracing import Capture, capture_key

pytestmark = pytest.mark.lab

PHY, BRIDGE = Lab.PHY, Lab.BRIDGE
REMOTE6 = Lab.REMOTE_IP6
V6NAME, V6IP = "v6-guest", "fd77::7"


@pytest.fixture(scope="module")
def v6(lab):
    """Guest vnltap5 (10.77.0.7, fd77::7); the remote speaks IPv6 meanwhile."""
    lab.remote_ipv6(True)
    vm, ip4 = lab.add_guest(5, V6NAME, ip6=V6IP)
    try:
        rc, out = vm.guest("ping -6 -c 2 -W 3 %s" % REMOTE6, timeout=60)   # ND done
        assert rc == 0, out
        yield vm
    finally:
        lab.remove_guest(vm)
        lab.remote_ipv6(False)


def wire_of(cap, mac):
    return [p for p in cap.stop().packets(mac) if p[0] in ("tx", "rx")]


def test_ping6_is_traced_per_packet(v6, traces):
    t = traces("--vm", V6NAME, "--phy-dev", PHY, "--protocol", "icmp6")
    cap = Capture("vnltap5", "icmp6")
    rc, out = v6.guest("ping -6 -c 5 -i 0.2 -W 2 %s" % REMOTE6)
    assert rc == 0 and "5 packets received" in out, out
    t.stop()
    wire = wire_of(cap, "52:54:00:77:00:07")
    echoes = [r for r in t.packets() if r["icmp_id"] is not None]
    assert collections.Counter(map(capture_key, echoes)) == collections.Counter(
        w for w in wire if w[6] in (128, 129))
    assert len(echoes) == 10
    for r in echoes:
        assert r["ip_version"] == 6 and r["vm"] == V6NAME
        assert (r["icmp_type"], r["src_ip"], r["dst_ip"]) in (
            (128, V6IP, REMOTE6), (129, REMOTE6, V6IP))
    # neighbour discovery and MLD are ICMPv6 too, with a type and never an echo's id
    for r in t.packets():
        if r["icmp_type"] not in (128, 129):
            assert r["icmp_id"] is None and r["icmp_seq"] is None, r
    s = t.summary()
    assert s["lost"] == s["not_tracked"] == 0


def test_udp6_burst_gives_one_record_per_datagram(lab, v6, traces):
    sink = lab.start_udp_sink(9600, "::")
    t = traces("--vm", V6NAME, "--phy-dev", PHY, "--protocol", "udp", "--src-ip", V6IP)
    rc, out = v6.guest("vnl-traffic udp %s 9600 200 40601" % REMOTE6)
    assert rc == 0 and out.strip() == "sent 200", out
    assert sink.wait_count(200) == 200
    t.stop()
    sink.stop()
    recs = t.packets()
    assert len(recs) == 200
    assert all((r["ip_version"], r["src_ip"], r["src_port"], r["dst_ip"], r["dst_port"]) ==
               (6, V6IP, 40601, REMOTE6, 9600) for r in recs)
    assert all(r["stages"] == ["tap_rx", "phy_queue", "phy_xmit"] for r in recs)
    s = t.summary()
    assert s["reported"] == s["started"] == 200


def test_tcp_over_ipv6_and_ipv4_match_the_wire(lab, v6, traces):
    echo6, echo4 = lab.start_tcp_echo(7600, "::"), lab.start_tcp_echo(7604)
    t = traces("--vm", V6NAME, "--phy-dev", PHY, "--protocol", "tcp", output="json")
    cap = Capture("vnltap5", "tcp")
    for dst, port, sport in ((REMOTE6, 7600, 40602), (Lab.REMOTE_IP, 7604, 40604)):
        rc, out = v6.guest("vnl-traffic tcp %s %d 4 %d" % (dst, port, sport))
        assert rc == 0 and out.strip() == "exchanged 4", out
    assert echo6.wait_closed(1) == 1 and echo4.wait_closed(1) == 1
    t.stop(settle=1.0)
    echo6.stop()
    echo4.stop()
    wire = wire_of(cap, "52:54:00:77:00:07")
    assert collections.Counter(map(capture_key, t.packets())) == collections.Counter(wire)
    versions = collections.Counter(r["ip_version"] for r in t.packets())
    assert versions[6] >= 10 and versions[4] >= 10, versions


def test_ipv6_filters_and_text(lab, v6, traces):
    sink = lab.start_udp_sink(9601, "::")
    t = traces("--vm", V6NAME, "--phy-dev", PHY, "--dst-ip", REMOTE6, "--dst-port", "9601",
               output="text")
    for port in (9601, 9602):
        rc, out = v6.guest("vnl-traffic udp %s %d 3 40605" % (REMOTE6, port))
        assert rc == 0, out
    rc, out = v6.guest("vnl-traffic udp %s 9601 3 40605" % Lab.REMOTE_IP)   # IPv4: filtered
    assert rc == 0, out
    rc, out = v6.guest("ping -6 -c 2 -i 0.2 %s" % REMOTE6)
    assert rc == 0, out
    t.stop()
    sink.stop()
    heads = [l for l in t.stdout.splitlines() if l.startswith("[")]
    assert len(heads) == 3, t.stdout
    assert all(l.endswith("UDP [%s]:40605 -> [%s]:9601 TX %s vnltap5 -> %s"
                          % (V6IP, REMOTE6, V6NAME, PHY)) for l in heads), heads


# --- crafted frames: extension headers, fragments, VLANs ---

STAND_IN, STAND_IN_MAC = "vnltap1", "52:54:00:77:00:09"
SRC6, DST6 = "fd77::9", "fd77::3"


def test_extension_headers_are_skipped_and_later_fragments_not_traced(lab, traces):
    opts = b"\x01\x02\x00\x00"     # a PadN option
    u = udp(40700, 9700, b"payload")
    frames = {
        "plain": (ipv6(SRC6, DST6, 17, u), 1),
        "hop-by-hop": (ipv6(SRC6, DST6, 17, u, ext=[(0, opts)]), 1),
        "hbh, routing, destination options": (
            ipv6(SRC6, DST6, 17, u, ext=[(0, opts), (43, b"\x00\x00" + b"\0" * 4),
                                         (60, opts + b"\0" * 8)]), 1),
        "first fragment": (ipv6(SRC6, DST6, 17, u, ext=[(44, b"\x00\x01" + b"\0\0\0\x07")]), 1),
        "later fragment": (ipv6(SRC6, DST6, 17, u, ext=[(44, b"\x00\x08" + b"\0\0\0\x07")]), 0),
        "five extension headers": (ipv6(SRC6, DST6, 17, u, ext=[(60, opts)] * 5), 0),
        "truncated": (ipv6(SRC6, DST6, 17, u)[:-12], 0),
    }
    with TapWriter(STAND_IN, BRIDGE) as vm:
        subprocess.run(["bridge", "fdb", "replace", STAND_IN_MAC, "dev", STAND_IN, "master",
                        "static"], check=True)
        t = traces("--vm-dev", STAND_IN, "--phy-dev", PHY, "--direction", "tx")
        for name, (packet, _n) in frames.items():
            vm.write(ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x86dd, packet))
        # and inside an 802.1Q tag, and IPv4 beside it
        vm.write(ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x86dd, frames["hop-by-hop"][0],
                       vlans=((0x8100, 100),)))
        vm.write(ether(Lab.REMOTE_MAC, STAND_IN_MAC, 0x0800,
                       ipv4("10.77.0.9", Lab.REMOTE_IP, 17, udp(40701, 9701))))
        t.stop()
    recs = t.packets()
    want = sum(n for _p, n in frames.values()) + 2
    assert len(recs) == want, [(r["ip_version"], r["vlan"]) for r in recs]
    v6recs = [r for r in recs if r["ip_version"] == 6]
    assert all((r["src_ip"], r["dst_ip"], r["src_port"], r["dst_port"], r["protocol"]) ==
               (SRC6, DST6, 40700, 9700, "udp") for r in v6recs)
    assert sorted(r["vlan"] for r in v6recs if r["vlan"] is not None) == [100]
    assert [r["src_port"] for r in recs if r["ip_version"] == 4] == [40701]
