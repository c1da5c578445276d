#!/usr/bin/python3
"""overhead.py - what does vm_network_latency.py cost per packet, next to tcpdump,
bpftrace and the cheapest possible BPF filter?

Run as root, from the repository:  python3 -m bench.overhead [-r REPS] [-n FRAMES] [options]

The lab (every name starts with "vnb"; nothing else on the machine is touched):

  tapflood (holds vnbtap0, writes frames as a VM would)
     |  write() -> tun_get_user -> netif_receive_skb        (all in the writer's thread)
  vnbtap0 --- vnbbr0 (bridge, no IP, stp off, static fdb) --- vnbphy0 (veth)
                                                                |
                                 namespace vnb-remote: eth0 10.78.0.3/24 (52:54:00:78:00:03)
                                 static ARP 10.78.0.2 -> 52:54:00:78:00:02

No host-side device gets an address: the only address is inside the namespace.

Detailed mode's keep-up runs (is every packet reported at a paced rate?) measure the
tool's reader, not the path, and need a generator faster than the reader: they use a
second, shorter path on the same bridge, where nothing is received at the far end:

  tapflood (holds vnbtap1, src 52:54:00:78:00:05, dst 52:54:00:78:00:04)
  vnbtap1 --- vnbbr0 --- vnbsink0 (a dummy device, whose transmit counts the frame and
                                   frees it; where the kernel has no dummy driver, an
                                   ifb device, which frees a frame no tc action
                                   redirected to it and counts it as dropped)

with the tool on --vm-dev vnbtap1 --phy-dev vnbsink0 (the same stages: the tap's receive,
the device's queue and transmit). The sink's counter must count every frame sent. A
kernel with neither driver runs the keep-up floods on the long path (and says so).

Frames: 64-byte UDP/IPv4, 10.78.0.2:5000 -> 10.78.0.3:9000. Nobody listens on port 9000
in the namespace; its ICMP error generator is switched off by the namespace's own
global ICMP rate limit (icmp_msgs_per_sec=0, icmp_msgs_burst=0, icmp_ratelimit at its
maximum), so every frame takes the same path
  tap -> bridge -> veth -> namespace eth0 -> udp_rcv (no socket) -> kfree_skb(NO_SOCKET)
and nothing ever comes back towards the tap. The driver checks it (the namespace's eth0
sends 0 packets, UdpNoPorts counts every frame).

The whole host path runs in the writer's thread, so the generator's own CPU time per
frame (getrusage, user+sys) is the cost of the path, tracers' BPF programs included.
Each configuration is measured REPS times, interleaved (rotating order); report.py turns
the raw measurements into the table (medians, ratios, targets).

Two other paths, each measured the same way against its own baseline (nothing
attached) and with the tool in histogram mode, after everything else (the main path
is measured on a host without a macvtap: with one, the tool compiles its macvtap code
in):

  macvtap   tapflood writes into macvtap vnbmvt0 (bridge mode) through its /dev/tapN,
            as QEMU does for libvirt's <interface type='direct'>: tap_get_user ->
            the macvtap's queue -> macvlan -> veth vnbphy1 -> the namespace's eth1
            (10.78.1.3), udp_rcv, no socket; all in the writer's thread.
  VM to VM  tapflood writes into vnbtap2 frames for vnbtap3 on the same bridge, whose
            "VM" is a second tapflood (--drain) reading every frame: the writer's CPU
            time per frame plus the reader's (tun_put_user and the tool's vm_read probe
            run there). The reader must get every frame: one read() a frame is slower
            than the writer, whose floods here are paced at V2V_RATE frames/s (pacing
            costs its configurations the same sleeps). It is also the path a VM
            receives by, measured with --explain too (the reader's waits are what
            --explain explains; no frame raises a softirq of its own here, where every
            frame on the main path does: the veth's receive into the namespace).

With BPF statistics on (kernel.bpf_stats_enabled, one flood each), the run time of every
program, and two variants of the floor's (floor.py empty, clock): what a program run and
a clock read cost, from which report.py gives the least histogram mode can cost on this
machine, and the least --explain's interrupt time can (a program at each softirq's entry
and exit).

The devices and namespace are made with the test suite's own tests/harness/topology.py; the
tool's counts come from its --output json summary. Everything created (devices,
namespace, processes, work files) is removed on exit, on failure and on Ctrl-C. The
generator binary is cached in /var/cache/vm-network-latency/bench, and results are
written there as JSON (the raw runs and the analysis).

MIT License (see LICENSE).
"""
import argparse
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench import report
from tests.harness import topology                      # the tests' devices
from tests.harness.procs import LabError, die_with_parent, run
from tests.kguest.guest import prog_cost                # programs by tracepoint

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PY = "/usr/bin/python3"             # BCC's bindings live in the distribution's interpreter
CACHE = "/var/cache/vm-network-latency/bench"
LOCK = "/run/vnb-bench.lock"

BR, TAP, PHY, NS = "vnbbr0", "vnbtap0", "vnbphy0", "vnb-remote"
VM_MAC, REMOTE_MAC = "52:54:00:78:00:02", "52:54:00:78:00:03"
# the keep-up runs' short path: a second tap and a sink device on the bridge, with the
# statistics that count what the sink's transmit freed
FAST_TAP, SINK = "vnbtap1", "vnbsink0"
SINK_KINDS = [("dummy", ("tx_packets",)), ("ifb", ("rx_dropped", "tx_dropped"))]
FAST_VM_MAC, SINK_MAC = "52:54:00:78:00:05", "52:54:00:78:00:04"
VM_IP, REMOTE_IP = "10.78.0.2", "10.78.0.3"
# the macvtap path: its own veth "NIC" into the namespace (eth1), a macvtap on it
MVT, MVT_PHY = "vnbmvt0", "vnbphy1"
MVT_MAC, MVT_REMOTE_MAC, MVT_REMOTE_IP = "52:54:00:78:01:02", "52:54:00:78:01:03", "10.78.1.3"
# the VM-to-VM path: a writer's tap and a reader's tap on the bridge
V2V_TAP, V2V_MAC, RECV_TAP, RECV_MAC = "vnbtap2", "52:54:00:78:00:06", "vnbtap3", \
    "52:54:00:78:00:07"
