"""The real tool, the real kernel, a real QEMU VM on a tap: tap -> bridge -> veth -> namespace.

Every count is checked against an independent oracle: what the traffic generator
sent, what the remote sink received, or what tcpdump saw crossing the tap.
"""
import collections
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.harness.tool import PYTHON, TOOL
from tests.harness.lab import Lab
from tests.harness.tapwriter import TapWriter, ether, ipv4, udp
from tests.harness.tracing import Capture, exact_percentile, wait_qdisc_empty

pytestmark = pytest.mark.lab

TAP, PHY = Lab.TAP, Lab.PHY
VM, REMOTE = Lab.GUEST_IP, Lab.REMOTE_IP
DEVS = ("--vm-dev", TAP, "--phy-dev", PHY)
TX_STAGES = ["tap_rx", "phy_queue", "phy_xmit"]
RX_STAGES = ["phy_rx", "tap_queue", "tap_xmit", "vm_read"]


def guest_ok(lab, cmd, timeout=120):
    rc, out = lab.guest(cmd, timeout=timeout)
    assert rc == 0, "guest command failed: %s\n%s" % (cmd, out)
    return out


def check_record_shape(rec, lab):
    """What every packet record must hold, whatever the protocol."""
    stages = TX_STAGES if rec["direction"] == "tx" else RX_STAGES
    assert rec["stages"] == stages
    assert [(s["from"], s["to"]) for s in rec["segments"]] == list(zip(stages, stages[1:]))
    assert all(s["us"] > 0 for s in rec["segments"])
    assert abs(sum(s["us"] for s in rec["segments"]) - rec["total_us"]) < 0.01
    assert rec["vm_dev"] == TAP and rec["phy_dev"] == PHY
    # the process on the VM's side of the tap: QEMU writes TX frames, reads RX frames
    assert rec["pid"] == lab.qemu.pid
    assert rec["comm"] == "qemu-system-x86"


def test_ping_is_traced_both_ways_per_packet(lab, traces):
    t = traces(*DEVS)
    cap = Capture(TAP, "icmp")
    guest_ok(lab, "ping -c 5 -i 0.2 -W 2 %s" % REMOTE)
    t.stop()
    seen = cap.stop().packets(Lab.GUEST_MAC)
    assert t.returncode == 0, t.stderr
    tx = t.packets(direction="tx", protocol="icmp")
    rx = t.packets(direction="rx", protocol="icmp")
    assert len(tx) == 5 and len(rx) == 5
    assert len(seen) == 10
    assert sorted(r["icmp_seq"] for r in tx) == sorted(r["icmp_seq"] for r in rx) == \
        sorted(p[5] for p in seen if p[0] == "tx")
    assert {r["icmp_id"] for r in tx + rx} == {p[4] for p in seen}
    for r in tx:
        assert (r["src_ip"], r["dst_ip"], r["icmp_type"]) == (VM, REMOTE, 8)
        check_record_shape(r, lab)
    for r in rx:
        assert (r["src_ip"], r["dst_ip"], r["icmp_type"]) == (REMOTE, VM, 0)
        check_record_shape(r, lab)
    s = t.summary()
    assert s["reported"] == 10 and s["dropped"] == 0 and s["lost"] == 0
    assert s["in_flight"] == 0 and s["not_tracked"] == 0


# the event path of kernels without a BPF ring buffer (before 5.8), forced here
EVENT_BUFFERS = {"ring": (), "perf": ("--perf-buffer",)}
EVENT_BUFFER_SAID = {"ring": "events: BPF ring buffer", "perf": "events: perf buffer (forced)"}


