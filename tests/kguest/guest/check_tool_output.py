#!/usr/bin/python3
"""Check one vm_network_latency.py --output json run of the kguest lane.

usage: check_tool_output.py [--case NAME] [--samples N] OUT.jsonl [RC_FILE]

The case name says what traffic ran and where:
"<TOPO>-<kprobe|tracepoint|auto|tp_btf>[-mix|-netem|-host|-drop|-cost|-failover|-vm2vm]".
A (OVS) and B (Linux bridge) topologies, V (a Linux bridge on VLAN 100 of a bond of
vnlphy0 and vnlphy1), O (OVS with a bond port and a second VM), M (the VM on a macvtap); the traffic mix is ping + a UDP burst with the
fixed 5-tuple 10.77.0.2:40000 -> 10.77.0.3:40001 + one TCP connection
10.77.0.2:40003 -> 10.77.0.3:40002; a "-netem" case pings with netem delay 20ms on
the physical device; a "-host" case is traffic from the remote end to the host's own
address (only --attach kprobe can see it end: host_rcv); a "-drop" case pings into
netem loss 100% with --drops: drop records, no packet records; a "-cost" case is pings
and a bigger UDP burst, no TCP; "-failover" pings while the bond's active slave fails;
"-vm2vm" pings and UDP from the VM to a second VM on the same switch.
A quick look for the lane's log, printed one check a line (FAIL, WARN), the last line a
one-line verdict; exit 0 when no FAIL. The checks that decide the lane are in
tests/test_kguest.py, against the oracles. Stdlib only: runs in the guest and on the host.
"""
import argparse
import collections
import json
import statistics
import sys

VM_IP, REMOTE_IP = "10.77.0.2", "10.77.0.3"
# Stage names the lane knows (ovs_upcall: the first packet of a flow, sent to ovs-vswitchd).
TX_STAGES = ["vhost_kick", "tap_rx", "mvt_queue", "mvt_xmit", "bridge", "ovs_upcall", "ovs_dp",
             "encap", "phy_queue", "phy_xmit"]
RX_STAGES = ["phy_rx", "decap", "bridge", "ovs_upcall", "ovs_dp", "tap_queue", "tap_xmit",
             "mvt_ring", "vm_read", "vhost_signal", "host_rcv"]
VM2VM_STAGES = ["vhost_kick", "tap_rx", "mvt_queue", "mvt_xmit", "phy_rx", "bridge", "ovs_upcall",
                "ovs_dp", "tap_queue", "tap_xmit", "mvt_ring", "vm_read", "vhost_signal"]
