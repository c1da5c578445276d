"""Decoding, reporting and the summary, without a kernel: synthetic records built from
the tool's own record declaration, fed to the same code the live tool runs, and
recordings replayed with --read-events as an unprivileged process."""
import io
import ipaddress
import json
import os
import struct
import subprocess

import pytest

from conftest import PYTHON, TOOL

# fixed wall clock: the monotonic stamps below are seconds 100.000..., the wall offset
# puts them at 2026-12-01 10:00:00 UTC
WALL = 1796119200.0 - 100.0


def raw(tool, **values):
    """A record as the kernel would send it: every field from RECORD_FIELDS, packed."""
    flat = list(tool.PKT.unpack(b"\0" * tool.PKT.size))
    ts = values.pop("ts", {})
    for stage, ns in ts.items():
        flat[tool.PKT_INDEX["ts"] + tool.STAGE_BY_NAME[stage].sid] = ns
        if ns:      # as the kernel marks the stages that saw it
            flat[tool.PKT_INDEX["seen"]] |= 1 << tool.STAGE_BY_NAME[stage].sid
    for name, v in values.items():
        flat[tool.PKT_INDEX[name]] = v
    return tool.PKT.pack(*flat)


def ip(text):
    """An address as the record holds it: 16 bytes, network order, IPv4 first."""
    packed = ipaddress.ip_address(text).packed
    return packed + b"\0" * (16 - len(packed))


def udp_tx(tool, **over):
    v = dict(ts={"tap_rx": 100000000000, "phy_queue": 100000012500,
                 "phy_xmit": 100000015500},
             saddr=ip("10.0.0.1"), daddr=ip("10.0.0.2"), sport=40001, dport=9000,
             proto=17, ip_version=4, dir=tool.DIR_TX, last=tool.STAGE_BY_NAME["phy_xmit"].sid,
             type=tool.EV_PACKET, vm_ifindex=7, phy_ifindex=3, pid=4242, tid=4243)
    v.update(over)
    return raw(tool, **v)


def icmp_rx(tool, **over):
    v = dict(ts={"phy_rx": 200000000000, "tap_queue": 200000001000,
                 "tap_xmit": 200000002000, "vm_read": 200000052000},
             saddr=ip("10.0.0.2"), daddr=ip("10.0.0.1"), sport=77, dport=3, icmp_type=0,
             proto=1, ip_version=4, dir=tool.DIR_RX, last=tool.STAGE_BY_NAME["vm_read"].sid,
             type=tool.EV_PACKET, vm_ifindex=7, phy_ifindex=3, pid=4242, tid=4244)
    v.update(over)
    return raw(tool, **v)


NAMES = {7: "vnet0", 3: "eth1"}


def new_run(tool, output="json", mode="detailed", drop_reasons=None, out=None):
    class Args(object):
        pass
    args = Args()
    args.mode = mode
    reporter = tool.Reporter(output, "all", out=out or io.StringIO())
    segments = tool.histogram_segments([])
    run = tool.Run(args, reporter, dict(NAMES), segments, drop_reasons is not None,
                   drop_reasons or {}, WALL)
    run.known["comm"][4242] = "qemu-system-x86"
    run.known["thread"][4243] = "CPU 0/KVM"
    run.known["thread"][4244] = "worker"
    return run


def test_record_declaration_matches_the_c_struct(tool):
    text = tool.record_c_struct()
    size = sum({"u64": 8, "u32": 4, "u16": 2, "u8": 1}[t] * n for _f, t, n, _w in tool.RECORD_FIELDS)
    assert tool.PKT.size == (size + 7) // 8 * 8
    for name, ctype, count, _what in tool.RECORD_FIELDS:
        assert "%s %s%s;" % (ctype, name, "[%d]" % count if count > 1 else "") in text
    # every field decodes from its own slot
    values = dict((n, i + 1) for i, (n, t, c, _w) in enumerate(tool.RECORD_FIELDS) if c == 1)
    values["saddr"], values["daddr"] = bytes(range(16)), bytes(range(16, 32))
    fields = tool.PKT.unpack(raw(tool, **values))
    assert all(fields[tool.PKT_INDEX[n]] == v for n, v in values.items())


