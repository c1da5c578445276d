#!/usr/bin/python3
"""Traffic helpers for the kguest lane: fixed 5-tuple UDP bursts and a TCP exchange.

Servers run in namespace `remote`, clients in namespace `vm` (via `ip netns exec`).
Every command is bounded in count and time and prints one JSON summary line.

  traffic.py udp-server --bind 10.77.0.3 --port 40001 --count 20 [--ready FILE]
  traffic.py udp-burst  --src 10.77.0.2 --sport 40000 --dst 10.77.0.3 --dport 40001 --count 20
  traffic.py tcp-server --bind 10.77.0.3 --port 40002 [--ready FILE]
  traffic.py tcp-client --src 10.77.0.2 --sport 40003 --dst 10.77.0.3 --dport 40002 --messages 5
  traffic.py barrier --bind 10.78.0.101 --peer 10.78.0.102 --name ready   (case J's two guests)
"""
import argparse
import json
import socket
import sys
import time


def ready(path):
    if path:
        with open(path, "w") as f:
            f.write("ready\n")


def udp_server(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind, a.port))
    ready(a.ready)
    deadline = time.monotonic() + a.timeout
    n = 0
    while n < a.count and time.monotonic() < deadline:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data, peer = s.recvfrom(65535)
        except socket.timeout:
            break
        s.sendto(data, peer)
        n += 1
    print(json.dumps({"udp_server": {"echoed": n}}))
    return 0


def udp_burst(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.src, a.sport))
    payload = b"vnl-udp-" + b"x" * max(0, a.size - 8)
    got = 0
    rtts = []
    for i in range(a.count):
        t0 = time.monotonic()
        s.sendto(payload[:a.size], (a.dst, a.dport))
        s.settimeout(a.reply_timeout)
        try:
            s.recvfrom(65535)
            got += 1
            rtts.append((time.monotonic() - t0) * 1e3)
        except socket.timeout:
            pass
        if a.interval:
            time.sleep(a.interval)
    out = {"udp_burst": {"sent": a.count, "replies": got,
                         "five_tuple": [a.src, a.sport, a.dst, a.dport, "udp"],
                         "rtt_ms_max": round(max(rtts), 3) if rtts else None,
                         "rtt_ms_min": round(min(rtts), 3) if rtts else None}}
    print(json.dumps(out))
    return 0 if got == a.count else 1


def tcp_server(a):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.bind, a.port))
    ls.listen(4)
    ready(a.ready)
    ls.settimeout(a.timeout)
    total = 0
    conns = 0
    deadline = time.monotonic() + a.timeout
    try:
        while conns < a.conns and time.monotonic() < deadline:
            c, _ = ls.accept()
            conns += 1
            c.settimeout(max(0.1, deadline - time.monotonic()))
            with c:
                while True:
                    data = c.recv(65536)
                    if not data:
                        break
                    c.sendall(data)
                    total += len(data)
    except socket.timeout:
        pass
    print(json.dumps({"tcp_server": {"connections": conns, "echoed_bytes": total}}))
    return 0


def tcp_client(a):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((a.src, a.sport))
    s.settimeout(a.reply_timeout)
    s.connect((a.dst, a.dport))
    ok = 0
    for i in range(a.messages):
        msg = (b"vnl-tcp-%03d-" % i).ljust(a.size, b"y")
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        ok += got == msg
        if a.interval:
            time.sleep(a.interval)
    s.close()
    print(json.dumps({"tcp_client": {"messages": a.messages, "echoed_ok": ok,
                                     "five_tuple": [a.src, a.sport, a.dst, a.dport, "tcp"]}}))
    return 0 if ok == a.messages else 1


def barrier(a):
    """Two guests meet (case J): each sends NAME to the other every 0.2 s until it hears
    the other's, then a few more times (the other may have just begun listening)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a.bind, a.port))
    s.settimeout(0.2)
    want = a.name.encode()
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        s.sendto(want, (a.peer, a.port))
        try:
            data, _peer = s.recvfrom(256)
        except socket.timeout:
            continue
        if data == want:
            for _ in range(5):
                s.sendto(want, (a.peer, a.port))
                time.sleep(0.1)
            return 0
    print("barrier %s: no word from %s in %ss" % (a.name, a.peer, a.timeout), file=sys.stderr)
    return 1


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    us = sub.add_parser("udp-server")
    us.add_argument("--bind", required=True)
    us.add_argument("--port", type=int, required=True)
    us.add_argument("--count", type=int, default=100)
    us.add_argument("--timeout", type=float, default=60)
    us.add_argument("--ready")
    ub = sub.add_parser("udp-burst")
    ts = sub.add_parser("tcp-server")
    ts.add_argument("--bind", required=True)
    ts.add_argument("--port", type=int, required=True)
    ts.add_argument("--conns", type=int, default=1)
    ts.add_argument("--timeout", type=float, default=60)
    ts.add_argument("--ready")
    tc = sub.add_parser("tcp-client")
    for sp in (ub, tc):
        sp.add_argument("--src", required=True)
        sp.add_argument("--sport", type=int, required=True)
        sp.add_argument("--dst", required=True)
        sp.add_argument("--dport", type=int, required=True)
        sp.add_argument("--size", type=int, default=64)
        sp.add_argument("--interval", type=float, default=0.05)
        sp.add_argument("--reply-timeout", type=float, default=3.0)
    ub.add_argument("--count", type=int, default=20)
    tc.add_argument("--messages", type=int, default=5)
    br = sub.add_parser("barrier")
    br.add_argument("--bind", required=True)
    br.add_argument("--peer", required=True)
    br.add_argument("--port", type=int, default=40099)
    br.add_argument("--name", required=True)
    br.add_argument("--timeout", type=float, default=600)
    a = p.parse_args()
    return {"udp-server": udp_server, "udp-burst": udp_burst,
            "tcp-server": tcp_server, "tcp-client": tcp_client, "barrier": barrier}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