V2V_RATE = 250000   # frames/s the reader keeps up with (unpaced it read 15,110 of 20,000)

DEVS = ["--vm-dev", TAP, "--phy-dev", PHY, "--output", "json"]
TOOL_ARGS = {
    "tool_hist": DEVS + ["--mode", "histogram", "--interval", "3600"],
    # the attach methods side by side: auto (tp_btf at the stages that read sk_buff
    # fields, where the kernel loads them) and raw tracepoints only
    "tool_hist_raw": DEVS + ["--mode", "histogram", "--interval", "3600",
                             "--attach", "tracepoint"],
    "tool_thresh": DEVS + ["--mode", "detailed", "--latency-threshold", "1000000"],
    "tool_detail": DEVS + ["--mode", "detailed"],
    "tool_filtered": DEVS + ["--dst-port", "9999"],
    "tool_sample": DEVS + ["--mode", "histogram", "--interval", "3600", "--sample", "100"],
    # --explain: each stage checks for the longest segment, and every context switch and
    # interrupt of the machine runs the scheduler's handlers (two lookups for a thread
    # not followed)
    "tool_explain": DEVS + ["--mode", "histogram", "--interval", "3600", "--explain"],
    "tool_keepup": ["--vm-dev", FAST_TAP, "--phy-dev", SINK, "--output", "json",
                    "--mode", "detailed"],
    # the other paths, histogram mode as config 2
    "mvt_hist": ["--vm-dev", MVT, "--phy-dev", MVT_PHY, "--output", "json", "--mode",
                 "histogram", "--interval", "3600"],
    "v2v_hist": ["--vm-dev", V2V_TAP, "--vm-dev", RECV_TAP, "--output", "json", "--mode",
                 "histogram", "--interval", "3600"],
    # --explain where a VM receives: the reader's waits are what it explains, and no
    # frame raises a softirq of its own (tap -> bridge -> tap)
    "v2v_explain": ["--vm-dev", V2V_TAP, "--vm-dev", RECV_TAP, "--output", "json", "--mode",
                    "histogram", "--interval", "3600", "--explain"],
}
# which generator floods each configuration's path (the rest: the main one)
PATH_OF = {"mvt_baseline": "mvt", "mvt_hist": "mvt", "v2v_baseline": "v2v",
           "v2v_hist": "v2v", "v2v_explain": "v2v"}
# the soaks: is resident memory flat once warm, at full rate for half an hour?
SOAK_PORT = 9478
SOAK_ARGS = {
    "histogram": DEVS + ["--mode", "histogram", "--interval", "1"],
    "exporter": DEVS + ["--mode", "histogram", "--interval", "1", "--quiet",
                        "--prometheus", "127.0.0.1:%d" % SOAK_PORT],
}
SOAK_SAMPLE_S = 10
STATS_CONFIGS = ["tool_hist", "tool_hist_raw", "tool_detail", "tool_filtered",
                 "tool_sample", "tool_explain", "floor", "floor_empty", "floor_clock"]
PATH_STATS_CONFIGS = ["v2v_hist", "v2v_explain"]
# the options a configuration needs of the tool (a version from before them, --rev,
# is measured without it)
NEEDS_OPTION = {"tool_explain": "--explain", "v2v_explain": "--explain"}
# the floor's program on its four tracepoints, and its two variants that measure what
# no tracer avoids (BPF run time only): a program that returns at once, one that reads
# the clock once
FLOOR_VARIANTS = {"floor": "floor", "floor_empty": "empty", "floor_clock": "clock"}
NEEDED = [("ip", "iproute2"), ("bridge", "iproute2"), ("tcpdump", "tcpdump"),
          ("bpftrace", "bpftrace"), ("bpftool", "bpftool"), ("gcc", "gcc")]

START = time.monotonic()
TRACERS = []        # every tracing process started, stopped at the end whatever happens
GENERATORS = []     # and every generator


def log(msg):
    sys.stderr.write("[overhead %6.1fs] %s\n" % (time.monotonic() - START, msg))
    sys.stderr.flush()


class BenchError(Exception):
    """The benchmark cannot go on: one line, exit 1."""


