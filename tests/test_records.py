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

from tests.harness.tool import PYTHON, TOOL

pytestmark = pytest.mark.offline

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
             proto=17, ip_version=4, dir=tool.Dir.TX, last=tool.STAGE_BY_NAME["phy_xmit"].sid,
             type=tool.Ev.PACKET, vm_ifindex=7, phy_ifindex=3, pid=4242, tid=4243)
    v.update(over)
    return raw(tool, **v)


def icmp_rx(tool, **over):
    v = dict(ts={"phy_rx": 200000000000, "tap_queue": 200000001000,
                 "tap_xmit": 200000002000, "vm_read": 200000052000},
             saddr=ip("10.0.0.2"), daddr=ip("10.0.0.1"), sport=77, dport=3, icmp_type=0,
             proto=1, ip_version=4, dir=tool.Dir.RX, last=tool.STAGE_BY_NAME["vm_read"].sid,
             type=tool.Ev.PACKET, vm_ifindex=7, phy_ifindex=3, pid=4242, tid=4244)
    v.update(over)
    return raw(tool, **v)


NAMES = {7: "vnet0", 3: "eth1"}


class Book(object):
    """A NameBook's face to packet_record(): fixed names for every process."""

    def __init__(self, devices=None, vms=None, comm="qemu", thread=lambda tid: "t"):
        self.devices, self.vms, self.uplinks = devices or NAMES, vms or {}, {}
        self.comm, self.thread = comm, thread

    def process_name(self, pid):
        return self.comm

    def thread_name(self, pid, tid):
        return self.thread(tid)


def new_run(tool, output="json", mode="detailed", drop_reasons=None, out=None, segments=None):
    settings = tool.RunSettings(mode, False, 1, False, False)
    reporter = tool.Reporter(output, "all", out=out or io.StringIO())
    book = tool.NameBook(live=False)
    book.devices.update(NAMES)
    book.known["comm"][4242] = "qemu-system-x86"
    book.known["thread"][4243] = "CPU 0/KVM"
    book.known["thread"][4244] = "worker"
    return tool.Run(settings, reporter, segments or tool.TracePlan([]).segments,
                    drop_reasons is not None, drop_reasons or {}, WALL, book)


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
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)),
                             Book(thread=lambda tid: "t%d" % tid), WALL)
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
    rec = tool.packet_record(tool.PKT.unpack(icmp_rx(tool, vlan=101)), Book(), WALL)
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
    reporter.packet(tool.packet_record(tool.PKT.unpack(raw_event), run.book, WALL))
    return out.getvalue()


def kinds_of_packets(tool):
    """Records of several kinds, each twice with different times (the second of a kind
    is printed from its template)."""
    v6 = dict(saddr=ip("fd00::1"), daddr=ip("fd00::2"), ip_version=6)
    tunnel = dict(tunnel=tool.Tunnel.VXLAN, outer_version=4, vni=4242, tun_ifindex=9,
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
    run.book.devices.update({11: "tap%d", 12: "tap\x01x", 9: "vxlan0"})
    run.book.known["thread"][4245] = "50% \x01 busy"
    run.book.known["comm"][4343] = "qemu %s"
    run.book.known["thread"][4344] = "w"
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
    run.book.devices.update({11: "tap%d", 12: "tap\x01x", 9: "vxlan0"})
    run.book.known["thread"][4245] = "50% \x01 busy"
    run.book.known["comm"][4343] = "qemu %s"
    run.book.known["thread"][4344] = "w"
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
    run.book.known["location"][0xffff1234] = "__dev_queue_xmit+0x5a"
    run.on_event(udp_tx(tool, type=tool.Ev.DROP, reason=64, location=0xffff1234,
                        last=tool.STAGE_BY_NAME["phy_queue"].sid,
                        ts={"tap_rx": 100000000000, "phy_queue": 100000012500}))
    rec = json.loads(out.getvalue())
    assert (rec["type"], rec["last_stage"], rec["reason"], rec["location"]) == \
        ("drop", "phy_queue", "QDISC_DROP", "__dev_queue_xmit+0x5a")
    assert run.reported == {"tx": 0, "rx": 0, "vm2vm": 0}   # a drop is not reported


def test_summary_accounts_for_every_packet(tool):
    run = new_run(tool)
    run.on_event(udp_tx(tool))
    run.on_event(icmp_rx(tool))
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0, 0))
    stats.update(started=(4, 3, 0), completed=(1, 1, 0), dropped=(1, 0, 0),
                 left_path=(0, 1, 0), lost=(2, 0, 0))
    tap_rx = tool.STAGE_BY_NAME["tap_rx"].sid
    waiting = udp_tx(tool, ts={"tap_rx": 299000000000}, last=tap_rx)
    upcalled = udp_tx(tool, ts={"tap_rx": 299500000000}, last=tap_rx, upcalled=1)
    run.counters = tool.RecordedCounters({
        "stats": [v for n in tool.STAT_NAMES for v in stats[n]],
        "fates": [[tool.C.FATE_LEFT, tool.Dir.RX, tool.STAGE_BY_NAME["phy_rx"].sid, 1],
                  [64, tool.Dir.TX, tool.STAGE_BY_NAME["phy_queue"].sid, 1]],
        "inflight": [waiting, upcalled], "inflight_count": 2, "inflight_upcalled": 1,
        "upcalls_waiting": 1})
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
    assert line.startswith("Summary: 2 packets reported (tx 1, rx 1); 0 below the "
                           "latency threshold; 1 dropped by the kernel; 1 left the traced path")


def test_histogram_intervals_report_what_each_added(tool):
    plans = [tool.Plan(st, "tracepoint", [("x", 0)], "") for st in tool.STAGES
             if st.name in ("tap_rx", "phy_queue", "phy_xmit")]
    segments = tool.TracePlan(plans).segments
    assert segments[:3] == [("tx", "tap_rx->phy_queue"), ("tx", "tap_rx->phy_xmit"),
                            ("tx", "phy_queue->phy_xmit")]
    run = new_run(tool, mode="histogram", segments=segments)
    total = segments.index(("tx", "total")) * tool.C.HIST_BUCKETS
    counts = [0] * tool.hist_slots(segments)
    counts[total + 40] = 3
    t1 = run.histograms(1.0, counts)
    counts[total + 40] = 5
    counts[total + 41] = 1
    t2 = run.histograms(2.0, counts)
    assert t1 == [("tx", "total", {40: 3})] and t2 == [("tx", "total", {40: 2, 41: 1})]
    assert run.hist_totals == {"tx": 6, "rx": 0, "vm2vm": 0}


