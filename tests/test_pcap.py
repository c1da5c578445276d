"""--write-pcap on the real kernel with the real VM, read by a real Wireshark (tshark).

The lab (tests/harness/lab.py): QEMU on a tap, a bridge, a veth standing in for the NIC,
the remote in a namespace. Pings both ways and a burst into the paused VM (its tap's
ring fills: drops), traced with --output json --drops --write-pcap --write-events; tshark
reads every packet of the capture: one per JSON record, in the same order, on the right
interface, its comment the record's stages and segments (a drop's: its reason); the
replay of the recording writes the same file.
"""
import json
import os
import subprocess

import pytest

from tests.harness.lab import Lab
from tests.harness.tool import PYTHON, TOOL
from tests.test_truth import burst_into_stopped_vm

pytestmark = pytest.mark.lab

TAP, PHY = Lab.TAP, Lab.PHY
DEVS = ("--vm-dev", TAP, "--phy-dev", PHY)


def tshark(path, *args):
    r = subprocess.run(["tshark", "-r", path] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def packets(path):
    """Each packet of the file as tshark decodes it: its interface, comment, addresses
    and identifiers."""
    fields = ["frame.interface_name", "frame.comment", "ip.src", "ip.dst", "ip.proto",
              "ip.id", "icmp.type", "icmp.seq", "udp.srcport", "udp.dstport"]
    out = json.loads(tshark(path, "-T", "json", *[a for f in fields for a in ("-e", f)]))
    return [dict((f, (p["_source"]["layers"].get(f) or [None])[0]) for f in fields)
            for p in out]


def test_tshark_reads_every_reported_packet_with_its_record(lab, traces, tmp_path,
                                                            recording_dir):
    live = str(tmp_path / "live.pcapng")
    rec = os.path.join(recording_dir, "run.vnl")
    t = traces(*DEVS, "--drops", "--write-pcap", live, "--write-events", rec)
    lab.remote_run("ping", "-q", "-c", 5, "-i", 0.05, "-W", 2, Lab.GUEST_IP, timeout=30)
    try:
        burst_into_stopped_vm(lab, 1500, 9200, 40200, 20, stopped=0.5, settle=2)
    finally:
        if lab.vm_status() != "running":
            lab.resume_vm()
    t.stop()
    assert t.returncode == 0, t.stderr
    records = [o for o in t.objects() if o["type"] in ("packet", "drop")]
    drops = [r for r in records if r["type"] == "drop"]
    assert len(drops) > 100 and len(records) > len(drops) + 10
    got = packets(live)
    assert len(got) == len(records)
    for p, r in zip(got, records):
        where = r["vm_dev"] if r["direction"] == "tx" else r["phy_dev"]
        assert p["frame.interface_name"] == where, (p, r)
        assert (p["ip.src"], p["ip.dst"]) == (r["src_ip"], r["dst_ip"]), (p, r)
        assert int(p["ip.proto"]) == {"icmp": 1, "udp": 17, "tcp": 6}[r["protocol"]]
        if r["protocol"] == "udp":
            assert (int(p["udp.srcport"]), int(p["udp.dstport"])) == \
                (r["src_port"], r["dst_port"])
        if r["icmp_seq"] is not None:
            assert (int(p["icmp.type"]), int(p["icmp.seq"])) == (r["icmp_type"],
                                                                 r["icmp_seq"])
        comment = p["frame.comment"]
        assert comment.startswith("vm_network_latency %s" % r["direction"].upper())
        segs = comment.splitlines()[1].split(" | ")
        assert [s.split(":")[0] for s in segs] == ["%s->%s" % (s["from"], s["to"])
                                                    for s in r["segments"]], (comment, r)
        if r["type"] == "drop":
            assert "DROPPED after %s: %s at %s" % (r["last_stage"], r["reason"],
                                                   r["location"]) in comment, comment
        else:
            assert "Total Latency: %.2fus" % r["total_us"] in comment, comment
    # Wireshark's own filter on the comments
    read = tshark(live, "-Y", 'frame.comment contains "vm_read"', "-T", "fields", "-e",
                  "frame.number").split()
    assert len(read) == sum(1 for r in records if "vm_read" in r["stages"]) > 5
    # the file's own comment (its section header's) says the headers are rebuilt
    with open(live, "rb") as f:
        assert b"the headers of each packet are rebuilt from the tool's record" in \
            f.read(1024)
    # and the replay of the recording writes the same file
    os.chmod(rec, 0o644)
    again = str(tmp_path / "again.pcapng")
    r = subprocess.run([PYTHON, TOOL, "--read-events", rec, "--write-pcap", again,
                        "--output", "json"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert open(again, "rb").read() == open(live, "rb").read()
