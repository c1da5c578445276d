"""The shapes besides tap -> bridge -> NIC, with real QEMU guests on this kernel: two
VMs on taps of one bridge talking to each other while one also talks to the remote (VM
to VM), a VM on a macvtap (QEMU handed the macvtap's /dev/tapN, as libvirt does), and
two VMs on macvtaps of one NIC in bridge mode. No device options: the tool finds the
devices as a user's first run would. The oracles: tcpdump on the taps and the NIC, the
guests' own counts, the kernel's counters."""
import collections
import json
import subprocess
import threading
import time

import pytest

from tests.harness.lab import Lab
from tests.harness.tool import run_tool
from tests.harness.tracing import Capture, capture_key

pytestmark = pytest.mark.lab

REMOTE = Lab.REMOTE_IP
GUEST, GUEST_TAP, GUEST_IP, GUEST_MAC = Lab.GUEST_NAME, Lab.TAP, Lab.GUEST_IP, Lab.GUEST_MAC
# the second guest on the bridge (Lab.add_guest(3): vnltap3, 10.77.0.5)
DB, DB_UUID, DB_TAP, DB_MAC = "db-05", "0c0ffee0-0000-4000-8000-000000000005", "vnltap3", \
    "52:54:00:77:00:05"
# the guests on macvtaps (Lab.add_macvtap_guest(i): vnlmvt<i>, 10.77.0.<16 + i>)
MVT, MVT_UUID, MVT_MAC = "mvt-16", "0c0ffee0-0000-4000-8000-000000000016", "52:54:00:77:00:10"
MVT2, MVT2_UUID, MVT2_MAC = "mvt-17", "0c0ffee0-0000-4000-8000-000000000017", \
    "52:54:00:77:00:11"
ACCOUNTED = ("reported", "below_threshold", "dropped", "left_path", "in_flight",
             "not_tracked", "lost", "vanished")


def accounted(summary):
    return sum(summary[k] for k in ACCOUNTED)


def know_each_other(a, a_ip, a_mac, b, b_ip, b_mac):
    """Static ARP entries both ways: no ARP in the traced runs."""
    a.guest_check("arp -i eth0 -s %s %s" % (b_ip, b_mac))
    b.guest_check("arp -i eth0 -s %s %s" % (a_ip, a_mac))