# --- --read-events as a process, as nobody ---

def recording_meta(tool, **over):
    meta = {"kind": "meta", "tool": "vm_network_latency", "version": tool.VERSION,
            "format": tool.RECORDING_FORMAT, "record": tool.PKT.format,
            "stages": tool.STAGE_NAMES, "plans": {}, "segments": [], "mode": "detailed",
            "protocol": "all", "drops": False, "per_vm": False, "sample": 1,
            "kfree_skb_reason": False, "drop_reasons": {}, "wall_offset": WALL,
            "explain": None,
            "host": {"hostname": "hv-01", "boot_id": "b", "kernel": "6.1", "machine": "x"}}
    meta.update(over)
    return meta


def recording_final(tool, **over):
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0, 0))
    stats.update(started=(1, 0, 0), completed=(1, 0, 0))
    final = {"kind": "final", "now": 200.0, "perf_lost": 0,
             "stats": [v for n in tool.STAT_NAMES for v in stats[n]], "fates": [],
             "inflight": [], "inflight_count": 0, "inflight_upcalled": 0,
             "upcalls_waiting": 0}
    final.update(over)
    return final


def write_recording(tool, path, lines, final=True, meta=None):
    with open(path, "w") as f:
        for obj in [meta or recording_meta(tool)] + lines + \
                ([recording_final(tool)] if final else []):
            f.write(obj if isinstance(obj, str) else json.dumps(obj) + "\n")
    os.chmod(path, 0o644)


def as_nobody(*argv):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           PYTHON, TOOL] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_read_events_replays_a_recording_without_root(tool, recording_dir):
    path = os.path.join(recording_dir, "run.vnl")
    write_recording(tool, path, [
        {"kind": "names", "names": {"7": "vnet0", "3": "eth1"}, "uplinks": {}},
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
    ("", "an empty file, not a recording of this tool"),
    ('{"kind": "meta", "tool": "other"}\n', "line 1: not a recording of this tool"),
    ("garbage\n", "line 1: not JSON"),
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
    assert r.returncode == 2 and "ends at line 2, before the run did" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


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
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)), Book(vms={7: web}), WALL)
    assert (rec["vm"], rec["vm_uuid"], rec["vm_pid"]) == ("web-03", "0c0ffee0", 4242)
    out = io.StringIO()
    run = new_run(tool, output="text", out=out)
    run.book.vms = {7: web}
    run.on_event(udp_tx(tool))
    assert out.getvalue().splitlines()[0].endswith(
        "UDP 10.0.0.1:40001 -> 10.0.0.2:9000 TX web-03 vnet0 -> eth1")
    # a tap whose owner is unknown: no VM, and nothing in its place
    rec = tool.packet_record(tool.PKT.unpack(udp_tx(tool)), Book(), WALL)
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


# --- recordings are input from outside: every malformed one is one line, exit 2 ---

def valid_lines(tool):
    """The lines of a small recording of every kind, after its meta."""
    return [{"kind": "names", "names": {"7": "vnet0", "3": "eth1"}, "uplinks": {}},
            {"kind": "vms", "vms": {"7": ["web-03", None, 4242, "qemu-system-x86"]}},
            {"kind": "comm", "key": 4242, "name": "qemu-system-x86"},
            {"kind": "thread", "key": 4243, "name": "CPU 0/KVM"},
            {"kind": "thread", "key": 4244, "name": "worker"},
            {"kind": "event", "raw": udp_tx(tool).hex()},
            {"kind": "event", "raw": icmp_rx(tool).hex()}]


def run_main(tool, argv):
    """The tool's main() in this process (fast, for many files): (status, out, err)."""
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = tool.main(argv)
    return status, out.getvalue(), err.getvalue()


def replace_in(obj, key, value):
    obj = dict(obj)
    obj[key] = value
    return obj