def test_a_udp_tx_record(tool):
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)), NAMES, lambda pid: "qemu",
                             lambda pid, tid: "t%d" % tid, WALL)
    assert rec["type"] == "packet" and rec["direction"] == "tx" and rec["protocol"] == "udp"
    assert (rec["src_ip"], rec["src_port"], rec["dst_ip"], rec["dst_port"]) == \
        ("10.0.0.1", 40001, "10.0.0.2", 9000)
    assert rec["stages"] == ["tap_rx", "phy_queue", "phy_xmit"]
    assert rec["segments"] == [{"from": "tap_rx", "to": "phy_queue", "us": 12.5},
                               {"from": "phy_queue", "to": "phy_xmit", "us": 3.0}]
    assert rec["total_us"] == 15.5
    assert (rec["vm_dev"], rec["phy_dev"], rec["pid"], rec["comm"], rec["thread"]) == \
        ("vnet0", "eth1", 4242, "qemu", "t4243")
    assert rec["icmp_type"] is None and rec["icmp_id"] is None and rec["vlan"] is None
    # the packet ended 15.5 us after 10:00:00: to the nearest microsecond, half up
    assert rec["timestamp"] == 1796119200.000016


def test_an_icmp_echo_reply_record_with_a_vlan(tool):
    rec = tool.packet_record(tool.PKT.unpack(icmp_rx(tool, vlan=101)), NAMES,
                             lambda pid: "qemu", lambda pid, tid: "t", WALL)
    assert rec["direction"] == "rx" and rec["protocol"] == "icmp"
    assert (rec["icmp_type"], rec["icmp_id"], rec["icmp_seq"]) == (0, 77, 3)
    assert rec["src_port"] is None and rec["dst_port"] is None and rec["vlan"] == 100
    assert rec["stages"] == ["phy_rx", "tap_queue", "tap_xmit", "vm_read"]
    assert rec["total_us"] == 52.0


def test_text_output_of_a_packet(tool):
    out = io.StringIO()
    run = new_run(tool, output="text", out=out)
    run.on_event(udp_tx(tool))
    when = run.reporter.clock(WALL + 100.0000155)
    assert out.getvalue() == (
        "[%s] UDP 10.0.0.1:40001 -> 10.0.0.2:9000 TX vnet0 -> eth1\n"
        "  tap_rx->phy_queue: 12.50us | phy_queue->phy_xmit: 3.00us\n"
        "  Total Latency: 15.50us | PID: 4242 (qemu-system-x86)\n" % when)
    out.truncate(0)
    out.seek(0)
    run.on_event(icmp_rx(tool))
    assert out.getvalue().splitlines()[0].endswith(
        "ICMP 10.0.0.2 -> 10.0.0.1 id=77 seq=3 RX eth1 -> vnet0")


def reference_output(tool, run, raw_event):
    """What the reference path (packet_record, then the Reporter) prints for an event."""
    out = io.StringIO()
    reporter = tool.Reporter("json" if run.reporter.json else "text", "all", out=out)
    reporter._second, reporter._hms = None, ""
    reporter.packet(tool.packet_record(tool.PKT.unpack(raw_event), run.names,
                                       run.process_name, run.thread_name, WALL, run.vms))
    return out.getvalue()


def kinds_of_packets(tool):
    """Records of several kinds, each twice with different times (the second of a kind
    is printed from its template)."""
    v6 = dict(saddr=ip("fd00::1"), daddr=ip("fd00::2"), ip_version=6)
    tunnel = dict(tunnel=tool.TUNNEL_VXLAN, outer_version=4, vni=4242, tun_ifindex=9,
                  outer_saddr=ip("10.9.0.1"), outer_daddr=ip("10.9.0.2"))
    kinds = [
        udp_tx(tool), icmp_rx(tool), icmp_rx(tool, vlan=101), udp_tx(tool, **v6),
        icmp_rx(tool, proto=58, icmp_type=129, **v6), icmp_rx(tool, icmp_type=3),
        udp_tx(tool, **tunnel), udp_tx(tool, pid=0, tid=0),
        udp_tx(tool, ts={"tap_rx": 100000000000, "phy_xmit": 100000001234}),
        udp_tx(tool, vm_ifindex=11, tid=4245),      # names with "%" and the template mark
        udp_tx(tool, vm_ifindex=12, pid=4343, tid=4344),
    ]
    later = []
    for k in list(kinds):
        fields = list(tool.PKT.unpack(k))
        for i in range(tool.NSTAGES):
            if fields[i]:
                fields[i] += 7777777 * (i + 1)        # other times, same kind
        later.append(tool.PKT.pack(*fields))
    return kinds + later