@pytest.mark.parametrize("buffer", sorted(EVENT_BUFFERS))
def test_udp_burst_gives_one_record_per_datagram(lab, traces, buffer):
    sink = lab.start_udp_sink(9000)
    t = traces(*(DEVS + ("--protocol", "udp", "--verbose") + EVENT_BUFFERS[buffer]))
    assert EVENT_BUFFER_SAID[buffer] in t.stderr
    out = guest_ok(lab, "vnl-traffic udp %s 9000 200 40001" % REMOTE)
    assert out.strip() == "sent 200"
    assert sink.wait_count(200) == 200
    t.stop()
    sink.stop()
    tx = t.packets(direction="tx")
    assert len(tx) == 200 and len(t.packets()) == 200
    for r in tx:
        assert (r["src_port"], r["dst_port"], r["src_ip"], r["dst_ip"]) == (40001, 9000, VM, REMOTE)
        check_record_shape(r, lab)
    # one flow, 200 packets in flight together: each measured on its own
    assert len({r["timestamp"] for r in tx}) > 1
    s = t.summary()
    assert s["reported"] == s["started"] == 200
    assert s["dropped"] == s["left_path"] == s["in_flight"] == s["lost"] == 0


def test_tcp_exchange_counts_match_the_wire(lab, traces):
    echo = lab.start_tcp_echo(7000)
    t = traces(*(DEVS + ("--protocol", "tcp")))
    cap = Capture(TAP, "tcp port 7000")
    out = guest_ok(lab, "vnl-traffic tcp %s 7000 5 40002" % REMOTE)
    assert out.strip() == "exchanged 5"
    assert echo.wait_closed(1) == 1
    time.sleep(0.5)   # the last ACK/FIN
    t.stop()
    echo.stop()
    wire = cap.stop().packets(Lab.GUEST_MAC)
    tx, rx = t.packets(direction="tx"), t.packets(direction="rx")
    assert len(tx) == sum(1 for p in wire if p[0] == "tx")
    assert len(rx) == sum(1 for p in wire if p[0] == "rx")
    assert len(tx) >= 8 and len(rx) >= 8   # handshake, 5 requests and echoes, close
    for r in tx:
        assert (r["src_port"], r["dst_port"]) == (40002, 7000)
        check_record_shape(r, lab)
    for r in rx:
        assert (r["src_port"], r["dst_port"]) == (7000, 40002)
        check_record_shape(r, lab)


def _key(rec):
    return (rec["direction"], rec["protocol"])


def test_filters_select_exactly_the_matching_packets(lab, traces):
    """Several instances side by side, each with one filter, on the same mixed traffic."""
    sinks = [lab.start_udp_sink(9000), lab.start_udp_sink(9001)]
    echo = lab.start_tcp_echo(7001)
    filters = {
        "icmp": (("--protocol", "icmp"), lambda p: p[1] == "icmp"),
        "udp_dport": (("--protocol", "udp", "--dst-port", "9001"),
                      lambda p: p[1] == "udp" and p[5] == 9001),
        "src_ip": (("--src-ip", REMOTE), lambda p: p[2] == REMOTE),
        "dst_ip_tcp": (("--dst-ip", REMOTE, "--protocol", "tcp"),
                       lambda p: p[3] == REMOTE and p[1] == "tcp"),
        "sport": (("--src-port", "40001"), lambda p: p[1] != "icmp" and p[4] == 40001),
        "rx_only": (("--direction", "rx"), lambda p: p[0] == "rx"),
        "tx_only": (("--direction", "tx", "--protocol", "udp"),
                    lambda p: p[0] == "tx" and p[1] == "udp"),
    }
    runs = dict((name, traces(*(DEVS + args))) for name, (args, _f) in filters.items())
    everything = traces()               # no filter, default devices
    slow_only = traces(*(DEVS + ("--latency-threshold", "5000000")))
    cap = Capture(TAP, "ip")
    guest_ok(lab, "ping -c 3 -i 0.2 -W 2 %s" % REMOTE)
    guest_ok(lab, "vnl-traffic udp %s 9000 30 40001" % REMOTE)
    guest_ok(lab, "vnl-traffic udp %s 9001 20 40003" % REMOTE)
    guest_ok(lab, "vnl-traffic tcp %s 7001 3 40004" % REMOTE)
    assert sinks[0].wait_count(30) == 30 and sinks[1].wait_count(20) == 20
    echo.wait_closed(1)
    time.sleep(0.5)
    for t in list(runs.values()) + [everything, slow_only]:
        t.stop(settle=0)
    wire = [p for p in cap.stop().packets(Lab.GUEST_MAC) if p[0] != "?"]
    for s in sinks + [echo]:
        s.stop()
    for name, (_args, keep) in filters.items():
        expected = collections.Counter((p[0], p[1]) for p in wire if keep(p))
        got = collections.Counter(_key(r) for r in runs[name].packets())
        assert got == expected, name
        assert sum(expected.values()) > 0, name
    # no filter, no devices named: every tap is a VM port, the bridge's uplink the NIC
    got = everything.packets()
    assert collections.Counter(_key(r) for r in got) == \
        collections.Counter((p[0], p[1]) for p in wire)
    assert {(r["vm_dev"], r["phy_dev"]) for r in got} == {(TAP, PHY)}
    # a 5 s threshold: nothing here is that slow, and every packet is accounted for
    s = slow_only.summary()
    assert slow_only.packets() == []
    assert s["below_threshold"] == s["started"] == len(wire)


