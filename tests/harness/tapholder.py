#!/usr/bin/python3
"""A stand-in VM in a process of its own, as a tenant's VM is: it creates (or attaches
to) a tap, holds it open, and writes the frames it is given, one hex line on stdin each.

    tapholder.py TAP [--comm NAME] [--spin-read SECONDS CPU]
                     [any other words: its command line, e.g. -name VM]

It prints "ready" once the tap is held, "ok" after each frame. Its command line and
process name are what the tool reads from /proc: tests give it crafted ones (a VM name
with escape sequences, another VM's name in another network namespace). With
--spin-read it writes nothing: pinned to CPU, it reads the tap in a busy loop for
SECONDS (a VM's backend polling its queue: always runnable, never asleep), then exits.
"""
import ctypes
import fcntl
import os
import struct
import sys
import time

TUNSETIFF = 0x400454ca
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
PR_SET_NAME = 15


def spin_read(fd, seconds, cpu):
    os.sched_setaffinity(0, {cpu})
    os.set_blocking(fd, False)
    end = time.monotonic() + seconds
    frames = 0
    while time.monotonic() < end:
        try:
            os.read(fd, 65536)
            frames += 1
        except BlockingIOError:
            pass
    print("read %d" % frames, flush=True)
    return 0


def main(argv):
    tap = argv[1].encode("utf-8", "surrogateescape")
    if "--comm" in argv:
        comm = argv[argv.index("--comm") + 1].encode("utf-8", "surrogateescape")
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(comm[:15]), 0, 0, 0)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap, IFF_TAP | IFF_NO_PI))
    print("ready", flush=True)
    if "--spin-read" in argv:
        at = argv.index("--spin-read")
        return spin_read(fd, float(argv[at + 1]), int(argv[at + 2]))
    for line in sys.stdin:
        if line.strip():
            os.write(fd, bytes.fromhex(line.strip()))
            print("ok", flush=True)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main([os.fsdecode(a) for a in sys.argv]))