# each topology's VM device and NICs
VM_DEV = {"M": "vnlmvt0"}
PHY_DEVS = {"V": ("vnlphy0", "vnlphy1"), "O": ("vnlphy0", "vnlphy1")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--case", default="")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("jsonl")
    p.add_argument("rc", nargs="?")
    a = p.parse_args()
    parts = a.case.split("-") if a.case else []
    topo = parts[0] if parts else ""
    netem = "netem" in parts
    host = "host" in parts
    drop = "drop" in parts
    vhost = "vhost" in parts or "overlay" in parts or "cost" in parts   # no TCP
    pings_only = netem or "failover" in parts
    vm2vm = "vm2vm" in parts

    fails, warns = [], []
    rc = None
    if a.rc:
        try:
            rc = int(open(a.rc).read().strip())
        except (OSError, ValueError):
            fails.append("no exit status recorded")
    if rc not in (None, 0):
        fails.append("tool exit status %s%s" % (rc, " (killed by the lane's timeout)" if rc in (124, 137) else ""))

    records, bad = [], []
    try:
        lines = open(a.jsonl, encoding="utf-8", errors="replace").read().splitlines()
    except OSError as e:
        lines = []
        fails.append("cannot read %s: %s" % (a.jsonl, e))
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            records.append(obj)
        except ValueError as e:
            bad.append((i, line[:160], str(e)))
    for i, line, err in bad[:5]:
        fails.append("stdout line %d is not a JSON object (%s): %s" % (i, err, line))

    pkts = [r for r in records if r.get("type") == "packet"]
    summaries = [r for r in records if r.get("type") == "summary"]
    other = collections.Counter(r.get("type") for r in records if r.get("type") not in ("packet", "summary"))
    print("records: %d packet, %d summary%s" % (len(pkts), len(summaries),
          "".join(", %d %s" % (n, t) for t, n in other.items())))
    if not summaries:
        fails.append("no summary record")
    if drop:
        drops = [r for r in records if r.get("type") == "drop"]
        if pkts or not drops:
            fails.append("every ping is lost at the qdisc: want drop records only, have "
                         "%d packet and %d drop records" % (len(pkts), len(drops)))
    elif not pkts and not host:
        fails.append("no packet records")

    by = collections.defaultdict(list)
    for r in pkts:
        by[(r.get("direction"), r.get("protocol"))].append(r)
    for key in sorted(by, key=str):
        rs = by[key]
        tot = [r.get("total_us") for r in rs if isinstance(r.get("total_us"), (int, float))]
        stages = collections.Counter(tuple(r.get("stages") or []) for r in rs)
        print("  %-3s %-5s n=%-4d total_us median=%s max=%s" % (
            key[0], key[1], len(rs), round(statistics.median(tot), 1) if tot else "-",
            round(max(tot), 1) if tot else "-"))
        for st, n in stages.most_common(4):
            print("        %4d x stages %s" % (n, ",".join(st)))

    # field sanity
    need = ["direction", "protocol", "src_ip", "dst_ip", "vm_dev", "phy_dev", "total_us", "stages", "segments"]
    for r in pkts[:200]:
        missing = [k for k in need if k not in r]
        if missing:
            fails.append("packet record without %s: %s" % (",".join(missing), json.dumps(r)[:200]))
            break
    devs = collections.Counter((r.get("vm_dev"), r.get("phy_dev")) for r in pkts)
    vm_dev, phys = VM_DEV.get(topo, "vnltap0"), PHY_DEVS.get(topo, ("vnlphy0",))
    if pkts and not host and not vm2vm and not any((vm_dev, p) in devs for p in phys):
        fails.append("no record with vm_dev=%s phy_dev in %s (seen %s)" % (
            vm_dev, phys, dict(devs)))
    if vm2vm and (not pkts or any(r.get("direction") != "vm2vm" for r in pkts)):
        fails.append("VM to VM: want only vm2vm records, have %s" % dict(
            collections.Counter(r.get("direction") for r in pkts)))
    for r in pkts:
        d = r.get("direction")
        names = set(r.get("stages") or [])
        allowed = set(TX_STAGES if d == "tx" else VM2VM_STAGES if d == "vm2vm" else RX_STAGES)
        if names - allowed:
            warns.append("unknown stage names for %s: %s" % (d, sorted(names - allowed)))
            break
        segs = r.get("segments") or []
        if any((s.get("us") or 0) < 0 for s in segs):
            fails.append("negative segment: %s" % json.dumps(r)[:240])
            break

    def has(direction, proto, pred=lambda r: True):
        return any(pred(r) for r in by.get((direction, proto), []))

    def ips(src, dst):
        return lambda r: r.get("src_ip") == src and r.get("dst_ip") == dst

    if pkts and host:
        if any(r.get("direction") != "rx" or (r.get("stages") or [""])[-1] != "host_rcv" for r in pkts):
            fails.append("host-local traffic, yet a record that is not rx ending in host_rcv")
    elif pkts and not vm2vm:
        # a method that cannot follow OVS upcalls (5.10's tracepoints) counts the packets
        # that went to ovs-vswitchd as having left the path: the host's tests judge those
        left = summaries and summaries[-1].get("left_path")
        presence = warns if left else fails
        if not has("tx", "icmp", ips(VM_IP, REMOTE_IP)):
            presence.append("no tx icmp record 10.77.0.2 -> 10.77.0.3 (the VM's echo requests)")
        if not has("rx", "icmp", ips(REMOTE_IP, VM_IP)):
            presence.append("no rx icmp record 10.77.0.3 -> 10.77.0.2 (the echo replies)")
        if not pings_only:
            udp_tx = lambda r: ips(VM_IP, REMOTE_IP)(r) and r.get("src_port") == 40000 and r.get("dst_port") == 40001
            udp_rx = lambda r: ips(REMOTE_IP, VM_IP)(r) and r.get("src_port") == 40001 and r.get("dst_port") == 40000
            if not has("tx", "udp", udp_tx):
                presence.append("no tx udp record 10.77.0.2:40000 -> 10.77.0.3:40001")
            if not has("rx", "udp", udp_rx):
                presence.append("no rx udp record 10.77.0.3:40001 -> 10.77.0.2:40000")
            ntx = len([r for r in by.get(("tx", "udp"), []) if udp_tx(r)])
            want = 200 if "cost" in parts else 10
            if 0 < ntx < want:
                warns.append("only %d of %d UDP datagrams seen in tx" % (ntx, want))
            if not vhost and (not has("tx", "tcp") or not has("rx", "tcp")):
                presence.append("no tcp records in both directions (tx=%d rx=%d)" % (
                    len(by.get(("tx", "tcp"), [])), len(by.get(("rx", "tcp"), []))))
        seen = set(s for r in pkts for s in (r.get("stages") or []))
        if topo == "A" and "ovs_dp" not in seen:
            warns.append("topology A (OVS) but no record has an ovs_dp stage")
        if topo == "B" and "bridge" not in seen and "-tracepoint" not in a.case and \
                "-tp_btf" not in a.case:
            warns.append("topology B (Linux bridge) but no record has a bridge stage")
        if topo == "B" and ("ovs_dp" in seen or "ovs_upcall" in seen):
            fails.append("topology B has no OVS, yet records show an ovs_dp stage")
        if netem:
            tx = [r.get("total_us") or 0 for r in by.get(("tx", "icmp"), [])]
            if not tx or max(tx) < 15000:
                fails.append("netem delay 20ms on vnlphy0, but no tx icmp total_us >= 15000 (max %s)" % (max(tx) if tx else None))

    for key in sorted(by, key=str):
        for r in by[key][:a.samples]:
            print("  sample: " + json.dumps(r, sort_keys=False))
    for s in summaries[-1:]:
        print("  summary: " + json.dumps(s)[:1500])

    for w in warns:
        print("WARN: " + w)
    for f in fails:
        print("FAIL: " + f)
    counts = ", ".join("%s/%s=%d" % (k[0], k[1], len(v)) for k, v in sorted(by.items(), key=str))
    print("%s %s: %d packet records (%s); %d fail, %d warn" % (
        "OK" if not fails else "FAILED", a.case or a.jsonl, len(pkts), counts, len(fails), len(warns)))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