def test_text_output_follows_the_readme(lab, traces):
    t = traces(*DEVS, output="text")
    guest_ok(lab, "ping -c 2 -i 0.2 -W 2 %s" % REMOTE)
    t.stop()
    lines = t.stdout.splitlines()
    heads = [l for l in lines if l.startswith("[") and " ICMP " in l]
    assert len(heads) == 4
    # the VM's name, then the devices, as the README shows
    assert sum(1 for l in heads if l.endswith("TX %s %s -> %s" % (Lab.GUEST_NAME, TAP, PHY))) == 2
    assert sum(1 for l in heads if l.endswith("RX %s %s -> %s" % (Lab.GUEST_NAME, PHY, TAP))) == 2
    totals = [l for l in lines if l.strip().startswith("Total Latency:")]
    assert len(totals) == 4
    assert all("PID: %d (qemu-system-x86)" % lab.qemu.pid in l for l in totals)
    assert any(l.strip().startswith("tap_rx->phy_queue:") for l in lines)
    assert lines[-1].startswith("Summary: 4 packets reported (tx 2, rx 2)")


def test_histogram_counts_and_percentiles_match_exact_values(lab, traces):
    # a token bucket on the NIC spreads the packets over 0-100 ms: far above the
    # microsecond by which two tracers on the same tracepoints see each packet apart
    subprocess.run(["tc", "qdisc", "replace", "dev", PHY, "root", "tbf", "rate", "10mbit",
                    "burst", "1500", "limit", "200000"], check=True)
    sink = lab.start_udp_sink(9002)
    try:
        args = DEVS + ("--protocol", "udp", "--mode", "histogram")
        per_second = traces(*(args + ("--interval", "1")))
        one_table = traces(*(args + ("--interval", "600")))   # all packets in the last table
        exact = traces(*(DEVS + ("--protocol", "udp")))
        guest_ok(lab, "vnl-traffic udp %s 9002 100 40005 0 1208" % REMOTE)
        time.sleep(1.5)   # the next bursts fall in later intervals
        guest_ok(lab, "vnl-traffic udp %s 9002 100 40005 0 1208" % REMOTE)
        guest_ok(lab, "vnl-traffic udp %s 9002 100 40005 500 1208" % REMOTE)
        assert sink.wait_count(300) == 300
        assert wait_qdisc_empty(PHY) == 0
        time.sleep(1.5)   # at least one interval boundary after the traffic
        for t in (per_second, one_table, exact):
            t.stop(settle=0)
    finally:
        sink.stop()
        subprocess.run(["tc", "qdisc", "del", "dev", PHY, "root"], stderr=subprocess.DEVNULL)
    tables = per_second.histograms()
    assert len({h["timestamp"] for h in tables}) >= 2   # reported per interval
    by_segment = collections.defaultdict(list)
    for h in tables:
        assert h["direction"] == "tx"
        by_segment[h["segment"]].append(h)
    assert set(by_segment) == {"tap_rx->phy_queue", "phy_queue->phy_xmit", "total"}
    # Every packet is accounted for, and the histograms hold exactly the reported ones.
    # Rarely (seen about once in ten runs, with tbf), the kernel does not deliver
    # net_dev_start_xmit to BPF for a packet the sink did receive: an independent bpftrace
    # program missed the same events. The tool then reports the packet as still in flight
    # after phy_queue, which is what it saw (or, once the namespace's UDP freed it, as
    # having left the path after phy_queue; or, once its sk_buff carried the next packet
    # while the record still waited, as vanished: the UDP sink frees without a tracepoint);
    # allow at most 3% of those. (Seen with this and the previous in-flight table alike:
    # up to 7 of 300 in about one run in five; in one full run 1 in flight, 4 vanished.)
    s = per_second.summary()
    reported = s["reported"]
    unseen_xmit = s["in_flight"] + s["vanished"] + sum(
        f["count"] for f in s["fates"] if f["fate"] == "left_path" and
        f["last_stage"] == "phy_queue")
    counts = dict((k, s[k]) for k in ("started", "reported", "completed", "in_flight",
                                      "vanished", "dropped", "left_path", "not_tracked",
                                      "lost"))
    # in a full run, a few of the 300 were not even seen entering (the same events the
    # kernel did not deliver): what the tool started, it accounts for exactly
    assert reported + unseen_xmit == s["started"] and s["started"] >= 291, (counts, s)
    assert unseen_xmit <= 9, (counts, s)
    assert all(p["last_stage"] == "phy_queue" for p in s["in_flight_examples"]), s
    assert s["dropped"] == s["not_tracked"] == s["lost"] == 0, s
    for segment, rows in by_segment.items():
        assert sum(h["count"] for h in rows) == reported, segment
        assert sum(b["count"] for h in rows for b in h["buckets"]) == reported
    # the same packets, measured exactly by the detailed instance beside it
    values = [r["total_us"] for r in exact.packets()]
    assert 291 <= len(values) <= 300 and max(values) > 50000
    total = [h for h in one_table.histograms() if h["segment"] == "total"]
    assert len(total) == 1 and total[0]["count"] == one_table.summary()["reported"] >= 291
    for f, key in ((0.5, "p50_us"), (0.9, "p90_us"), (0.99, "p99_us")):
        want = exact_percentile(values, f)
        assert abs(total[0][key] - want) <= 0.10 * want, (key, total[0][key], want)


