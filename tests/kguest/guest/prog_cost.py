#!/usr/bin/python3
"""Which BPF program each tool instance runs at each tracepoint, and what it cost.

usage: prog_cost.py OUT.json METHOD=PID...

Read from /proc/PID/fdinfo alone (5.8+): a raw tracepoint link's fd names its tracepoint
(tp_name) and its program (prog_id); a program's fd has its run_cnt and run_time_ns,
which the kernel counts while kernel.bpf_stats_enabled is 1. BTF-typed tracepoints
(tp_btf) and raw ones attach through the same kind of link. Writes
{method: [{"tp": name, "prog_id": id, "link_id": id, "run_cnt": n, "run_time_ns": ns}, ...]}
(link ids grow with attach order, and a tracepoint calls its programs in that order).
Stdlib only: runs in the guest (and bench/overhead.py names programs with it).
"""
import json
import os
import sys


def fdinfo(pid):
    """Every fd's fdinfo of a process, as {key: value} dicts."""
    out = []
    d = "/proc/%d/fdinfo" % pid
    for fd in os.listdir(d):
        try:
            with open(os.path.join(d, fd)) as f:
                text = f.read()
        except OSError:
            continue
        info = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        out.append(info)
    return out


def tracepoints_of(pid):
    """{prog_id: tracepoint} of the programs a process attached through links."""
    return dict((int(i["prog_id"]), i["tp_name"]) for i in fdinfo(pid)
                if "tp_name" in i and "prog_id" in i)


def programs_of(pid):
    infos = fdinfo(pid)
    progs = dict((int(i["prog_id"]), i) for i in infos
                 if "prog_type" in i and "prog_id" in i)
    out = []
    for i in infos:
        if "tp_name" in i and "prog_id" in i:
            p = progs.get(int(i["prog_id"]), {})
            out.append({"tp": i["tp_name"], "prog_id": int(i["prog_id"]),
                        "link_id": int(i.get("link_id", 0)),
                        "run_cnt": int(p.get("run_cnt", 0)),
                        "run_time_ns": int(p.get("run_time_ns", 0))})
    return sorted(out, key=lambda r: r["tp"])


def main(argv):
    out = {}
    for arg in argv[2:]:
        method, pid = arg.split("=")
        out[method] = programs_of(int(pid))
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)
    for method, progs in sorted(out.items()):
        for p in progs:
            print("%-10s %-28s runs %7d  %s ns/run" % (
                method, p["tp"], p["run_cnt"],
                "%.0f" % (p["run_time_ns"] / p["run_cnt"]) if p["run_cnt"] else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
