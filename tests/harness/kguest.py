"""The kernel matrix's results, as run_lane.sh leaves them (tests/kguest/README.md): a
lane's files, each traced run's tool outputs and oracles (tcpdump's captures, the traffic
generators' counts), read and checked for shape; tests/test_kguest.py decides."""
import json
import os
import re
import signal
import subprocess

from .pcap import parse_frame, read_pcap
from .procs import stop_with_parent

KGUEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kguest")
LANE_SCRIPT = os.path.join(KGUEST, "run_lane.sh")
LANE_PROCESS_TIMEOUT_S = 1500   # run_lane.sh's guest timeout is 1020 s; plus the image
VM, HOST = "10.77.0.2", "10.77.0.1"     # the stand-in VM's address, the host's own


def flow_key(r):
    """What identifies a packet's flow; ICMP echoes are one packet each (id, seq)."""
    if r["protocol"] == "icmp":
        return (r["direction"], "icmp", r["src_ip"], r["dst_ip"], r["icmp_type"],
                r["icmp_id"], r["icmp_seq"])
    return (r["direction"], r["protocol"], r["src_ip"], r["dst_ip"], r["src_port"],
            r["dst_port"])


def fmt_key(k):
    return " ".join(str(x) for x in k)


def counter_diff(got, want):
    lines = []
    for k in sorted(set(got) | set(want), key=str):
        if got.get(k, 0) != want.get(k, 0):
            lines.append("  %s: tool %d, oracle %d" % (k if isinstance(k, str) else
                                                       fmt_key(k), got.get(k, 0), want.get(k, 0)))
    return "\n".join(lines)


class ToolOutput(object):
    """One instance's stdout (JSON lines), stderr and exit status."""

    def __init__(self, run, method):
        self.method = method
        self.label = "%s --attach %s" % (run.name, method)
        self.stdout = run.read(method + ".jsonl")
        self.stderr = run.read(method + ".stderr")
        self.rc = int(run.read(method + ".rc").strip() or -1)
        self.records = []
        for i, line in enumerate(self.stdout.splitlines(), 1):
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
            except ValueError:
                raise AssertionError("%s: stdout line %d is not JSON: %r" % (self.label, i, line[:200]))
        self.packets = [r for r in self.records if r.get("type") == "packet"]
        sums = [r for r in self.records if r.get("type") == "summary"]
        assert len(sums) == 1, "%s: %d summary records (want 1); rc %s; stderr:\n%s" % (
            self.label, len(sums), self.rc, self.stderr[-2000:])
        self.summary = sums[0]


class Run(object):
    """One traced run of the lane: both instances' outputs and the oracles."""

    def __init__(self, lane, name):
        self.name = name
        self.topo = name.split("-")[0]
        self.dir = lane.path("runs", name)
        assert os.path.isdir(self.dir), (
            "no results for run %s: the guest did not get that far (see %s)"
            % (name, lane.path("lane.log")))
        self.meta = json.loads(self.read("meta.json"))
        self.oracle = [json.loads(l) for l in self.read("oracle.jsonl").splitlines() if l.strip()]
        self.methods = self.meta["methods"].split()
        self.out = dict((m, ToolOutput(self, m)) for m in self.methods)
        self._captures = {}

    def read(self, name):
        path = os.path.join(self.dir, name)
        assert os.path.exists(path), "the guest wrote no %s" % path
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def capture(self, dev):
        """Packets tcpdump saw on dev, with the direction the tool would give them."""
        if dev not in self._captures:
            stats = self.read(dev + ".tcpdump.stderr")
            m = re.search(r"(\d+) packets? dropped by kernel", stats)
            assert m and m.group(1) == "0", "%s: tcpdump on %s dropped packets or did not " \
                "finish: %s" % (self.name, dev, stats.strip())
            pkts = []
            for ts, frame in read_pcap(os.path.join(self.dir, dev + ".pcap")):
                p = parse_frame(frame)
                if p is None:
                    continue
                if p["src_ip"] == VM:
                    p["direction"] = "tx"
                elif p["dst_ip"] in (VM, HOST):
                    p["direction"] = "rx"
                else:
                    p["direction"] = "other"
                p["ts"] = ts
                pkts.append(p)
            self._captures[dev] = pkts
        return self._captures[dev]

    def oracle_of(self, kind):
        return [o for o in self.oracle if o.get("kind") == kind or kind in o]