class Stop(Exception):
    """A signal or the hard time limit: clean up and stop."""


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="What vm_network_latency.py costs per packet, next to tcpdump, "
                    "bpftrace and the cheapest BPF filter (run as root).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  sudo python3 -m bench.overhead -r 5            # the README's table\n"
               "  sudo python3 -m bench.overhead -r 1 -n 50000   # a quick look\n"
               "  sudo python3 -m bench.overhead --rev HEAD~3    # an older version, same machine\n"
               "  sudo python3 -m bench.overhead --soak 30       # resident memory at full rate\n")
    pos = report.positive_int
    p.add_argument("-r", "--reps", type=pos, default=5,
                   help="repetitions per configuration, interleaved (default 5)")
    p.add_argument("-n", "--frames", type=pos, default=200000,
                   help="frames per flood (default 200000)")
    p.add_argument("-p", "--ports", type=pos, default=1,
                   help="vary the source port over N values 5000.. (default 1)")
    p.add_argument("--keepup-rates", type=report.rates, default=report.rates(
                   "50000 100000 150000 200000"), metavar='"R.."',
                   help="paced rates (frames/s) tried for detailed mode, ascending, until "
                        "one loses packets (default \"50000 100000 150000 200000\")")
    p.add_argument("--keepup-seconds", type=pos, default=3,
                   help="length of each paced run (default 3)")
    p.add_argument("--startup-runs", type=pos, default=3,
                   help="start-up time measurements (default 3)")
    p.add_argument("--main-only", action="store_true",
                   help="only the main path, not the macvtap and VM-to-VM ones (a version "
                        "from before issue 23 follows neither)")
    p.add_argument("--no-bpf-stats", action="store_true",
                   help="skip the per-program breakdown (kernel.bpf_stats_enabled run)")
    p.add_argument("-o", "--json", metavar="FILE",
                   help="where to write the results (default %s/overhead-<time>.json)" % CACHE)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tool", default=os.path.join(REPO, "vm_network_latency.py"),
                   help="the tool to measure; copied at start, so every run measures "
                        "the same version")
    g.add_argument("--rev", help="measure the tool as committed at git revision REV "
                                 "(read with 'git show', the working tree is not touched)")
    p.add_argument("--max-seconds", type=pos, default=900,
                   help="hard limit for the whole run (default 900; a soak adds its own)")
    p.add_argument("--soak", type=pos, metavar="MINUTES",
                   help="instead of the cost runs: histogram mode (--interval 1) at full "
                        "rate for MINUTES, its resident memory sampled every %d s, and "
                        "its growth after warm-up reported; then the same as an exporter "
                        "(--prometheus, scraped every second)" % SOAK_SAMPLE_S)
    p.add_argument("--soak-configs", default="histogram,exporter", metavar="C[,C]",
                   help="which soaks (default histogram,exporter)")
    args = p.parse_args(argv)
    args.soak_configs = args.soak_configs.split(",")
    if set(args.soak_configs) - set(SOAK_ARGS):
        p.error("--soak-configs: one of %s" % ", ".join(sorted(SOAK_ARGS)))
    if args.soak:
        args.max_seconds += args.soak * 60 * len(args.soak_configs) + 120
    return args


# ------------------------------------------------------------------ the machine

def install_dependencies():
    missing = sorted(set(pkg for cmd, pkg in NEEDED if not shutil.which(cmd)))
    if not os.path.exists("/usr/include/linux/if_tun.h"):
        missing.append("linux-libc-dev")
    if run([PY, "-c", "import bcc"], check=False).returncode:
        missing.append("python3-bpfcc")
    if not missing:
        return
    log("installing: %s" % " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
    inst = apt + ["install", "-y", "--no-install-recommends"] + missing
    if run(inst, check=False, timeout=900, env=env).returncode:
        run(apt + ["update"], check=False, timeout=900, env=env)
        if run(inst, check=False, timeout=900, env=env).returncode:
            raise BenchError("apt-get install %s failed" % " ".join(missing))


def prepare_kernel_side():
    """tracefs for tracepoints (left mounted: others use it); kernel headers where BCC
    looks for them (see LAB_FACTS: this kernel's own are not packaged)."""
    if not os.path.exists("/sys/kernel/tracing/events"):
        run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        log("mounted tracefs on /sys/kernel/tracing (left mounted)")
    build = "/lib/modules/%s/build" % os.uname().release
    if os.path.exists(build):
        return
    hdrs = sorted(d for d in os.listdir("/usr/src") if re.match(r"linux-headers-.*-amd64$", d))
    if not hdrs:
        raise BenchError("no kernel headers for BCC (install linux-headers-amd64)")
    hdr = os.path.join("/usr/src", hdrs[-1])
    common = hdr[:-len("-amd64")] + "-common"
    os.makedirs(os.path.dirname(build), exist_ok=True)
    os.symlink(hdr, build)
    if os.path.isdir(common) and not os.path.exists(os.path.dirname(build) + "/source"):
        os.symlink(common, os.path.dirname(build) + "/source")
    log("linked %s -> %s (left in place)" % (build, hdr))


def build_generator():
    src = os.path.join(HERE, "tapflood.c")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    os.makedirs(CACHE, exist_ok=True)
    gen = os.path.join(CACHE, "tapflood-" + digest)
    if not os.access(gen, os.X_OK):
        log("building %s" % gen)
        run(["gcc", "-O2", "-Wall", "-o", gen + ".tmp", src], timeout=120)
        os.rename(gen + ".tmp", gen)
    return gen


def stop_leftover_generators():
    """Generators left by a SIGKILLed run (their pid files, checked against the binary)."""
    for name in os.listdir(CACHE):
        if not re.match(r"generator(-.*)?\.pid$", name):
            continue
        path = os.path.join(CACHE, name)
        try:
            pid = int(open(path).read())
            if os.readlink("/proc/%d/exe" % pid).startswith(CACHE + "/tapflood-"):
                log("stopping a generator left by an earlier run (pid %d)" % pid)
                os.kill(pid, signal.SIGTERM)
                time.sleep(0.3)
        except (OSError, ValueError):
            pass
        try:
            os.unlink(path)
        except OSError:
            pass


def snapshot_tool(args, work):
    """The tool under test as a private copy: edits made while we run change nothing."""
    path = os.path.join(work, "vm_network_latency.py")
    if args.rev:
        r = run(["git", "-C", REPO, "show", "%s:vm_network_latency.py" % args.rev], check=False)
        if r.returncode:
            raise BenchError("cannot read vm_network_latency.py at %s: %s"
                             % (args.rev, r.stderr.strip()))
        with open(path, "w") as f:
            f.write(r.stdout)
        short = run(["git", "-C", REPO, "rev-parse", "--short", args.rev], check=False)
        desc = "git " + (short.stdout.strip() or args.rev)
    else:
        if not os.path.isfile(args.tool):
            raise BenchError("%s not found" % args.tool)
        shutil.copy(args.tool, path)
        desc = args.tool
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    return path, desc, sha


# ------------------------------------------------------------------ the lab

class Generator(object):
    """tapflood --serve: creates and holds the tap, answers one line per command."""

    def __init__(self, binary, errpath, tap, options=(), mode="--serve"):
        self.err = open(errpath, "w")
        self.proc = subprocess.Popen([binary, "-i", tap, mode, "-p", "1"] + list(options),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, preexec_fn=die_with_parent)
        GENERATORS.append(self)
        self.pidfile = os.path.join(CACHE, "generator-%s.pid" % tap)
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % self.proc.pid)
        self.buf = b""

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise BenchError("the generator did not answer within %ss" % timeout)
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise BenchError("the generator exited (%s)" % open(self.err.name).read())
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def send(self, line):
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, line, timeout):
        self.send(line)
        return self.readline(timeout)

    def flood(self, frames, ports, rate=0, timeout=300):
        """One flood; the generator's own measurement of it as a dict of numbers."""
        answer = self.cmd("flood %d %d %d" % (frames, ports, rate), timeout)
        if not answer.startswith("result "):
            raise BenchError("flood failed: %s" % answer)
        return report.key_values(answer)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self.err.close()
        try:
            os.unlink(self.pidfile)
        except OSError:
            pass