def malformed(tool):
    """(what, meta, lines after it, message expected), the issue's list and more."""
    meta = recording_meta(tool)
    lines = valid_lines(tool)
    event = lines[5]
    ev = dict(raw=lambda **kw: {"kind": "event", "raw": udp_tx(tool, **kw).hex()})
    hist_meta = recording_meta(tool, mode="histogram", segments=[["tx", "total"],
                                                                 ["rx", "total"]])
    cases = [
        ("a JSON list", meta, ["[1, 2]\n"], "line 2: not a JSON object"),
        ("no kind", meta, [{"names": {}}], "line 2: an object without 'kind'"),
        ("an unknown kind", meta, [{"kind": "telemetry"}], "line 2: unknown kind"),
        ("a 50-byte record", meta, [{"kind": "event", "raw": "00" * 50}],
         "line 2: the event has 50 bytes, a record has %d" % tool.PKT.size),
        ("direction 9", meta, [ev["raw"](dir=9)], "direction 9 is not tx (0), rx (1) or "
                                                  "vm2vm (2)"),
        ("stage 200", meta, [ev["raw"](last=200)], "stage 200 does not exist"),
        ("a time of 2^64-1 ns", meta, [ev["raw"](ts={"tap_rx": 100, "phy_xmit": 2 ** 64 - 1})],
         "is beyond any uptime"),
        ("times out of path order", meta,
         [ev["raw"](ts={"tap_rx": 500, "phy_queue": 400, "phy_xmit": 600})],
         "stage times out of path order"),
        ("a stage of the other direction", meta,
         [ev["raw"](ts={"tap_rx": 100, "phy_xmit": 200, "vm_read": 300})],
         "a stage off the tx path has a time"),
        ("no start stage", meta, [ev["raw"](ts={"phy_queue": 100, "phy_xmit": 200})],
         "no time where the tx path starts"),
        ("IP version 5", meta, [ev["raw"](ip_version=5)], "IP version 5"),
        ("type 7", meta, [ev["raw"](type=7)], "type 7 is neither"),
        ("a histogram index of 99,999,999", hist_meta,
         [{"kind": "hist", "when": 1.0, "last": False, "counts": {"99999999": 1}}],
         "a histogram index 99999999 is outside"),
        ("histogram counts going backwards", hist_meta,
         [{"kind": "hist", "when": 1.0, "last": False, "counts": {"5": 3}},
          {"kind": "hist", "when": 2.0, "last": False, "counts": {"5": 2}}],
         "line 3: histogram counts go backwards"),
        ("a negative count", hist_meta,
         [{"kind": "hist", "when": 1.0, "last": False, "counts": {"5": -1}}],
         "a count -1 is outside"),
        ("a non-numeric per-VM key", recording_meta(tool, mode="histogram", per_vm=True,
                                                    segments=[["tx", "total"]]),
         [{"kind": "vmhist", "when": 1.0, "last": False, "counts": {"vnet0:0:3": 1}}],
         "a per-VM ifindex 'vnet0' is not a whole number"),
        ("a per-VM key without a slot", recording_meta(tool, mode="histogram", per_vm=True,
                                                       segments=[["tx", "total"]]),
         [{"kind": "vmhist", "when": 1.0, "last": False, "counts": {"7:3": 1}}],
         "is not TAP:PEER:SLOT"),
        ("names given as a list", meta, [{"kind": "names", "names": ["vnet0"]}],
         "names is not an object"),
        ("an ifindex that is not a number", meta,
         [{"kind": "names", "names": {"x7": "vnet0"}}], "an ifindex 'x7' is not"),
        ("a device name that is a number", meta, [{"kind": "names", "names": {"7": 7}}],
         "a device name is not a string"),
        ("raw as a number", meta, [{"kind": "event", "raw": 12}], "the event is not a string"),
        ("bad hex", meta, [{"kind": "event", "raw": "zz" * tool.PKT.size}],
         "the event is not hexadecimal"),
        ("short stats", meta, [event, recording_final(tool, stats=[1, 2, 3])],
         "stats has 3 items, not %d" % tool.C.NSTATS),
        ("a fate at stage 200", meta, [recording_final(tool, fates=[[0, 0, 200, 1]])],
         "a stage 200 is outside"),
        ("more in flight listed than counted", meta,
         [recording_final(tool, inflight=[udp_tx(tool).hex()], inflight_count=0)],
         "more packets in flight listed than counted"),
        ("meta without mode", dict((k, v) for k, v in meta.items() if k != "mode"), [],
         "line 1: meta without 'mode'"),
        ("mode 'fast'", replace_in(meta, "mode", "fast"), [], "line 1: mode 'fast'"),
        ("wall_offset 1e300", replace_in(meta, "wall_offset", 1e300), [],
         "line 1: wall_offset 1e+300 is outside"),
        ("wall_offset NaN", replace_in(meta, "wall_offset", float("nan")), [],
         "line 1: wall_offset is not a number: NaN"),
        ("sample true", replace_in(meta, "sample", True), [],
         "line 1: sample is not a whole number: true"),
        ("an older format", replace_in(meta, "format", 1), [],
         "line 1: recorded by version %s in format 1" % tool.VERSION),
        ("deeply nested JSON", meta, ["[" * 100000 + "]" * 100000 + "\n"],
         "line 2: JSON nested too deeply"),
        ("not UTF-8", meta, [b"\xff\xfe{}\n".decode("latin-1")], "line 2: not"),
        ("NaN as a count", hist_meta, ['{"kind": "hist", "when": 1, "last": false, '
                                       '"counts": {"5": NaN}}\n'], "a count is not a whole"),
        ("an event after the final counters", meta, [recording_final(tool), event],
         "line 3: event after the recording's end"),
        ("a line cut in the middle", meta, ['{"kind": "names", "nam'],
         "line 2: not JSON"),
    ]
    return cases


@pytest.mark.parametrize("case", range(36))
def test_malformed_recordings_are_one_line_and_exit_2(tool, tmp_path, case):
    cases = malformed(tool)
    assert len(cases) == 36
    what, meta, lines, message = cases[case]
    path = str(tmp_path / "bad.vnl")
    with open(path, "w", encoding="latin-1") as f:
        for obj in [meta] + lines:
            f.write(obj if isinstance(obj, str) else json.dumps(obj) + "\n")
    for output in ("text", "json"):
        status, _out, err = run_main(tool, ["--read-events", path, "--output", output])
        assert status == 2, (what, err)
        assert len(err.splitlines()) == 1 and message in err, (what, err)
        assert err.startswith("vm_network_latency.py: error: --read-events %s: " % path)


def test_files_that_are_not_recordings_at_all(tool, tmp_path):
    for path, message in [("/dev/zero", "not a regular file"), (str(tmp_path), "Is a "
                          "directory"), (str(tmp_path / "none"), "No such file")]:
        status, out, err = run_main(tool, ["--read-events", path])
        assert status == 2 and out == "" and message in err and len(err.splitlines()) == 1


def test_a_line_beyond_the_longest_a_run_writes_is_refused(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "RECORDING_LINE_MAX", 1000)
    path = str(tmp_path / "long.vnl")
    write_recording(tool, path, [{"kind": "comm", "key": 1, "name": "x" * 2000}])
    status, _out, err = run_main(tool, ["--read-events", path])
    assert status == 2 and "line 2: longer than 1000 bytes" in err


def test_a_valid_recording_of_every_kind_replays(tool, tmp_path):
    """The base the malformed cases and the fuzzing start from is itself accepted."""
    path = str(tmp_path / "ok.vnl")
    write_recording(tool, path, valid_lines(tool))
    status, out, err = run_main(tool, ["--read-events", path, "--output", "json"])
    assert (status, err) == (0, "")
    objs = [json.loads(l) for l in out.splitlines()]
    assert [o["type"] for o in objs] == ["packet", "packet", "summary"]
    assert objs[0]["vm"] == "web-03" and objs[1]["thread"] == "worker"


