"""--top in a real terminal (tmux) on the VM lab, three real VMs talking.

The lab's guest and two more (Lab.add_guest) on the bridge, the remote sending UDP to all
three, 500 datagrams a second each (not ping: it slows down to what comes back); a token
bucket on two of their taps, more than it lets through, keeps a queue there as long as
the bucket allows (about 56 ms and 16 ms; it drops the rest), so their latencies differ. tmux runs the tool --top in an 80x24 terminal; the test
reads the screen with capture-pane.
"""
import re
import subprocess
import time

import pytest

from tests.harness.lab import Lab
from tests.harness.procs import stop_popen
from tests.harness.tool import PYTHON, TOOL

pytestmark = pytest.mark.lab

SESSION = "vnl-top-test"
# name, tap index, the bucket's latency: at 256 kbit/s with 200 bytes of burst, what 500
# frames of 106 bytes a second (424 kbit/s) queue behind it: tbf's limit, (50 ms x 32 kB/s
# + 200) / 32 kB/s, about 56 ms; 10 ms: about 16 ms
VMS = [("db-05", 3, "50ms"), ("web-06", 4, "10ms")]
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+ \d+%|-)\s+(\d+)")



@pytest.fixture(scope="module")
def three_vms(lab):
    added = []
    try:
        for name, index, delay in VMS:
            vm, ip_addr = lab.add_guest(index, name)
            tap = "vnltap%d" % index
            subprocess.run(["tc", "qdisc", "replace", "dev", tap, "root", "tbf", "rate",
                            "256kbit", "burst", "200", "latency", delay], check=True)
            added.append((vm, tap, ip_addr))
        yield [(Lab.TAP, Lab.GUEST_IP)] + [(tap, ip) for _vm, tap, ip in added]
    finally:
        for vm, tap, _ip in added:
            subprocess.run(["tc", "qdisc", "del", "dev", tap, "root"],
                           stderr=subprocess.DEVNULL)
            lab.remove_guest(vm)


def tmux(*args, check=True):
    return subprocess.run(["tmux"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=check,
                          timeout=30)


def screen(history=False):
    """What the terminal shows (with history: and what scrolled off its top)."""
    return tmux("capture-pane", "-p", "-t", SESSION, *(["-S", "-"] if history else [])
                ).stdout


def rows(text):
    """The view's VM lines: (name, P99 in us)."""
    out = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            p99 = m.group(5)
            us = float(p99[:-2]) * (1000 if p99.endswith("ms") else 1) if p99 != "-" \
                else 0.0
            out.append((m.group(1), us))
    return out


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen()
        if predicate(text):
            return text
        time.sleep(0.5)
    raise AssertionError("%s: not on the screen after %ss:\n%s" % (what, timeout, text))


def sending(lab, vms):
    """UDP datagrams to each VM every 2 ms, for up to two minutes (stopped sooner)."""
    return [lab.remote(lab.host_traffic, "udp", ip, 9300, 60000, 40300 + i, 2000,
                       stdout=subprocess.DEVNULL) for i, (_tap, ip) in enumerate(vms)]


def devices(vms):
    args = []
    for tap, _ip in vms:
        args += ["--vm-dev", tap]
    return args + ["--phy-dev", Lab.PHY]


def test_the_live_view_in_a_terminal(lab, three_vms):
    pingers = sending(lab, three_vms)
    cmd = " ".join([PYTHON, TOOL, "--top"] + devices(three_vms))
    tmux("kill-session", "-t", SESSION, check=False)
    try:
        tmux("new-session", "-d", "-s", SESSION, "-x", "80", "-y", "24",
             "%s; echo TOOL-EXITED $?; sleep 120" % cmd)
        names = set(["vnl-guest"] + [n for n, _i, _d in VMS])
        text = wait_for(lambda t: set(n for n, _p in rows(t)) == names and
                        all(p > 0 for _n, p in rows(t)), 120, "a line per VM")
        lines = text.splitlines()
        assert lines[0].startswith("vm_network_latency --top") and "by P99" in lines[0]
        assert all(len(l) <= 80 for l in lines)
        # sorted by P99: the 20 ms VM, the 5 ms one, the one without a delay
        order = [n for n, _p in rows(text)]
        assert order == ["db-05", "web-06", "vnl-guest"], text
        p99 = dict(rows(text))
        assert p99["db-05"] > 30000 and 5000 < p99["web-06"] < 30000 and \
            p99["vnl-guest"] < 5000, text
        # the buckets' drops, with the kernel's reason
        assert re.search(r"^db-05 .* \d+ \S+", text, re.M), text
        tmux("send-keys", "-t", SESSION, "n")
        text = wait_for(lambda t: [n for n, _p in rows(t)] == sorted(names) and
                        "by name" in t, 10, "sorted by name")
        tmux("send-keys", "-t", SESSION, "q")
        wait_for(lambda t: "TOOL-EXITED" in t, 30, "the tool's end")
        text = screen(history=True)
        # the terminal as it was (no view left on it), then the summary
        assert "TOOL-EXITED 0" in text and "Summary:" in text, text
        assert "vm_network_latency --top" not in text and "SLOWEST" not in text, text
    finally:
        tmux("kill-session", "-t", SESSION, check=False)
        for p in pingers:
            stop_popen(p)


def test_the_same_command_into_a_file_prints_plain_lines(lab, three_vms, tmp_path):
    pingers = sending(lab, three_vms)
    out = tmp_path / "top.txt"
    try:
        with open(str(out), "w") as f:
            r = subprocess.run([PYTHON, TOOL, "--top", "--interval", "1", "--timeout", "6"] +
                               devices(three_vms), stdout=f, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=180)
    finally:
        for p in pingers:
            stop_popen(p)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "\x1b" not in text
    heads = [l for l in text.splitlines() if re.match(r"^\[\d\d:\d\d:\d\d\] VM +TX/s", l)]
    assert len(heads) >= 4, text
    last_block = text.split("\n\n")[-3]          # the last interval before the summary
    assert [n for n, _p in rows(last_block)] == ["db-05", "web-06", "vnl-guest"], \
        text + r.stderr
    assert text.rstrip().splitlines()[-1].startswith("Summary:") or "Summary:" in text