def test_namespace_devices_with_colliding_ifindex_are_not_ours(lab, traces):
    """A device in the remote namespace has the ifindex of the host's tap: it is not ours."""
    with open("/sys/class/net/%s/ifindex" % TAP) as f:
        tap_index = int(f.read())
    subprocess.run(["ip", "-n", Lab.NS, "link", "add", "vnlx0", "index", str(tap_index),
                    "type", "veth", "peer", "name", "vnlx1"], check=True)
    try:
        subprocess.run(["ip", "-n", Lab.NS, "link", "set", "vnlx0", "up"], check=True)
        subprocess.run(["ip", "-n", Lab.NS, "link", "set", "vnlx1", "up"], check=True)
        # traffic inside the namespace on the device whose ifindex is the tap's
        t = traces(*DEVS)
        subprocess.run(["ip", "netns", "exec", Lab.NS, "ping", "-c", "3", "-i", "0.2",
                        "-I", "vnlx0", "-W", "1", "169.254.9.9"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        guest_ok(lab, "ping -c 2 -i 0.2 -W 2 %s" % REMOTE)
        t.stop()
    finally:
        subprocess.run(["ip", "-n", Lab.NS, "link", "del", "vnlx0"], check=False)
    s = t.summary()
    assert len(t.packets()) == 4 and s["started"] == 4 and s["left_path"] == 0


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "timeout"])
def test_every_stop_detaches_and_summarises(lab, traces, how):
    if how == "timeout":
        t = traces(*(DEVS + ("--timeout", "3")))
        guest_ok(lab, "ping -c 1 -W 2 %s" % REMOTE)
        t.wait()
    else:
        t = traces(*DEVS)
        guest_ok(lab, "ping -c 1 -W 2 %s" % REMOTE)
        t.stop(getattr(signal, how))
    assert t.returncode == 0, t.stderr
    assert "Traceback" not in t.stderr
    assert t.summary()["reported"] == 2
    assert t.prog_ids and t.leftover_programs() == []


