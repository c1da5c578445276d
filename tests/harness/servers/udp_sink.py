#!/usr/bin/python3
"""UDP sink for the lab's namespaces: usage: udp_sink.py PORT BIND_IP.
Prints "ready", then "src IP:PORT" for each new source and "count N BYTES" after
each batch of datagrams (NsServer in nsservers.py reads these lines)."""
import select, signal, socket, sys
port, bind_ip = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
signal.signal(signal.SIGINT, signal.SIG_IGN)
s = socket.socket(socket.AF_INET6 if ":" in bind_ip else socket.AF_INET, socket.SOCK_DGRAM)
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
        src = "%s:%d" % addr[:2]
        if src not in seen:
            seen.add(src)
            print("src", src, flush=True)
    print("count", n, nbytes, flush=True)
