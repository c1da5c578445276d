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

    from tests.harness.lab import Lab
    with Lab() as lab:
        rc, out = lab.guest("ping -c 1 10.77.0.3")
        sink = lab.start_udp_sink(5001)
        lab.guest("vnl-traffic udp 10.77.0.3 5001 100 40001")
        assert sink.wait_count(100) == 100
        sink.stop()

Command line: ``python3 -m tests.harness.lab demo-smoke | up [SECONDS] | cleanup``.

The parts: qemu.py (one guest: boot, command channel, QMP), topology.py (devices,
namespaces, the check that keeps test addresses off the host's own network),
nsservers.py with servers/ (UDP sink and TCP echo in a namespace), procs.py. This
file puts them together: the lock, signals, the image build, teardown.

Everything the lab creates is removed in ``__exit__`` (also when ``__enter__``
fails half-way), on SIGINT/SIGTERM/SIGHUP (turned into KeyboardInterrupt so
``with`` blocks unwind) and by an atexit safety net.  QEMU and the namespace
servers get PR_SET_PDEATHSIG=SIGKILL, so they die with the Python process even
on SIGKILL; devices left by a SIGKILLed run are removed by the next ``Lab``
(``__enter__`` cleans stale leftovers first) or by ``lab.py cleanup``.
A lock on the guest cache directory keeps two labs from running at once.
"""

import atexit
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import topology
from .nsservers import start_server
from .procs import LabError, die_with_parent, kill_pid, run, stop_popen
from .qemu import QemuGuest

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, "guest", "build_guest.sh")
DEFAULT_CACHE_DIR = "/var/cache/vm-network-latency/guest"
GUEST_TRAFFIC = "/bin/vnl-traffic"   # the helper's path inside the guest


class Lab:
    """A QEMU guest on a tap, a bridge, a veth 'physical NIC' and a remote namespace."""

    TAP, BRIDGE, PHY, NS = "vnltap0", "vnlbr0", "vnlphy0", "vnl-remote"
    NS_DEV = "eth0"                       # the namespace's end of the veth
    GUEST_IP, REMOTE_IP = "10.77.0.2", "10.77.0.3"
    GUEST_MAC, REMOTE_MAC = "52:54:00:77:00:02", "52:54:00:77:00:03"
    # the lab's guest is named and identified as libvirt starts QEMU
    GUEST_NAME, GUEST_UUID = "vnl-guest", "7e57a000-0000-4000-8000-000000000002"
    PREFIX = 24
    GUEST_TRAFFIC = GUEST_TRAFFIC
    # every device a lab may create (a stand-in VM vnltap1, more guests vnltap2...)
    # a tap whose name holds an escape sequence (the tests of names printed to a terminal)
    HOSTILE_TAP = "vnl\x1b[7mX"
    # the macvtap topology (test_topologies): no bridge; macvtaps in bridge mode on a
    # veth "NIC" of their own, MVT_PHY, whose other end is a second remote, MVT_NS, with
    # the same address and MAC as the first (the guests' static ARP entry)
    MVT_PHY, MVT_NS = "vnlphy1", "vnl-mremote"
    MACVTAPS = tuple("vnlmvt%d" % i for i in range(2))
    DEVICES = (TAP, PHY, BRIDGE, HOSTILE_TAP) + tuple("vnltap%d" % i for i in range(1, 8)) + \
        ("vnlbr1", "vnlvx0", "vnlund0") + MACVTAPS + (MVT_PHY,)
    EXTRA_NS = ("vnl-vtep", "vnl-evil", MVT_NS)

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
        self.vm = None                  # the QemuGuest
        self.vmlinuz = os.path.join(self.cache_dir, "vmlinuz")
        self.initrd = os.path.join(self.cache_dir, "initrd.cpio.gz")
        self.host_traffic = os.path.join(self.cache_dir, "vnl-traffic")  # helper for the host
        self.guest_kernel = None
        self._guests = []               # more guests (add_guest), stopped at teardown
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
                    raise LabError("%s missing (run tests/harness/guest/build_guest.sh)" % f)
            self.workdir = tempfile.mkdtemp(prefix="vnl-lab-%d-" % os.getpid())
            t = time.monotonic()
            self._setup_network()
            self.timings["setup"] = time.monotonic() - t
            t = time.monotonic()
            self.vm = self.new_guest(self.TAP, self.GUEST_MAC, self.workdir,
                                     name=self.GUEST_NAME, uuid=self.GUEST_UUID)
            self.vm.start(self.boot_timeout)
            self.timings["boot"] = time.monotonic() - t
            self.timings["boot_to_marker"] = self.vm.boot_to_marker
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
        # QEMU processes attached to one of our taps (matched by the ifname argument)
        # or to a macvtap (by descriptor: then its files in a lab's work directory)
        needle = re.compile(rb"ifname=vnltap\d+,|/vnl-lab-\d+-")
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and \
                    any(needle.search(a) for a in argv):
                kill_pid(int(pid))
        if topology.netns_exists(cls.NS):
            p = run(["ip", "netns", "pids", cls.NS], check=False)
            for pid in p.stdout.split():
                if pid.isdigit():
                    kill_pid(int(pid), grace=1.0)
        for ns in cls.EXTRA_NS:
            if topology.netns_exists(ns):
                for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                    if pid.isdigit():
                        kill_pid(int(pid), grace=1.0)
        topology.remove(cls.DEVICES, (cls.NS,) + cls.EXTRA_NS)
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

    def _setup_network(self):
        topology.add_bridge(self.BRIDGE)
        topology.add_tap(self.TAP)
        topology.add_netns(self.NS)
        topology.add_veth_into(self.PHY, self.NS, self.NS_DEV, mac=self.REMOTE_MAC,
                               address="%s/%d" % (self.REMOTE_IP, self.PREFIX))
        topology.in_ns(self.NS, "ip", "neigh", "replace", self.GUEST_IP, "lladdr",
                       self.GUEST_MAC, "dev", self.NS_DEV, "nud", "permanent")
        topology.ip("link", "set", self.TAP, "master", self.BRIDGE)
        topology.ip("link", "set", self.PHY, "master", self.BRIDGE)
        topology.up(self.BRIDGE, self.TAP, self.PHY)

    def new_guest(self, tap, mac, workdir, name="vnl-guest", uuid=None, append=""):
        """A QemuGuest of the lab's image on tap (started by the caller)."""
        return QemuGuest(tap, mac, self.vmlinuz, self.initrd, workdir, name=name, uuid=uuid,
                         memory_mb=self.memory_mb, qemu=self.qemu_bin, log=self._log,
                         append=append)

    # IPv6 (only for the guests and the remote that ask for it: the others stay silent)
    PREFIX6 = "fd77::"            # fd77::/64: not a prefix this machine routes (fd00::/64)
    REMOTE_IP6 = "fd77::3"

    def add_guest(self, index, name, uuid=None, ip6=None, bridge=None):
        """Another guest on the bridge: tap vnltap<index>, 10.77.0.<index + 2>, MAC
        52:54:00:77:00:<index + 2>, known to the remote; stopped at teardown (or by
        remove_guest). ip6: it also has that IPv6 address. Returns (QemuGuest, its IP)."""
        tap, ip_addr = "vnltap%d" % index, "10.77.0.%d" % (index + 2)
        mac = "52:54:00:77:00:%02x" % (index + 2)
        assert tap in self.DEVICES and tap not in (self.TAP, "vnltap1")
        topology.add_tap(tap, master=bridge or self.BRIDGE)
        topology.up(tap)
        topology.in_ns(self.NS, "ip", "neigh", "replace", ip_addr, "lladdr", mac, "dev",
                       self.NS_DEV, "nud", "permanent")
        workdir = os.path.join(self.workdir, tap)
        shutil.rmtree(workdir, True)        # a guest of this index before, removed
        os.mkdir(workdir)
        append = "vnl.ip=%s" % ip_addr + (" vnl.ip6=%s" % ip6 if ip6 else "")
        vm = self.new_guest(tap, mac, workdir, name=name, uuid=uuid, append=append)
        self._guests.append(vm)
        vm.start(self.boot_timeout)
        return vm, ip_addr

    def add_macvtap_guest(self, index, name, uuid=None):
        """A guest on macvtap vnlmvt<index> (bridge mode) of MVT_PHY: 10.77.0.<16 + index>,
        MAC 52:54:00:77:00:<16 + index> (the macvtap's own: it takes only frames to its
        MAC), known to the remote MVT_NS, which the first call creates. Its QEMU gets the
        macvtap's /dev/tapN as a descriptor, as libvirt does. Stopped at teardown (or by
        remove_guest). Returns (QemuGuest, its IP)."""
        dev, ip_addr = self.MACVTAPS[index], "10.77.0.%d" % (16 + index)
        mac = "52:54:00:77:00:%02x" % (16 + index)
        if not topology.link_exists(self.MVT_PHY):
            self._macvtap_remote()
        topology.add_macvtap(dev, self.MVT_PHY, mac)
        topology.in_ns(self.MVT_NS, "ip", "neigh", "replace", ip_addr, "lladdr", mac, "dev",
                       self.MVT_NS_BR, "nud", "permanent")
        workdir = os.path.join(self.workdir, dev)
        shutil.rmtree(workdir, True)
        os.mkdir(workdir)
        vm = self.new_guest(dev, mac, workdir, name=name, uuid=uuid,
                            append="vnl.ip=%s" % ip_addr)
        self._guests.append(vm)
        vm.start(self.boot_timeout)
        return vm, ip_addr

    MVT_NS_BR = "br0"

    def _macvtap_remote(self):
        """The macvtaps' remote: its end of the veth is a port of a bridge there, with
        hairpin on, as the adjacent switch of VEPA mode is (a frame from one macvtap to
        another comes back the way it went); the address and MAC on the bridge."""
        ns, br = self.MVT_NS, self.MVT_NS_BR
        topology.add_netns(ns)
        topology.add_veth_into(self.MVT_PHY, ns, self.NS_DEV)
        topology.in_ns(ns, "ip", "link", "add", br, "address", self.REMOTE_MAC, "type",
                       "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
        topology.in_ns(ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/%s/disable_ipv6"
                       % br)
        topology.in_ns(ns, "ip", "link", "set", self.NS_DEV, "master", br)
        topology.in_ns(ns, "bridge", "link", "set", "dev", self.NS_DEV, "hairpin", "on")
        topology.in_ns(ns, "ip", "addr", "add", "%s/%d" % (self.REMOTE_IP, self.PREFIX),
                       "dev", br)
        topology.in_ns(ns, "ip", "link", "set", br, "up")
        topology.up(self.MVT_PHY)

    def remote_ipv6(self, on):
        """The remote end's IPv6 address REMOTE_IP6 on (neighbour discovery, no DAD)
        or off again."""
        conf = "/proc/sys/net/ipv6/conf/%s/" % self.NS_DEV
        if on:
            topology.in_ns(self.NS, "sh", "-c", "echo 0 > %saccept_dad; echo 0 > %s"
                           "disable_ipv6" % (conf, conf))
            topology.in_ns(self.NS, "ip", "-6", "addr", "add", self.REMOTE_IP6 + "/64",
                           "dev", self.NS_DEV)
        else:
            topology.in_ns(self.NS, "sh", "-c", "echo 1 > %sdisable_ipv6" % conf, check=False)

    def remove_guest(self, vm):
        """Stop a guest of add_guest() and remove its tap (a VM shut down)."""
        errors = []
        vm.stop(errors)
        self._guests.remove(vm)
        topology.remove((vm.tap,))
        if errors:
            raise LabError("stopping %s: %s" % (vm.name, errors))

    # --- the guest, as the tests use it ---
    @property
    def qemu(self):
        return self.vm.qemu if self.vm else None

    @property
    def console_log(self):
        return self.vm.console_log if self.vm else None

    def guest(self, cmd, timeout=60):
        """Run a shell command in the guest: (exit status, output)."""
        return self.vm.guest(cmd, timeout)

    def guest_send(self, cmd):
        return self.vm.guest_send(cmd)

    def guest_wait(self, timeout=60):
        return self.vm.guest_wait(timeout)

    def guest_check(self, cmd, timeout=60):
        return self.vm.guest_check(cmd, timeout)

    def qmp(self, command, **arguments):
        return self.vm.qmp(command, **arguments)

    def pause_vm(self):
        """Stop the guest's CPUs (QMP "stop"): QEMU then does not read the tap."""
        self.vm.qmp("stop")

    def resume_vm(self):
        """Resume the guest (QMP "cont")."""
        self.vm.qmp("cont")

    def vm_status(self):
        """QMP query-status: "running", "paused", ..."""
        return self.vm.qmp("query-status").get("status")

    # ------------------------------------------------------------------ the remote namespace
    def remote(self, *argv, **popen_kwargs):
        """Start argv inside the namespace (ip netns exec; ns=MVT_NS: the macvtaps'
        remote); returns a subprocess.Popen. Killed at teardown if still running.
        """
        ns = popen_kwargs.pop("ns", None) or self.NS
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs.setdefault("start_new_session", True)
        if "preexec_fn" not in popen_kwargs:
            popen_kwargs["preexec_fn"] = die_with_parent
        p = subprocess.Popen(["ip", "netns", "exec", ns] + [str(a) for a in argv],
                             **popen_kwargs)
        self._procs.append(p)
        return p

    def remote_run(self, *argv, timeout=30, check=False, ns=None):
        """Run argv inside the namespace to completion; CompletedProcess with text output."""
        p = self.remote(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        ns=ns)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_popen(p)
            raise LabError("remote command timed out: %s" % " ".join(map(str, argv)))
        finally:
            if p in self._procs and p.poll() is not None:
                self._procs.remove(p)
        cp = subprocess.CompletedProcess(p.args, p.returncode, out, err)
        if check and p.returncode != 0:
            raise LabError("remote command failed (rc=%d): %s\n%s%s" % (
                p.returncode, " ".join(map(str, argv)), out, err))
        return cp

    def _start_server(self, kind, port, bind_ip, ns):
        srv = start_server(ns or self.NS, kind, port, bind_ip)
        self._servers.append(srv)
        return srv

    def start_udp_sink(self, port, bind_ip=None, ns=None):
        """UDP sink in the namespace; handle.count = datagrams received; .stop()."""
        return self._start_server("udp", port, bind_ip, ns)

    def start_tcp_echo(self, port, bind_ip=None, ns=None):
        """TCP echo server in the namespace; handle.connections/.closed/.bytes; .stop()."""
        return self._start_server("tcp", port, bind_ip, ns)

    # ------------------------------------------------------------------ teardown
    def _teardown(self, errors):
        def step(what, fn, *a):
            try:
                fn(*a)
            except Exception as e:  # keep going: remove as much as possible
                errors.append("%s: %s" % (what, e))

        for vm in self._guests + ([self.vm] if self.vm else []):
            vm.stop(errors)
        self._guests = []
        for srv in self._servers:
            step("stop %s server" % srv.kind, srv.stop)
        self._servers = []
        for p in self._procs:
            step("stop remote process", stop_popen, p, 2.0)
        self._procs = []
        if self._lock_fd is None:
            # we never got the lock: nothing below is ours (another lab may own it)
            if self.workdir and not self.keep_workdir:
                step("remove workdir", shutil.rmtree, self.workdir, True)
            return
        # whatever else still lives in the namespace, QEMU left on our tap, devices
        step("cleanup", self.cleanup_stale)
        for dev in self.DEVICES:
            if topology.link_exists(dev):
                errors.append("device %s still exists" % dev)
        for ns in (self.NS,) + self.EXTRA_NS:
            if topology.netns_exists(ns):
                errors.append("namespace %s still exists" % ns)
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