def test_a_sighup_ignored_at_start_stays_ignored(lab, traces):
    """nohup's run goes on at logout: the SIGHUP it ignores, the tool ignores too."""
    t = traces(*DEVS, pre=["nohup"])
    t.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert t.proc.poll() is None, t.stderr
    guest_ok(lab, "ping -c 2 -i 0.2 -W 2 %s" % REMOTE)
    t.stop(signal.SIGINT)
    assert t.returncode == 0 and t.summary()["reported"] == 4


def test_a_background_job_of_a_script_still_stops_on_sigint(lab, traces):
    """A script's `tool &` starts with SIGINT ignored (no job control: the shell guards
    its background jobs from the terminal's Ctrl-C); `kill -INT` must still stop it with
    its summary, as the kernel matrix's lane stops it."""
    t = traces(*DEVS, pre=["sh", "-c", 'trap "" INT; exec "$0" "$@"'])
    guest_ok(lab, "ping -c 2 -i 0.2 -W 2 %s" % REMOTE)
    t.stop(signal.SIGINT, timeout=20)
    assert t.returncode == 0 and t.summary()["reported"] == 4, t.stderr


def test_a_named_tap_recreated_while_tracing_is_followed(lab, traces):
    """--vm-dev names a tap; the VM restarts, its tap is made again (a new ifindex):
    the tool follows the new one."""
    stand_in, mac, ip = "vnltap1", "52:54:00:77:00:09", "10.77.0.9"
    frame = ether(Lab.REMOTE_MAC, mac, 0x0800, ipv4(ip, REMOTE, 17, udp(40530, 9530, b"x")))
    with TapWriter(stand_in, Lab.BRIDGE) as writer:
        t = traces("--vm-dev", stand_in, "--phy-dev", PHY, "--direction", "tx")
        subprocess.run(["bridge", "fdb", "replace", mac, "dev", stand_in, "master",
                        "static"], check=True)
        for _ in range(3):
            writer.write(frame)
    with TapWriter(stand_in, Lab.BRIDGE) as writer:
        subprocess.run(["bridge", "fdb", "replace", mac, "dev", stand_in, "master",
                        "static"], check=True)
        time.sleep(1.5)             # the tool's device refresh (1 s)
        for _ in range(4):
            writer.write(frame)
        t.stop()
    assert len(t.packets(vm_dev=stand_in)) == 7, t.stderr


def test_a_full_disk_cuts_the_recording_not_the_run(lab, traces, tmp_path):
    """The recording's file system fills up: one warning, tracing goes on to its
    summary, and the recording replays what it holds, marked as cut short."""
    mnt = str(tmp_path / "small")
    os.mkdir(mnt)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mnt], check=True)
    try:
        rec = os.path.join(mnt, "run.vnl")
        sink = lab.start_udp_sink(9110)
        t = traces(*(DEVS + ("--protocol", "udp", "--write-events", rec)), output="text")
        guest_ok(lab, "vnl-traffic udp %s 9110 1000 40012" % REMOTE)
        assert sink.wait_count(1000) == 1000
        sink.stop()
        t.stop()
        assert t.returncode == 0, t.stderr
        warnings = [l for l in t.stderr.splitlines() if "--write-events" in l]
        assert len(warnings) == 1 and "No space left on device" in warnings[0], t.stderr
        assert "Summary: 1000 packets reported" in t.stdout
        replay = subprocess.run([PYTHON, TOOL, "--read-events", rec],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, timeout=60)
    finally:
        subprocess.run(["umount", mnt], check=False)
    assert replay.returncode == 0, replay.stderr
    assert "cut short after line" in replay.stderr and "No space left" in replay.stderr
    replayed = replay.stdout.splitlines()
    assert 0 < len(replayed) < len(t.stdout.splitlines())
    assert replayed == t.stdout.splitlines()[:len(replayed)]      # what it has, exact