def in_ns(*argv):
    return topology.in_ns(NS, *argv)


def lab_down():
    left = topology.remove([BR, PHY, TAP, SINK, FAST_TAP, MVT, MVT_PHY, V2V_TAP, RECV_TAP],
                           [NS])
    if left:
        log("warning: could not remove %s" % " ".join(left))


def lab_up(gen_binary, work):
    lab_down()          # leftovers of an earlier run (vnb names only)
    topology.add_netns(NS)
    topology.add_bridge(BR)
    topology.add_veth_into(PHY, NS, "eth0", mac=REMOTE_MAC, address=REMOTE_IP + "/24",
                           master=BR)
    # no ICMP port-unreachable replies: the namespace's global ICMP budget is zero
    in_ns("sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=0", "net.ipv4.icmp_msgs_burst=0",
          "net.ipv4.icmp_ratelimit=2147483647")
    in_ns("ip", "neigh", "replace", VM_IP, "lladdr", VM_MAC, "dev", "eth0", "nud", "permanent")
    topology.up(PHY, BR)
    run(["bridge", "fdb", "replace", REMOTE_MAC, "dev", PHY, "master", "static"])
    sink = add_sink()
    gen = start_generator(gen_binary, work, TAP, VM_MAC, ())
    ports = [TAP, PHY]
    fast = None
    if sink:
        fast = start_generator(gen_binary, work, FAST_TAP, FAST_VM_MAC,
                               ("--src-mac", FAST_VM_MAC, "--dst-mac", SINK_MAC))
        ports += [FAST_TAP, SINK]
    for _ in range(100):      # every bridge port forwarding
        out = run(["bridge", "link", "show"]).stdout
        if all(re.search(r"\b%s\b.*state forwarding" % d, out) for d in ports):
            break
        time.sleep(0.1)
    else:
        raise BenchError("bridge ports do not forward")
    lab = {"tap_ifindex": ifindex(TAP), "phy_ifindex": ifindex(PHY),
           "sink_kind": sink and sink[0], "sink_counters": sink and sink[1],
           "mvt": None, "v2v": None, "gen_binary": gen_binary}     # other_paths_up()
    log("lab up: %s (ifindex %d) -> %s -> %s (ifindex %d) -> %s eth0 %s; keep-up: %s" % (
        TAP, lab["tap_ifindex"], BR, PHY, lab["phy_ifindex"], NS, REMOTE_IP,
        "%s -> %s (%s)" % (FAST_TAP, SINK, sink[0]) if sink else
        "on that path (no dummy or ifb driver for a shorter one)"))
    return gen, fast, lab


def macvtap_path(gen_binary, work):
    """The macvtap path: veth vnbphy1 into the namespace (eth1, 10.78.1.3), macvtap
    vnbmvt0 on it in bridge mode, a generator writing into the macvtap's queue."""
    topology.add_veth_into(MVT_PHY, NS, "eth1", mac=MVT_REMOTE_MAC,
                           address=MVT_REMOTE_IP + "/24")
    in_ns("ip", "neigh", "replace", "10.78.1.2", "lladdr", MVT_MAC, "dev", "eth1", "nud",
          "permanent")
    topology.up(MVT_PHY)
    topology.add_macvtap(MVT, MVT_PHY, MVT_MAC)
    gen = Generator(gen_binary, os.path.join(work, "gen-%s.err" % MVT), MVT,
                    ("--src-mac", MVT_MAC, "--dst-mac", MVT_REMOTE_MAC, "--src-ip",
                     "10.78.1.2", "--dst-ip", MVT_REMOTE_IP))
    line = gen.readline(10)
    if not line.startswith("created"):
        raise BenchError("macvtap generator: %s" % line)
    gen.cmd("up", 10)
    return gen


def vm_to_vm_path(gen_binary, work):
    """The VM-to-VM path: a writer on vnbtap2 and a reader draining vnbtap3, both
    ports of the bridge, which knows both MACs. Returns (writer, reader)."""
    reader = Generator(gen_binary, os.path.join(work, "drain-%s.err" % RECV_TAP), RECV_TAP,
                       (), mode="--drain")
    line = reader.readline(10)
    if not line.startswith("created"):
        raise BenchError("reader: %s" % line)
    topology.disable_ipv6(RECV_TAP)
    # room for 40 ms of the flood while the reader is off its CPU (a tap's ring holds
    # 500 frames: 2 ms here)
    topology.ip("link", "set", RECV_TAP, "txqueuelen", "10000")
    topology.ip("link", "set", RECV_TAP, "master", BR)
    reader.cmd("up", 10)
    run(["bridge", "fdb", "replace", RECV_MAC, "dev", RECV_TAP, "master", "static"])
    writer = start_generator(gen_binary, work, V2V_TAP, V2V_MAC,
                             ("--src-mac", V2V_MAC, "--dst-mac", RECV_MAC, "--src-ip",
                              "10.78.0.6", "--dst-ip", "10.78.0.7"))
    return writer, reader


