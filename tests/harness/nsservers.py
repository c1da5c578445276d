"""Servers inside a network namespace (UDP sink, TCP echo), watched from the host.

The servers are the scripts in servers/; NsServer reads their output lines."""
import os
import subprocess
import sys
import threading
import time

from .procs import LabError, die_with_parent, stop_popen

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"udp": os.path.join(HERE, "servers", "udp_sink.py"),
           "tcp": os.path.join(HERE, "servers", "tcp_echo.py")}


def start_server(netns, kind, port, bind_ip=None):
    """A UDP sink ("udp") or TCP echo server ("tcp") in netns, ready to receive."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable or "/usr/bin/python3", "-u",
         SCRIPTS[kind], str(port), bind_ip or "0.0.0.0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=die_with_parent)
    srv = NsServer(kind, port, proc)
    try:
        srv.wait_ready()
    except BaseException:
        srv.stop()
        raise
    return srv


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
        stop_popen(self.proc)
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
