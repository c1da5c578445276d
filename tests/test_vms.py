"""VMs by name: the lab's guest and a second one, started as libvirt starts QEMU
(-name guest=NAME,debug-threads=on -uuid UUID) on two taps of the bridge, talking to the
remote at the same time; a third started while tracing; a tap held by a process that is
not QEMU. The names come from /proc, as the tool finds them; the oracles are the guests'
own ping counts and which tap each guest is on."""
import collections
import json
import os
import subprocess
import threading
import time

import pytest

from tests.harness.tool import PYTHON, TOOL, run_tool
from tests.harness.lab import Lab
from tests.harness.tapwriter import TapHolder, TapWriter, ether, ipv4, udp

pytestmark = pytest.mark.lab

TAP, PHY, BRIDGE = Lab.TAP, Lab.PHY, Lab.BRIDGE
REMOTE = Lab.REMOTE_IP
WEB, WEB_UUID = "web-03", "0c0ffee0-0000-4000-8000-000000000003"


@pytest.fixture(scope="module")
def web(lab):
    """A second named guest, vnltap2 (10.77.0.4), for this module's tests."""
    vm, ip = lab.add_guest(2, WEB, WEB_UUID)
    yield vm, ip
    lab.remove_guest(vm)


def ping_from(vm, n, results, key):
    rc, out = vm.guest("ping -c %d -i 0.2 -W 2 %s" % (n, REMOTE), timeout=60)
    results[key] = (rc, out)