def other_paths_up(lab, work):
    """The macvtap and VM-to-VM paths, made after the main path's runs: on a host with a
    macvtap the tool compiles its macvtap code in, and the main path is measured on a
    host without one, as it was before macvtaps were followed."""
    lab["v2v"] = vm_to_vm_path(lab["gen_binary"], work)
    lab["mvt"] = macvtap_path(lab["gen_binary"], work)


def drained(reader):
    """The reader's tally: (frames read, its CPU seconds) so far."""
    kv = report.key_values(reader.cmd("count", 10))
    if "frames" not in kv:
        raise BenchError("the reader did not answer its count")
    return kv["frames"], kv["cpu_s"]


def add_sink():
    """The keep-up path's last device, on the bridge: (kind, its counters), or None."""
    for kind, counters in SINK_KINDS:
        if topology.ip("link", "add", SINK, "type", kind, check=False).returncode == 0:
            break
    else:
        return None
    topology.disable_ipv6(SINK)
    topology.ip("link", "set", SINK, "master", BR)
    topology.up(SINK)
    run(["bridge", "fdb", "replace", SINK_MAC, "dev", SINK, "master", "static"])
    return kind, counters


def start_generator(binary, work, tap, mac, options):
    """A generator holding its tap, the tap a port of the bridge that knows its MAC."""
    gen = Generator(binary, os.path.join(work, "gen-%s.err" % tap), tap, options)
    line = gen.readline(10)
    if not line.startswith("created"):
        raise BenchError("generator: %s" % line)
    topology.disable_ipv6(tap)
    topology.ip("link", "set", tap, "master", BR)
    gen.cmd("up", 10)
    run(["bridge", "fdb", "replace", mac, "dev", tap, "master", "static"])
    return gen


def ifindex(dev):
    with open("/sys/class/net/%s/ifindex" % dev) as f:
        return int(f.read())


def path_counters():
    """The namespace's eth0 rx/tx packets, UDP NoPorts and ICMP OutMsgs (absolute)."""
    r = in_ns("sh", "-c", "cat /sys/class/net/eth0/statistics/rx_packets "
                          "/sys/class/net/eth0/statistics/tx_packets /proc/net/snmp")
    lines = r.stdout.splitlines()
    snmp = {}
    for names, values in zip(lines[2::2], lines[3::2]):
        if names.split(":")[0] == values.split(":")[0]:
            for k, v in zip(names.split()[1:], values.split()[1:]):
                snmp[names.split(":")[0] + ":" + k] = int(v)
    return {"rx": int(lines[0]), "tx": int(lines[1]), "udp_noports": snmp["Udp:NoPorts"],
            "icmp_out": snmp["Icmp:OutMsgs"]}


def sink_count(counters):
    """What the sink's transmit freed, by its counters (an ifb counts them as received
    and dropped, or transmitted and dropped, by kernel version: their sum)."""
    total = 0
    for name in counters:
        with open("/sys/class/net/%s/statistics/%s" % (SINK, name)) as f:
            total += int(f.read())
    return total


def counter_delta(a, b):
    return dict((k, b[k] - a[k]) for k in a)


# ------------------------------------------------------------------ CPU accounting

def proc_ticks(pid):
    """utime + stime of a process, in clock ticks (10 ms)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def ksoftirqd_pids():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if open("/proc/%s/comm" % d).read().startswith("ksoftirqd/"):
                    out.append(int(d))
            except OSError:
                pass
    return out


def machine_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return {"busy": user + nice + system + irq + softirq, "steal": steal, "total": sum(v)}


class CpuSnapshot(object):
    def __init__(self, pids, ksoftirqd):
        self.pids, self.ksoftirqd = pids, ksoftirqd
        self.tracer = sum(proc_ticks(p) for p in pids)
        self.ks = sum(proc_ticks(p) for p in ksoftirqd)
        self.machine = machine_ticks()

    def since(self):
        m = machine_ticks()
        return {"tracer_ticks": sum(proc_ticks(p) for p in self.pids) - self.tracer,
                "ksoftirqd_ticks": sum(proc_ticks(p) for p in self.ksoftirqd) - self.ks,
                "machine_busy_ticks": m["busy"] - self.machine["busy"],
                "machine_steal_ticks": m["steal"] - self.machine["steal"],
                "machine_total_ticks": m["total"] - self.machine["total"]}


def vm_hwm_kb(pid):
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------ the tracers

class Tracer(object):
    """One tracing process under measurement, its output in files of the work dir."""

    def __init__(self, argv, work, tag, ready, ready_in=("err",), settle=0.5):
        self.tag = tag
        self.out = os.path.join(work, tag + ".out")
        self.err = os.path.join(work, tag + ".err")
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                         preexec_fn=die_with_parent)
        TRACERS.append(self)
        files = [self.out if w == "out" else self.err for w in ready_in]
        deadline = time.monotonic() + 60
        while not any(re.search(ready, read(f), re.M) for f in files):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError("%s did not start: %s" % (tag, read(self.err)[-400:].strip()))
            time.sleep(0.05)
        time.sleep(settle)      # ready messages come right after the attach calls

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, grace=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def tool_summary(tracer):
    """The tool's exit summary: the last JSON object of type summary on its stdout."""
    for line in reversed(read(tracer.out).splitlines()):
        if '"type": "summary"' in line:
            return json.loads(line)
    return None