@pytest.mark.parametrize("output", ["json", "text"])
def test_templated_output_equals_the_reference(tool, output):
    """Detailed mode prints the second packet of a kind from a template: the output
    must be the reference path's, byte for byte, for every kind of record."""
    out = io.StringIO()
    run = new_run(tool, output=output, out=out)
    run.names.update({11: "tap%d", 12: "tap\x01x", 9: "vxlan0"})
    run.known["thread"][4245] = "50% \x01 busy"
    run.known["comm"][4343] = "qemu %s"
    run.known["thread"][4344] = "w"
    for event in kinds_of_packets(tool):
        out.truncate(0)
        out.seek(0)
        run.on_event(event)
        assert out.getvalue() == reference_output(tool, run, event)
    assert run.reported["tx"] + run.reported["rx"] == len(kinds_of_packets(tool))
    assert len(run.formatter.kinds) >= 10         # the kinds were templated


class FakeRing(object):
    """A BPF ring buffer's pages as RingReader sees them, in memory: the producer page,
    then the data pages twice in a row (the kernel maps them so)."""
    SIZE = 1 << 14

    def __init__(self, tool, start):
        self.tool, self.page = tool, tool.mmap.PAGESIZE
        self.buf = bytearray(self.page + 2 * self.SIZE)
        self.consumed = tool.ctypes.c_uint64(start)
        self.pos = start

    def put(self, data, flags=0, length=None):
        """A record at the producer position (flags: BUSY, DISCARD); its position."""
        rec = struct.pack("<II", (len(data) if length is None else length) | flags, 0) + data
        rec += b"\0" * (-len(rec) % 8)
        at = self.pos & (self.SIZE - 1)
        for copy in (0, self.SIZE):
            end = min(at + copy + len(rec), 2 * self.SIZE)
            self.buf[self.page + at + copy:self.page + end] = rec[:end - at - copy]
        if at + len(rec) > self.SIZE:           # wraps: its tail at the start
            self.buf[self.page:self.page + at + len(rec) - self.SIZE] = \
                rec[self.SIZE - at:]
        was, self.pos = self.pos, self.pos + len(rec)
        struct.pack_into("<Q", self.buf, 0, self.pos)
        return was

    def set_flags(self, at, flags):
        for copy in (0, self.SIZE):
            struct.pack_into("<I", self.buf, self.page + (at & (self.SIZE - 1)) + copy,
                             self.tool.PKT.size | flags)


@pytest.mark.parametrize("output", ["json", "text"])
def test_the_ring_reader_prints_what_the_reference_prints(tool, output):
    """RingReader unpacks runs of events in one call and fills templates from their
    times: the output must be the reference path's, in order, across the ring's end,
    past a discarded record, and stopping at one still being written."""
    out = io.StringIO()
    run = new_run(tool, output=output, out=out)
    run.names.update({11: "tap%d", 12: "tap\x01x", 9: "vxlan0"})
    run.known["thread"][4245] = "50% \x01 busy"
    run.known["comm"][4343] = "qemu %s"
    run.known["thread"][4344] = "w"
    stride = tool.EVENT_TIMES.size
    ring = FakeRing(tool, start=FakeRing.SIZE - 5 * stride - 16)    # wraps at the 6th
    events = kinds_of_packets(tool) * 2
    want = []
    for i, event in enumerate(events):
        ring.put(event)
        want.append(reference_output(tool, run, event))
        if i == 3:
            ring.put(udp_tx(tool, dport=1), flags=tool.RingReader.DISCARD)
    busy = ring.put(icmp_rx(tool), flags=tool.RingReader.BUSY)
    fast = []

    def on_times(t):
        fast.append(run.on_times(t))
        return fast[-1]
    reader = tool.RingReader(ring.buf, ring.consumed, FakeRing.SIZE, run.on_record,
                             on_times, run.write_pending)
    reader.drain()
    assert out.getvalue() == "".join(want)
    assert ring.consumed.value == busy          # the record being written waits
    assert fast.count(True) >= len(events) // 2 - 1      # the second of each kind
    assert run.reported["tx"] + run.reported["rx"] == len(events)
    ring.set_flags(busy, 0)                     # submitted now
    reader.drain()
    assert out.getvalue() == "".join(want) + reference_output(tool, run, icmp_rx(tool))
    assert ring.consumed.value == ring.pos


