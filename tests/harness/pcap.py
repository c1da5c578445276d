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
    """The fields the tool reports for an IPv4 or IPv6 TCP/UDP/ICMP/ICMPv6 frame (up to
    two VLAN tags; IPv6 extension headers skipped), or None for what it does not trace."""
    eth, l3 = struct.unpack("!H", frame[12:14])[0], 14
    while eth in (0x8100, 0x88a8):
        eth, l3 = struct.unpack("!H", frame[l3 + 2:l3 + 4])[0], l3 + 4
    if eth == 0x0800 and len(frame) >= l3 + 20:
        version, l4_off = 4, l3 + (frame[l3] & 15) * 4
        proto = frame[l3 + 9]
        if struct.unpack("!H", frame[l3 + 6:l3 + 8])[0] & 0x1fff:
            return None                  # a non-first fragment: the tool skips them too
        src = socket.inet_ntop(socket.AF_INET, frame[l3 + 12:l3 + 16])
        dst = socket.inet_ntop(socket.AF_INET, frame[l3 + 16:l3 + 20])
    elif eth == 0x86dd and len(frame) >= l3 + 40:
        version, proto, l4_off = 6, frame[l3 + 6], l3 + 40
        for _ in range(4):               # hop-by-hop, routing, destination options, fragment
            if proto not in (0, 43, 60, 44):
                break
            if proto == 44:
                if struct.unpack("!H", frame[l4_off + 2:l4_off + 4])[0] & 0xfff8:
                    return None
                proto, l4_off = frame[l4_off], l4_off + 8
            else:
                proto, l4_off = frame[l4_off], l4_off + (frame[l4_off + 1] + 1) * 8
        src = socket.inet_ntop(socket.AF_INET6, frame[l3 + 8:l3 + 24])
        dst = socket.inet_ntop(socket.AF_INET6, frame[l3 + 24:l3 + 40])
    else:
        return None
    names = {1: "icmp", 6: "tcp", 17: "udp"} if version == 4 else {58: "icmp6", 6: "tcp",
                                                                    17: "udp"}
    # what tells one packet from another (tests of joins): the IPv4 id, its length,
    # TCP's sequence
    rec = {"protocol": names.get(proto), "ip_version": version, "src_ip": src,
           "dst_ip": dst, "src_port": None, "dst_port": None,
           "icmp_type": None, "icmp_id": None, "icmp_seq": None,
           "ip_id": struct.unpack("!H", frame[l3 + 4:l3 + 6])[0] if version == 4 else None,
           "ip_len": struct.unpack("!H", frame[l3 + 2:l3 + 4])[0] if version == 4 else None,
           "tcp_seq": None}
    if rec["protocol"] is None:
        return None
    l4 = frame[l4_off:l4_off + 8]
    if rec["protocol"] in ("icmp", "icmp6"):
        rec["icmp_type"] = l4[0]
        if l4[0] in ((0, 8) if version == 4 else (128, 129)):
            rec["icmp_id"], rec["icmp_seq"] = struct.unpack("!HH", l4[4:8])
    else:
        rec["src_port"], rec["dst_port"] = struct.unpack("!HH", l4[0:4])
        if rec["protocol"] == "tcp":
            rec["tcp_seq"] = struct.unpack("!I", l4[4:8])[0]
    return rec
