"""One QEMU guest of the lab: boot (software emulation), the serial command channel,
QMP. Built by tests/harness/guest/build_guest.sh: a Debian cloud kernel and a busybox
initramfs whose /init runs each line it reads on the second serial port as a shell
command and answers with its output and a done marker."""
import json
import os
import re
import select
import socket
import subprocess
import time

from .procs import LabError, die_with_parent, read_tail, stop_popen

READY_MARKER = "__VNL_GUEST_READY__"
DONE_MARKER = "__VNL_DONE__"
_DONE_RE = re.compile(rb"(?:^|\n)" + DONE_MARKER.encode() + rb" (-?\d+)\r?\n")


class GuestTimeout(LabError, TimeoutError):
    """A guest command did not finish in time."""


class QemuGuest(object):
    """A guest on a tap. name/uuid: what QEMU is told (-name guest=NAME,... as libvirt
    does, -uuid), so that tools can find the VM by the name its operators use."""

    def __init__(self, tap, mac, vmlinuz, initrd, workdir, name="vnl-guest", uuid=None,
                 memory_mb=512, qemu="qemu-system-x86_64", log=None, append=""):
        self.tap, self.mac, self.name, self.uuid = tap, mac, name, uuid
        self.vmlinuz, self.initrd, self.workdir = vmlinuz, initrd, workdir
        self.memory_mb, self.qemu_bin = memory_mb, qemu
        self.append = append
        self._log = log or (lambda msg: None)
        self.console_log = os.path.join(workdir, "console.log")
        self.qemu = None                # subprocess.Popen of QEMU
        self.qemu_argv = None
        self._qemu_out = None
        self._cmd_sock = None
        self._cmd_buf = b""
        self._outstanding = 0           # commands sent, result not yet read
        self._discard = 0               # results to throw away (their caller timed out)
        self._qmp_sock = None
        self._qmp_file = None
        self.qmp_events = []
        self._fds = []
        self._active = False

    def start(self, boot_timeout):
        self._active = True
        self._start_qemu()
        self._wait_ready(boot_timeout)
        return self

    def _start_qemu(self):
        self._qmp_path = os.path.join(self.workdir, "qmp.sock")
        self._cmd_path = os.path.join(self.workdir, "cmd.sock")
        argv = [
            self.qemu_bin, "-accel", "tcg", "-nodefaults", "-no-user-config",
            # as libvirt starts QEMU: the VM's name, threads named after their work
            "-name", "guest=%s,debug-threads=on" % self.name,
            "-machine", "pc", "-m", str(self.memory_mb), "-smp", "1",
            "-display", "none", "-vga", "none", "-no-reboot",
            "-kernel", self.vmlinuz, "-initrd", self.initrd,
            "-append", ("console=ttyS0 panic=-1 ipv6.disable_ipv6=1 " + self.append).strip(),
            "-chardev", "file,id=con0,path=%s" % self.console_log, "-serial", "chardev:con0",
            "-chardev", "socket,id=cmd0,path=%s,server=on,wait=off" % self._cmd_path,
            "-serial", "chardev:cmd0",
            "-qmp", "unix:%s,server=on,wait=off" % self._qmp_path,
        ] + self._netdev() + [
            "-device", "virtio-net-pci,netdev=net0,mac=%s,romfile=" % self.mac,
        ] + (["-uuid", self.uuid] if self.uuid else [])
        self.qemu_argv = argv
        with open(os.path.join(self.workdir, "qemu.argv"), "w") as f:
            f.write(" ".join(argv) + "\n")
        self._qemu_out = open(os.path.join(self.workdir, "qemu.log"), "wb")
        self._log("qemu: %s" % " ".join(argv))
        self.qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._qemu_out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent, pass_fds=self._fds)
        for fd in self._fds:        # QEMU has its own copy now
            os.close(fd)
        self._fds = []

    def _netdev(self):
        """The guest's NIC's backend: its tap by name, or a macvtap's character device
        opened here and handed to QEMU as a descriptor, as libvirt does for
        <interface type='direct'> (QEMU cannot open /dev/tapN by a name)."""
        self._fds = []
        if not os.path.isdir("/sys/class/net/%s/macvtap" % self.tap):
            return ["-netdev", "tap,id=net0,ifname=%s,script=no,downscript=no" % self.tap]
        with open("/sys/class/net/%s/ifindex" % self.tap) as f:
            node = "/dev/tap%d" % int(f.read())
        fd = os.open(node, os.O_RDWR)
        self._fds.append(fd)
        return ["-netdev", "tap,id=net0,fd=%d" % fd]

    def _qemu_failure(self, what):
        return LabError("%s\n--- qemu (rc=%s) output:\n%s\n--- console log (%s):\n%s" % (
            what, self.qemu.poll() if self.qemu else None,
            read_tail(os.path.join(self.workdir, "qemu.log"), 2000) if self.workdir else "",
            self.console_log, read_tail(self.console_log) if self.console_log else ""))

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

    def _wait_ready(self, boot_timeout):
        deadline = time.monotonic() + boot_timeout
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
                raise self._qemu_failure("guest not ready after %ss" % boot_timeout)
            time.sleep(0.05)
        self.boot_to_marker = time.monotonic() - (deadline - boot_timeout)
        # first command: a blank line first flushes any partial line on the channel.
        # The guest announces itself just before it opens its end of the channel: bytes
        # that arrive in between can lose their first character ("sh: cho: not found"
        # was seen once), so the check is tried again before the boot counts as failed.
        for attempt in range(3):
            self._cmd_sock.sendall(b"\n")
            rc, out = self.guest("echo vnl-channel-ok",
                                 timeout=max(5, deadline - time.monotonic()))
            if rc == 0 and "vnl-channel-ok" in out:
                return
            self._log("command channel check %d: rc=%s out=%r" % (attempt + 1, rc, out))
            time.sleep(0.3)
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
            raise LabError("guest %s is not running" % self.name)
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

    # ------------------------------------------------------------------ stop
    def stop(self, errors):
        """Close the channels and stop QEMU; problems go to errors (keep going)."""
        def step(what, fn, *a):
            try:
                fn(*a)
            except Exception as e:  # remove as much as possible
                errors.append("%s: %s" % (what, e))
        for s in (self._cmd_sock, self._qmp_sock):
            if s is not None:
                step("close socket", s.close)
        if self._qmp_file is not None:
            step("close qmp file", self._qmp_file.close)
        self._cmd_sock = self._qmp_sock = self._qmp_file = None
        self._cmd_buf, self._outstanding, self._discard = b"", 0, 0
        if self.qemu is not None:
            step("stop qemu", stop_popen, self.qemu, 5.0)
            self.qemu = None
        if self._qemu_out is not None:
            step("close qemu log", self._qemu_out.close)
            self._qemu_out = None
        self._active = False