def test_verbose_says_what_is_attached_and_where_layouts_come_from(lab, traces):
    t = traces(*(DEVS + ("--verbose",)))
    t.stop(settle=0)
    err = t.stderr
    assert "struct layouts from BTF: " in err and "SKB_HEAD=" in err
    # auto: BTF-typed tracepoints where the kernel loads them, raw ones elsewhere; the
    # VM's read wants only the skb's address, which a raw tracepoint has for free
    assert re.search(r"^attached (tp_btf|tracepoint) net:netif_receive_skb -> tap_rx, phy_rx",
                     err, re.M)
    assert "attached tracepoint skb:skb_copy_datagram_iovec -> vm_read" in err
    assert "VM devices: %s; physical devices: %s" % (TAP, PHY) in err
    # host_rcv needs kprobes: attached where the kernel has them, else said why not
    assert "note: stage host_rcv not traced" in err or "-> host_rcv" in err


def test_typed_and_raw_tracepoints_see_the_same_packets_the_same_way(lab, traces):
    """--attach tp_btf (plain loads of sk_buff fields) and --attach tracepoint (probe
    reads) side by side on the same traffic: the same packets, the same stages, the same
    latencies but for the other instance's own run time at each stage."""
    probe = subprocess.run([PYTHON, TOOL, "--list-stages", "--attach", "tp_btf"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
    if probe.returncode == 2 and "--attach tp_btf: " in probe.stderr:
        pytest.skip(probe.stderr.strip())     # a kernel that refuses them: said so
    assert probe.returncode == 0, probe.stderr
    sink = lab.start_udp_sink(9002)
    typed = traces(*(DEVS + ("--attach", "tp_btf", "--verbose")))
    raw = traces(*(DEVS + ("--attach", "tracepoint", "--verbose")))
    assert "10 packets received" in guest_ok(lab, "ping -c 10 -i 0.1 -W 2 %s" % REMOTE)
    assert guest_ok(lab, "vnl-traffic udp %s 9002 100 40011" % REMOTE).strip() == "sent 100"
    assert sink.wait_count(100) == 100
    raw.stop()
    typed.stop()
    sink.stop()
    assert typed.returncode == 0 and raw.returncode == 0, typed.stderr + raw.stderr
    assert "attached tp_btf net:netif_receive_skb -> tap_rx, phy_rx" in typed.stderr
    assert "attached tp_btf net:net_dev_start_xmit -> " in typed.stderr
    assert "attached tracepoint net:netif_receive_skb -> tap_rx, phy_rx" in raw.stderr

    def by_packet(t):
        # a flow's packets in the order they came (the datagrams of one 5-tuple carry
        # nothing else to tell them apart): each instance stamps the same tracepoint
        # a fraction of a microsecond after the other, far less than packets are apart
        flows = collections.defaultdict(list)
        for r in t.packets():
            flows[(r["direction"], r["protocol"], r.get("icmp_seq"), r.get("src_port"))] \
                .append(r)
        return dict((k, sorted(v, key=lambda r: r["timestamp"])) for k, v in flows.items())
    a, b = by_packet(typed), by_packet(raw)
    # the echo requests and replies ping counted, the datagrams the sink received
    assert sum(len(v) for v in a.values()) == 10 + 10 + 100
    assert dict((k, len(v)) for k, v in a.items()) == dict((k, len(v)) for k, v in b.items())
    diffs = []
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert x["stages"] == y["stages"], k
            check_record_shape(x, lab)
            diffs.append(abs(x["total_us"] - y["total_us"]))
    # each instance's stamp follows the other's program at some tracepoints: measured
    # median 0.3-0.5 us, 90th percentile 1-1.5 us (before the ring buffer's wake-ups
    # were batched, the first instance's wake-up put 8-25 us on 30-60% of packets)
    diffs.sort()
    median, p90 = diffs[len(diffs) // 2], diffs[len(diffs) * 9 // 10]
    assert median <= 3.0 and p90 <= 10.0, "the methods disagree: |difference| median " \
        "%.1f us, 90th percentile %.1f us" % (median, p90)
    for t in (typed, raw):
        s = t.summary()
        assert s["reported"] == 120 and s["not_tracked"] == s["lost"] == 0


# ---------------------------------------------------------------------------
# Record and replay: --write-events while tracing, --read-events offline
# ---------------------------------------------------------------------------

def _as_nobody(*argv):
    """The tool as an unprivileged user: the replay needs neither root nor BPF."""
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "/usr/bin/python3", TOOL] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


@pytest.mark.parametrize("mode,output", [("detailed", "json"), ("detailed", "text"),
                                         ("histogram", "text"), ("histogram", "json")])
def test_read_events_reproduces_the_run_exactly(lab, traces, recording_dir, mode, output,
                                                tool):
    rec = os.path.join(recording_dir, "run.vnl")
    sink = lab.start_udp_sink(9100)
    t = traces(*(DEVS + ("--mode", mode, "--interval", "1", "--write-events", rec, "--drops")),
               output=output)
    guest_ok(lab, "ping -c 4 -i 0.2 -W 2 %s" % REMOTE)
    guest_ok(lab, "vnl-traffic udp %s 9100 50 40011" % REMOTE)
    assert sink.wait_count(50) == 50
    time.sleep(1.2)       # at least one histogram interval with packets in it
    t.stop()
    sink.stop()
    assert t.returncode == 0, t.stderr
    live = t.stdout
    assert "Summary" in live or '"type": "summary"' in live
    if mode == "detailed":
        # the kernel marks each stage that saw a packet in `seen`, and the reader keys
        # its templates on it: the bits are exactly the stages with a time
        raw = [json.loads(l)["raw"] for l in open(rec) if '"kind": "event"' in l]
        assert len(raw) >= 4 * 2 + 50
        for event in raw:
            f = tool.PKT.unpack(bytes(bytearray.fromhex(event)))
            assert f[tool.F.seen] == sum(1 << s for s in range(tool.NSTAGES) if f[s]), f
    os.chmod(rec, 0o644)
    replay = _as_nobody("--read-events", rec, "--output", output)
    assert replay.returncode == 0 and replay.stderr == "", replay.stderr
    assert replay.stdout == live
    # and in the other output format, the same run
    other = "json" if output == "text" else "text"
    again = _as_nobody("--read-events", rec, "--output", other)
    assert again.returncode == 0, again.stderr
    if other == "json":
        s = [json.loads(l) for l in again.stdout.splitlines() if l.strip()][-1]
        assert s["type"] == "summary" and s["reported"] == 4 * 2 + 50


def test_sample_traces_one_packet_in_n_and_says_so(lab, traces):
    """--sample 10 over 2,000 datagrams of one flow: about 200 are traced (binomial:
    sd 13.4; the bound is 5 sd), each one completely, and the outputs say they are
    sampled."""
    sink = lab.start_udp_sink(9700)
    t = traces(*(DEVS + ("--protocol", "udp", "--dst-port", "9700", "--sample", "10")))
    h = traces(*(DEVS + ("--protocol", "udp", "--dst-port", "9700", "--sample", "10",
                         "--mode", "histogram", "--interval", "60")), output="text")
    out = guest_ok(lab, "vnl-traffic udp %s 9700 2000 40701 100" % REMOTE)
    assert out.strip() == "sent 2000"
    assert sink.wait_count(2000, timeout=30) == 2000
    t.stop()
    h.stop()
    sink.stop()
    s = t.summary()
    assert 200 - 70 <= s["reported"] <= 200 + 70, s["reported"]
    assert s["reported"] == s["started"] == len(t.packets()) and s["sample"] == 10
    assert all(r["stages"] == TX_STAGES for r in t.packets())
    assert "(sampled: 1 in 10)" in h.stdout and "sampled: one packet in 10" in h.stdout