def both_ping(lab, web, n):
    """Both guests ping the remote at the same time; each must get every reply."""
    results = {}
    threads = [threading.Thread(target=ping_from, args=(lab.vm, n, results, "lab")),
               threading.Thread(target=ping_from, args=(web[0], n, results, "web"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, (rc, out) in results.items():
        assert rc == 0 and "%d packets received" % n in out, (key, out)


def test_list_vms_names_both_guests_and_their_switch(lab, web):
    r = run_tool("--list-vms", "--output", "json")
    assert r.returncode == 0, r.stderr
    vms = dict((o["name"], o) for o in map(json.loads, r.stdout.splitlines()))
    assert vms[Lab.GUEST_NAME]["uuid"] == Lab.GUEST_UUID
    assert vms[Lab.GUEST_NAME]["pid"] == lab.qemu.pid
    assert vms[Lab.GUEST_NAME]["taps"] == [{"dev": TAP, "switch": BRIDGE}]
    assert (vms[WEB]["uuid"], vms[WEB]["pid"]) == (WEB_UUID, web[0].qemu.pid)
    assert vms[WEB]["taps"] == [{"dev": "vnltap2", "switch": BRIDGE}]
    text = run_tool("--list-vms")
    assert text.returncode == 0
    line = [l for l in text.stdout.splitlines() if l.startswith(WEB)][0].split()
    assert line == [WEB, WEB_UUID, str(web[0].qemu.pid), "qemu-system-x86", "vnltap2", BRIDGE]


def test_every_record_names_its_vm(lab, web, traces):
    t = traces("--phy-dev", PHY, "--protocol", "icmp")
    both_ping(lab, web, 5)
    t.stop()
    assert t.returncode == 0, t.stderr
    by_vm = collections.Counter((r["vm"], r["vm_dev"], r["direction"]) for r in t.packets())
    assert by_vm == {(Lab.GUEST_NAME, TAP, "tx"): 5, (Lab.GUEST_NAME, TAP, "rx"): 5,
                     (WEB, "vnltap2", "tx"): 5, (WEB, "vnltap2", "rx"): 5}, by_vm
    for r in t.packets():
        want = (Lab.GUEST_UUID, lab.qemu.pid) if r["vm"] == Lab.GUEST_NAME else \
            (WEB_UUID, web[0].qemu.pid)
        assert (r["vm_uuid"], r["vm_pid"]) == want
        assert r["pid"] == r["vm_pid"]         # QEMU's own I/O here, no vhost
        ip = Lab.GUEST_IP if r["vm"] == Lab.GUEST_NAME else web[1]
        assert ip in (r["src_ip"], r["dst_ip"])
    s = t.summary()
    assert sorted((v["label"], v["vm_dev"], v["reported"]) for v in s["vms"]) == \
        [(Lab.GUEST_NAME, [TAP], 10), (WEB, ["vnltap2"], 10)]


def test_text_output_names_the_vm(lab, web, traces):
    t = traces("--phy-dev", PHY, "--protocol", "icmp", "--vm", WEB, output="text")
    rc, out = web[0].guest("ping -c 2 -i 0.2 -W 2 %s" % REMOTE)
    assert rc == 0, out
    t.stop()
    firsts = [l for l in t.stdout.splitlines() if l.startswith("[") and "ICMP" in l]
    assert len(firsts) == 4
    assert all(l.endswith("TX %s vnltap2 -> %s" % (WEB, PHY)) or
               l.endswith("RX %s %s -> vnltap2" % (WEB, PHY)) for l in firsts), firsts
    assert "  VM " not in t.stdout      # one VM seen: no per-VM lines in the summary


def test_vm_selects_only_that_vms_taps(lab, web, traces):
    t = traces("--vm", WEB, "--phy-dev", PHY, "--protocol", "icmp", "--verbose")
    both_ping(lab, web, 4)
    t.stop()
    got = collections.Counter((r["vm"], r["direction"]) for r in t.packets())
    assert got == {(WEB, "tx"): 4, (WEB, "rx"): 4}, got
    assert "VM devices: vnltap2;" in t.stderr


def test_per_vm_histograms_count_each_vms_packets_exactly(lab, web, traces):
    t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
               "--per-vm", "--interval", "60")
    both_ping(lab, web, 6)
    rc, out = lab.guest("ping -c 3 -i 0.2 -W 2 %s" % REMOTE)   # 3 more from one VM
    assert rc == 0, out
    t.stop()
    totals = collections.defaultdict(int)
    for h in t.histograms():
        assert h["vm_label"] in (Lab.GUEST_NAME, WEB)
        assert h["vm"] == h["vm_label"] and h["vm_dev"] == ([TAP] if h["vm"] == Lab.GUEST_NAME
                                                            else ["vnltap2"])
        if h["segment"] == "total":
            totals[(h["vm"], h["direction"])] += h["count"]
            assert sum(b["count"] for b in h["buckets"]) == h["count"]
    assert dict(totals) == {(Lab.GUEST_NAME, "tx"): 9, (Lab.GUEST_NAME, "rx"): 9,
                            (WEB, "tx"): 6, (WEB, "rx"): 6}
    s = t.summary()
    assert s["reported"] == 30 and s["vm_hist_full"] == 0
    assert sorted((v["label"], v["reported"]) for v in s["vms"]) == \
        [(Lab.GUEST_NAME, 18), (WEB, 12)]


def test_a_vm_started_while_tracing_is_picked_up_with_its_name(lab, traces):
    t = traces("--phy-dev", PHY, "--protocol", "icmp")
    vm, ip = lab.add_guest(3, "db-01")
    try:
        time.sleep(1.5)                         # the tool's device refresh (1 s)
        rc, out = vm.guest("ping -c 3 -i 0.2 -W 2 %s" % REMOTE)
        assert rc == 0, out
        t.stop()
    finally:
        lab.remove_guest(vm)
    mine = [r for r in t.packets() if ip in (r["src_ip"], r["dst_ip"])]
    assert len(mine) == 6
    assert all((r["vm"], r["vm_dev"], r["vm_uuid"]) == ("db-01", "vnltap3", None)
               for r in mine), mine[:2]


def test_unknown_vm_is_refused_naming_the_running_ones(lab, web):
    r = run_tool("--vm", "no-such-vm", "--timeout", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "no running VM is named 'no-such-vm'" in line
    assert Lab.GUEST_NAME in line and WEB in line


def test_a_tap_held_by_another_process_has_no_vm_name(lab, traces):
    stand_in, mac, ip = "vnltap1", "52:54:00:77:00:09", "10.77.0.9"
    with TapWriter(stand_in, BRIDGE) as writer:
        subprocess.run(["bridge", "fdb", "replace", mac, "dev", stand_in, "master",
                        "static"], check=True)
        t = traces("--vm-dev", stand_in, "--phy-dev", PHY, "--direction", "tx")
        frame = ether(Lab.REMOTE_MAC, mac, 0x0800, ipv4(ip, REMOTE, 17, udp(40500, 9500, b"x")))
        for _ in range(5):
            writer.write(frame)
        t.stop()
    recs = t.packets()
    assert len(recs) == 5
    assert all((r["vm"], r["vm_uuid"], r["vm_pid"]) == (None, None, os.getpid())
               for r in recs), recs[0]
    assert "Traceback" not in t.stderr


# --- what a tenant controls: its VM's name, its process's name, the tap's name ---

HOSTILE_NAME = "\x1b]0;pwned\x07evil\x1b[2J\rvm-" + "x" * 70
HOSTILE_COMM = "q\x1b[2Jemu"


def terminal_safe(text):
    return all(c == "\n" or c.isprintable() for c in text)


@pytest.fixture
def hostile_vm(lab):
    """A stand-in VM on a tap named with an escape sequence, its process started with a
    -name full of them and named with one: (holder, its MAC, its IP)."""
    tap, mac, ip = Lab.HOSTILE_TAP, "52:54:00:77:00:0a", "10.77.0.10"
    holder = TapHolder(tap, ["-name", "guest=%s,debug-threads=on" % HOSTILE_NAME],
                       comm=HOSTILE_COMM)
    try:
        for cmd in (["ip", "link", "set", tap, "master", BRIDGE], ["ip", "link", "set", tap,
                                                                  "up"],
                    ["bridge", "fdb", "replace", mac, "dev", tap, "master", "static"]):
            subprocess.run(cmd, check=True)
        yield holder, mac, ip
    finally:
        holder.close()
        subprocess.run(["ip", "link", "del", tap], stderr=subprocess.DEVNULL)


def test_hostile_names_reach_no_terminal_raw(lab, traces, hostile_vm):
    """Every text path: --list-vms, detailed records and the summary, per-VM histograms,
    an error naming the running VMs, --verbose."""
    holder, mac, ip = hostile_vm
    frame = ether(Lab.REMOTE_MAC, mac, 0x0800, ipv4(ip, REMOTE, 17, udp(40510, 9510, b"x")))
    listed = run_tool("--list-vms")
    refused = run_tool("--vm", "no-such-vm", "--timeout", "1")
    assert refused.returncode == 2 and "no running VM is named" in refused.stderr
    detailed = traces("--vm-dev", Lab.HOSTILE_TAP, "--phy-dev", PHY, "--direction", "tx",
                      "--verbose", output="text")
    hist = traces("--phy-dev", PHY, "--direction", "tx", "--protocol", "udp", "--mode",
                  "histogram", "--per-vm", "--interval", "60", output="text")
    for _ in range(3):
        holder.write(frame)
    detailed.stop()
    hist.stop()
    texts = {"--list-vms": listed.stdout, "the error": refused.stderr,
             "records": detailed.stdout, "--verbose": detailed.stderr,
             "per-VM histograms": hist.stdout}
    for what, text in texts.items():
        assert terminal_safe(text), (what, [l for l in text.splitlines()
                                            if not terminal_safe(l)])
    escaped = "\\x1b]0;pwned\\x07evil\\x1b[2J\\x0dvm-"
    assert escaped in listed.stdout and escaped in refused.stderr
    assert "q\\x1b[2Jemu" in listed.stdout and "vnl\\x1b[7mX" in listed.stdout
    firsts = [l for l in detailed.stdout.splitlines() if l.startswith("[")]
    assert len(firsts) == 3 and all(escaped in l and "vnl\\x1b[7mX" in l and "..." in l
                                    for l in firsts), firsts
    assert "x" * 70 not in detailed.stdout          # a name's length is capped
    assert "VM %s" % escaped in hist.stdout
    assert "vnl\\x1b[7mX" in detailed.stderr        # --verbose names the devices
    # JSON keeps the name whole, escaped as JSON escapes it
    listed = run_tool("--list-vms", "--output", "json")
    assert terminal_safe(listed.stdout)
    assert HOSTILE_NAME in [json.loads(l)["name"] for l in listed.stdout.splitlines()]


def test_a_tap_of_the_same_name_in_another_namespace_claims_no_vm(lab, traces):
    """A process in another network namespace holds a tap named as the host's stand-in
    VM's, and claims a VM name: the host's tap keeps its own holder (unnamed here)."""
    stand_in, mac, ip = "vnltap1", "52:54:00:77:00:09", "10.77.0.9"
    subprocess.run(["ip", "netns", "add", "vnl-evil"], check=True)
    try:
        with TapWriter(stand_in, BRIDGE) as writer, \
                TapHolder(stand_in, ["-name", "evil-vm"], netns="vnl-evil") as evil:
            # the other namespace has its own vnltap1, held by the claimant
            ns_taps = subprocess.run(["ip", "netns", "exec", "vnl-evil", "ip", "-o", "link"],
                                     stdout=subprocess.PIPE, universal_newlines=True).stdout
            assert stand_in in ns_taps
            listed = run_tool("--list-vms", "--output", "json")
            t = traces("--vm-dev", stand_in, "--phy-dev", PHY, "--direction", "tx")
            subprocess.run(["bridge", "fdb", "replace", mac, "dev", stand_in, "master",
                            "static"], check=True)
            frame = ether(Lab.REMOTE_MAC, mac, 0x0800,
                          ipv4(ip, REMOTE, 17, udp(40520, 9520, b"x")))
            for _ in range(3):
                writer.write(frame)
            t.stop()
            assert evil.proc.poll() is None
    finally:
        subprocess.run(["ip", "netns", "del", "vnl-evil"], check=False)
    vms = [json.loads(l) for l in listed.stdout.splitlines()]
    assert "evil-vm" not in [v["name"] for v in vms], vms
    mine = [v for v in vms if {"dev": stand_in, "switch": BRIDGE} in v["taps"]]
    assert [(v["name"], v["pid"]) for v in mine] == [(None, os.getpid())], vms
    recs = t.packets()
    assert len(recs) == 3 and all((r["vm"], r["vm_pid"]) == (None, os.getpid())
                                  for r in recs), recs[0]


def _as_nobody(*argv):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           PYTHON, TOOL] + list(argv), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


def test_a_replay_after_the_vm_is_gone_is_the_live_run(lab, traces, recording_dir):
    """Record 10 pings of a named VM, let the VM exit (its QEMU process gone, its tap
    removed), replay as an unprivileged user: text and JSON exactly as printed live,
    names included, none looked up on this machine."""
    vm, ip = lab.add_guest(7, "gone-07")
    qemu_pid = vm.qemu.pid
    runs = {}
    try:
        for output in ("json", "text"):
            rec = os.path.join(recording_dir, "%s.vnl" % output)
            runs[output] = (rec, traces("--vm", "gone-07", "--phy-dev", PHY, "--protocol",
                                        "icmp", "--write-events", rec, output=output))
        rc, out = vm.guest("ping -c 10 -i 0.2 -W 2 %s" % REMOTE)
        assert rc == 0 and "10 packets received" in out, out
        for _rec, t in runs.values():
            t.stop()
    finally:
        lab.remove_guest(vm)
    assert not os.path.exists("/proc/%d" % qemu_pid)
    for output, (rec, t) in runs.items():
        assert t.returncode == 0, t.stderr
        assert os.stat(rec).st_mode & 0o777 == 0o600     # every packet's addresses
        os.chmod(rec, 0o644)                              # shared, as with a ticket
        replay = _as_nobody("--read-events", rec, "--output", output)
        assert replay.returncode == 0 and replay.stderr == "", replay.stderr
        assert replay.stdout == t.stdout
    recs = runs["json"][1].packets()
    assert len(recs) == 20 and all((r["vm"], r["comm"]) == ("gone-07", "qemu-system-x86")
                                   for r in recs), recs[0]
    assert all(r["thread"] not in (None, "?") for r in recs)