class Bench(object):
    def __init__(self, args, work, tool, gen, fast, lab, offsets):
        self.args, self.work, self.tool, self.gen, self.lab = args, work, tool, gen, lab
        self.fast = fast
        self.offsets = offsets
        self.ksoftirqd = ksoftirqd_pids()

    def start(self, cfg, tag):
        """The tracers of one configuration, attached."""
        w = self.work
        if cfg in TOOL_ARGS:
            return [Tracer([PY, self.tool] + TOOL_ARGS[cfg], w, tag, r"^Tracing")]
        if cfg == "tcpdump":
            return [Tracer(["tcpdump", "-n", "-i", dev, "-w", "/dev/null"], w,
                           "%s.%s" % (tag, dev), "listening on", settle=0)
                    for dev in (TAP, PHY)]
        if cfg == "bpftrace":
            return [Tracer(["bpftrace", os.path.join(HERE, "lat.bt"), TAP, PHY], w, tag,
                           r"^Attaching", ready_in=("out", "err"), settle=1.0)]
        if cfg in FLOOR_VARIANTS:
            return [Tracer([PY, os.path.join(HERE, "floor.py")] +
                           [str(v) for v in (self.offsets["SKB_DEV"],
                                             self.offsets["DEV_IFINDEX"],
                                             self.lab["tap_ifindex"],
                                             self.lab["phy_ifindex"])] +
                           [FLOOR_VARIANTS[cfg]],
                           w, tag, r"^Attached")]
        return []

    def stop(self, tracers):
        for t in tracers:
            t.stop()

    def measure(self, cfg, rep):
        """One flood under one configuration: the generator's figures and the tracers'."""
        tag = "%s-%d" % (cfg, rep)
        path = PATH_OF.get(cfg)
        gen, reader = self.gen, None
        if path == "mvt":
            gen = self.lab["mvt"]
        elif path == "v2v":
            gen, reader = self.lab["v2v"]
        tracers = self.start(cfg, tag)
        try:
            snap = CpuSnapshot([t.pid for t in tracers], self.ksoftirqd)
            got0 = drained(reader) if reader else None
            res = gen.flood(self.args.frames, self.args.ports, V2V_RATE if reader else 0)
            res.update(snap.since())
            if reader:
                # the receiving "VM"'s reads are part of this path's cost
                time.sleep(0.2)
                got, cpu = drained(reader)
                res["received"] = got - got0[0]
                res["writer_cpu_ns_per_frame"] = res["cpu_ns_per_frame"]
                res["cpu_ns_per_frame"] += (cpu - got0[1]) * 1e9 / self.args.frames
                if res["received"] != self.args.frames:
                    log("warning: %s run %d: the reader got %d of %d frames" % (
                        cfg, rep, res["received"], self.args.frames))
            res["hwm_kb"] = vm_hwm_kb(tracers[0].pid) if cfg in TOOL_ARGS or cfg == "floor" \
                else 0
        finally:
            self.stop(tracers)
        res.update(cfg=cfg, rep=rep)
        if cfg in TOOL_ARGS:
            res["summary"] = tool_summary(tracers[0])
            if not res["summary"]:
                log("warning: %s run %d printed no summary: %s"
                    % (cfg, rep, read(tracers[0].err)[-300:].strip()))
        elif cfg == "tcpdump":
            errs = "".join(read(t.err) for t in tracers)
            res["captured"] = sum(int(n) for n in re.findall(r"(\d+) packets captured", errs))
            res["kernel_dropped"] = sum(int(n) for n in
                                        re.findall(r"(\d+) packets dropped by kernel", errs))
            res["received"] = sum(int(n) for n in
                                  re.findall(r"(\d+) packets received by filter", errs))
        elif cfg == "bpftrace":
            res["hist_count"] = sum(int(n) for n in re.findall(
                r"^\[.*\)\s+(\d+)\s+\|", read(tracers[0].out), re.M))
        elif cfg == "floor":
            m = re.search(r"^hits (\d+)", read(tracers[0].out), re.M)
            res["hits"] = int(m.group(1)) if m else None
        log("%-13s rep %d: %s ns/frame, %s frames/s, background %s" % (
            cfg, rep, res["cpu_ns_per_frame"], int(res["pps"]),
            report.fmt(report.background_pct(res), "{:.0f}%")))
        return res

    def keepup(self, rate):
        """Detailed mode, every packet reported, at a paced rate, on the short path
        (tap -> bridge -> sink) where the kernel has a sink driver."""
        n = rate * self.args.keepup_seconds
        counters = self.lab["sink_counters"]
        tracers = self.start("tool_keepup" if counters else "tool_detail", "keepup-%d" % rate)
        try:
            snap = CpuSnapshot([t.pid for t in tracers], self.ksoftirqd)
            before = sink_count(counters) if counters else 0
            res = (self.fast or self.gen).flood(n, self.args.ports, rate,
                                                timeout=self.args.keepup_seconds * 10 + 60)
            res.update(snap.since())
            time.sleep(0.5)
            res["sink_kind"] = self.lab["sink_kind"]
            res["sink_count"] = sink_count(counters) - before if counters else None
        finally:
            self.stop(tracers)
        res.update(rate=rate, summary=tool_summary(tracers[0]))
        s = res["summary"] or {}
        log("keep-up at %d/s: sent %d (%d/s achieved), reported %s, lost %s, the sink "
            "freed %s" % (rate, n, res["pps"], s.get("reported"), s.get("lost"),
                          res["sink_count"]))
        if counters and res["sink_count"] != n:
            raise BenchError("the keep-up path lost frames: %d sent, the sink freed %d"
                             % (n, res["sink_count"]))
        return res

    def startup(self, i):
        """Launch the tool while the generator sends one frame every 10 ms: how long
        until the first packet record?"""
        launched = time.time()
        t = Tracer([PY, self.tool] + TOOL_ARGS["tool_detail"], self.work, "startup-%d" % i,
                   "", settle=0)
        first = None
        try:
            self.gen.send("tick 10000")
            deadline = time.monotonic() + 30
            while first is None and time.monotonic() < deadline and t.proc.poll() is None:
                for line in read(t.out).splitlines():
                    if '"type": "packet"' in line:
                        first = json.loads(line)
                        break
                time.sleep(0.05)
            ticked = self.gen.cmd("stop", 10)
            if not ticked.startswith("ticked"):
                raise BenchError("the generator did not stop ticking: %s" % ticked)
        finally:
            t.stop()
        if first is None:
            log("startup run %d: no packet record (%s)" % (i, read(t.err)[-200:].strip()))
            return None
        took = first["timestamp"] - launched
        log("startup run %d: first record %.3f s after launch" % (i, took))
        return took

    def bpf_stats(self, cfg):
        """Run time per BPF program during one flood (kernel.bpf_stats_enabled=1)."""
        tracers = self.start(cfg, "stats-" + cfg)
        try:
            ids = set()
            fd_dir = "/proc/%d/fdinfo" % tracers[0].pid
            for fd in os.listdir(fd_dir):
                m = re.search(r"^prog_id:\s+(\d+)", read(os.path.join(fd_dir, fd)), re.M)
                if m:
                    ids.add(int(m.group(1)))
            # a raw tracepoint's link (typed or not) names its tracepoint: the programs'
            # own names are cut at 15 characters (JSON keys: strings)
            tracepoint_of = dict((str(i), tp) for i, tp in
                                 prog_cost.tracepoints_of(tracers[0].pid).items())
            before = bpftool_progs(ids)
            if PATH_OF.get(cfg) == "v2v":
                res = self.lab["v2v"][0].flood(self.args.frames, self.args.ports, V2V_RATE)
            else:
                res = self.gen.flood(self.args.frames, self.args.ports)
            after = bpftool_progs(ids)
        finally:
            self.stop(tracers)
        log("bpf_stats run %s done" % cfg)
        return {"cfg": cfg, "frames": res["frames"], "cpu_ns_per_frame": res["cpu_ns_per_frame"],
                "before": before, "after": after, "tracepoint_of": tracepoint_of}


