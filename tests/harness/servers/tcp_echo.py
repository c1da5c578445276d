#!/usr/bin/python3
"""TCP echo server for the lab's namespaces: usage: tcp_echo.py PORT BIND_IP.
Prints "ready", "conn IP:PORT" per connection, "closed IP:PORT BYTES" when one ends."""
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
s = socket.socket(socket.AF_INET6 if ":" in bind_ip else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind_ip, port))
s.listen(64)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    peer = "%s:%d" % addr[:2]
    out("conn", peer)
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