def in_parallel(*jobs):
    """Run (guest, command) jobs at once, one thread each; every one must succeed.
    Returns their outputs."""
    results = [None] * len(jobs)

    def run(i, vm, cmd):
        results[i] = vm.guest(cmd, timeout=120)
    threads = [threading.Thread(target=run, args=(i, vm, cmd))
               for i, (vm, cmd) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (vm, cmd), res in zip(jobs, results):
        assert res is not None and res[0] == 0, (vm.name, cmd, res)
    return [out for _rc, out in results]


def between(packets, ip_a, ip_b):
    """Wire packets (Capture.packets) between two addresses, either way."""
    return [p for p in packets if {p[2], p[3]} == {ip_a, ip_b}]


def as_seen_on(rec, vm_name):
    """A VM-to-VM record as tcpdump on vm_name's device sees the packet: tx if that VM
    sent it."""
    return ("tx" if rec["vm"] == vm_name else "rx",) + capture_key(rec)[1:]


# ---------------------------------------------------------------------------
# Two VMs on one Linux bridge
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def db(lab):
    """A second named guest on the lab's bridge; the two know each other's MAC, and the
    bridge knows where each is (no flooding to the NIC while it learns)."""
    vm, ip_addr = lab.add_guest(3, DB, DB_UUID)
    know_each_other(lab.vm, GUEST_IP, GUEST_MAC, vm, ip_addr, DB_MAC)
    for mac, tap in ((GUEST_MAC, GUEST_TAP), (DB_MAC, DB_TAP)):
        subprocess.run(["bridge", "fdb", "replace", mac, "dev", tap, "master", "static"],
                       check=True)
    yield vm, ip_addr
    lab.vm.guest("arp -d %s" % ip_addr)
    subprocess.run(["bridge", "fdb", "del", GUEST_MAC, "dev", GUEST_TAP, "master"])
    lab.remove_guest(vm)


def test_vm_to_vm_on_a_bridge_is_one_record_per_packet_naming_both(lab, db, traces):
    dbvm, db_ip = db
    dbvm.guest_check("nc -l -p 7001 -e cat >/dev/null 2>&1 &")    # a TCP echo in db
    on_db, on_phy = Capture(DB_TAP, "ip"), Capture(Lab.PHY, "ip")
    t = traces("--verbose")
    # the lab's guest talks to db (ICMP both ways, UDP to a closed port: db answers with
    # ICMP errors, TCP echoed) while db pings the remote
    outs = in_parallel(
        (lab.vm, "ping -c 5 -i 0.2 -W 2 %s && vnl-traffic udp %s 6001 10 41001 && "
                 "vnl-traffic tcp %s 7001 3 41002" % (db_ip, db_ip, db_ip)),
        (dbvm, "ping -c 5 -i 0.2 -W 2 %s" % REMOTE))
    assert "5 packets received" in outs[0] and "exchanged 3" in outs[0], outs[0]
    t.stop()
    wire_db, wire_phy = on_db.stop().packets(DB_MAC), on_phy.stop().packets(DB_MAC)
    assert t.returncode == 0, t.stderr
    recs = t.packets()
    vm2vm = [r for r in recs if r["direction"] == "vm2vm"]
    # every packet between the two VMs, once, as tcpdump saw it on db's tap
    assert collections.Counter(as_seen_on(r, DB) for r in vm2vm) == \
        collections.Counter(between(wire_db, GUEST_IP, db_ip))
    protocols = collections.Counter(r["protocol"] for r in vm2vm)
    assert protocols["icmp"] >= 10 and protocols["udp"] == 10 and protocols["tcp"] >= 9, \
        protocols
    for r in vm2vm:
        sender = (GUEST, GUEST_TAP, GUEST_IP) if r["vm"] == GUEST else (DB, DB_TAP, db_ip)
        receiver = (DB, DB_TAP, db_ip) if r["vm"] == GUEST else (GUEST, GUEST_TAP, GUEST_IP)
        assert (r["vm"], r["vm_dev"], r["src_ip"]) == sender, r
        assert (r["peer_vm"], r["peer_vm_dev"], r["dst_ip"]) == receiver, r
        assert r["peer_vm_uuid"] == (DB_UUID if receiver[0] == DB else Lab.GUEST_UUID)
        assert r["phy_dev"] is None
        assert r["pid"] == (dbvm if receiver[0] == DB else lab.vm).qemu.pid  # its reader
        # from the sender's tap to the receiver's backend; the bridge has no tracepoint
        assert r["stages"] == ["tap_rx", "tap_queue", "tap_xmit", "vm_read"], r
        assert all(s["us"] >= 0 for s in r["segments"])
    # db's own traffic with the remote: TX and RX as before, and only that
    others = [r for r in recs if r["direction"] != "vm2vm"]
    assert collections.Counter(map(capture_key, others)) == collections.Counter(wire_phy)
    assert {(r["vm"], r["direction"]) for r in others} == {(DB, "tx"), (DB, "rx")}
    s = t.summary()
    assert (s["reported"], s["reported_vm2vm"]) == (len(recs), len(vm2vm))
    assert s["started"] == len(recs) and accounted(s) == s["started"], s


@pytest.mark.parametrize("select,expect_tx_rx,left", [
    # sends and receives only VM-to-VM here; the remote's replies to db entered at the
    # NIC (which VM a frame is for is known at its tap) and left the path at db's tap
    (("--vm", GUEST), 0, 3),
    (("--vm", DB), 3, 0),                   # db also pings the remote
    (("--direction", "vm2vm"), 0, 0),       # every VM, only VM to VM
])
def test_one_of_two_vms_selected_still_gets_every_packet_between_them(
        lab, db, traces, select, expect_tx_rx, left):
    dbvm, db_ip = db
    t = traces(*select)
    in_parallel((lab.vm, "ping -c 3 -i 0.2 -W 2 %s" % db_ip),
                (dbvm, "ping -c 3 -i 0.2 -W 2 %s && ping -c 3 -i 0.2 -W 2 %s"
                 % (GUEST_IP, REMOTE)))
    t.stop()
    assert t.returncode == 0, t.stderr
    got = collections.Counter((r["direction"], r["vm"], r["peer_vm"], r["icmp_type"])
                              for r in t.packets())
    # requests and replies of both pings between them, each named by sender -> receiver
    want = {("vm2vm", GUEST, DB, 8): 3, ("vm2vm", DB, GUEST, 0): 3,
            ("vm2vm", DB, GUEST, 8): 3, ("vm2vm", GUEST, DB, 0): 3}
    if expect_tx_rx:
        want.update({("tx", DB, None, 8): 3, ("rx", DB, None, 0): 3})
    assert got == want, got
    s = t.summary()
    assert s["started"] == 12 + 2 * expect_tx_rx + left and accounted(s) == s["started"], s
    assert s["left_path"] == left and s["reported"] == 12 + 2 * expect_tx_rx, s


def test_vm_to_vm_histograms_and_metrics_are_by_sender_and_receiver(lab, db, traces,
                                                                      tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    dbvm, db_ip = db
    prom = str(tmp_path / "vm_network_latency.prom")
    t = traces("--mode", "histogram", "--per-vm", "--interval", "60", "--direction", "vm2vm",
               "--prometheus-textfile", prom)
    lab.vm.guest_check("ping -c 4 -i 0.2 -W 2 %s" % db_ip)
    t.stop()
    assert t.returncode == 0, t.stderr
    totals = dict(((h["vm"], h["peer_vm"], tuple(h["vm_dev"]), tuple(h["peer_vm_dev"])),
                   h["count"]) for h in t.histograms() if h["segment"] == "total")
    assert totals == {(GUEST, DB, (GUEST_TAP,), (DB_TAP,)): 4,
                      (DB, GUEST, (DB_TAP,), (GUEST_TAP,)): 4}, totals
    assert {h["direction"] for h in t.histograms()} == {"vm2vm"}
    with open(prom) as f:
        fams = dict((m.name, m) for m in text_string_to_metric_families(f.read()))
    counts = collections.Counter()
    for sample in fams["vm_network_latency_seconds"].samples:
        if sample.name.endswith("_count") and sample.labels["segment"] == "total":
            counts[(sample.labels["direction"], sample.labels["vm"],
                    sample.labels["peer_vm"])] += sample.value
    assert counts == {("vm2vm", GUEST, DB): 4, ("vm2vm", DB, GUEST): 4}, counts


# ---------------------------------------------------------------------------
# A VM on a macvtap
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mvt(lab):
    vm, ip_addr = lab.add_macvtap_guest(0, MVT, MVT_UUID)
    yield vm, ip_addr
    lab.remove_guest(vm)


def rx_dropped(dev):
    with open("/sys/class/net/%s/statistics/rx_dropped" % dev) as f:
        return int(f.read())


def test_a_vm_on_a_macvtap_is_listed_by_name(lab, mvt):
    r = run_tool("--list-vms", "--output", "json")
    assert r.returncode == 0, r.stderr
    vms = dict((o["name"], o) for o in map(json.loads, r.stdout.splitlines()))
    assert (vms[MVT]["uuid"], vms[MVT]["pid"]) == (MVT_UUID, mvt[0].qemu.pid)
    assert vms[MVT]["taps"] == [{"dev": "vnlmvt0", "switch": "macvtap@" + Lab.MVT_PHY}]


def test_a_macvtap_vms_packets_both_ways_match_the_nic(lab, mvt, traces):
    vm, ip_addr = mvt
    sink = lab.start_udp_sink(5101, ns=Lab.MVT_NS)
    wire = Capture(Lab.MVT_PHY, "ip")
    t = traces("--vm", MVT, "--verbose")
    # only the VM's name: its macvtap, and the NIC under it, are found
    assert "VM devices: vnlmvt0;" in t.stderr and Lab.MVT_PHY in t.stderr, t.stderr
    out = vm.guest_check("ping -c 5 -i 0.2 -W 2 %s && vnl-traffic udp %s 5101 20 41101"
                         % (REMOTE, REMOTE))
    assert "5 packets received" in out
    # the remote sends to a closed port of the VM: it answers each with an ICMP error
    r = lab.remote_run(lab.host_traffic, "udp", ip_addr, 5102, 10, 41102, 20000,
                       ns=Lab.MVT_NS, check=True)
    assert r.stdout.strip() == "sent 10"
    assert sink.wait_count(20) == 20
    t.stop()
    packets = wire.stop().packets(MVT_MAC)
    assert t.returncode == 0, t.stderr
    recs = t.packets()
    assert collections.Counter(map(capture_key, recs)) == collections.Counter(packets)
    assert collections.Counter(r["direction"] for r in recs)["rx"] >= 15   # 5 + 10 UDP
    for r in recs:
        assert (r["vm"], r["vm_uuid"], r["vm_pid"], r["vm_dev"], r["phy_dev"]) == \
            (MVT, MVT_UUID, vm.qemu.pid, "vnlmvt0", Lab.MVT_PHY), r
        # this kernel has no kprobes: the frame's entry in the macvtap's ring is unseen
        want = ["mvt_queue", "mvt_xmit", "phy_queue", "phy_xmit"] if r["direction"] == "tx" \
            else ["phy_rx", "vm_read"]
        assert r["stages"] == want, r
        assert r["pid"] == vm.qemu.pid, r     # QEMU wrote (TX) or read (RX) the frame
    s = t.summary()
    assert s["started"] == len(recs) and accounted(s) == s["started"], s
    assert "note:" in t.stderr and "mvt_ring" in t.stderr, t.stderr


def test_a_full_macvtap_ring_is_counted_as_drops(lab, mvt, traces):
    """The VM stops reading (QEMU paused): the macvtap's ring fills and the kernel drops
    the rest; every frame the NIC received is reported or counted as dropped, as many as
    the macvtap's own drop counter says."""
    vm, ip_addr = mvt
    # a ring of 100: the sender's socket holds the frames waiting in the ring (its send
    # buffer, about 260 of them here), so a ring of 500 would never fill
    subprocess.run(["ip", "link", "set", "vnlmvt0", "txqueuelen", "100"], check=True)
    try:
        ring_overflow(lab, vm, ip_addr, traces)
    finally:
        subprocess.run(["ip", "link", "set", "vnlmvt0", "txqueuelen", "500"], check=True)


def ring_overflow(lab, vm, ip_addr, traces):
    t = traces("--vm", MVT, "--direction", "rx", "--protocol", "udp", "--dst-port", "5103",
               "--drops")
    with open("/sys/class/net/%s/statistics/rx_packets" % Lab.MVT_PHY) as f:
        nic_before = int(f.read())
    drops_before = rx_dropped("vnlmvt0")
    vm.qmp("stop")
    try:
        lab.remote_run(lab.host_traffic, "udp", ip_addr, 5103, 1500, 41103, 20,
                       ns=Lab.MVT_NS, check=True)
        time.sleep(0.5)
    finally:
        vm.qmp("cont")
    time.sleep(2)
    with open("/sys/class/net/%s/statistics/rx_packets" % Lab.MVT_PHY) as f:
        entered = int(f.read()) - nic_before
    kernel_drops = rx_dropped("vnlmvt0") - drops_before
    t.stop(settle=0)
    assert t.returncode == 0, t.stderr
    s = t.summary()
    assert entered >= 1500 and s["started"] == entered and accounted(s) == entered, s
    assert kernel_drops > 100 and s["dropped"] == kernel_drops, (kernel_drops, s)
    drops = [o for o in t.objects() if o["type"] == "drop"]
    assert len(drops) == s["dropped"]
    assert all(d["location"].startswith("tap_handle_frame") for d in drops), drops[:3]
    assert s["reported"] == entered - kernel_drops


# ---------------------------------------------------------------------------
# Two VMs on macvtaps of one NIC, bridge mode
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mvt2(lab, mvt):
    vm, ip_addr = lab.add_macvtap_guest(1, MVT2, MVT2_UUID)
    know_each_other(mvt[0], mvt[1], MVT_MAC, vm, ip_addr, MVT2_MAC)
    yield vm, ip_addr
    lab.remove_guest(vm)


def test_vm_to_vm_on_macvtaps_in_bridge_mode(lab, mvt, mvt2, traces):
    (a, a_ip), (b, b_ip) = mvt, mvt2
    b.guest_check("nc -l -p 7002 -e cat >/dev/null 2>&1 &")
    on_b = Capture("vnlmvt1", "ip")
    t = traces("--verbose")
    outs = in_parallel(
        (a, "ping -c 5 -i 0.2 -W 2 %s && vnl-traffic udp %s 6002 10 41201 && "
            "vnl-traffic tcp %s 7002 3 41202" % (b_ip, b_ip, b_ip)),
        (b, "ping -c 5 -i 0.2 -W 2 %s" % REMOTE))
    assert "5 packets received" in outs[0] and "exchanged 3" in outs[0], outs[0]
    t.stop()
    wire_b = on_b.stop().packets(MVT2_MAC)
    assert t.returncode == 0, t.stderr
    recs = t.packets()
    vm2vm = [r for r in recs if r["direction"] == "vm2vm"]
    assert collections.Counter(as_seen_on(r, MVT2) for r in vm2vm) == \
        collections.Counter(between(wire_b, a_ip, b_ip))
    for r in vm2vm:
        names = (r["vm"], r["vm_dev"], r["peer_vm"], r["peer_vm_dev"])
        assert names in ((MVT, "vnlmvt0", MVT2, "vnlmvt1"), (MVT2, "vnlmvt1", MVT, "vnlmvt0"))
        # the sender's macvtap, back through the NIC's receive (dev_forward_skb), the
        # receiver's backend
        assert r["stages"] == ["mvt_queue", "mvt_xmit", "phy_rx", "vm_read"], r
        assert r["pid"] == (b if r["peer_vm"] == MVT2 else a).qemu.pid, r     # its reader
    others = [r for r in recs if r["direction"] != "vm2vm"]
    assert collections.Counter((r["vm"], r["direction"]) for r in others) == \
        {(MVT2, "tx"): 5, (MVT2, "rx"): 5}
    s = t.summary()
    assert s["reported_vm2vm"] == len(vm2vm) and s["started"] == len(recs)
    assert accounted(s) == s["started"], s


@pytest.fixture
def vepa(mvt, mvt2):
    """Both macvtaps in VEPA mode for one test: frames between them go out through the
    NIC to the adjacent switch (the remote's bridge, hairpin on) and come back."""
    for dev in ("vnlmvt0", "vnlmvt1"):
        subprocess.run(["ip", "link", "set", dev, "type", "macvtap", "mode", "vepa"],
                       check=True)
    yield
    for dev in ("vnlmvt0", "vnlmvt1"):
        subprocess.run(["ip", "link", "set", dev, "type", "macvtap", "mode", "bridge"],
                       check=True)


def test_vepa_mode_vm_to_vm_is_a_tx_and_an_rx_record(lab, mvt, mvt2, vepa, traces):
    """In VEPA mode the frame leaves through the NIC and comes back from the switch in a
    new sk_buff: TX for the sender up to the NIC's driver, RX for the receiver from the
    NIC's receive, as the README says; never a VM2VM record."""
    (a, _a_ip), (b, b_ip) = mvt, mvt2
    wire = Capture(Lab.MVT_PHY, "icmp")
    t = traces("--protocol", "icmp")
    out = a.guest_check("ping -c 3 -i 0.2 -W 2 %s" % b_ip)
    assert "3 packets received" in out
    t.stop()
    frames = wire.stop().packets(MVT_MAC)
    assert t.returncode == 0, t.stderr
    got = collections.Counter((r["direction"], r["vm"], r["phy_dev"], r["icmp_type"])
                              for r in t.packets())
    assert got == {("tx", MVT, Lab.MVT_PHY, 8): 3, ("rx", MVT2, Lab.MVT_PHY, 8): 3,
                   ("tx", MVT2, Lab.MVT_PHY, 0): 3, ("rx", MVT, Lab.MVT_PHY, 0): 3}, got
    assert len(frames) == 12        # each frame out to the switch and back on the NIC
    s = t.summary()
    assert s["started"] == 12 and accounted(s) == 12, s