def bpftool_progs(ids):
    r = run(["bpftool", "prog", "show", "-j"], check=False)
    try:
        progs = json.loads(r.stdout)
    except ValueError:
        return []
    return [p for p in progs if p.get("id") in ids]


def tool_offsets(tool):
    """struct offsets for the floor: the tool's own BTF-derived layout (--ebpf)."""
    r = run([PY, tool, "--ebpf", "--vm-dev", TAP, "--phy-dev", PHY], check=False, timeout=120)
    found = dict(re.findall(r"^#define (SKB_DEV|DEV_IFINDEX) (\d+)$", r.stdout, re.M))
    if len(found) != 2:
        raise BenchError("no SKB_DEV/DEV_IFINDEX in the tool's --ebpf output: %s"
                         % r.stderr.strip()[-300:])
    return dict((k, int(v)) for k, v in found.items())


def bpf_stats_enabled(value=None):
    path = "/proc/sys/kernel/bpf_stats_enabled"
    if value is None:
        return open(path).read().strip()
    with open(path, "w") as f:
        f.write(value)


def stats_runs(bench, cfgs):
    """One flood per configuration with the kernel's BPF statistics on, as it was after."""
    old = bpf_stats_enabled()
    bpf_stats_enabled("1")
    try:
        return [bench.bpf_stats(cfg) for cfg in cfgs]
    finally:
        bpf_stats_enabled(old)


# ------------------------------------------------------------------ the run