def test_replay_names_come_from_the_recording_not_this_machine(tool, tmp_path):
    """A pid the recording names is some other process here (this test's own): the
    replay must print the recorded name, and '?' where the recording has none."""
    me = os.getpid()
    lines = [{"kind": "names", "names": {"7": "vnet0", "3": "eth1"}, "uplinks": {}},
             {"kind": "comm", "key": me, "name": "qemu-system-x86"},
             {"kind": "thread", "key": me + 1, "name": "IO iothread1"},
             {"kind": "event", "raw": udp_tx(tool, pid=me, tid=me + 1).hex()},
             {"kind": "event", "raw": udp_tx(tool, pid=1, tid=1).hex()}]
    path = str(tmp_path / "names.vnl")
    write_recording(tool, path, lines)
    status, out, _err = run_main(tool, ["--read-events", path, "--output", "json"])
    recs = [json.loads(l) for l in out.splitlines()][:2]
    assert status == 0
    assert (recs[0]["comm"], recs[0]["thread"]) == ("qemu-system-x86", "IO iothread1")
    assert (recs[1]["comm"], recs[1]["thread"]) == ("?", "?")     # pid 1 is init here


def test_a_recording_cut_short_by_a_full_disk_replays_what_it_has(tool, tmp_path):
    path = str(tmp_path / "cut.vnl")
    # the mark overwrites the line the recorder keeps in reserve, after the meta
    write_recording(tool, path, [{"kind": "truncated", "why": "No space left on device",
                                  "after_line": 9}] + valid_lines(tool), final=False)
    status, out, err = run_main(tool, ["--read-events", path, "--output", "json"])
    assert status == 0 and [json.loads(l)["type"] for l in out.splitlines()] == \
        ["packet", "packet"]
    assert len(err.splitlines()) == 1 and "cut short after line 9 (No space left on " \
        "device)" in err and "no summary" in err
    for lines, after, why in [
            (valid_lines(tool) + [recording_final(tool)], 10,
             "line 10: final counters in a recording that was cut short"),
            (valid_lines(tool) + [{"kind": "comm", "key": 9, "name": "x"}] * 3, 9,
             "line 10: comm after the line where the recording was cut short")]:
        write_recording(tool, path, [{"kind": "truncated", "why": "disk full",
                                      "after_line": after}] + lines, final=False)
        status, out, err = run_main(tool, ["--read-events", path])
        assert status == 2 and why in err, err


def test_replay_into_a_closed_pipe_ends_quietly(tool, recording_dir):
    path = os.path.join(recording_dir, "many.vnl")
    write_recording(tool, path, valid_lines(tool)[:5] + [
        {"kind": "event", "raw": udp_tx(tool, sport=40000 + i % 2).hex()}
        for i in range(20000)])
    r = subprocess.run("%s %s --read-events %s | head -1" % (PYTHON, TOOL, path),
                       shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert r.stdout.startswith("[") and len(r.stdout.splitlines()) == 1
    assert r.stderr == "", r.stderr


# --- fuzzing: no recording, however broken, ends in a traceback ---

JSON_VALUES = None


def json_values():
    from hypothesis import strategies as st
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=20), st.sampled_from(["7", "7:3", "-1", "tx", "rx",
                                                              "total", "ff" * 8]))
    return st.recursive(leaves, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), c,
                                                                    max_size=4)),
                        max_leaves=12)


def fuzz_base(tool):
    meta = recording_meta(tool, mode="histogram", per_vm=True,
                          segments=[["tx", "tap_rx->phy_xmit"], ["tx", "total"],
                                    ["rx", "total"]], drops=True, kfree_skb_reason=True,
                          drop_reasons={"2": "SKB_DROP_REASON_NOT_SPECIFIED"})
    return [meta] + valid_lines(tool) + [
        {"kind": "location", "key": 18446744072000000000, "name": "kfree_skb+0x1"},
        {"kind": "hist", "when": 1.5, "last": False, "counts": {"5": 1, "800": 2}},
        {"kind": "vmhist", "when": 1.5, "last": False, "counts": {"7:0:5": 1, "0:0:800": 2}},
        {"kind": "prune", "taps": [7]},
        recording_final(tool, fates=[[2, 0, 8, 1], [0xffffffff, 1, 1, 2]],
                        inflight=[udp_tx(tool).hex()], inflight_count=3,
                        inflight_upcalled=1)]


