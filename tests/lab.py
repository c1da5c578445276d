#!/usr/bin/python3
"""Test lab for vm_network_latency.py: a real QEMU guest on a tap device.

Topology (all names start with ``vnl``; the host bridge has no IP address)::

    QEMU guest eth0 10.77.0.2 (52:54:00:77:00:02)
        |  virtio-net
    vnltap0 --- vnlbr0 (bridge, stp off, no IP) --- vnlphy0 (veth, "physical NIC")
                                                       |
                                     namespace vnl-remote: eth0 10.77.0.3 (52:54:00:77:00:03)

Both ends have static ARP entries and IPv6 is disabled on every device the lab
creates, so the only traffic on the path is what a test sends.

Usage (stdlib only, runs under /usr/bin/python3, needs root)::

    from lab import Lab
    with Lab() as lab:
        rc, out = lab.guest("ping -c 1 10.77.0.3")
        sink = lab.start_udp_sink(5001)
        lab.guest("vnl-traffic udp 10.77.0.3 5001 100 40001")
        assert sink.wait_count(100) == 100
        sink.stop()

Command line: ``python3 tests/lab.py demo-smoke | up [SECONDS] | cleanup``.

Everything the lab creates is removed in ``__exit__`` (also when ``__enter__``
fails half-way), on SIGINT/SIGTERM/SIGHUP (turned into KeyboardInterrupt so
``with`` blocks unwind) and by an atexit safety net.  QEMU and the namespace
servers get PR_SET_PDEATHSIG=SIGKILL, so they die with the Python process even
on SIGKILL; devices left by a SIGKILLed run are removed by the next ``Lab``
(``__enter__`` cleans stale leftovers first) or by ``lab.py cleanup``.
A lock on the guest cache directory keeps two labs from running at once.
"""

import atexit
import ctypes
import errno
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, "guest", "build_guest.sh")
DEFAULT_CACHE_DIR = "/var/cache/vm-network-latency/guest"
READY_MARKER = "__VNL_GUEST_READY__"
DONE_MARKER = "__VNL_DONE__"
GUEST_TRAFFIC = "/bin/vnl-traffic"   # the helper's path inside the guest

_DONE_RE = re.compile(rb"(?:^|\n)" + DONE_MARKER.encode() + rb" (-?\d+)\r?\n")


class LabError(RuntimeError):
    """The lab could not be built, set up or driven."""


class GuestTimeout(LabError, TimeoutError):
    """A guest command did not finish in time."""


# --------------------------------------------------------------------------- helpers