def measure_all(args, bench, gen):
    raw = {"frames": args.frames, "reps": args.reps, "source_ports": args.ports,
           "kernel": os.uname().release, "cpus": os.cpu_count(),
           "keepup_seconds": args.keepup_seconds}
    main = [c for c in report.MAIN_CONFIGS if tool_has(bench.tool, c)]
    dry_run_all([c for c in TOOL_ARGS if c not in PATH_OF and c in main], bench)
    c0 = path_counters()
    log("warm-up flood")
    gen.flood(args.frames, args.ports)
    c1 = path_counters()
    raw["path_check_warmup"] = counter_delta(c0, c1)
    log("path check: %s" % raw["path_check_warmup"])
    if raw["path_check_warmup"]["rx"] < args.frames:
        raise BenchError("the frames do not reach the namespace")

    raw["runs"] = interleaved(args, bench, main)

    raw["keepup"] = []
    for i, rate in enumerate(args.keepup_rates):
        res = bench.keepup(rate)
        raw["keepup"].append(res)
        if report.kept_up(res):
            continue
        if i == 0:      # not even the lowest rate: what does it keep up with?
            r = rate * 2 // 3
            for _ in range(4):
                if r < 5000:
                    break
                res = bench.keepup(r)
                raw["keepup"].append(res)
                if report.kept_up(res):
                    break
                r = r * 2 // 3
        break

    raw["startup_s"] = [s for s in (bench.startup(i + 1) for i in range(args.startup_runs))
                        if s is not None]
    raw["bpf_stats"] = []
    if not args.no_bpf_stats:
        raw["bpf_stats"] = stats_runs(bench, [cfg for cfg in STATS_CONFIGS
                                              if cfg not in TOOL_ARGS or cfg in main])
    raw["path_check_total"] = counter_delta(c0, path_counters())
    if args.main_only:
        return raw

    log("the other paths: macvtap and VM to VM")
    other_paths_up(bench.lab, bench.work)
    paths = [c for c in report.PATH_CONFIGS if tool_has(bench.tool, c)]
    dry_run_all([c for c in TOOL_ARGS if c in paths], bench)
    bench.lab["mvt"].flood(args.frames // 10, args.ports)
    bench.lab["v2v"][0].flood(args.frames // 10, args.ports, V2V_RATE)
    raw["runs"] += interleaved(args, bench, paths)
    if not args.no_bpf_stats:
        # where the VM-to-VM path's --explain time goes (the reader's waits)
        raw["bpf_stats"] += stats_runs(bench, [c for c in PATH_STATS_CONFIGS if c in paths])
    return raw


def tool_has(tool, cfg):
    """Does this version of the tool have what configuration cfg needs?"""
    option = NEEDS_OPTION.get(cfg)
    if not option:
        return True
    r = run([PY, tool, "--help"], check=False, timeout=60)
    return option in r.stdout


def dry_run_all(configs, bench):
    """Fail early: every configuration's programs pass the verifier."""
    for cfg in configs:
        r = run([PY, bench.tool] + TOOL_ARGS[cfg] + ["--dry-run"], check=False, timeout=180)
        if r.returncode:
            raise BenchError("the tool fails its --dry-run for %s: %s"
                             % (cfg, r.stderr.strip()[-300:]))


def interleaved(args, bench, configs):
    """REPS runs of each configuration, interleaved in rotating order."""
    runs, n = [], len(configs)
    for rep in range(1, args.reps + 1):
        for j in range(n):
            runs.append(bench.measure(configs[(j + rep - 1) % n], rep))
    return runs


def vm_rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def soak(args, bench, gen, cfg):
    """One soak: the tool attached for args.soak minutes while the generator floods
    back to back; its resident memory every SOAK_SAMPLE_S seconds (an exporter is
    scraped every second meanwhile, as Prometheus would)."""
    import threading
    import urllib.request
    log("soak %s: %d minutes at full rate" % (cfg, args.soak))
    t = Tracer([PY, bench.tool] + SOAK_ARGS[cfg], bench.work, "soak-" + cfg, r"^Tracing")
    done = threading.Event()
    flooded = [0]

    def flood():
        while not done.is_set():
            r = gen.flood(args.frames, args.ports)
            flooded[0] += int(r.get("frames", args.frames))

    def scrape():
        while not done.wait(1.0):
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/metrics" % SOAK_PORT,
                                       timeout=5).read()
            except OSError as e:
                log("scrape failed: %s" % e)
    threads = [threading.Thread(target=flood)] + \
        ([threading.Thread(target=scrape)] if cfg == "exporter" else [])
    for th in threads:
        th.daemon = True
        th.start()
    start, samples = time.monotonic(), []
    try:
        while time.monotonic() - start < args.soak * 60:
            time.sleep(SOAK_SAMPLE_S)
            samples.append([round(time.monotonic() - start, 1), vm_rss_kb(t.pid)])
            if len(samples) % 6 == 0:
                log("soak %s: %4.0f s, resident %s kB" % (cfg, samples[-1][0], samples[-1][1]))
    finally:
        done.set()
        for th in threads:
            th.join(120)
        t.stop()
    summary = tool_summary(t)
    return {"config": cfg, "argv": SOAK_ARGS[cfg], "minutes": args.soak,
            "sample_s": SOAK_SAMPLE_S, "frames": flooded[0], "samples": samples,
            "reported": summary and summary.get("reported"),
            "lost": summary and summary.get("lost")}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        sys.stderr.write("overhead.py: must run as root\n")
        return 2

    def on_signal(signum, _frame):
        raise Stop("signal %d" % signum)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, on_signal)
    signal.alarm(args.max_seconds)      # every wait is bounded; this is the safety net

    lock = open(LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.stderr.write("overhead.py: another benchmark holds %s\n" % LOCK)
        return 1
    work = tempfile.mkdtemp(prefix="vnb-bench.")
    try:
        install_dependencies()
        prepare_kernel_side()
        tool, desc, sha = snapshot_tool(args, work)
        log("tool under test: %s (sha256 %s...)" % (desc, sha))
        gen_binary = build_generator()
        stop_leftover_generators()
        gen, fast, lab = lab_up(gen_binary, work)
        bench = Bench(args, work, tool, gen, fast, lab, tool_offsets(tool))
        if args.soak:
            raw = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                   "soak": [soak(args, bench, gen, cfg) for cfg in args.soak_configs]}
        else:
            raw = measure_all(args, bench, gen)
        raw.update(tool=desc, tool_sha256_prefix=sha,
                   total_seconds=round(time.monotonic() - START, 1))
        result = report.analyse(raw)
        out = args.json or os.path.join(CACHE, "overhead-%s.json"
                                        % time.strftime("%Y%m%d-%H%M%S"))
        with open(out, "w") as f:
            json.dump({"raw": raw, "result": result}, f, indent=2)
        print(report.render(result))
        print("\nJSON: %s" % out)
        return 0
    except (BenchError, LabError) as e:
        log("error: %s" % e)
        return 1
    except Stop as e:
        log("stopped (%s): cleaning up" % e)
        return 130
    finally:
        signal.alarm(0)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)     # cleanup is not interrupted
        for t in TRACERS:
            t.stop(grace=10)
        for g in GENERATORS:
            g.close()
        lab_down()
        shutil.rmtree(work, ignore_errors=True)
        lock.close()
        log("total run time: %.1f s" % (time.monotonic() - START))


if __name__ == "__main__":
    sys.exit(main())