def test_fuzzed_recordings_never_end_in_a_traceback(tool, tmp_path):
    from hypothesis import given, settings, HealthCheck, strategies as st

    base = fuzz_base(tool)
    path = str(tmp_path / "fuzz.vnl")
    status, _o, err = run_main(tool, ["--read-events", _write(path, base)])
    assert status == 0, err

    def mutate(draw_lines, data):
        lines = [dict(o) for o in base]
        op = data.draw(st.sampled_from(["value", "value", "value", "drop key", "line",
                                        "bytes", "cut", "swap", "event field",
                                        "event field"]))
        i = data.draw(st.integers(0, len(lines) - 1))
        if op == "value" or op == "drop key":
            key = data.draw(st.sampled_from(sorted(lines[i])))
            if op == "value":
                lines[i][key] = data.draw(json_values())
            else:
                del lines[i][key]
        elif op == "line":
            lines[i] = json.dumps(data.draw(json_values())) + "\n"
        elif op == "bytes":
            lines[i] = data.draw(st.binary(max_size=60)).decode("latin-1") + "\n"
        elif op == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "event field":
            name = data.draw(st.sampled_from([f[0] for f in tool.RECORD_FIELDS]))
            flat = list(tool.PKT.unpack(udp_tx(tool)))
            at = tool.PKT_INDEX[name]
            if isinstance(flat[at], bytes):
                flat[at] = data.draw(st.binary(min_size=16, max_size=16))
            else:
                bits = {"u64": 64, "u32": 32, "u16": 16, "u8": 8}[
                    [f[1] for f in tool.RECORD_FIELDS if f[0] == name][0]]
                flat[at] = data.draw(st.integers(0, 2 ** bits - 1))
            lines[6] = {"kind": "event", "raw": tool.PKT.pack(*flat).hex()}
        text = "".join(o if isinstance(o, str) else json.dumps(o) + "\n" for o in lines)
        if op == "cut":
            text = text[:data.draw(st.integers(0, len(text)))]
        return text

    @settings(max_examples=1500, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        with open(path, "w", encoding="latin-1") as f:
            f.write(mutate(None, data))
        for output in ("text", "json"):
            status, _out, err = run_main(tool, ["--read-events", path, "--output", output])
            assert status in (0, 2), err
            if status == 2:
                assert len(err.splitlines()) == 1, err
    fuzz()


def _write(path, objs):
    with open(path, "w") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")
    return path


# --- names reach the terminal escaped ---

HOSTILE = "\x1b]0;pwned\x07web\x1b[2J\rforged\u202e" + "x" * 80


def terminal_safe(text):
    """No character a terminal acts on, but the newlines between lines."""
    return all(c == "\n" or c.isprintable() for c in text)


def test_printable_escapes_what_a_terminal_would_act_on(tool):
    assert tool.printable("web-03") == "web-03"
    assert tool.printable("\x1b[2J\r\x07\x7f\x9b\u202e\t") == \
        "\\x1b[2J\\x0d\\x07\\x7f\\x9b\\u202e\\x09"
    assert tool.printable("é ü 中") == "é ü 中"
    assert tool.printable("x" * 100, 64) == "x" * 61 + "..."


def test_hostile_names_are_escaped_in_every_text_path(tool):
    out = io.StringIO()
    run = new_run(tool, output="text", out=out, mode="histogram",
                  drop_reasons={64: HOSTILE})
    run.book.devices.update({7: "vnet\x1b[1m", 3: "eth\r1"})
    run.book.vms = {7: tool.VmInfo(HOSTILE, None, 4242, "q\x1b]2;t\x07")}
    run.book.known["comm"][4242] = HOSTILE
    run.book.known["location"][0xffffffff81000000] = "kfree_skb\x1b[31m+0x1"
    run.settings = run.settings._replace(mode="detailed")
    run.on_event(udp_tx(tool))
    run.on_event(udp_tx(tool, sport=1))             # the templated path as well
    run.on_event(udp_tx(tool, type=tool.Ev.DROP, reason=64, location=0xffffffff81000000,
                        ts={"tap_rx": 100000000000, "phy_queue": 100000012500}))
    run.reporter.histograms(1.0, [("tx", "total", {40: 1})], tool.VmTables(
        tool.vm_label(run.book.vms[7], "vnet0"), HOSTILE, ["vnet\x1b[1m"], None, None, []))
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0, 0))
    run.counters = tool.RecordedCounters({
        "stats": [v for n in tool.STAT_NAMES for v in stats[n]], "fates": [[64, 0, 7, 1]],
        "inflight": [], "inflight_count": 0, "inflight_upcalled": 0, "upcalls_waiting": 0})
    run.per_vm_reported = {7: 2, 8: 1}
    run.book.devices[8] = "tap\x1b8"
    run.reporter.summary(run.summary(300.0))
    text = out.getvalue()
    assert terminal_safe(text), [l for l in text.splitlines() if not terminal_safe(l)]
    assert "\\x1b]0;pwned\\x07web\\x1b[2J\\x0dforged\\u202e" in text
    assert "at kfree_skb\\x1b[31m+0x1" in text
    assert "x" * 80 not in text and "..." in text      # long names are cut
    assert text.count("\n") == len(text.splitlines())  # no line was forged
    # JSON carries the names whole: its escapes are safe for a terminal already
    out = io.StringIO()
    run = new_run(tool, output="json", out=out)
    run.book.vms = {7: tool.VmInfo(HOSTILE, None, 4242, "qemu")}
    run.on_event(udp_tx(tool))
    line = out.getvalue()
    assert terminal_safe(line) and json.loads(line)["vm"] == HOSTILE


def test_list_vms_escapes_names(tool):
    out = io.StringIO()
    tool.list_vms_report({"vnet0": tool.VmInfo(HOSTILE, "u\x1bu", 7, "c\rc")}, False,
                         tool.Reporter("text", "all", out=out))
    assert terminal_safe(out.getvalue()) and "\\x1b]0;pwned" in out.getvalue()


def icmp_vm2vm(tool, **over):
    v = dict(ts={"tap_rx": 300000000000, "tap_queue": 300000004000,
                 "tap_xmit": 300000005000, "vm_read": 300000025000},
             saddr=ip("10.0.0.1"), daddr=ip("10.0.0.5"), sport=9, dport=1, icmp_type=8,
             proto=1, ip_version=4, dir=tool.Dir.VM2VM, last=tool.STAGE_BY_NAME["vm_read"].sid,
             type=tool.Ev.PACKET, vm_ifindex=7, peer_ifindex=8, pid=4242, tid=4243)
    v.update(over)
    return raw(tool, **v)


def test_a_vm_to_vm_record_names_sender_and_receiver(tool):
    web = tool.VmInfo("web-03", "0c0ffee0", 4242, "qemu-system-x86")
    db = tool.VmInfo("db-05", "0d0ffee0", 4343, "qemu-system-x86")
    book = Book(devices={7: "vnet0", 8: "vnet5", 3: "eth1"}, vms={7: web, 8: db})
    rec = tool.packet_record(tool.PKT.unpack(icmp_vm2vm(tool)), book, WALL)
    assert (rec["direction"], rec["vm"], rec["vm_dev"], rec["peer_vm"], rec["peer_vm_dev"],
            rec["peer_vm_uuid"], rec["peer_vm_pid"], rec["phy_dev"]) == \
        ("vm2vm", "web-03", "vnet0", "db-05", "vnet5", "0d0ffee0", 4343, None)
    assert rec["stages"] == ["tap_rx", "tap_queue", "tap_xmit", "vm_read"]
    assert [s["us"] for s in rec["segments"]] == [4.0, 1.0, 20.0] and rec["total_us"] == 25.0
    out = io.StringIO()
    run = new_run(tool, output="text", out=out)
    run.book.devices.update({8: "vnet5"})
    run.book.vms = {7: web, 8: db}
    run.on_event(icmp_vm2vm(tool))
    assert out.getvalue().splitlines()[0].endswith(
        "ICMP 10.0.0.1 -> 10.0.0.5 id=9 seq=1 VM2VM web-03 vnet0 -> db-05 vnet5")
    assert run.reported == {"tx": 0, "rx": 0, "vm2vm": 1}
    # a receiver whose owner is unknown: its device alone
    rec = tool.packet_record(tool.PKT.unpack(icmp_vm2vm(tool)),
                             Book(devices={7: "vnet0", 8: "vnet5"}, vms={7: web}), WALL)
    assert (rec["peer_vm"], rec["peer_vm_dev"]) == (None, "vnet5")