class Lane(object):
    def __init__(self, suite, root, output, rc):
        self.suite, self.root, self.output, self.rc = suite, root, output, rc
        self._runs = {}
        self._stages = {}

    def run_after(self, step):
        """The first traced run the guest made after a step (the order of steps.tsv)."""
        names = [l.split("\t")[0] for l in self.read("steps.tsv").splitlines() if l.strip()]
        later = [n for n in names[names.index(step) + 1:] if n.startswith("run.")]
        assert later, "no run after %s: %s" % (step, names)
        return self.run(later[0][len("run."):])

    def stages(self, method):
        """{stage: its --list-stages JSON object} as the tool planned them in the guest."""
        if method not in self._stages:
            objs = [json.loads(l) for l in self.read("list-stages-%s.json" % method).splitlines()
                    if l.strip()]
            self._stages[method] = dict((o["name"], o) for o in objs if o.get("type") == "stage")
        return self._stages[method]

    def traced(self, method):
        return set(n for n, o in self.stages(method).items() if o["method"])

    def has_drop_reasons(self):
        """The kernel's own word: kfree_skb's tracepoint has a reason field (5.17+)."""
        return bool(re.search(r"field:[^;]* reason;", self.read("kfree_skb.format")))

    def ovs_tracepoints(self):
        """The guest kernel's openvswitch tracepoints (ls of its tracefs directory)."""
        text = self.read("ovs-tracepoints.txt")
        return [] if "No such file" in text else text.split()

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def read(self, *parts):
        path = self.path(*parts)
        assert os.path.exists(path), "the guest wrote no %s" % path
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def run(self, name):
        if name not in self._runs:
            self._runs[name] = Run(self, name)
        return self._runs[name]


def run_lane(suite, results):
    """run_lane.sh in pytest's process group, so a Ctrl-C reaches it too; on a timeout or
    an interrupt it gets SIGTERM, on which it kills its QEMU (never leave one behind)."""
    # stop_with_parent: SIGTERM when pytest dies, even by SIGKILL; run_lane.sh traps it
    # and kills its QEMU
    proc = subprocess.Popen([LANE_SCRIPT, "--suite", suite, "--results", results],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True,
                            preexec_fn=stop_with_parent)
    try:
        out, _ = proc.communicate(timeout=LANE_PROCESS_TIMEOUT_S)
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if os.path.isdir(results):
            with open(os.path.join(results, "lane-output.txt"), "w") as f:
                f.write(out or "")
        raise
    return proc.returncode, out


def free_udp_port():
    """A UDP port of the host's loopback that nothing holds now."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


JOIN_GUEST_TIMEOUT_S = 900     # case J takes 3-5 minutes; each of its waits is bounded


def run_join(suites, results):
    """Case J: two guests at once (suites[0] host a, suites[1] host b, each its own
    kernel and clock), their NICs one QEMU socket link on the host's loopback. Both
    run_lane.sh in pytest's process group, stopped as run_lane() stops one.
    [(exit status, output)] of a and b."""
    ports = [free_udp_port(), free_udp_port()]
    procs = []
    try:
        for i, (suite, role) in enumerate(zip(suites, "ab")):
            procs.append(subprocess.Popen(
                [LANE_SCRIPT, "--suite", suite, "--cases", "J", "--results", results[i],
                 "--join", "%s,%d,%d" % (role, ports[i], ports[1 - i]),
                 "--timeout", str(JOIN_GUEST_TIMEOUT_S)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                preexec_fn=stop_with_parent))
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=LANE_PROCESS_TIMEOUT_S)
            outs.append((p.returncode, out))
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