def test_a_drop_record_names_reason_stage_and_place(tool):
    out = io.StringIO()
    run = new_run(tool, output="json", out=out, drop_reasons={64: "SKB_DROP_REASON_QDISC_DROP"})
    run.known["location"][0xffff1234] = "__dev_queue_xmit+0x5a"
    run.on_event(udp_tx(tool, type=tool.EV_DROP, reason=64, location=0xffff1234,
                        last=tool.STAGE_BY_NAME["phy_queue"].sid,
                        ts={"tap_rx": 100000000000, "phy_queue": 100000012500}))
    rec = json.loads(out.getvalue())
    assert (rec["type"], rec["last_stage"], rec["reason"], rec["location"]) == \
        ("drop", "phy_queue", "QDISC_DROP", "__dev_queue_xmit+0x5a")
    assert run.reported == {"tx": 0, "rx": 0}      # a drop is not a reported packet


def test_summary_accounts_for_every_packet(tool):
    run = new_run(tool)
    run.on_event(udp_tx(tool))
    run.on_event(icmp_rx(tool))
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0))
    stats.update(started=(4, 3), completed=(1, 1), dropped=(1, 0), left_path=(0, 1),
                 lost=(2, 0))
    waiting = udp_tx(tool, ts={"tap_rx": 299000000000}, last=0)
    upcalled = udp_tx(tool, ts={"tap_rx": 299500000000}, last=0, upcalled=1)
    run.counters = tool.RecordedCounters({
        "stats": [v for n in tool.STAT_NAMES for v in stats[n]],
        "fates": [[tool.FATE_LEFT, tool.DIR_RX, tool.STAGE_BY_NAME["phy_rx"].sid, 1],
                  [64, tool.DIR_TX, tool.STAGE_BY_NAME["phy_queue"].sid, 1]],
        "inflight": [waiting.hex(), upcalled.hex()], "upcalls_waiting": 1})
    run.perf_lost = 2     # the perf buffer's own tally of the same 2 losses: not added
    s = run.summary(300.0)
    assert (s["reported"], s["reported_tx"], s["reported_rx"]) == (2, 1, 1)
    assert (s["started"], s["completed"], s["dropped"], s["left_path"]) == (7, 2, 1, 1)
    # the upcalled original is counted by its copy waiting for ovs-vswitchd: once
    assert (s["in_flight"], s["in_upcall"], s["lost"]) == (2, 1, 2)
    assert [(f["fate"], f["direction"], f["last_stage"]) for f in s["fates"]] == \
        [("left_path", "rx", "phy_rx"), ("dropped", "tx", "phy_queue")]
    assert s["fates"][1]["reason"] == "unknown (kernel has no drop reasons)"
    ex = s["in_flight_examples"][0]
    assert (ex["last_stage"], ex["waiting_us"]) == ("tap_rx", 1000000.0)
    line = tool.summary_line(s)
    assert line.startswith("Summary: 2 packets reported (tx 1, rx 1); 0 below the latency "
                           "threshold; 1 dropped by the kernel; 1 left the traced path")