def test_the_summary_line_names_vm_to_vm_packets_only_when_there_were_some(tool):
    run = new_run(tool)
    run.on_event(udp_tx(tool))
    run.on_event(icmp_vm2vm(tool))
    stats = dict.fromkeys(tool.STAT_NAMES, (0, 0, 0))
    stats.update(started=(1, 0, 1), completed=(1, 0, 1))
    run.counters = tool.RecordedCounters({
        "stats": [v for n in tool.STAT_NAMES for v in stats[n]], "fates": [],
        "inflight": [], "inflight_count": 0, "inflight_upcalled": 0, "upcalls_waiting": 0})
    s = run.summary(400.0)
    assert (s["reported"], s["reported_tx"], s["reported_rx"], s["reported_vm2vm"]) == \
        (2, 1, 0, 1)
    assert tool.summary_line(s).startswith("Summary: 2 packets reported (tx 1, rx 0, vm2vm 1);")


def test_a_record_names_the_nic_and_the_bond_and_vlan_above_it(tool):
    book = Book(devices={7: "vnet0", 3: "eth1"})
    book.uplinks = {3: ["bond0.100", "bond0"]}
    rec = tool.packet_record(tool.PKT.unpack(icmp_rx(tool, vlan=101)), book, WALL)
    assert (rec["phy_dev"], rec["uplink"], rec["vlan"]) == ("eth1", ["bond0.100", "bond0"], 100)
    out = io.StringIO()
    run = new_run(tool, output="text", out=out)
    run.book.uplinks = {3: ["bond0.100", "bond0"]}
    run.on_event(icmp_rx(tool))
    assert out.getvalue().splitlines()[0].endswith("RX eth1 (bond0.100/bond0) -> vnet0")


# ---------------------------------------------------------------------------
# --explain: an event's explanation, decoded and reported
# ---------------------------------------------------------------------------

def explanation(tool, ns=None, **over):
    """An event's --explain tail as the kernel writes it (EXPLAIN_FIELDS)."""
    flat = list(tool.EXPL.unpack(b"\0" * tool.EXPL.size))
    for cause, value in (ns or {}).items():
        flat[tool.X.x_ns + tool.EXPLAIN_CAUSES.index(cause)] = value
    for name, value in over.items():
        flat[getattr(tool.X, name)] = value
    return tool.EXPL.pack(*flat)


def slow_read(tool):
    """An RX packet whose frame waited 4.8 ms in the tap for the VM's reader."""
    return icmp_rx(tool, ts={"phy_rx": 200000000000, "tap_queue": 200000001000,
                             "tap_xmit": 200000002000, "vm_read": 200004802000})


def explain_run(tool, output, mode="detailed"):
    out = io.StringIO()
    settings = tool.RunSettings(mode, False, 1, False, False, 100.0)
    run = tool.Run(settings, tool.Reporter(output, "all", out=out), tool.TracePlan([]).segments,
                   False, {}, WALL, tool.NameBook(live=False))
    run.book.devices.update(NAMES)
    run.book.known["comm"][4242] = "qemu-system-x86"
    run.book.known["thread"][4244] = "IO mon_iothread"
    return run, out


def test_an_explained_wait_names_the_run_queue_its_cpu_and_the_task_ahead(tool):
    why = explanation(tool, {"run_queue": 4600000, "running": 200000}, x_tid=4244,
                      x_behind=2231, x_behind_comm=b"stress-ng", x_cpu=1,
                      x_from=tool.STAGE_BY_NAME["tap_xmit"].sid,
                      x_to=tool.STAGE_BY_NAME["vm_read"].sid, x_flags=tool.XF.FOLLOWED)
    run, out = explain_run(tool, "text")
    run.on_event(slow_read(tool) + why)
    lines = out.getvalue().splitlines()
    assert lines[3] == "  why: tap_xmit->vm_read 4800.00us = run-queue 4600.00us on CPU 1 " \
                       "behind stress-ng[2231] + running 200.00us", lines
    run, out = explain_run(tool, "json")
    run.on_event(slow_read(tool) + why)
    rec = json.loads(out.getvalue())
    assert rec["explain"] == {
        "segment": "tap_xmit->vm_read", "in_irq": False, "tid": 4244,
        "thread": "IO mon_iothread", "followed": True, "partial": False, "cpu": 1,
        "behind": {"pid": 2231, "comm": "stress-ng"},
        "us": {"asleep": 0.0, "stopped": 0.0, "run_queue": 4600.0, "running": 200.0,
               "irq": 0.0, "unknown": 0.0, "queue": 0.0}}
    # a packet with no segment long enough to explain: explain is null
    run, out = explain_run(tool, "json")
    run.on_event(icmp_rx(tool) +
                 explanation(tool))
    assert json.loads(out.getvalue())["explain"] is None


def test_a_qdisc_hold_is_the_queue_and_an_interrupt_names_no_thread(tool):
    """phy_queue->phy_xmit dequeued by a softirq on a timer (the thread it cut into did
    not end the segment): the time nobody was scheduled for is the queue's."""
    tx = udp_tx(tool, ts={"tap_rx": 100000000000, "phy_queue": 100000012500,
                          "phy_xmit": 100030012500})
    why = explanation(tool, {"unknown": 30000000}, x_tid=4243,
                      x_from=tool.STAGE_BY_NAME["phy_queue"].sid,
                      x_to=tool.STAGE_BY_NAME["phy_xmit"].sid, x_flags=tool.XF.IN_IRQ)
    run, out = explain_run(tool, "text")
    run.on_event(tx + why)
    assert "  why: phy_queue->phy_xmit 30000.00us = queue 30000.00us\n" in out.getvalue()
    run, out = explain_run(tool, "json")
    run.on_event(tx + why)
    x = json.loads(out.getvalue())["explain"]
    assert (x["in_irq"], x["tid"], x["us"]["queue"], x["us"]["unknown"]) == \
        (True, None, 30000.0, 0.0)


