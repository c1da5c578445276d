#!/usr/bin/python3
"""Count kprobe hits on the functions of the VM <-> switch <-> NIC path while a command runs.

usage: kprobe_hits.py [--require FN,FN] -- COMMAND...
Prints one line per function and a final JSON line {"kprobe_hits": {...}}.
Exit 0 when every --require'd function was hit at least once and COMMAND succeeded.
"""
import argparse
import json
import subprocess
import sys
import time

from bcc import BPF

FUNCS = ["ovs_dp_process_packet", "tun_net_xmit", "tun_get_user", "__dev_queue_xmit",
         "__netif_receive_skb", "br_handle_frame", "icmp_rcv", "udp_rcv", "tcp_v4_rcv"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--require", default="")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd

    text = "BPF_ARRAY(hits, u64, %d);\n" % len(FUNCS)
    for i, fn in enumerate(FUNCS):
        text += ("int hit_%d(void *ctx) { int k = %d; u64 *v = hits.lookup(&k);"
                 " if (v) __sync_fetch_and_add(v, 1); return 0; }\n" % (i, i))
    t0 = time.monotonic()
    b = BPF(text=text)
    attached = {}
    for i, fn in enumerate(FUNCS):
        try:
            b.attach_kprobe(event=fn, fn_name="hit_%d" % i)
            attached[fn] = True
        except Exception as e:  # a function may be absent (e.g. openvswitch not loaded)
            attached[fn] = False
            print("kprobe %s: not attached (%s)" % (fn, e), file=sys.stderr)
    print("kprobes attached in %.1f s: %s" % (time.monotonic() - t0,
          " ".join(f for f in FUNCS if attached[f])), flush=True)
    rc = 0
    if cmd:
        rc = subprocess.call(cmd)
    hits = b["hits"]
    counts = {fn: (int(hits[hits.Key(i)].value) if attached[fn] else None)
              for i, fn in enumerate(FUNCS)}
    for fn in FUNCS:
        print("  %-24s %s" % (fn, counts[fn] if counts[fn] is not None else "not attached"))
    print(json.dumps({"kprobe_hits": counts, "command_rc": rc}), flush=True)
    missing = [f for f in a.require.split(",") if f and not counts.get(f)]
    if missing:
        print("required functions not hit: %s" % ",".join(missing), file=sys.stderr)
    b.cleanup()
    return 1 if (missing or rc) else 0


if __name__ == "__main__":
    sys.exit(main())