def test_histogram_intervals_report_what_each_added(tool):
    plans = [tool.Plan(st, "tracepoint", [("x", 0)], "") for st in tool.STAGES
             if st.name in ("tap_rx", "phy_queue", "phy_xmit")]
    segments = tool.histogram_segments(plans)
    assert segments[:3] == [("tx", "tap_rx->phy_queue"), ("tx", "tap_rx->phy_xmit"),
                            ("tx", "phy_queue->phy_xmit")]
    run = new_run(tool, mode="histogram")
    run.segments = segments
    run.hist_prev = [0] * tool.hist_slots(segments)
    total = segments.index(("tx", "total")) * tool.HIST_BUCKETS
    counts = list(run.hist_prev)
    counts[total + 40] = 3
    t1 = run.histograms(1.0, counts)
    counts[total + 40] = 5
    counts[total + 41] = 1
    t2 = run.histograms(2.0, counts)
    assert t1 == [("tx", "total", {40: 3})] and t2 == [("tx", "total", {40: 2, 41: 1})]
    assert run.hist_totals == {"tx": 6, "rx": 0}


# --- --read-events as a process, as nobody ---

def write_recording(tool, path, lines, final=True):
    meta = {"kind": "meta", "tool": "vm_network_latency", "version": tool.VERSION,
            "record": tool.PKT.format, "stages": tool.STAGE_NAMES, "plans": {},
            "segments": [], "mode": "detailed", "protocol": "all", "drops": False,
            "kfree_skb_reason": False, "drop_reasons": {}, "wall_offset": WALL}
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0))
    stats.update(started=(1, 0), completed=(1, 0))
    with open(path, "w") as f:
        for obj in [meta] + lines + ([{"kind": "final", "now": 200.0, "perf_lost": 0,
                                       "stats": [v for n in tool.STAT_NAMES
                                                 for v in stats[n]],
                                       "fates": [], "inflight": [],
                                       "upcalls_waiting": 0}] if final else []):
            f.write(json.dumps(obj) + "\n")
    os.chmod(path, 0o644)


def as_nobody(*argv):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           PYTHON, TOOL] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_read_events_replays_a_recording_without_root(tool, recording_dir):
    path = os.path.join(recording_dir, "run.vnl")
    write_recording(tool, path, [
        {"kind": "names", "names": {"7": "vnet0", "3": "eth1"}},
        {"kind": "comm", "key": 4242, "name": "qemu-system-x86"},
        {"kind": "thread", "key": 4243, "name": "CPU 0/KVM"},
        {"kind": "event", "raw": udp_tx(tool).hex()}])
    r = as_nobody("--read-events", path, "--output", "json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    objs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [o["type"] for o in objs] == ["packet", "summary"]
    assert (objs[0]["vm_dev"], objs[0]["comm"], objs[0]["thread"], objs[0]["total_us"]) == \
        ("vnet0", "qemu-system-x86", "CPU 0/KVM", 15.5)
    assert objs[1]["reported"] == objs[1]["started"] == 1


@pytest.mark.parametrize("content,message", [
    ("", "not a recording of this tool"),
    ('{"kind": "meta", "tool": "other"}\n', "not a recording of this tool"),
    ("garbage\n", "not a recording of this tool"),
])
def test_read_events_refuses_what_is_not_a_recording(recording_dir, content, message):
    path = os.path.join(recording_dir, "bad.vnl")
    with open(path, "w") as f:
        f.write(content)
    os.chmod(path, 0o644)
    r = as_nobody("--read-events", path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_read_events_says_when_a_recording_is_cut_short(tool, recording_dir):
    path = os.path.join(recording_dir, "cut.vnl")
    write_recording(tool, path, [{"kind": "event", "raw": udp_tx(tool).hex()}], final=False)
    r = as_nobody("--read-events", path, "--output", "json")
    assert r.returncode == 2 and "ends before the run did" in r.stderr
    assert "Traceback" not in r.stderr


# --- which VM owns a tap: the /proc parsing ---

@pytest.mark.parametrize("text,want", [
    ("guest=web-03,debug-threads=on", [("guest", "web-03"), ("debug-threads", "on")]),
    ("web-03", [(None, "web-03")]),
    ("web-03,process=qemu-web", [(None, "web-03"), ("process", "qemu-web")]),
    ("guest=a,,b,debug-threads=on", [("guest", "a,b"), ("debug-threads", "on")]),
    ("guest=x,,,,y", [("guest", "x,,y")]),
])
def test_qemu_option_syntax(tool, text, want):
    assert tool.qemu_opts(text) == want


@pytest.mark.parametrize("argv,want", [
    (["/usr/bin/qemu-system-x86_64", "-name", "guest=web-03,debug-threads=on", "-uuid",
      "0c0ffee0-0000-4000-8000-000000000003", "-m", "512"],
     ("web-03", "0c0ffee0-0000-4000-8000-000000000003")),
    (["qemu-kvm", "-id", "101", "-name", "pve-vm,debug-threads=on"], ("pve-vm", None)),
    (["qemu", "-name", "guest=tenant,,a,debug-threads=on"], ("tenant,a", None)),
    (["qemu-system-x86_64", "-m", "512"], (None, None)),
    (["qemu-system-x86_64", "-name"], (None, None)),        # a dangling option
    (["firecracker", "--api-sock", "/run/fc.sock"], (None, None)),
])
def test_vm_identity_from_the_command_line(tool, argv, want):
    assert tool.vm_identity(argv) == want


def test_records_and_text_carry_the_vm(tool):
    web = tool.VmInfo("web-03", "0c0ffee0", 4242, "qemu-system-x86")
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)), NAMES, lambda pid: "qemu",
                             lambda pid, tid: "t", WALL, {7: web})
    assert (rec["vm"], rec["vm_uuid"], rec["vm_pid"]) == ("web-03", "0c0ffee0", 4242)
    out = io.StringIO()
    run = new_run(tool, output="text", out=out)
    run.vms = {7: web}
    run.on_event(udp_tx(tool))
    assert out.getvalue().splitlines()[0].endswith(
        "UDP 10.0.0.1:40001 -> 10.0.0.2:9000 TX web-03 vnet0 -> eth1")
    # a tap whose owner is unknown: no VM, and nothing in its place
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)), NAMES, lambda pid: "qemu",
                             lambda pid, tid: "t", WALL, {})
    assert (rec["vm"], rec["vm_uuid"], rec["vm_pid"]) == (None, None, None)