def test_a_stopped_vm_and_a_thread_not_followed(tool):
    stopped = explanation(tool, {"stopped": 4500000, "run_queue": 250000, "running": 50000},
                          x_tid=4244, x_from=tool.STAGE_BY_NAME["tap_xmit"].sid,
                      x_to=tool.STAGE_BY_NAME["vm_read"].sid,
                          x_flags=tool.XF.FOLLOWED, x_cpu=0)
    run, out = explain_run(tool, "text")
    run.on_event(slow_read(tool) + stopped)
    assert "why: tap_xmit->vm_read 4800.00us = stopped 4500.00us + run-queue 250.00us " \
        "on CPU 0 + running 50.00us" in out.getvalue()
    alone = explanation(tool, {"unknown": 4800000}, x_tid=999,
                        x_from=tool.STAGE_BY_NAME["tap_xmit"].sid,
                      x_to=tool.STAGE_BY_NAME["vm_read"].sid)
    run, out = explain_run(tool, "text")
    run.book.known["thread"][999] = "worker"
    run.on_event(slow_read(tool) + alone)
    assert "why: tap_xmit->vm_read 4800.00us = unknown 4800.00us (worker[999] is not " \
        "followed)" in out.getvalue()


def test_histogram_mode_reports_each_segments_time_by_cause(tool):
    run, out = explain_run(tool, "text", mode="histogram")
    counts = [0] * tool.EXPLAIN_SLOTS
    rx, frm, to = tool.Dir.RX, tool.STAGE_BY_NAME["tap_xmit"].sid, \
        tool.STAGE_BY_NAME["vm_read"].sid
    base = ((rx * tool.NSTAGES + frm) * tool.NSTAGES + to) * tool.C.NCAUSES
    counts[base + tool.Cause.RUN_QUEUE] = 8000000
    counts[base + tool.Cause.RUNNING] = 2000000
    run.report_explanations(WALL + 5, run.explanations(WALL + 5, counts), False)
    assert "  RX tap_xmit->vm_read 10000.00us: run-queue 80% | running 20%" in out.getvalue()
    # the next interval: only what it added
    counts[base + tool.Cause.ASLEEP] = 1000000
    added = run.explanations(WALL + 10, counts)
    assert added == {("rx", "tap_xmit->vm_read"): [1000000, 0, 0, 0, 0, 0]}


def test_per_vm_explanations_come_with_each_vms_histograms_and_only_theirs(tool):
    """--per-vm --explain: the per-VM table's slots after the histogram rows hold each
    VM's sums; each VM's Why block follows its own tables, under its (escaped) name."""
    segments = [("rx", "tap_xmit->vm_read"), ("rx", "total")]
    base = tool.vm_explain_base(segments)
    rx, frm, to = tool.Dir.RX, tool.STAGE_BY_NAME["tap_xmit"].sid, \
        tool.STAGE_BY_NAME["vm_read"].sid
    slot = base + ((rx * tool.NSTAGES + frm) * tool.NSTAGES + to) * tool.C.NCAUSES
    bucket = tool.C.VM_HIST_ROW + 40        # a count in the total's row
    for output in ("text", "json"):
        out = io.StringIO()
        run = tool.Run(tool.RunSettings("histogram", True, 1, False, False, 100.0),
                       tool.Reporter(output, "all", out=out), segments, False, {}, WALL,
                       tool.NameBook(live=False))
        run.book.devices.update({7: "vnet0", 8: "vnet1"})
        run.book.vms = {7: tool.VmInfo("web\x1b[2J1", None, 4242, "qemu"),
                        8: tool.VmInfo("db1", None, 4343, "qemu")}
        counts = {(7, 0, bucket): 3, (7, 0, slot + tool.Cause.RUN_QUEUE): 9000000,
                  (7, 0, slot + tool.Cause.RUNNING): 1000000,
                  (8, 0, bucket): 2, (8, 0, slot + tool.Cause.ASLEEP): 4000000}
        per_vm = run.vm_histograms(WALL + 5, counts)
        assert [(who.name, why) for who, _t, why in per_vm] == [
            ("db1", {("rx", "tap_xmit->vm_read"): [4000000, 0, 0, 0, 0, 0]}),
            ("web\x1b[2J1", {("rx", "tap_xmit->vm_read"): [0, 0, 9000000, 1000000, 0, 0]})]
        run.report_vm_histograms(WALL + 5, per_vm, False)
        # all VMs' Why block is not printed as well (each VM's sums are in its own)
        run.report_explanations(WALL + 5, {("rx", "tap_xmit->vm_read"): [1, 0, 0, 0, 0, 0]},
                                False)
        if output == "text":
            text = out.getvalue()
            assert "\x1b" not in text
            web = text.index("VM web\\x1b[2J1 (vnet0): Why")
            assert text.index("VM web\\x1b[2J1 (vnet0): Latency") < web
            assert "  RX tap_xmit->vm_read 10000.00us: run-queue 90% | running 10%" in \
                text[web:]
            db = text.index("VM db1 (vnet1): Why")
            assert "  RX tap_xmit->vm_read 4000.00us: asleep 100%" in text[db:web]
            assert text.count("Why") == 2, text
        else:
            shares = [o for o in map(json.loads, out.getvalue().splitlines())
                      if o["type"] == "explain"]
            assert [(o["vm"], o["vm_dev"], o["us"]["run_queue"], o["us"]["asleep"])
                    for o in shares] == [("db1", ["vnet1"], 0.0, 4000.0),
                                         ("web\x1b[2J1", ["vnet0"], 9000.0, 0.0)]
        # the next read: only what each VM added
        counts[(8, 0, slot + tool.Cause.ASLEEP)] += 500000
        assert [why for _w, _t, why in run.vm_histograms(WALL + 10, counts)] == [
            {("rx", "tap_xmit->vm_read"): [500000, 0, 0, 0, 0, 0]}]


