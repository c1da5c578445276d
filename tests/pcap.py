"""The one pcap reader of the tests: tcpdump's captures, parsed with the standard
library into what the tool reports of a packet (the independent oracle)."""
import socket
import struct


def read_pcap(path):
    """[(timestamp, frame bytes)] of a classic pcap file (either byte order, us or ns)."""
    with open(path, "rb") as f:
        data = f.read()
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise AssertionError("%s is not a pcap file (magic %r)" % (path, magic))
    nanos = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, "%s: link type %d, not Ethernet" % (path, linktype)
    frames, off = [], 24
    while off + 16 <= len(data):
        sec, frac, incl, _orig = struct.unpack(endian + "IIII", data[off:off + 16])
        frames.append((sec + frac / (1e9 if nanos else 1e6), data[off + 16:off + 16 + incl]))
        off += 16 + incl
    return frames


def parse_frame(frame):
    """The fields the tool reports for an IPv4 TCP/UDP/ICMP frame, or None."""
    eth, l3 = struct.unpack("!H", frame[12:14])[0], 14
    while eth in (0x8100, 0x88a8):
        eth, l3 = struct.unpack("!H", frame[l3 + 2:l3 + 4])[0], l3 + 4
    if eth != 0x0800 or len(frame) < l3 + 20:
        return None
    ihl = (frame[l3] & 15) * 4
    proto = frame[l3 + 9]
    if struct.unpack("!H", frame[l3 + 6:l3 + 8])[0] & 0x1fff:
        return None                      # a non-first fragment: the tool skips them too
    rec = {"protocol": {1: "icmp", 6: "tcp", 17: "udp"}.get(proto),
           "src_ip": socket.inet_ntoa(frame[l3 + 12:l3 + 16]),
           "dst_ip": socket.inet_ntoa(frame[l3 + 16:l3 + 20]),
           "src_port": None, "dst_port": None,
           "icmp_type": None, "icmp_id": None, "icmp_seq": None}
    if rec["protocol"] is None:
        return None
    l4 = frame[l3 + ihl:l3 + ihl + 8]
    if proto == 1:
        rec["icmp_type"] = l4[0]
        if l4[0] in (0, 8):
            rec["icmp_id"], rec["icmp_seq"] = struct.unpack("!HH", l4[4:8])
    else:
        rec["src_port"], rec["dst_port"] = struct.unpack("!HH", l4[0:4])
    return rec
