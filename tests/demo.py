#!/usr/bin/python3
"""Live demo: the lab's QEMU VM pings the remote host while the real tracer watches.

    sudo ./test_vm_latency.sh demo [TOOL ARGS...]      (Ctrl-C to stop)
"""
import os
import signal
import subprocess
import sys

from tests.harness.lab import Lab

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(os.path.dirname(HERE), "vm_network_latency.py")


def main(args):
    with Lab() as lab:
        lab.guest("ping -q -i 0.5 %s >/dev/null 2>&1 &" % lab.REMOTE_IP)
        sys.stderr.write("demo: VM %s on %s pings %s through %s and %s; Ctrl-C to stop\n"
                         % (lab.GUEST_IP, lab.TAP, lab.REMOTE_IP, lab.BRIDGE, lab.PHY))
        cmd = ["/usr/bin/python3", TOOL, "--vm-dev", lab.TAP, "--phy-dev", lab.PHY] + args
        sys.stderr.write("demo: %s\n" % " ".join(cmd))
        tracer = subprocess.Popen(cmd)
        try:
            return tracer.wait()
        except KeyboardInterrupt:
            # a terminal's Ctrl-C reaches the tracer too; a SIGTERM to us does not
            tracer.send_signal(signal.SIGINT)
            return tracer.wait(30)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
