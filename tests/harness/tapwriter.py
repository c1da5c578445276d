"""A stand-in VM: a process that holds a tap device and writes frames into it, as QEMU does.

Frames are built here byte by byte so that tests can also write malformed ones.
"""
import fcntl
import os
import socket
import struct
import subprocess

TUNSETIFF = 0x400454ca
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def mac(text):
    return bytes.fromhex(text.replace(":", ""))


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return (~s) & 0xffff


def ipv4(src, dst, proto, payload, ident=0, frag=0, ihl=5, tot_len=None, options=b""):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0,
                      tot_len if tot_len is not None else 20 + len(options) + len(payload),
                      ident, frag, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    hdr += options
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src, dst, next_header, payload, ext=()):
    """An IPv6 packet; ext: [(header type, its body after the 2 first bytes)], in order
    (hop-by-hop 0, routing 43, destination options 60: padded to 8-byte units; fragment
    44: body is the 6 bytes after next header and reserved)."""
    chain = b""
    types = [t for t, _b in ext] + [next_header]
    for (htype, body), nxt in zip(ext, types[1:]):
        if htype == 44:
            chain += struct.pack("!BB", nxt, 0) + body
        else:
            raw = body + b"\0" * (-(len(body) + 2) % 8)
            chain += struct.pack("!BB", nxt, (len(raw) + 2) // 8 - 1) + raw
    first = types[0]
    return struct.pack("!IHBB16s16s", 6 << 28, len(chain) + len(payload), first, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + chain + payload


def udp(sport, dport, payload=b""):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def icmp(icmp_type, ident, seq, payload=b"ping"):
    body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def ether(dst, src, ethertype, payload, vlans=()):
    head = mac(dst) + mac(src)
    for tpid, vid in vlans:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", ethertype) + payload


class TapWriter(object):
    """Create tap NAME on BRIDGE, hold it open (carrier up), write frames into it."""

    def __init__(self, name, bridge):
        self.name = name
        subprocess.run(["ip", "tuntap", "add", name, "mode", "tap"], check=True)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                        IFF_TAP | IFF_NO_PI))
            with open("/proc/sys/net/ipv6/conf/%s/disable_ipv6" % name, "w") as f:
                f.write("1")
            subprocess.run(["ip", "link", "set", name, "master", bridge], check=True)
            subprocess.run(["ip", "link", "set", name, "up"], check=True)
        except Exception:
            self.close()
            raise

    def write(self, frame):
        os.write(self.fd, frame)

    def drain(self):
        """Read (and throw away) what the host sent towards this 'VM'."""
        n = 0
        while True:
            try:
                os.read(self.fd, 65536)
                n += 1
            except BlockingIOError:
                return n

    def rx_packets(self):
        with open("/sys/class/net/%s/statistics/rx_packets" % self.name) as f:
            return int(f.read())

    def close(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None
        subprocess.run(["ip", "link", "del", self.name], stderr=subprocess.DEVNULL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TapHolder(object):
    """A stand-in VM in a process of its own (tapholder.py), with the command line and
    process name a test gives it, holding tap NAME (in network namespace netns, if
    given). The caller puts the tap on a bridge; write() sends a frame from the 'VM'."""

    def __init__(self, name, argv=(), comm=None, netns=None):
        from .procs import die_with_parent
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = ["/usr/bin/python3", os.path.join(here, "tapholder.py"), name] + \
            (["--comm", comm] if comm else []) + list(argv)
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.name, self.netns = name, netns
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     universal_newlines=True, preexec_fn=die_with_parent)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("tapholder.py did not start: %s" % cmd)
        self.pid = self.proc.pid        # (ip netns exec execs the command: the same)

    def write(self, frame):
        self.proc.stdin.write(frame.hex() + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