def test_vm_labels(tool):
    assert tool.vm_label(tool.VmInfo("web-03", None, 1, "qemu"), "vnet0") == "web-03"
    assert tool.vm_label(tool.VmInfo(None, None, 77, "firecracker"), "vnet0") == \
        "firecracker[77]"
    assert tool.vm_label(None, "vnet0") == "vnet0"


def test_json_us_is_what_json_prints_for_the_same_nanoseconds(tool):
    """The formatter's integer path gives the digits json gives packet_record()'s float
    (round(ns / 1000.0, 3)) for every count of ns, also beyond its integer range."""
    import random
    rnd = random.Random(7)
    cases = list(range(0, 3001)) + [rnd.randrange(10 ** 12) for _ in range(100000)] + \
        [999999999999, 10 ** 12, 10 ** 15 + 1, -1, -1500]
    for ns in cases:
        assert tool.json_us(ns) == json.dumps(round(ns / 1000.0, 3)), ns


def test_timestamps_are_exact_to_the_microsecond_and_print_as_json_prints_them(tool):
    """The wall clock of a packet comes by integer arithmetic (a float of today's
    seconds since 1970 holds only about 0.24 us); its text is the one json prints for
    the float the record carries, so the template and the reference agree."""
    import random
    rnd = random.Random(11)
    base = 1796119200 * 10 ** 6
    cases = [base, base + 1, base + 10, base + 999999, base + 100000, base + 120] + \
        [base + rnd.randrange(10 ** 13) for _ in range(100000)]
    for us in cases:
        text = tool.timestamp_text(us)
        assert json.dumps(float(text)) == text, us
        assert round(float(text) * 1e6) == us, us
    wall = 1796119100.25
    assert tool.wall_us(wall, 100 * 10 ** 9 + 1499) == base + 250001   # 1.499 us
    assert tool.wall_us(wall, 100 * 10 ** 9 + 1500) == base + 250002   # 1.5: half up
