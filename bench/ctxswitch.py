#!/usr/bin/python3
"""ctxswitch.py - what --explain costs a context switch, next to bcc's runqlat.

Run as root, from the repository:  python3 -m bench.ctxswitch [-r REPS] [-n ROUNDS]

--explain runs the scheduler's handlers (sched_switch, sched_wakeup, IRQ and softirq
entry and exit) on every context switch and interrupt of the machine, whichever task it
is: for a thread it does not follow, two hash lookups; for one it follows (a VM's), it
also keeps the event. The workload (pingpong.c) is two processes on one CPU handing a
byte back and forth through pipes: every hand-off is a wake-up and a switch, and the
wall time per switch is the figure. Configurations, interleaved REPS times:

  off           nothing attached
  runqlat       bcc's runqlat (bpfcc-tools), which runs on the same scheduler events
  explain       the tool, --mode histogram --explain, on a tap nobody holds: the
                ping-pong pair is not followed (the cost every other task pays)
  explain_vm    the same, the pair holding the tap: a VM's threads, followed

Its own small lab: one tap, vnbtap9 (no address, on no bridge), removed on exit. The
results go to /var/cache/vm-network-latency/bench/ctxswitch-*.json.

MIT License (see LICENSE).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tests.harness.procs import die_with_parent, run, stop_popen

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "vm_network_latency.py")
PY = "/usr/bin/python3"
CACHE = "/var/cache/vm-network-latency/bench"
TAP = "vnbtap9"
CPU = 1
RUNQLAT = "/usr/sbin/runqlat-bpfcc"
CONFIGS = ["off", "runqlat", "explain", "explain_vm"]


def log(msg):
    sys.stderr.write("[ctxswitch] %s\n" % msg)
    sys.stderr.flush()


def build_pingpong():
    os.makedirs(CACHE, exist_ok=True)
    binary = os.path.join(CACHE, "pingpong")
    src = os.path.join(HERE, "pingpong.c")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(src):
        run(["gcc", "-O2", "-Wall", "-o", binary, src], timeout=120)
    return binary


def install_runqlat():
    if not os.path.exists(RUNQLAT):
        log("installing bpfcc-tools (bcc's runqlat)")
        run(["apt-get", "install", "-y", "-q", "bpfcc-tools"], timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def start(argv, ready, timeout=120):
    """A tracer in the background, once it printed `ready` (on stdout or stderr)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if ready in line:
            return p
    stop_popen(p)
    raise RuntimeError("%s did not start: %s" % (argv[0], "".join(seen)[-500:]))


def measure(pingpong, cfg, rounds):
    holder = [TAP] if cfg == "explain_vm" else []
    pair = subprocess.Popen([pingpong, str(CPU), str(rounds)] + holder,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            universal_newlines=True, preexec_fn=die_with_parent)
    tracer = None
    try:
        assert pair.stdout.readline().strip() == "ready"
        if cfg == "runqlat":
            tracer = start([RUNQLAT, "3600", "1"], "Tracing")
        elif cfg.startswith("explain"):
            # --verbose says how many threads it follows: the pair's two, when it holds
            # the tap (found at start)
            tracer = start([PY, TOOL, "--vm-dev", TAP, "--mode", "histogram", "--interval",
                            "3600", "--explain", "--verbose", "--output", "json"],
                           "Tracing")
        time.sleep(1)
        pair.stdin.write("go\n")
        pair.stdin.flush()
        ns = float(pair.stdout.readline())
        pair.wait(60)
        return ns
    finally:
        stop_popen(pair)
        if tracer:
            stop_popen(tracer, grace=20)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("-r", "--reps", type=int, default=5)
    p.add_argument("-n", "--rounds", type=int, default=300000,
                   help="round trips per run (two switches each)")
    args = p.parse_args(argv[1:])
    if os.geteuid() != 0:
        print("ctxswitch: run as root", file=sys.stderr)
        return 2
    install_runqlat()
    pingpong = build_pingpong()
    run(["ip", "tuntap", "add", TAP, "mode", "tap"])
    runs = []
    try:
        run(["ip", "link", "set", TAP, "up"])
        for rep in range(args.reps):
            for i in range(len(CONFIGS)):
                cfg = CONFIGS[(i + rep) % len(CONFIGS)]
                ns = measure(pingpong, cfg, args.rounds)
                log("rep %d %-10s %.1f ns a switch" % (rep + 1, cfg, ns))
                runs.append({"cfg": cfg, "rep": rep + 1, "ns_per_switch": ns})
    finally:
        run(["ip", "link", "del", TAP], check=False)
    med = dict((c, statistics.median(r["ns_per_switch"] for r in runs if r["cfg"] == c))
               for c in CONFIGS)
    mins = dict((c, min(r["ns_per_switch"] for r in runs if r["cfg"] == c)) for c in CONFIGS)
    result = {"kernel": os.uname().release, "cpus": os.cpu_count(), "rounds": args.rounds,
              "reps": args.reps, "runs": runs, "median_ns": med, "min_ns": mins}
    path = os.path.join(CACHE, "ctxswitch-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("| configuration | ns a switch (median) | added | added (minima) |")
    print("|---|---|---|---|")
    for c in CONFIGS:
        print("| %s | %.0f | %s | %s |" % (
            c, med[c], "-" if c == "off" else "%+.0f" % (med[c] - med["off"]),
            "-" if c == "off" else "%+.0f" % (mins[c] - mins["off"])))
    for c in ("explain", "explain_vm"):
        added, ref = med[c] - med["off"], med["runqlat"] - med["off"]
        print("%s added / runqlat added: %s" % (c, "%.2f" % (added / ref) if ref > 0 else "-"))
    print("(raw runs: %s)" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