_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL when the (forking thread of the) lab dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _run(argv, check=True, timeout=30, **kw):
    """Run a host command, capture text output; LabError if check and it fails."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabError("timeout after %ss: %s" % (timeout, " ".join(argv))) from e
    if check and p.returncode != 0:
        raise LabError("command failed (rc=%d): %s\n%s%s" % (
            p.returncode, " ".join(argv), p.stdout, p.stderr))
    return p


def _link_exists(name):
    return os.path.exists("/sys/class/net/%s" % name)


def _netns_exists(name):
    return os.path.exists("/run/netns/%s" % name)


def _disable_ipv6_host(dev):
    path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % dev
    if os.path.exists(path):
        with open(path, "w") as f:
            f.write("1\n")


def _read_tail(path, limit=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
        text = data.decode("utf-8", "replace")
        return ("...\n" if size > limit else "") + text
    except OSError as e:
        return "<%s unreadable: %s>" % (path, e)


def _kill_pid(pid, grace=3.0):
    """SIGTERM, then SIGKILL after `grace` seconds, one pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap it if it is our child
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_popen(proc, grace=3.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- namespace servers

_UDP_SINK = r'''
import select, signal, socket, sys
port, bind_ip = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
signal.signal(signal.SIGINT, signal.SIG_IGN)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)       # SO_RCVBUFFORCE
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
s.bind((bind_ip, port))
print("ready", flush=True)
n = nbytes = 0
seen = set()
while True:
    select.select([s], [], [])
    while True:
        try:
            data, addr = s.recvfrom(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        n += 1
        nbytes += len(data)
        src = "%s:%d" % addr
        if src not in seen:
            seen.add(src)
            print("src", src, flush=True)
    print("count", n, nbytes, flush=True)
'''

_TCP_ECHO = r'''
import signal, socket, sys, threading
port, bind_ip = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
signal.signal(signal.SIGINT, signal.SIG_IGN)
lock = threading.Lock()
def out(*a):
    with lock:
        print(*a, flush=True)
def serve(c, peer):
    total = 0
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
            total += len(d)
    except OSError as e:
        out("error", peer, e)
    finally:
        c.close()
        out("closed", peer, total)
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind_ip, port))
s.listen(64)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    peer = "%s:%d" % addr
    out("conn", peer)
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
'''


class NsServer:
    """A server process inside the lab's namespace (see Lab.start_udp_sink/start_tcp_echo).

    Attributes, updated live by a reader thread:
      UDP sink: ``count`` (datagrams received), ``bytes``, ``sources`` (set of "ip:port")
      TCP echo: ``connections`` (accepted), ``closed`` (finished), ``bytes`` (echoed, of
                closed connections), ``peers`` (list of "ip:port"), ``errors``
    """

    def __init__(self, kind, port, proc):
        self.kind, self.port, self.proc = kind, port, proc
        self.count = 0
        self.bytes = 0
        self.sources = set()
        self.connections = 0
        self.closed = 0
        self.peers = []
        self.errors = []
        self.lines = []
        self._cv = threading.Condition()
        self._ready = False
        self._thread = threading.Thread(target=self._reader, daemon=True,
                                        name="vnl-%s-%d" % (kind, port))
        self._thread.start()

    def _reader(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            parts = line.split()
            with self._cv:
                self.lines.append(line)
                if not parts:
                    pass
                elif parts[0] == "ready":
                    self._ready = True
                elif parts[0] == "count" and len(parts) == 3:
                    self.count, self.bytes = int(parts[1]), int(parts[2])
                elif parts[0] == "src":
                    self.sources.add(parts[1])
                elif parts[0] == "conn":
                    self.connections += 1
                    self.peers.append(parts[1])
                elif parts[0] == "closed" and len(parts) == 3:
                    self.closed += 1
                    self.bytes += int(parts[2])
                elif parts[0] == "error":
                    self.errors.append(line)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def _wait(self, pred, timeout):
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    return False
                self._cv.wait(min(left, 0.2))
            return True

    def wait_ready(self, timeout=10):
        if not self._wait(lambda: self._ready, timeout):
            err = b""
            if self.proc.poll() is not None and self.proc.stderr:
                err = self.proc.stderr.read() or b""
            raise LabError("%s server on port %d did not start (rc=%s): %s" % (
                self.kind, self.port, self.proc.poll(), err.decode("utf-8", "replace")))

    def wait_count(self, n, timeout=10):
        """UDP sink: wait until at least n datagrams arrived; return the count."""
        self._wait(lambda: self.count >= n, timeout)
        return self.count

    def wait_closed(self, n=1, timeout=10):
        """TCP echo: wait until n connections were closed; return how many were."""
        self._wait(lambda: self.closed >= n, timeout)
        return self.closed

    def stop(self):
        """Stop the server; returns the UDP datagram count (or TCP connections closed)."""
        _stop_popen(self.proc)
        self._thread.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        return self.count if self.kind == "udp" else self.closed

    def __repr__(self):
        return "<NsServer %s:%d count=%d bytes=%d connections=%d>" % (
            self.kind, self.port, self.count, self.bytes, self.connections)


# --------------------------------------------------------------------------- the lab

class Lab:
    """A QEMU guest on a tap, a bridge, a veth 'physical NIC' and a remote namespace."""

    TAP, BRIDGE, PHY, NS = "vnltap0", "vnlbr0", "vnlphy0", "vnl-remote"
    NS_DEV = "eth0"                       # the namespace's end of the veth
    GUEST_IP, REMOTE_IP = "10.77.0.2", "10.77.0.3"
    GUEST_MAC, REMOTE_MAC = "52:54:00:77:00:02", "52:54:00:77:00:03"
    PREFIX = 24
    GUEST_TRAFFIC = GUEST_TRAFFIC

    def __init__(self, cache_dir=None, memory_mb=512, boot_timeout=60, build=True,
                 qemu="qemu-system-x86_64", lock_timeout=120, verbose=False,
                 keep_workdir=None):
        self.cache_dir = cache_dir or os.environ.get("VNL_GUEST_CACHE") or DEFAULT_CACHE_DIR
        self.memory_mb = memory_mb
        self.boot_timeout = boot_timeout
        self.build = build
        self.qemu_bin = qemu
        self.lock_timeout = lock_timeout
        self.verbose = verbose
        if keep_workdir is None:
            keep_workdir = os.environ.get("VNL_LAB_KEEP", "") not in ("", "0")
        self.keep_workdir = keep_workdir
        self.timings = {}               # seconds: build, setup, boot
        self.workdir = None
        self.console_log = None
        self.qemu = None                # subprocess.Popen of QEMU
        self.qemu_argv = None
        self.vmlinuz = os.path.join(self.cache_dir, "vmlinuz")
        self.initrd = os.path.join(self.cache_dir, "initrd.cpio.gz")
        self.host_traffic = os.path.join(self.cache_dir, "vnl-traffic")  # helper for the host
        self.guest_kernel = None
        self._cmd_sock = None
        self._cmd_buf = b""
        self._outstanding = 0           # commands sent, result not yet read
        self._discard = 0               # results to throw away (their caller timed out)
        self._qmp_sock = None
        self._qmp_file = None
        self.qmp_events = []
        self._servers = []
        self._procs = []
        self._lock_fd = None
        self._active = False
        self._tearing_down = False
        self._old_handlers = {}
        self._atexit_registered = False

    # ------------------------------------------------------------------ logging
    def _log(self, msg):
        if self.verbose:
            sys.stderr.write("lab: %s\n" % msg)
            sys.stderr.flush()

    # ------------------------------------------------------------------ context manager
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def start(self):
        """Bring the lab up (what ``with Lab() as lab`` does)."""
        if self._active:
            return self
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, tap, bridge)")
        self._active = True
        self._install_signal_handlers()
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True
        try:
            self._take_lock()
            self.cleanup_stale()
            t = time.monotonic()
            if self.build:
                self._build()
            self.timings["build"] = time.monotonic() - t
            for f in (self.vmlinuz, self.initrd):
                if not os.path.exists(f):
                    raise LabError("%s missing (run tests/guest/build_guest.sh)" % f)
            self.workdir = tempfile.mkdtemp(prefix="vnl-lab-%d-" % os.getpid())
            self.console_log = os.path.join(self.workdir, "console.log")
            t = time.monotonic()
            self._setup_network()
            self.timings["setup"] = time.monotonic() - t
            t = time.monotonic()
            self._start_qemu()
            self._wait_ready()
            self.timings["boot"] = time.monotonic() - t
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Tear everything down; safe to call more than once and on a half-built lab."""
        if not self._active:
            return
        self._tearing_down = True
        masked = self._mask_signals()
        errors = []
        try:
            self._teardown(errors)
        finally:
            self._active = False
            self._tearing_down = False
            self._restore_signals(masked)
            self._release_lock()
        if errors:
            sys.stderr.write("lab: teardown problems:\n  %s\n" % "\n  ".join(errors))

    def _atexit(self):
        if self._active:
            self.close()

    # ------------------------------------------------------------------ signals / lock
    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame):
        if self._tearing_down:
            return
        raise KeyboardInterrupt("lab: got signal %d" % signum)

    def _mask_signals(self):
        """During teardown, ignore SIGINT/SIGTERM/SIGHUP so cleanup is not cut short."""
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                try:
                    saved[sig] = signal.getsignal(sig)
                    signal.signal(sig, signal.SIG_IGN)
                except (ValueError, OSError):
                    pass
        return saved

    def _restore_signals(self, saved):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, h in saved.items():
            if sig in self._old_handlers:
                h = self._old_handlers[sig]
            try:
                signal.signal(sig, h if h is not None else signal.SIG_DFL)
            except (ValueError, OSError):
                pass
        self._old_handlers = {}

    def _take_lock(self):
        # the lock is the guest cache directory itself: no lock file is left behind
        os.makedirs(self.cache_dir, exist_ok=True)
        fd = os.open(self.cache_dir, os.O_RDONLY)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LabError("another lab holds the lock on %s" % self.cache_dir)
                time.sleep(0.2)
        self._lock_fd = fd

    def _release_lock(self):
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            except OSError:
                pass
            self._lock_fd = None

    # ------------------------------------------------------------------ build
    def _build(self):
        self._log("build: %s %s" % (BUILD_SCRIPT, self.cache_dir))
        p = subprocess.run(["bash", BUILD_SCRIPT, self.cache_dir], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            raise LabError("build_guest.sh failed (rc=%d):\n%s" % (p.returncode, p.stdout[-6000:]))
        self._log(p.stdout.strip())
        try:
            with open(os.path.join(self.cache_dir, "kernel-version")) as f:
                self.guest_kernel = f.read().split()[0]
        except (OSError, IndexError):
            pass

    # ------------------------------------------------------------------ network
    @classmethod
    def cleanup_stale(cls):
        """Remove leftovers of a killed run: its QEMU, namespace processes, devices."""
        # QEMU processes attached to our tap (matched by the exact ifname argument)
        needle = ("ifname=%s," % cls.TAP).encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and \
                    any(needle in a for a in argv):
                _kill_pid(int(pid))
        if _netns_exists(cls.NS):
            p = _run(["ip", "netns", "pids", cls.NS], check=False)
            for pid in p.stdout.split():
                if pid.isdigit():
                    _kill_pid(int(pid), grace=1.0)
        for dev in (cls.TAP, cls.PHY, cls.BRIDGE):
            if _link_exists(dev):
                _run(["ip", "link", "del", dev], check=False)
        if _netns_exists(cls.NS):
            _run(["ip", "netns", "del", cls.NS], check=False)
        # work directories (sockets, logs) of labs whose process is gone
        tmp = tempfile.gettempdir()
        for name in os.listdir(tmp):
            m = re.match(r"vnl-lab-(\d+)-", name)
            if not m:
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue                      # owner still alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(os.path.join(tmp, name), True)

    def _ns(self, *argv, check=True):
        return _run(["ip", "netns", "exec", self.NS] + list(argv), check=check)

    def _setup_network(self):
        ip = lambda *a: _run(["ip"] + list(a))
        ip("link", "add", self.BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0",
           "mcast_snooping", "0")  # snooping would send IGMP reports (224.0.0.106)
        _disable_ipv6_host(self.BRIDGE)
        ip("tuntap", "add", "dev", self.TAP, "mode", "tap")
        _disable_ipv6_host(self.TAP)
        ip("netns", "add", self.NS)
        # the peer is created directly inside the namespace: there is never a
        # second "eth0" in the host namespace
        ip("link", "add", self.PHY, "type", "veth", "peer", "name", self.NS_DEV,
           "netns", self.NS)
        _disable_ipv6_host(self.PHY)
        self._ns("sh", "-c",
                 "for f in all default %s; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done"
                 % self.NS_DEV)
        self._ns("ip", "link", "set", self.NS_DEV, "address", self.REMOTE_MAC)
        self._ns("ip", "addr", "add", "%s/%d" % (self.REMOTE_IP, self.PREFIX), "dev", self.NS_DEV)
        self._ns("ip", "link", "set", "lo", "up")
        self._ns("ip", "link", "set", self.NS_DEV, "up")
        self._ns("ip", "neigh", "replace", self.GUEST_IP, "lladdr", self.GUEST_MAC,
                 "dev", self.NS_DEV, "nud", "permanent")
        ip("link", "set", self.TAP, "master", self.BRIDGE)
        ip("link", "set", self.PHY, "master", self.BRIDGE)
        ip("link", "set", self.BRIDGE, "up")
        ip("link", "set", self.TAP, "up")
        ip("link", "set", self.PHY, "up")

    # ------------------------------------------------------------------ QEMU
    def _start_qemu(self):
        self._qmp_path = os.path.join(self.workdir, "qmp.sock")
        self._cmd_path = os.path.join(self.workdir, "cmd.sock")
        argv = [
            self.qemu_bin, "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-name", "vnl-guest", "-machine", "pc", "-m", str(self.memory_mb), "-smp", "1",
            "-display", "none", "-vga", "none", "-no-reboot",
            "-kernel", self.vmlinuz, "-initrd", self.initrd,
            "-append", "console=ttyS0 panic=-1 ipv6.disable_ipv6=1",
            "-chardev", "file,id=con0,path=%s" % self.console_log, "-serial", "chardev:con0",
            "-chardev", "socket,id=cmd0,path=%s,server=on,wait=off" % self._cmd_path,
            "-serial", "chardev:cmd0",
            "-qmp", "unix:%s,server=on,wait=off" % self._qmp_path,
            "-netdev", "tap,id=net0,ifname=%s,script=no,downscript=no" % self.TAP,
            "-device", "virtio-net-pci,netdev=net0,mac=%s,romfile=" % self.GUEST_MAC,
        ]
        self.qemu_argv = argv
        with open(os.path.join(self.workdir, "qemu.argv"), "w") as f:
            f.write(" ".join(argv) + "\n")
        self._qemu_out = open(os.path.join(self.workdir, "qemu.log"), "wb")
        self._log("qemu: %s" % " ".join(argv))
        self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._qemu_out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def _qemu_failure(self, what):
        return LabError("%s\n--- qemu (rc=%s) output:\n%s\n--- console log (%s):\n%s" % (
            what, self.qemu.poll() if self.qemu else None,
            _read_tail(os.path.join(self.workdir, "qemu.log"), 2000) if self.workdir else "",
            self.console_log, _read_tail(self.console_log) if self.console_log else ""))

    def _connect_unix(self, path, deadline):
        while True:
            if self.qemu.poll() is not None:
                raise self._qemu_failure("QEMU exited during startup")
            if os.path.exists(path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    return s
                except OSError:
                    s.close()
            if time.monotonic() > deadline:
                raise self._qemu_failure("QEMU did not create %s" % path)
            time.sleep(0.02)

    def _wait_ready(self):
        deadline = time.monotonic() + self.boot_timeout
        self._cmd_sock = self._connect_unix(self._cmd_path, deadline)
        self._qmp_connect(deadline)
        pos = 0
        seen = b""
        while True:
            try:
                with open(self.console_log, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                pos += len(chunk)
                seen = (seen + chunk)[-4096:]
                if READY_MARKER.encode() in seen:
                    break
            if self.qemu.poll() is not None:
                raise self._qemu_failure("QEMU exited before the guest was ready")
            if time.monotonic() > deadline:
                raise self._qemu_failure("guest not ready after %ss" % self.boot_timeout)
            time.sleep(0.05)
        self.timings["boot_to_marker"] = time.monotonic() - (deadline - self.boot_timeout)
        # first command: a blank line first flushes any partial line on the channel
        self._cmd_sock.sendall(b"\n")
        rc, out = self.guest("echo vnl-channel-ok", timeout=max(5, deadline - time.monotonic()))
        if rc != 0 or "vnl-channel-ok" not in out:
            raise self._qemu_failure("command channel check failed: rc=%s out=%r" % (rc, out))

    # ------------------------------------------------------------------ guest commands
    def guest(self, cmd, timeout=60):
        """Run a shell command in the guest; returns (exit status, stdout+stderr as text).

        Commands run one after another.  On timeout GuestTimeout is raised and the
        late result of that command is discarded by the next call.
        """
        self.guest_send(cmd)
        try:
            return self.guest_wait(timeout)
        except GuestTimeout:
            # the command still runs in the guest; drop its result when it comes
            self._discard += 1
            self._outstanding -= 1
            raise

    def guest_send(self, cmd):
        """Queue a command in the guest without waiting (pair with guest_wait)."""
        if not self._active or self._cmd_sock is None:
            raise LabError("lab is not running")
        if "\n" in cmd or "\r" in cmd:
            raise ValueError("guest command must be a single line")
        if not cmd.strip():
            raise ValueError("empty guest command")
        self._cmd_sock.sendall(cmd.encode() + b"\n")
        self._outstanding += 1

    def guest_wait(self, timeout=60):
        """Wait for the oldest outstanding command sent with guest_send; (rc, output)."""
        if self._outstanding <= 0:
            raise LabError("no guest command outstanding")
        deadline = time.monotonic() + timeout
        while True:
            m = _DONE_RE.search(self._cmd_buf)
            if m:
                raw = self._cmd_buf[:m.start()]
                if m.group(0).startswith(b"\n"):
                    raw += b"\n"
                self._cmd_buf = self._cmd_buf[m.end():]
                out = raw.decode("utf-8", "replace")
                rc = int(m.group(1))
                if self._discard > 0:
                    self._discard -= 1
                    continue
                self._outstanding -= 1
                return rc, out
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout("guest command did not finish within %ss; output so far: %r"
                                   % (timeout, self._cmd_buf[-2000:]))
            if self.qemu is not None and self.qemu.poll() is not None:
                raise self._qemu_failure("QEMU exited while a guest command was running")
            r, _, _ = select.select([self._cmd_sock], [], [], min(left, 0.5))
            if r:
                data = self._cmd_sock.recv(65536)
                if not data:
                    raise self._qemu_failure("guest command channel closed")
                self._cmd_buf += data

    def guest_check(self, cmd, timeout=60):
        """Like guest() but raises LabError on a non-zero exit; returns the output."""
        rc, out = self.guest(cmd, timeout)
        if rc != 0:
            raise LabError("guest command failed (rc=%d): %s\n%s" % (rc, cmd, out))
        return out

    # ------------------------------------------------------------------ QMP
    def _qmp_connect(self, deadline):
        self._qmp_sock = self._connect_unix(self._qmp_path, deadline)
        self._qmp_sock.settimeout(10)
        self._qmp_file = self._qmp_sock.makefile("rb")
        greeting = json.loads(self._qmp_file.readline())
        if "QMP" not in greeting:
            raise LabError("unexpected QMP greeting: %r" % greeting)
        self.qmp("qmp_capabilities")

    def qmp(self, command, **arguments):
        """Execute a QMP command; returns its "return" value (LabError on "error")."""
        if self._qmp_sock is None:
            raise LabError("QMP not connected")
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._qmp_sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self._qmp_file.readline()
            if not line:
                raise LabError("QMP connection closed")
            reply = json.loads(line)
            if "event" in reply:
                self.qmp_events.append(reply)
                continue
            if "error" in reply:
                raise LabError("QMP %s failed: %s" % (command, reply["error"]))
            if "return" in reply:
                return reply["return"]

    def pause_vm(self):
        """Stop the guest's CPUs (QMP "stop"): QEMU then does not read the tap."""
        self.qmp("stop")

    def resume_vm(self):
        """Resume the guest (QMP "cont")."""
        self.qmp("cont")

    def vm_status(self):
        """QMP query-status: "running", "paused", ..."""
        return self.qmp("query-status").get("status")

    # ------------------------------------------------------------------ the remote namespace
    def remote(self, *argv, **popen_kwargs):
        """Start argv inside the namespace (ip netns exec); returns a subprocess.Popen.

        The process is killed at teardown if still running.
        """
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        if "preexec_fn" not in popen_kwargs:
            popen_kwargs["preexec_fn"] = _die_with_parent
        p = subprocess.Popen(["ip", "netns", "exec", self.NS] + [str(a) for a in argv],
                             **popen_kwargs)
        self._procs.append(p)
        return p

    def remote_run(self, *argv, timeout=30, check=False):
        """Run argv inside the namespace to completion; CompletedProcess with text output."""
        p = self.remote(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_popen(p)
            raise LabError("remote command timed out: %s" % " ".join(map(str, argv)))
        finally:
            if p in self._procs and p.poll() is not None:
                self._procs.remove(p)
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise LabError("remote command failed (rc=%d): %s\n%s%s" % (
                p.returncode, " ".join(map(str, argv)), out, err))
        return cp

    def _start_server(self, kind, script, port, bind_ip):
        path = os.path.join(self.workdir, "%s_server.py" % kind)
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(script)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.NS, sys.executable or "/usr/bin/python3", "-u", path,
             str(port), bind_ip or "0.0.0.0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent)
        srv = NsServer(kind, port, proc)
        self._servers.append(srv)
        try:
            srv.wait_ready()
        except BaseException:
            srv.stop()
            raise
        return srv

    def start_udp_sink(self, port, bind_ip=None):
        """UDP sink in the namespace; handle.count = datagrams received; .stop()."""
        return self._start_server("udp", _UDP_SINK, port, bind_ip)

    def start_tcp_echo(self, port, bind_ip=None):
        """TCP echo server in the namespace; handle.connections/.closed/.bytes; .stop()."""
        return self._start_server("tcp", _TCP_ECHO, port, bind_ip)

    # ------------------------------------------------------------------ teardown
    def _teardown(self, errors):
        def step(what, fn, *a):
            try:
                fn(*a)
            except Exception as e:  # keep going: remove as much as possible
                errors.append("%s: %s" % (what, e))

        for s in (self._cmd_sock, self._qmp_sock):
            if s is not None:
                step("close socket", s.close)
        if self._qmp_file is not None:
            step("close qmp file", self._qmp_file.close)
        self._cmd_sock = self._qmp_sock = self._qmp_file = None
        self._cmd_buf, self._outstanding, self._discard = b"", 0, 0
        if self.qemu is not None:
            step("stop qemu", _stop_popen, self.qemu, 5.0)
            self.qemu = None
        if getattr(self, "_qemu_out", None) is not None:
            step("close qemu log", self._qemu_out.close)
            self._qemu_out = None
        for srv in self._servers:
            step("stop %s server" % srv.kind, srv.stop)
        self._servers = []
        for p in self._procs:
            step("stop remote process", _stop_popen, p, 2.0)
        self._procs = []
        if self._lock_fd is None:
            # we never got the lock: nothing below is ours (another lab may own it)
            if self.workdir and not self.keep_workdir:
                step("remove workdir", shutil.rmtree, self.workdir, True)
            return
        # whatever else still lives in the namespace, QEMU left on our tap, devices
        step("cleanup", self.cleanup_stale)
        for dev in (self.TAP, self.PHY, self.BRIDGE):
            if _link_exists(dev):
                errors.append("device %s still exists" % dev)
        if _netns_exists(self.NS):
            errors.append("namespace %s still exists" % self.NS)
        if self.workdir and not self.keep_workdir:
            step("remove workdir", shutil.rmtree, self.workdir, True)
        elif self.workdir:
            sys.stderr.write("lab: kept %s\n" % self.workdir)


# --------------------------------------------------------------------------- command line

def _demo_smoke():
    t_all = time.monotonic()
    timings = {}
    ok = True
    with Lab(verbose=True) as lab:
        timings.update(lab.timings)
        print("guest kernel: %s" % lab.guest_kernel)
        print("build %.2fs  setup %.2fs  boot %.2fs" % (
            lab.timings["build"], lab.timings["setup"], lab.timings["boot"]))

        t = time.monotonic()
        rc, out = lab.guest("ping -c 3 -W 5 %s" % lab.REMOTE_IP)
        timings["ping"] = time.monotonic() - t
        print("--- guest ping (rc=%d, %.2fs)\n%s" % (rc, timings["ping"], out.rstrip()))
        ok &= rc == 0 and "3 packets received" in out

        sink = lab.start_udp_sink(5001)
        t = time.monotonic()
        rc, out = lab.guest("vnl-traffic udp %s 5001 200 40001" % lab.REMOTE_IP)
        timings["udp_cmd"] = time.monotonic() - t
        got = sink.wait_count(200, timeout=10)
        time.sleep(0.3)  # anything extra would show up now
        got = sink.count
        print("--- udp burst (rc=%d, %.2fs): %s; sink counted %d datagrams, %d bytes from %s"
              % (rc, timings["udp_cmd"], out.strip(), got, sink.bytes, sorted(sink.sources)))
        sink.stop()
        ok &= rc == 0 and out.strip() == "sent 200" and got == 200

        echo = lab.start_tcp_echo(5002)
        t = time.monotonic()
        rc, out = lab.guest("vnl-traffic tcp %s 5002 5 40002" % lab.REMOTE_IP)
        timings["tcp_cmd"] = time.monotonic() - t
        echo.wait_closed(1, timeout=5)
        print("--- tcp exchange (rc=%d, %.2fs): %s; echo server: %d connection(s) from %s, "
              "%d bytes echoed" % (rc, timings["tcp_cmd"], out.strip(), echo.closed,
                                   echo.peers, echo.bytes))
        echo.stop()
        ok &= rc == 0 and out.strip() == "exchanged 5" and echo.bytes == 5 * 64

        t = time.monotonic()
        lab.pause_vm()
        st1 = lab.vm_status()
        lab.resume_vm()
        st2 = lab.vm_status()
        rc, out = lab.guest("echo alive")
        timings["pause_resume"] = time.monotonic() - t
        print("--- pause/resume: %s -> %s, guest says %r" % (st1, st2, out.strip()))
        ok &= st1 == "paused" and st2 == "running" and out.strip() == "alive"

        t_down = time.monotonic()
    timings["teardown"] = time.monotonic() - t_down
    timings["total"] = time.monotonic() - t_all
    print("timings: " + ", ".join("%s %.2fs" % kv for kv in timings.items()))
    print("demo-smoke: %s" % ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def _up(seconds):
    with Lab(verbose=True) as lab:
        print("lab up: guest %s on %s, bridge %s, phy %s, namespace %s (%s); console log %s"
              % (lab.GUEST_IP, lab.TAP, lab.BRIDGE, lab.PHY, lab.NS, lab.REMOTE_IP,
                 lab.console_log))
        print("timings: " + ", ".join("%s %.2fs" % kv for kv in lab.timings.items()), flush=True)
        end = time.monotonic() + seconds if seconds else None
        while end is None or time.monotonic() < end:
            time.sleep(0.2)
    return 0


def main(argv):
    cmd = argv[1] if len(argv) > 1 else "demo-smoke"
    try:
        if cmd == "demo-smoke":
            return _demo_smoke()
        if cmd == "up":
            return _up(float(argv[2]) if len(argv) > 2 else 0)
        if cmd == "cleanup":
            lab = Lab(lock_timeout=0)
            lab._take_lock()                  # refuses while a lab is running
            try:
                Lab.cleanup_stale()
            finally:
                lab._release_lock()
            return 0
    except KeyboardInterrupt as e:
        print("interrupted (%s); lab torn down" % (str(e) or "SIGINT"), file=sys.stderr)
        return 130
    except LabError as e:
        print("lab: %s" % e, file=sys.stderr)
        return 1
    print("usage: lab.py [demo-smoke | up [SECONDS] | cleanup]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