def test_a_recording_of_per_vm_explanations_replays_them_per_vm(tool, tmp_path):
    segments = [["rx", "tap_xmit->vm_read"], ["rx", "total"]]
    base = tool.vm_explain_base(segments)
    rx, frm, to = tool.Dir.RX, tool.STAGE_BY_NAME["tap_xmit"].sid, \
        tool.STAGE_BY_NAME["vm_read"].sid
    slot = base + ((rx * tool.NSTAGES + frm) * tool.NSTAGES + to) * tool.C.NCAUSES
    meta = recording_meta(tool, mode="histogram", per_vm=True, segments=segments,
                          explain=100.0, explain_record=tool.EXPL.format)
    names = {"kind": "names", "names": {"7": "vnet0", "3": "eth1"}, "uplinks": {}}
    vms = {"kind": "vms", "vms": {"7": ["web1", None, 4242, "qemu"]}}
    good = str(tmp_path / "good.vnl")
    write_recording(tool, good, [names, vms, {
        "kind": "vmhist", "when": WALL + 5, "last": False,
        "counts": {"7:0:%d" % (tool.C.VM_HIST_ROW + 40): 3,
                   "7:0:%d" % (slot + tool.Cause.RUN_QUEUE): 6000000}}], meta=meta)
    code, out, err = run_main(tool, ["--read-events", good])
    assert code == 0, err
    assert "VM web1 (vnet0): Why" in out and \
        "  RX tap_xmit->vm_read 6000.00us: run-queue 100%" in out, out
    # a slot past the explanations' is not a per-VM slot
    bad = str(tmp_path / "bad.vnl")
    write_recording(tool, bad, [names, {
        "kind": "vmhist", "when": WALL + 5, "last": False,
        "counts": {"7:0:%d" % (base + tool.EXPLAIN_SLOTS): 1}}], meta=meta)
    code, _out, err = run_main(tool, ["--read-events", bad])
    assert code == 2 and "a per-VM slot" in err and len(err.splitlines()) == 1, err


def test_a_recording_with_explanations_replays_them_and_refuses_impossible_ones(tool,
                                                                               tmp_path):
    why = explanation(tool, {"run_queue": 4600000, "running": 200000}, x_tid=4244,
                      x_from=tool.STAGE_BY_NAME["tap_xmit"].sid,
                      x_to=tool.STAGE_BY_NAME["vm_read"].sid, x_flags=tool.XF.FOLLOWED)
    good = tmp_path / "good.vnl"
    meta = recording_meta(tool, explain=100.0, explain_record=tool.EXPL.format)
    write_recording(tool, str(good), [{"kind": "names", "names": {"7": "vnet0", "3": "eth1"},
                                       "uplinks": {}},
                                      {"kind": "event", "raw": (slow_read(tool) + why).hex()}],
                    meta=meta)
    r = run_main(tool, ["--read-events", str(good)])
    assert r[0] == 0, r
    assert "why: tap_xmit->vm_read 4800.00us = run-queue 4600.00us" in r[1]
    # an explanation longer than its segment, or from a stage the packet never passed
    for bad_why, message in (
            (explanation(tool, {"running": 9000000}, x_tid=1, x_flags=tool.XF.FOLLOWED,
                         x_from=tool.STAGE_BY_NAME["tap_xmit"].sid,
                      x_to=tool.STAGE_BY_NAME["vm_read"].sid),
             "an explanation longer than its segment"),
            (explanation(tool, {"running": 1000}, x_tid=1, x_flags=tool.XF.FOLLOWED,
                         x_from=tool.STAGE_BY_NAME["phy_queue"].sid,
                         x_to=tool.STAGE_BY_NAME["phy_xmit"].sid),
             "which the packet did not pass")):
        bad = tmp_path / "bad.vnl"
        write_recording(tool, str(bad), [{"kind": "event",
                                          "raw": (slow_read(tool) + bad_why).hex()}],
                        meta=meta)
        code, _out, err = run_main(tool, ["--read-events", str(bad)])
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_the_longest_segment_is_explained_also_when_it_is_not_the_last(tool):
    """A tap's qdisc held the frame 30 ms on its way into the VM (tap_queue->tap_xmit),
    the VM then read it at once: that wait is the one explained, and it is the queue's."""
    rx = icmp_rx(tool, ts={"phy_rx": 200000000000, "tap_queue": 200000001000,
                           "tap_xmit": 200030001000, "vm_read": 200030021000})
    why = explanation(tool, {"unknown": 30000000}, x_tid=11,
                      x_from=tool.STAGE_BY_NAME["tap_queue"].sid,
                      x_to=tool.STAGE_BY_NAME["tap_xmit"].sid)
    run, out = explain_run(tool, "json")
    run.on_event(rx + why)
    x = json.loads(out.getvalue())["explain"]
    assert (x["segment"], x["us"]["queue"], x["us"]["unknown"], x["followed"]) == \
        ("tap_queue->tap_xmit", 30000.0, 0.0, False)
    run, out = explain_run(tool, "text")
    run.on_event(rx + why)
    assert "  why: tap_queue->tap_xmit 30000.00us = queue 30000.00us\n" in out.getvalue()


def test_a_heat_map_escapes_the_names_it_draws_and_needs_packets(tool, tmp_path):
    """--heatmap: a VM's name is text of the SVG, never markup; a histogram-mode
    recording has no packets to draw (one line, status 2)."""
    rec = str(tmp_path / "run.vnl")
    write_recording(tool, rec, [
        {"kind": "names", "names": {"7": "vnet0", "3": "eth1"}, "uplinks": {}},
        {"kind": "vms", "vms": {"7": ["<script>alert(1)</script>&\x1b[2J", None, 4242,
                                      "qemu"]}},
        {"kind": "event", "raw": udp_tx(tool).hex()},
        {"kind": "event", "raw": icmp_rx(tool).hex()}])
    svg = str(tmp_path / "heat.svg")
    code, _out, err = run_main(tool, ["--read-events", rec, "--heatmap", svg, "--per-vm"])
    assert code == 0, err
    text = open(svg).read()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;&amp;" in text
    assert "\x1b" not in text
    import xml.dom.minidom
    doc = xml.dom.minidom.parse(svg)        # well-formed
    titles = [n.getAttribute("data-panel") for n in doc.getElementsByTagName("rect")
              if n.getAttribute("id").startswith("plot-")]
    assert titles == ["TX tap_rx->phy_queue", "TX phy_queue->phy_xmit", "TX total",
                      "RX phy_rx->tap_queue", "RX tap_queue->tap_xmit",
                      "RX tap_xmit->vm_read", "RX total"], titles
    hist = str(tmp_path / "hist.vnl")
    write_recording(tool, hist, [], meta=recording_meta(tool, mode="histogram"))
    code, _out, err = run_main(tool, ["--read-events", hist, "--heatmap", svg])
    assert code == 2 and "histogram mode" in err and len(err.splitlines()) == 1, err
