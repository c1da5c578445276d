"""Running the real tool against the lab, and independent oracles for what it must see.

Trace      the tool as a subprocess, JSON on a file, stopped by a signal or --timeout.
Capture    tcpdump on a device: what really crossed it, to compare counts against.
"""
import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time

from .tool import PYTHON, TOOL
from .pcap import parse_frame, read_pcap
from .procs import stop_with_parent   # the tool runs in a session of its own: a Ctrl-C
                                     # of the run does not reach it, this does


class Trace(object):
    """The real tool, attached and tracing until stop()."""

    def __init__(self, *args, output="json", ready_timeout=90, pre=()):
        self.args = list(args)
        self.dir = tempfile.mkdtemp(prefix="vnl-trace-")
        self.out_path = os.path.join(self.dir, "stdout")
        self.err_path = os.path.join(self.dir, "stderr")
        # pre: a command the tool runs under (nohup, setpriv)
        argv = list(pre) + [PYTHON, TOOL, "--output", output] + [str(a) for a in args]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=stop_with_parent)
        self.returncode = None
        try:
            self._wait_ready(ready_timeout)
            self.prog_ids = programs_of(self.proc.pid)
        except BaseException:       # Ctrl-C while it starts: the fixture never saw it
            self.kill()
            raise

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Tracing" in self.stderr:
                return
            if self.proc.poll() is not None:
                raise AssertionError("tool exited before tracing (rc=%s): %s"
                                     % (self.proc.returncode, self.stderr))
            time.sleep(0.05)
        self.kill()
        raise AssertionError("tool did not start tracing in %ss: %s" % (timeout, self.stderr))

    @property
    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    @property
    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGINT, settle=0.5, timeout=60):
        """Let the last packets finish their path, signal the tool, wait for its summary."""
        time.sleep(settle)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("tool did not exit %ss after signal %d" % (timeout, sig))
        return self

    def wait(self, timeout=120):
        self.returncode = self.proc.wait(timeout)
        return self

    def leftover_programs(self, grace=5.0):
        """Programs this tool loaded that are still in the kernel (must be none after exit).

        The kernel frees a program when its last link goes, partly after an RCU grace
        period: give it a few seconds."""
        deadline = time.monotonic() + grace
        while True:
            left = sorted(set(self.prog_ids) & set(loaded_program_ids()))
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self):
        self.kill()
        for name in (self.out_path, self.err_path):
            if os.path.exists(name):
                os.unlink(name)
        os.rmdir(self.dir)

    # --- what it printed ---
    def objects(self):
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def packets(self, **match):
        return [o for o in self.objects() if o["type"] == "packet" and
                all(o.get(k) == v for k, v in match.items())]

    def histograms(self):
        return [o for o in self.objects() if o["type"] == "histogram"]

    def summary(self):
        found = [o for o in self.objects() if o["type"] == "summary"]
        assert len(found) == 1, "expected one summary, got %d: %s" % (len(found), self.stdout[-2000:])
        return found[0]


def programs_of(pid):
    """IDs of the BPF programs a process holds, from its file descriptors."""
    ids = []
    fdinfo = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(fdinfo):
        try:
            with open(os.path.join(fdinfo, fd)) as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.append(int(line.split()[1]))
        except (IOError, OSError):
            pass
    return ids


def loaded_program_ids():
    out = subprocess.run(["bpftool", "prog", "list", "-j"], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return [p["id"] for p in json.loads(out or "[]")]


class Capture(object):
    """tcpdump on one device, parsed here: the oracle for what crossed it."""

    def __init__(self, dev, bpf_filter="ip", netns=None):
        self.path = tempfile.mktemp(prefix="vnl-cap-", suffix=".pcap")
        argv = ["tcpdump", "-i", dev, "-nn", "-U", "--immediate-mode", "-w", self.path, bpf_filter]
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     universal_newlines=True, start_new_session=True,
                                     preexec_fn=stop_with_parent)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self):
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return self

    def packets(self, vm_mac):
        """[(direction, proto, src, dst, sport/icmp id, dport/icmp seq, icmp type)]"""
        vm = bytes.fromhex(vm_mac.replace(":", ""))
        frames = read_pcap(self.path)
        os.unlink(self.path)
        out = []
        for _ts, frame in frames:
            p = parse_frame(frame)
            if p is None:
                continue
            direction = "tx" if frame[6:12] == vm else "rx" if frame[0:6] == vm else "?"
            icmp = p["protocol"] in ("icmp", "icmp6")
            out.append((direction, p["protocol"], p["src_ip"], p["dst_ip"],
                        p["icmp_id"] if icmp else p["src_port"],
                        p["icmp_seq"] if icmp else p["dst_port"], p["icmp_type"]))
        return out


def capture_key(rec):
    """A packet record as Capture.packets() gives a packet: (direction, protocol, src,
    dst, port or ICMP id, port or ICMP sequence, ICMP type), to compare with the wire."""
    icmp = rec["protocol"] in ("icmp", "icmp6")
    return (rec["direction"], rec["protocol"], rec["src_ip"], rec["dst_ip"],
            rec["icmp_id"] if icmp else rec["src_port"],
            rec["icmp_seq"] if icmp else rec["dst_port"], rec["icmp_type"])


def exact_percentile(values, fraction):
    """Nearest-rank percentile: the smallest value with at least fraction of all at or below."""
    ordered = sorted(values)
    rank = max(1, int(math.ceil(fraction * len(ordered) - 1e-9)))
    return ordered[rank - 1]


def kill_quietly(sig, proc):
    try:
        os.killpg(proc.pid, sig)
    except OSError:
        pass


def qdisc_backlog(dev):
    """Packets waiting in the root qdisc of dev, as tc reports them."""
    out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", dev, "root"],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    m = re.search(r"backlog \S+ (\d+)p", out)
    return int(m.group(1)) if m else 0


def wait_qdisc_empty(dev, timeout=10):
    """Wait until dev's qdisc has sent or dropped everything; returns what is left."""
    deadline = time.monotonic() + timeout
    left = qdisc_backlog(dev)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = qdisc_backlog(dev)
    return left
