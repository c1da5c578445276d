#!/usr/bin/python3
# -*- coding: utf-8 -*-
#
# vm_network_latency  Where does a KVM guest's packet spend its time on the host?
#                     Per-packet latency between the VM's tap or macvtap device, the
#                     virtual switch (Open vSwitch kernel datapath or Linux bridge),
#                     VXLAN and Geneve tunnels and the physical NIC (behind bonds and
#                     VLANs), in both directions and from VM to VM on the host, IPv4
#                     and IPv6, per VM by name. For Linux, uses BCC, eBPF.
#
# How: every packet that enters the path (a frame the VM writes into its tap or
# macvtap, or a frame the physical NIC receives) is parsed once, filtered in the
# kernel, and kept in a direct-mapped table indexed by a hash of its sk_buff address.
# Each later stage (switch, qdisc, driver transmit, tap ring, the VM's read) only
# looks that address up and stamps the time. When the packet completes the path, one
# ring-buffer event (detailed mode) or a few in-kernel histogram increments
# (histogram mode) are produced. Packets freed before they complete are counted with
# the kernel's drop reason. Struct layouts come from the running kernel's BTF, never
# from headers of another kernel; what the kernel can do is tried, never read off its
# version. Stages attach to raw or BTF-typed tracepoints, or kprobes, chosen per
# stage. Which VM owns a tap or macvtap comes from /proc (the process holding it,
# QEMU's -name and -uuid); which NIC is under a bond or VLAN, from sysfs.
#
# USAGE: vm_network_latency.py [-h] [--src-ip IP] [--dst-ip IP] [--src-port PORT]
#            [--dst-port PORT] [--protocol {tcp,udp,icmp,icmp6,all}] [--vni N]
#            [--direction {tx,rx,vm2vm,all,both}] [--vm-dev DEV] [--vm NAME]
#            [--phy-dev DEV]
#            [--mode {detailed,histogram}] [--interval SECONDS] [--top] [--per-vm]
#            [--prometheus [ADDR:]PORT] [--prometheus-tls-cert FILE]
#            [--prometheus-tls-key FILE] [--prometheus-client-ca FILE]
#            [--forget-after SECONDS] [--vm-table-size N] [--prometheus-textfile PATH]
#            [--quiet] [--latency-threshold US] [--timeout SECONDS]
#            [--output {text,json}] [--attach {auto,kprobe,tracepoint,tp_btf}]
#            [--explain [US]] [--drops] [--list-vms] [--list-stages] [--dry-run]
#            [--sample N] [--max-inflight N] [--btf FILE] [--verbose]
#            [--write-events FILE] [--write-pcap FILE] [--read-events FILE]...
#            [--clock-offset US] [--heatmap SVG] [--version] [--ebpf]
#
# Copyright (c) 2026 The vm_network_latency developers. MIT License (see LICENSE).
#
# 25-Nov-2026   First version: tap, switch and NIC stages; BTF layouts; drops.
# 01-Dec-2026   BCC 0.18 and a kernel matrix; IPv6; VXLAN/Geneve; VMs by name;
#               vhost-net; Prometheus metrics; --write-events/--read-events.
# 06-Dec-2026   Recordings, names and files as untrusted input; metrics over TLS;
#               long-running exporters forget VMs that are gone. macvtap, VM to VM
#               on one host, NICs behind bonds and VLANs.
# 07-Dec-2026   --explain: why each long wait; two hosts' recordings joined;
#               --top, --write-pcap, --heatmap; vhost-net's kick and signal as stages.

from __future__ import print_function

import argparse
import array
import binascii
import bisect
import ctypes
import errno
import fcntl
import ipaddress
import json
import math
import mmap
import operator
import os
import re
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import collections
from collections import namedtuple


# ============================================================================
# Command line
# ============================================================================

VERSION = "1.0"
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"   # the running kernel's own BTF
EXAMPLES = """examples:
  # every VM packet, both directions, one record per packet
  sudo ./vm_network_latency.py
  # TCP traffic between two addresses, to port 80
  sudo ./vm_network_latency.py --src-ip 192.168.1.10 --dst-ip 192.168.1.20 \\
                               --protocol tcp --dst-port 80
  # all UDP traffic as distributions, every 5 seconds
  sudo ./vm_network_latency.py --protocol udp --mode histogram --interval 5
  # ICMP (ping) latency from one VM
  sudo ./vm_network_latency.py --protocol icmp --src-ip 192.168.1.10
  # only packets slower than 100 us, for 30 seconds
  sudo ./vm_network_latency.py --latency-threshold 100 --timeout 30
  # one direction only, on one VM port and one uplink
  sudo ./vm_network_latency.py --direction tx --vm-dev vnet3 --phy-dev eth1
  # one JSON object per line, for scripts
  sudo ./vm_network_latency.py --output json --timeout 10
  # where would each stage attach on this kernel? (traces nothing)
  sudo ./vm_network_latency.py --list-stages
  # where did my packets die?
  sudo ./vm_network_latency.py --drops --dst-ip 192.168.1.20
  # one VM by the name it was started with, one set of tables per VM
  sudo ./vm_network_latency.py --vm web-03 --mode histogram --per-vm
  # which VMs are here, on which taps and switches? (traces nothing)
  sudo ./vm_network_latency.py --list-vms
  # IPv6 TCP of one VM, and one tenant's VXLAN network
  sudo ./vm_network_latency.py --protocol tcp --src-ip 2001:db8::10
  sudo ./vm_network_latency.py --vni 42 --mode histogram
  # Prometheus metrics on port 9477 for as long as it runs
  sudo ./vm_network_latency.py --mode histogram --prometheus 9477 --quiet
  # save a run, and read it again later without root
  sudo ./vm_network_latency.py --timeout 60 --write-events run.vnl
  ./vm_network_latency.py --read-events run.vnl
  # one packet across two hypervisors: their recordings of the same minute, joined
  ./vm_network_latency.py --read-events hv-a.vnl --read-events hv-b.vnl
"""

# IP protocol numbers (PROTO_* in C); names as tcpdump's: icmp is ICMPv4, icmp6 ICMPv6
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58}
PROTO_NAMES = dict((v, k) for k, v in PROTOCOLS.items())
PROTOCOL_CHOICES = ["tcp", "udp", "icmp", "icmp6", "all"]


class UsageError(Exception):
    """A problem with what the user asked for: one line on stderr, exit 2."""


# Names come from outside the tool: a VM's name from its QEMU command line (which
# tenants influence on many clouds), process and device names, recordings. In text an
# escape sequence in one could retitle or clear the operator's terminal, a carriage
# return forge an output line: text output shows them through printable().
NAME_LIMIT = 64         # characters of a name in text output


def _escape_char(c):
    code = ord(c)
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code if code < 0x10000 \
        else "\\U%08x" % code


def printable(text, limit=None):
    """text with every character a terminal would act on (control characters, bidi
    overrides, anything str.isprintable() refuses) written as \\xNN or \\uNNNN, as
    repr() writes them; cut to `limit` characters ("..." at the end) when longer."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape_char(c) for c in text)
    if limit and len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


def shown_name(text):
    """A name (a VM's, a process's, a device's) as text output shows it."""
    return printable(text, NAME_LIMIT)


def log(msg):
    sys.stderr.write(printable(msg) + "\n")
    sys.stderr.flush()


def _int_in(lo, hi, what):
    """An argparse type: a whole number from lo to hi."""
    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a %s" % (text, what))
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError("%s %d is outside %d-%d" % (what, value, lo, hi))
        return value
    return parse


_port = _int_in(1, 65535, "port number")
_table_size = _int_in(16, 4194304, "table size")


def _ip(text):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an IPv4 or IPv6 address" % text)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError("%r must be a positive number" % text)
    return value


def _non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("%r must be zero or a positive number" % text)
    return value


def _listen_address(text):
    """[ADDR:]PORT (an IPv6 address in brackets: [::1]:9100) -> (address, port)."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        addr = ""
    addr = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    port = _int_in(1, 65535, "port number")(port)
    try:
        addr = str(ipaddress.ip_address(addr)) if addr else "127.0.0.1"
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an IP address to listen on" % addr)
    return addr, port


def _vm_name(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("a VM name cannot be empty")
    return text


def _device(text):
    if not text or len(text) > 15 or "/" in text or text in (".", "..") \
            or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("%r is not a valid network device name" % text)
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # what is wrong and where help is, exit 2: argparse's own 16-line usage would
        # push the one line that matters off a small terminal
        sys.stderr.write("%s: error: %s\nTry '%s -h' for help.\n"
                         % (self.prog, printable(message), self.prog))
        sys.exit(2)


def _path(text):
    """An argparse type: a file name, which cannot be empty."""
    if not text:
        raise argparse.ArgumentTypeError("the file name is empty")
    return text


def _clock_offset(text):
    """An argparse type: microseconds, either way, within a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%s is not a number of microseconds" % printable(
            text, 40))
    if not -86400e6 <= value <= 86400e6:
        raise argparse.ArgumentTypeError("%s is more than a day" % printable(text, 40))
    return value


TOP_INTERVAL_S = 2.0    # --top's refresh, unless --interval says otherwise


# a day: a longer threshold is a typo, and ns of it must fit the C's unsigned 64 bits
LATENCY_THRESHOLD_MAX_US = 86400 * 10 ** 6


def _threshold(text):
    value = _non_negative_float(text)
    if value > LATENCY_THRESHOLD_MAX_US:
        raise argparse.ArgumentTypeError("%r is more than a day (%d us)"
                                         % (text, LATENCY_THRESHOLD_MAX_US))
    return value


# --explain without a value: the longest segments of 100 us or more (an idle host's are
# tens of microseconds; a wait worth a question is longer)
EXPLAIN_DEFAULT_US = 100


def build_parser():
    parser = _Parser(
        prog="vm_network_latency.py", allow_abbrev=False,   # --vm is not --vm-dev
        description="Per-packet latency of KVM guest traffic between the VM's tap "
                    "device, the virtual switch and the physical NIC.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES)
    parser.add_argument("--src-ip", type=_ip, metavar="IP",
                        help="source IP filter (the packet's own source address)")
    parser.add_argument("--dst-ip", type=_ip, metavar="IP",
                        help="destination IP filter (the packet's own destination)")
    parser.add_argument("--src-port", type=_port, metavar="PORT",
                        help="source port filter (TCP/UDP)")
    parser.add_argument("--dst-port", type=_port, metavar="PORT",
                        help="destination port filter (TCP/UDP)")
    parser.add_argument("--protocol", choices=PROTOCOL_CHOICES,
                        default="all", type=str.lower,
                        help="protocol filter (default: all)")
    parser.add_argument("--vni", type=_int_in(0, 16777215, "VNI"), metavar="N",
                        help="only packets of this VXLAN/Geneve network (the inner packets "
                             "of one tenant)")
    parser.add_argument("--direction", choices=["tx", "rx", "vm2vm", "all", "both"],
                        default="all", type=str.lower,
                        help="tx: VM -> network, rx: network -> VM, vm2vm: one VM to "
                             "another on this host (default: all; both: the same)")
    parser.add_argument("--vm-dev", type=_device, action="append", metavar="DEV",
                        help="VM device, a tap or macvtap (repeatable; default: every one)")
    parser.add_argument("--vm", type=_vm_name, action="append", metavar="NAME",
                        help="only packets this VM sends or receives, on its taps and "
                             "macvtaps, also those it gains later (repeatable; "
                             "the name QEMU was started with, -name; with --vm-dev: both)")
    parser.add_argument("--phy-dev", type=_device, action="append", metavar="DEV",
                        help="physical device (repeatable; default: the other ports of "
                             "the switches the taps are on, the devices macvtaps sit on; "
                             "a bond or VLAN: the NICs under it)")
    parser.add_argument("--mode", choices=["detailed", "histogram"], default="detailed",
                        type=str.lower, help="output mode (default: detailed)")
    parser.add_argument("--interval", type=_positive_float, default=5.0, metavar="SECONDS",
                        help="histogram update interval (default: 5)")
    parser.add_argument("--top", action="store_true",
                        help="a live view: one line per VM (and VM pair), refreshed every "
                             "interval (default 2 s here): packets/s each way, P50/P99, "
                             "the slowest segment, drops; keys p r n d sort, space "
                             "pauses, q quits. Plain lines when stdout is not a terminal")
    parser.add_argument("--per-vm", action="store_true",
                        help="histogram mode: one set of tables per VM each interval")
    parser.add_argument("--prometheus", type=_listen_address, metavar="[ADDR:]PORT",
                        help="histogram mode: serve the distributions and counters as "
                             "Prometheus metrics on http://ADDR:PORT/metrics (default "
                             "address 127.0.0.1; needs python3-prometheus-client)")
    parser.add_argument("--prometheus-tls-cert", metavar="FILE", type=_path,
                        help="serve the metrics over HTTPS with this certificate (PEM; "
                             "with --prometheus-tls-key)")
    parser.add_argument("--prometheus-tls-key", metavar="FILE", type=_path,
                        help="the certificate's private key (PEM)")
    parser.add_argument("--prometheus-client-ca", metavar="FILE", type=_path,
                        help="with TLS: only clients with a certificate this CA signed "
                             "may scrape (Prometheus: tls_config cert_file, key_file)")
    parser.add_argument("--forget-after", type=_positive_float, default=300.0,
                        metavar="SECONDS",
                        help="--per-vm and metrics: a VM's counts leave the kernel's table "
                             "and the metrics this long after its taps are gone "
                             "(default: 300)")
    parser.add_argument("--vm-table-size", type=_int_in(64, 4194304, "table size"),
                        default=131072, metavar="N",
                        help="--per-vm and metrics: (VM, segment, bucket) counters the "
                             "kernel keeps, about 70 bytes each (default: 131072); when "
                             "full, counts are not kept and the summary and metrics say "
                             "how many")
    parser.add_argument("--prometheus-textfile", metavar="PATH", type=_path,
                        help="histogram mode: write the same metrics to PATH every interval "
                             "(atomically), for node_exporter's textfile collector")
    parser.add_argument("--quiet", action="store_true",
                        help="no output each interval (the metrics and the exit summary "
                             "remain)")
    parser.add_argument("--latency-threshold", type=_threshold, default=0.0,
                        metavar="US",
                        help="only packets whose total latency is at least this many "
                             "microseconds (filtered in the kernel)")
    parser.add_argument("--timeout", type=_non_negative_float, default=0.0,
                        metavar="SECONDS", help="stop after this long (0 = run until Ctrl-C)")
    parser.add_argument("--output", choices=["text", "json"], default="text", type=str.lower,
                        help="text for people, json for one object per line")
    parser.add_argument("--attach", choices=["auto", "kprobe", "tracepoint", "tp_btf"],
                        default="auto", type=str.lower,
                        help="how stages attach: tracepoint is raw tracepoints, tp_btf "
                             "BTF-typed ones (plain loads of sk_buff fields) where the "
                             "kernel has them (default: auto, chosen per stage)")
    parser.add_argument("--explain", type=_threshold, nargs="?",
                        const=EXPLAIN_DEFAULT_US, metavar="US",
                        help="why each packet's longest segment took long (the VM's "
                             "backend asleep, stopped, waiting in the run queue behind "
                             "another task, interrupted; a qdisc's hold), when it is at "
                             "least US microseconds (default %d)" % EXPLAIN_DEFAULT_US)
    parser.add_argument("--drops", action="store_true",
                        help="also report each tracked packet the kernel dropped, "
                             "with its drop reason and the last stage it reached")
    parser.add_argument("--list-vms", action="store_true",
                        help="print the VMs found, their taps and the switch each tap is "
                             "on, then exit without tracing")
    parser.add_argument("--list-stages", action="store_true",
                        help="print each stage and how it would attach on this kernel, "
                             "then exit without tracing")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile the program for every stage of the --attach method "
                             "and load it through the kernel verifier; attach nothing")
    parser.add_argument("--sample", type=_int_in(1, 1000000, "sampling rate"), default=1,
                        metavar="N",
                        help="trace one packet in N (chosen at random where it enters the "
                             "path, before any parsing: the busiest hosts; counts are the "
                             "sampled ones, and say so)")
    parser.add_argument("--max-inflight", type=_table_size, default=65536, metavar="N",
                        help="packets tracked at once (kernel memory is fixed at about "
                             "250 bytes each; beyond it, or when the slots an sk_buff's "
                             "address can use are taken, packets are counted as not "
                             "tracked; default: 65536)")
    parser.add_argument("--btf", metavar="FILE", default=DEFAULT_BTF, type=_path,
                        help="kernel BTF to take struct layouts from ('none': use the "
                             "kernel headers, only if they match the running kernel)")
    parser.add_argument("--verbose", action="store_true",
                        help="say what was attached where and how layouts were found")
    parser.add_argument("--ebpf", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-events", metavar="FILE", type=_path,
                        help="also save the run's raw events and final counters to FILE, "
                             "for --read-events")
    parser.add_argument("--write-pcap", metavar="FILE", type=_path,
                        help="also write each reported packet to FILE (pcapng, for "
                             "Wireshark): its headers rebuilt from the record, on the "
                             "device where it entered, with the record as its comment; "
                             "detailed mode; also from --read-events")
    parser.add_argument("--heatmap", metavar="SVG", type=_path,
                        help="with --read-events: draw the recording's latency over time "
                             "as an SVG heat map, a panel per segment and the total (per "
                             "VM with --per-vm)")
    parser.add_argument("--read-events", metavar="FILE", type=_path, action="append",
                        help="report a run saved with --write-events again (its records, "
                             "histograms and summary), offline: no root, no BPF; given "
                             "for two or more hosts' recordings, join them: each packet "
                             "from one host's VM to another's, the wire between them")
    parser.add_argument("--clock-offset", metavar="US", type=_clock_offset,
                        help="joining two hosts' recordings: the second host's wall clock "
                             "is US microseconds ahead of the first's (0: synchronised, "
                             "PTP), instead of the offset estimated from the packets")
    # tests: the perf-buffer path of kernels without a BPF ring buffer (before 5.8)
    parser.add_argument("--perf-buffer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    return parser


def keeps_per_vm_counts(args):
    """Histograms kept per VM in the kernel: for --per-vm and for the metrics (vm label)."""
    return bool(args.per_vm or args.prometheus or args.prometheus_textfile)


def wanted_directions(direction):
    """The directions --direction asks for ("all", or its old name "both": every one)."""
    return ("tx", "rx", "vm2vm") if direction in ("all", "both") else (direction,)


def parse_args(argv):
    """Parse and validate the command line; everything checked here needs no kernel."""
    parser = build_parser()
    args = parser.parse_args(argv)

    def given_besides(*allowed):
        return sorted("--" + k.replace("_", "-") for k, v in vars(args).items()
                      if k not in allowed and v != parser.get_default(k))
    if args.top and not args.read_events:
        if args.output == "json":
            parser.error("--top is a view for people: not with --output json (the "
                         "histograms' JSON is --mode histogram --per-vm)")
        if any(a == "--mode" or a.startswith("--mode=") for a in argv or ()) and \
                args.mode == "detailed":
            parser.error("--top shows distributions: not with --mode detailed")
        # per VM, in the kernel; drops as events, counted per VM
        args.mode, args.per_vm, args.drops = "histogram", True, True
        if args.interval == parser.get_default("interval"):
            args.interval = TOP_INTERVAL_S
    if args.clock_offset is not None and len(args.read_events or ()) != 2:
        parser.error("--clock-offset goes with a join of two recordings (--read-events A "
                     "--read-events B)")
    also = ("clock_offset", "mode") if len(args.read_events or ()) > 1 else \
        ("heatmap", "per_vm") if args.heatmap else ("write_pcap", "heatmap")
    if args.heatmap and len(args.read_events or ()) != 1:
        parser.error("--heatmap draws one recording: give it with --read-events FILE")
    if args.read_events and given_besides("read_events", "output", *also):
        parser.error("--read-events replays a recording: only %s go with it (not %s)" % (
            ", ".join(["--output"] + ["--" + a.replace("_", "-") for a in also]),
            ", ".join(given_besides("read_events", "output", *also))))
    if args.write_pcap and not args.read_events and args.mode != "detailed":
        parser.error("--write-pcap writes each reported packet: detailed mode only")
    for opt in ("write_events", "write_pcap"):
        if getattr(args, opt) and (args.list_stages or args.dry_run or args.ebpf):
            parser.error("--%s records a trace: not with %s" % (opt.replace("_", "-"), next(
                o for o in ("--list-stages", "--dry-run", "--ebpf")
                if getattr(args, o[2:].replace("-", "_")))))
    if args.list_vms and given_besides("list_vms", "output"):
        parser.error("--list-vms only lists the VMs: only --output goes with it (not %s)"
                     % ", ".join(given_besides("list_vms", "output")))
    if args.per_vm and args.mode != "histogram" and not args.heatmap:
        parser.error("--per-vm splits the histograms by VM: it needs --mode histogram")
    for opt in ("prometheus", "prometheus_textfile"):
        if getattr(args, opt) and args.mode != "histogram":
            parser.error("--%s exports the histograms: it needs --mode histogram"
                         % opt.replace("_", "-"))
    for opt in ("prometheus_tls_cert", "prometheus_tls_key", "prometheus_client_ca"):
        if getattr(args, opt) and not args.prometheus:
            parser.error("--%s secures the metrics endpoint: it needs --prometheus"
                         % opt.replace("_", "-"))
    for opt in ("forget_after", "vm_table_size"):
        if getattr(args, opt) != parser.get_default(opt) and not keeps_per_vm_counts(args):
            parser.error("--%s sizes the per-VM counts: it needs --per-vm, --prometheus "
                         "or --prometheus-textfile" % opt.replace("_", "-"))
    if bool(args.prometheus_tls_cert) != bool(args.prometheus_tls_key):
        parser.error("--prometheus-tls-cert and --prometheus-tls-key go together")
    if args.prometheus_client_ca and not args.prometheus_tls_cert:
        parser.error("--prometheus-client-ca checks clients over TLS: it needs "
                     "--prometheus-tls-cert and --prometheus-tls-key")
    if args.prometheus_textfile:
        where = os.path.dirname(os.path.abspath(args.prometheus_textfile))
        if not os.path.isdir(where):
            parser.error("--prometheus-textfile %s: no directory %s"
                         % (args.prometheus_textfile, where))
    if args.direction == "vm2vm" and args.vni is not None:
        parser.error("--vni selects packets of a VXLAN/Geneve network: VM-to-VM packets "
                     "on this host cross no tunnel (--direction vm2vm)")
    if args.protocol in ("icmp", "icmp6") and (args.src_port or args.dst_port):
        parser.error("ports cannot be used with --protocol %s (ICMP has no ports)"
                     % args.protocol)
    families = set(ipaddress.ip_address(a).version for a in (args.src_ip, args.dst_ip) if a)
    if len(families) > 1:
        parser.error("--src-ip and --dst-ip are of different families (IPv4 and IPv6): "
                     "no packet has both")
    if families and args.protocol in ("icmp", "icmp6") and \
            families != {4 if args.protocol == "icmp" else 6}:
        parser.error("--protocol %s is ICMP%s, but the address filter is IPv%d" % (
            args.protocol, "v4" if args.protocol == "icmp" else "v6", families.pop()))
    return args


# ============================================================================
# Declarations: the path, the record and the constants both sides share
# ============================================================================


# --- the stages of the path ---

# A stage is one point of the path; the table below owns the path. Its order is the
# path order of every direction it is on, a stage's position is its sid (its slot in the
# record's ts[]), and everything else is derived from it: each direction's path, its
# starts and its ends, the tracepoints to look for, the C handler each attach point calls.
#   directions where it is: "tx" VM -> network, "rx" network -> VM, "vm2vm" one VM to
#             another on this host (a packet starts as TX; it becomes VM-to-VM where it
#             reaches another VM's device)
#   hook      what the stage's C does (HOOK_HANDLERS):
#     kick     vhost-net: the guest's kick queues its TX ring's work; the worker takes
#              it (handle_tx_kick) and the first frame it then sends gets the kick's
#              time (no packet exists yet: the frame's record starts at tap_rx)
#     start    netif_receive_skb: a frame from a tap starts TX, one from a NIC RX (or,
#              sent through a macvtap of this NIC, comes back to another: VM-to-VM)
#     dev      a device's queue or driver: stamp on a device of this stage's role; at a
#              macvtap's queue, the VM's frame starts TX
#     plain    stamp any tracked packet that passes (the bridge)
#     ovs      the OVS datapath; with upcalls traced it also recognises returned packets
#     upcall   OVS sends the packet to ovs-vswitchd, which returns a copy
#     vm_read  the VM's backend reads the frame from its tap or macvtap: RX and VM-to-VM
#              end here, or, read by a vhost-net worker, at its signal
#     signal   vhost-net: the worker hands the frames it read to the guest in batches
#              (vhost_add_used_and_signal_n) and signals it (its call eventfd): each
#              frame of the batch gets the signal's time; a batch the guest asked not to
#              be signalled for (it polls) ends at the read
#     host_rcv the host's own stack takes the packet: RX ends here
#   role      the device role a start/dev stage stamps on: "vm" a tap or a macvtap (the
#             VM's side), "mvtap" a macvtap only, "phy" the physical side, "tun" a tunnel
#   end       where a direction's path ends: 1 first choice, 2, 3 if that is not traced
#   module    the kernel module without which the stage does not exist
#   kprobes   [(function, argument number of the skb; -N: of a pointer to it; 0: at
#             the function's return)]: each one found is attached
#   tracepoint (category, name, argument number of the skb)
Stage = namedtuple("Stage", "name sid directions hook role end module kprobes tracepoint "
                            "meaning")


def _stages(*rows):
    return [Stage(row[0], sid, *row[1:]) for sid, row in enumerate(rows)]


TX, RX, VM2VM = ("tx",), ("rx",), ("vm2vm",)
STAGES = _stages(
    # kprobes only, none of them sees a packet: the queueing of a vhost work (what the
    # kick's wake-up really calls: vhost_work_queue up to 6.3, vhost_worker_queue from
    # 6.4; vhost_poll_queue and vhost_vq_work_queue are inlined into the wake-up), the
    # TX work's start in the worker, and its other start (room again in the socket)
    ("vhost_kick", TX + VM2VM, "kick", None, None, "vhost_net",
     [("vhost_work_queue", 2), ("vhost_worker_queue", 2), ("handle_tx_kick", 1),
      ("handle_tx_net", 1)], None,
     "the guest kicked its TX ring (vhost-net: the ring's work queued for the worker); "
     "the first frame the worker sends after it"),
    ("tap_rx", TX + VM2VM, "start", "vm", None, None, [("__netif_receive_skb", 1)],
     ("net", "netif_receive_skb", 0),
     "the host receives the VM's frame from its tap (tun_get_user -> netif_receive_skb)"),
    ("mvt_queue", TX + VM2VM, "dev", "mvtap", None, None, [("__dev_queue_xmit", 1)],
     ("net", "net_dev_queue", 0),
     "the host takes the VM's frame from its macvtap (tap_get_user -> dev_queue_xmit: "
     "the macvtap's qdisc)"),
    ("mvt_xmit", TX + VM2VM, "dev", "mvtap", None, "macvlan", [("macvlan_start_xmit", 1)],
     ("net", "net_dev_start_xmit", 0),
     "the macvtap's qdisc hands the frame to macvlan (macvlan_start_xmit), towards its "
     "lower device or, in bridge mode, another macvtap"),
    ("phy_rx", RX + VM2VM, "start", "phy", None, None, [("__netif_receive_skb", 1)],
     ("net", "netif_receive_skb", 0),
     "the host receives the frame from the physical NIC (a tunnel's: the outer frame; "
     "VM-to-VM: a macvtap's frame to another of the same NIC, in bridge mode)"),
    # decap: the tracepoint only: a tunnel hands its inner frames over through GRO
    # cells, in lists, which the __netif_receive_skb kprobe never sees
    ("decap", RX, "start", "tun", None, None, [],
     ("net", "netif_receive_skb", 0),
     "the tunnel device (VXLAN, Geneve) receives the inner frame, decapsulated"),
    ("bridge", TX + RX + VM2VM, "plain", None, None, "bridge", [("br_forward", 2)], None,
     "the Linux bridge forwards the frame to its output port"),
    ("ovs_upcall", TX + RX + VM2VM, "upcall", None, None, "openvswitch",
     [("ovs_dp_upcall", 2), ("ovs_execute_actions", 2)],
     ("openvswitch", "ovs_dp_upcall", 1),
     "OVS had no flow for it: sent to ovs-vswitchd (first packet of a flow)"),
    ("ovs_dp", TX + RX + VM2VM, "ovs", None, None, "openvswitch",
     [("ovs_dp_process_packet", 1)], ("openvswitch", "ovs_do_execute_action", 1),
     "the Open vSwitch kernel datapath processes the frame"),
    ("encap", TX, "dev", "tun", None, None, [], ("net", "net_dev_start_xmit", 0),
     "the tunnel device transmits: encapsulation and the underlay's route follow"),
    ("phy_queue", TX, "dev", "phy", 2, None, [("__dev_queue_xmit", 1)],
     ("net", "net_dev_queue", 0),
     "queued for the physical NIC (__dev_queue_xmit: qdisc)"),
    ("phy_xmit", TX, "dev", "phy", 1, None, [], ("net", "net_dev_start_xmit", 0),
     "handed to the physical NIC's driver"),
    ("tap_queue", RX + VM2VM, "dev", "vm", 3, None, [("__dev_queue_xmit", 1)],
     ("net", "net_dev_queue", 0),
     "queued for the VM's tap (__dev_queue_xmit: qdisc)"),
    ("tap_xmit", RX + VM2VM, "dev", "vm", 2, None, [("tun_net_xmit", 1)],
     ("net", "net_dev_start_xmit", 0),
     "put in the tap's ring for the VM (tun_net_xmit)"),
    # a macvtap's ring is filled by its receive handler, where no tracepoint is: kprobes
    # only (tap_handle_frame(struct sk_buff **pskb))
    ("mvt_ring", RX + VM2VM, "dev", "mvtap", None, None, [("tap_handle_frame", -1)], None,
     "put in the macvtap's ring for the VM (tap_handle_frame)"),
    ("vm_read", RX + VM2VM, "vm_read", None, 1, None, [("skb_copy_datagram_iter", 1)],
     ("skb", "skb_copy_datagram_iovec", 0),
     "the VM's backend (QEMU or vhost) reads the frame (tun_put_user, tap_put_user)"),
    # kprobes only, none of them sees a packet: the worker's RX pass (handle_rx_kick,
    # handle_rx_net: its start and its return), its handing of a batch to the guest
    # (vhost_add_used_and_signal_n: start and return; vhost_signal is inlined into it)
    # and, in it, the signal: the call eventfd's (eventfd_signal up to 6.7; from 6.8
    # that is inline, eventfd_signal_mask is called)
    ("vhost_signal", RX + VM2VM, "signal", None, None, "vhost_net",
     [("handle_rx_kick", 1), ("handle_rx_net", 1), ("handle_rx_kick", 0),
      ("handle_rx_net", 0), ("vhost_add_used_and_signal_n", 1),
      ("vhost_add_used_and_signal_n", 0), ("eventfd_signal", 1),
      ("eventfd_signal_mask", 1)], None,
     "vhost-net signalled the guest that the frame is in its ring (the call eventfd: "
     "KVM's interrupt), once for a batch of up to 64 frames"),
    ("host_rcv", RX, "host_rcv", None, None, None,
     [("tcp_v4_rcv", 1), ("udp_rcv", 1), ("icmp_rcv", 1), ("tcp_v6_rcv", 1),
      ("udpv6_rcv", 1), ("icmpv6_rcv", 1)], None,
     "delivered to the host's own TCP/UDP/ICMP stack (traffic ending on the host)"),
)
STAGE_BY_NAME = dict((s.name, s) for s in STAGES)
STAGE_NAMES = [s.name for s in STAGES]
NSTAGES = len(STAGES)
DIRECTIONS = ("tx", "rx", "vm2vm")
PATH_ORDER = dict((d, [s.name for s in STAGES if d in s.directions]) for d in DIRECTIONS)
# where each direction's packets enter the path (VM-to-VM ones, as TX ones do)
START_STAGES = {"tx": ["tap_rx", "mvt_queue"], "rx": ["phy_rx"],
                "vm2vm": ["tap_rx", "mvt_queue"]}
START_SIDS = [[STAGE_BY_NAME[n].sid for n in START_STAGES[d]] for d in DIRECTIONS]
# vhost-net's kick: before a TX packet's start, when the frame's record starts
KICK_SID = STAGE_BY_NAME["vhost_kick"].sid
# vhost-net's signal: after the read, the end of a frame a vhost worker read
SIGNAL_SID = STAGE_BY_NAME["vhost_signal"].sid
# the ends of each direction's path, most wanted first (TracePlan takes the first traced)
END_STAGES = dict((d, [s.name for s in sorted(STAGES, key=lambda s: s.end or 0)
                       if s.end and d in s.directions]) for d in DIRECTIONS)
# packets freed before their path's end: how each one's fate is learnt
FREE_TRACEPOINTS = [("skb", "kfree_skb", "packet dropped (with the kernel's reason)"),
                    ("skb", "consume_skb", "packet freed normally: it left the path")]
# --explain: the scheduler's view of the followed threads (the interrupts' where the
# kernel has those tracepoints: without them, interrupts are part of running)
SCHED_TRACEPOINTS = [("sched", "sched_switch", "a followed thread switched out or in"),
                     ("sched", "sched_wakeup", "a followed thread woken"),
                     ("sched", "sched_wakeup_new", "a followed thread started")]
IRQ_TRACEPOINTS = [("irq", "softirq_entry", "a softirq cuts into a followed thread"),
                   ("irq", "softirq_exit", "the softirq ends"),
                   ("irq", "irq_handler_entry", "an interrupt cuts into a followed thread"),
                   ("irq", "irq_handler_exit", "the interrupt ends")]

TRACEPOINTS_USED = set(s.tracepoint[1] for s in STAGES if s.tracepoint) | \
    set(name for _cat, name, _what in FREE_TRACEPOINTS)

# Where auto takes a BTF-typed tracepoint (tp_btf) over a raw one: at the stages that
# read sk_buff or net_device fields, which a typed program reads with plain loads. Its
# skb's address, the record's key, costs it a probe read (the verifier allows no
# arithmetic on a typed pointer), which a raw argument has for free: the stages that
# only want the key (the VM's read, the frees) stay raw. Measured (bench/overhead.py,
# 6.18, both ways in one run): netif_receive_skb 232 -> 189 ns a run, net_dev_queue
# 208-220 -> 185, net_dev_start_xmit 177 -> 179.
TYPED_HOOKS = ("start", "dev")

# The C handler of each hook. Stages of the same role-split hook ("start", "dev") may
# share an attach point: the handler gets the sid of each role's stage there (-1: none).
HOOK_HANDLERS = {"kick": "on_vhost_queue", "start": "on_receive", "dev": "on_device",
                 "plain": "on_switch", "ovs": "on_switch", "upcall": "on_upcall",
                 "vm_read": "on_vm_read", "host_rcv": "on_host_rcv", "signal": None}

ROLE_SPLIT_HOOKS = ("start", "dev")
# the vhost stages' handler for each (function, argument; 0: its return): the kick
# stage's, else a work's queueing (on_vhost_queue); the signal stage's
VHOST_HANDLERS = {("handle_tx_kick", 1): "on_vhost_tx_kick(skb)",
                  ("handle_tx_net", 1): "on_vhost_tx_net(skb)",
                  ("handle_rx_kick", 1): "on_vhost_rx_pass()",
                  ("handle_rx_net", 1): "on_vhost_rx_pass()",
                  ("handle_rx_kick", 0): "on_vhost_rx_pass_done(ctx)",
                  ("handle_rx_net", 0): "on_vhost_rx_pass_done(ctx)",
                  ("vhost_add_used_and_signal_n", 1): "on_vhost_batch()",
                  ("vhost_add_used_and_signal_n", 0): "on_vhost_batch_done(ctx)",
                  ("eventfd_signal", 1): "on_vhost_signal()",
                  ("eventfd_signal_mask", 1): "on_vhost_signal()"}
VHOST_HOOKS = ("kick", "signal")
OVS_EXECUTE = "on_ovs_execute"   # also recognises a packet ovs-vswitchd sends back
OVS_SID = next(s.sid for s in STAGES if s.hook == "ovs")      # where OVS runs actions


# --- constants C and Python share ---
# Each set is declared once, as a class: Python reads Role.VM, C gets #define ROLE_VM
# (the class's name in capitals, or its C_PREFIX; "" for C's own names).

class Shared(object):
    C_PREFIX = None

    @classmethod
    def c_defines(cls):
        prefix = cls.__name__.upper() if cls.C_PREFIX is None else cls.C_PREFIX
        return [((prefix + "_" if prefix else "") + k, v) for k, v in vars(cls).items()
                if k.isupper() and k != "C_PREFIX"]


class Dir(Shared):
    """A packet's direction (DIRECTIONS): TX from the VM to the network, RX towards the
    VM, VM2VM from one VM to another on this host."""
    TX, RX, VM2VM = 0, 1, 2


class Role(Shared):
    """What a device is to the path (the kernel's device map): a VM's tap (VM) or
    macvtap (MVTAP); the physical side, a NIC (PHY; PHY_MVT: one macvtaps sit on, whose
    frames from one to another come back through it in bridge mode); MVT_LOWER, a VLAN
    or bond macvtaps sit on (that coming back only); a tunnel, whose role says its kind
    (TUN_VXLAN + Tunnel.x - Tunnel.VXLAN). PEER on a VM's device: a VM --vm or
    --vm-dev did not select, whose packets count only to or from those that are."""
    VM, PHY, TUN_VXLAN, TUN_GENEVE, MVTAP, PHY_MVT, MVT_LOWER = 1, 2, 3, 4, 5, 6, 7
    PEER = 0x80


class Tunnel(Shared):
    VXLAN, GENEVE = 1, 2


class Ev(Shared):
    """What an event from the kernel is."""
    PACKET, DROP = 1, 2


class PF(Shared):
    """A record's flags: PENDING, followed but not counted in (yet): a TX packet of a VM
    not selected, or one while only VM-to-VM packets are wanted; PEER, sent by a VM not
    selected (it counts only if it reaches a selected one)."""
    PENDING, PEER = 1, 2


class Err(Shared):
    EEXIST = errno.EEXIST


class Cause(Shared):
    """--explain: where the thread that ended a packet's longest segment spent it (x_ns[i]):
    ASLEEP, blocked (waiting for work, or for the guest's buffers); STOPPED (SIGSTOP, a
    debugger); RUN_QUEUE, runnable while other tasks had its CPU; RUNNING; IRQ, hard and
    soft interrupts that cut into its running; UNKNOWN, before the oldest event it keeps
    of the thread, or a thread not followed (a softirq's dequeue: the queue's time)."""
    ASLEEP, STOPPED, RUN_QUEUE, RUNNING, IRQ, UNKNOWN = range(6)


class XF(Shared):
    """--explain flags: an explanation's FOLLOWED (the thread's scheduling is followed),
    PARTIAL (its history did not reach back to the segment's start) and IN_IRQ (the
    segment ended in an interrupt or softirq, not in a thread's own work); a followed
    thread's KSOFTIRQD (softirqs are its work, not interruptions)."""
    FOLLOWED, PARTIAL, KSOFTIRQD, IN_IRQ = 1, 2, 4, 8


class TaskState(Shared):
    """The scheduler's task states a switched-out thread may have (stable since 2.6)."""
    C_PREFIX = "TASK"
    STOPPED_BITS = 0x4 | 0x8        # __TASK_STOPPED, __TASK_TRACED


# IP protocols, PROTOCOLS of the command line: Proto.TCP here, PROTO_TCP in C
Proto = type("Proto", (Shared,), dict((name.upper(), number)
                                      for name, number in PROTOCOLS.items()))

TUNNEL_NAMES = {Tunnel.VXLAN: "vxlan", Tunnel.GENEVE: "geneve"}
TUNNEL_PORTS = {"vxlan": 4789, "geneve": 6081}      # IANA; devices may use others

# the ICMP types (reply, request) of an echo, whose id and sequence a record carries
ICMP_ECHO = {Proto.ICMP: (0, 8), Proto.ICMP6: (129, 128)}

# What happened to packets, counted per direction in the kernel (slot 2 * STAT_x + dir)
STAT_NAMES = ["started", "completed", "below_threshold", "lost", "dropped", "left_path",
              "not_tracked", "vanished", "vm_hist_full", "other_vni"]

STAT = dict((n, i) for i, n in enumerate(STAT_NAMES))
COUNT_MASK = (1 << 64) - 1     # the kernel's counters are u64


class C(Shared):
    """Sizes and codes of the program, by C's own names."""
    C_PREFIX = ""
    NSTAGES = NSTAGES
    NDIRS = len(DIRECTIONS)
    NSTATS = NDIRS * len(STAT_NAMES)
    FATE_LEFT = 0xffffffff      # reason code in the fates map: freed normally, not dropped
    HIST_SUB_BITS = 4           # 16 sub-buckets per power of two: percentiles within ~3%
    HIST_BUCKETS = 720          # up to 2^47 / 1024 us (about 38 hours); longer ones share
    VM_HIST_ROW = HIST_BUCKETS + 1  # per tap and segment: the buckets, then the sum of ns
    DEVROLE_SLOTS = 65536       # ifindexes below this are in an array, above in a hash
    INFLIGHT_WAYS = 4           # slots per hash of an sk_buff address in the in-flight table
    # 2 MB of ring buffer: ~14,000 events, a quarter second at 50,000 packets/s; user
    # space maps it twice (for wrap-around), so it counts double in resident memory
    RINGBUF_PAGES = 512
    # the reader is woken at every WAKE_EVERY-th event of a CPU (and drains every 100
    # ms): far below the ring's ~14,000 events, far above one wake-up per packet
    WAKE_EVERY = 64
    # --explain: a followed thread's last scheduling events (a power of two), and how
    # many threads can be followed (the VMs' threads, vhost workers, ksoftirqd)
    EXPLAIN_RING = 32
    EXPLAIN_THREADS = 4096
    # per CPU: its last context switches (a power of two), to name the task that held
    # the CPU longest while a followed thread waited for it
    EXPLAIN_RUNNERS = 16
    NCAUSES = 6


SHARED = [Dir, Role, Tunnel, Ev, PF, Err, Cause, XF, TaskState, Proto, C]
INFLIGHT_EXAMPLES = 10      # packets still in flight at the end that the summary shows
PERF_BUFFER_PAGES = 256


def shared_defines():
    """Every shared constant as (C name, value): the #defines of the program."""
    out = [(name, value) for cls in SHARED for name, value in cls.c_defines()]
    out += [("STAT_" + n, i) for i, n in enumerate(STAT_NAMES)]
    out.append(("IS_ICMP_ECHO(proto, type)", "(%s)" % " || ".join(
        "((proto) == %d && ((type) == %d || (type) == %d))" % ((proto,) + types)
        for proto, types in sorted(ICMP_ECHO.items()))))
    out += [("ROLE_KIND(r)", "((r) & ~ROLE_PEER)"),
            ("IS_VM_SIDE(r)", "(ROLE_KIND(r) == ROLE_VM || ROLE_KIND(r) == ROLE_MVTAP)"),
            ("IS_PHY(r)", "((r) == ROLE_PHY || (r) == ROLE_PHY_MVT)"),
            ("IS_TUN(r)", "((r) == ROLE_TUN_VXLAN || (r) == ROLE_TUN_GENEVE)")]
    return out


# --- the per-packet record ---

# The per-packet record, declared once: the C struct (one per packet in flight, also
# the event sent to user space) and the Python decoder are both generated from it.
# (name, C type, count, what it holds). First what differs from packet to packet,
# then, from KIND_FROM to the end, what makes a packet's kind: detailed mode's reader
# looks up its output template by those bytes, in one piece. Every field at an offset
# that is a multiple of its size: no padding inside (record_struct() checks).
RECORD_FIELDS = [
    ("ts", "u64", NSTAGES, "when each stage saw the packet, 0 = not seen"),
    ("location", "u64", 1, "drop events: where the kernel freed it"),
    ("wait_start", "u64", 1, "--explain: when its longest segment began"),
    ("wait_end", "u64", 1, "and ended (0: none as long as --explain's threshold)"),
    ("tcp_seq", "u32", 1, "TCP sequence number (with ip_id: a packet's identity on the "
     "wire, which joins two hosts' records of it)"),
    ("ip_id", "u16", 1, "IPv4 identification"),
    ("pad", "u16", 1, "(alignment: seen starts on 4 bytes)"),
    ("seen", "u32", 1, "bit 1 << stage set for each stage that saw it"),
    ("vm_ifindex", "u32", 1, "the VM's tap or macvtap (VM-to-VM: the sender's)"),
    ("dev", "u64", 1, "the net_device of the last device stage (its role: dev_role)"),
    ("phy_ifindex", "u32", 1, "the physical device"),
    ("pid", "u32", 1, "VM side: the process that wrote (tx) or read (rx) it"),
    ("tid", "u32", 1, "and its thread"),
    ("vni", "u32", 1, "tunnel: VXLAN/Geneve network identifier"),
    ("tun_ifindex", "u32", 1, "tunnel: the tunnel device"),
    ("peer_ifindex", "u32", 1, "VM-to-VM: the receiving VM's tap or macvtap"),
    ("wait_tid", "u32", 1, "--explain: the thread that ended its longest segment"),
    ("saddr", "u8", 16, "source address, network order (IPv4: the first 4 bytes)"),
    ("daddr", "u8", 16, "destination address, network order (IPv4: the first 4 bytes)"),
    ("outer_saddr", "u8", 16, "tunnel: the outer source address (the local VTEP on TX)"),
    ("outer_daddr", "u8", 16, "tunnel: the outer destination address"),
    ("sport", "u16", 1, "TCP/UDP source port, or ICMP echo id"),
    ("dport", "u16", 1, "TCP/UDP destination port, or ICMP echo sequence"),
    ("vlan", "u16", 1, "802.1Q VLAN id + 1, 0 = untagged"),
    ("proto", "u8", 1, "IP protocol (the L4 header's, after IPv6 extension headers)"),
    ("ip_version", "u8", 1, "4 or 6"),
    ("tunnel", "u8", 1, "0, TUNNEL_VXLAN or TUNNEL_GENEVE"),
    ("outer_version", "u8", 1, "tunnel: 4 or 6, 0 while the outer headers are unknown"),
    ("dir", "u8", 1, "DIR_TX, DIR_RX or DIR_VM2VM"),
    ("last", "u8", 1, "the last stage that saw it"),
    ("wait_from", "u8", 1, "--explain: its longest segment's first stage"),
    ("wait_to", "u8", 1, "and last stage"),
    ("wait_flags", "u8", 1, "XF_IN_IRQ: that segment ended in an interrupt"),
    ("type", "u8", 1, "EV_PACKET or EV_DROP"),
    ("icmp_type", "u8", 1, "ICMP type"),
    ("upcalled", "u8", 1, "a copy waits for ovs-vswitchd to return it"),
    ("dev_role", "u8", 1, "the role of dev"),
    ("pflags", "u8", 1, "PF_PENDING: not counted yet; PF_PEER: sent by an unselected VM"),
    ("reason", "u32", 1, "drop events: enum skb_drop_reason"),
]

_C_SIZES = {"u64": 8, "u32": 4, "u16": 2, "u8": 1}
_STRUCT_CODES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B"}


def record_c_struct(name="pkt", fields=RECORD_FIELDS):
    """The C declaration of the record, padded to 8 bytes as the compiler would."""
    lines = ["struct %s {" % name]
    size = 0
    for fname, ctype, count, what in fields:
        decl = "%s %s%s;" % (ctype, fname, "[%d]" % count if count > 1 else "")
        lines.append("    %-24s // %s" % (decl, what))
        size += _C_SIZES[ctype] * count
    if size % 8:
        lines.append("    u8 _pad[%d];" % (8 - size % 8))
    lines.append("};")
    return "\n".join(lines)


def record_struct(fields=RECORD_FIELDS):
    """struct.Struct of the record and {field: index of its first value}."""
    fmt, index, i, size = "<", {}, 0, 0
    for fname, ctype, count, _what in fields:
        index[fname] = i
        if ctype == "u8" and count > 1:       # bytes (an address): one value
            fmt += "%ds" % count
            i += 1
        else:
            fmt += "%d%s" % (count, _STRUCT_CODES[ctype]) if count > 1 else _STRUCT_CODES[ctype]
            i += count
        if size % _C_SIZES[ctype]:
            raise AssertionError("record field %s is not aligned: C would pad" % fname)
        size += _C_SIZES[ctype] * count
    if size % 8:
        fmt += "%dx" % (8 - size % 8)
    return struct.Struct(fmt), index


def record_offset(name, fields=RECORD_FIELDS):
    """Where a field of the record starts, in bytes."""
    at = 0
    for fname, ctype, count, _what in fields:
        if fname == name:
            return at
        at += _C_SIZES[ctype] * count
    raise KeyError(name)


PKT, PKT_INDEX = record_struct()
KIND_FROM = "seen"
KIND_AT = record_offset(KIND_FROM)

assert NSTAGES <= 32, "seen is a u32: one bit per stage"

# Where each field of the record is in a decoded event (PKT.unpack): fields[F.dir]
F = namedtuple("RecordIndex", [name for name, _t, _n, _w in RECORD_FIELDS])(
    *[PKT_INDEX[name] for name, _t, _n, _w in RECORD_FIELDS])

# (name, index in the event) of each direction's stages, in path order
_PATH_FIELDS = dict((d, [(n, STAGE_BY_NAME[n].sid) for n in PATH_ORDER[d]]) for d in DIRECTIONS)
_PATH_SIDS = [tuple(sid for _n, sid in _PATH_FIELDS[d]) for d in DIRECTIONS]

# What detailed mode's reader unpacks of an event in the ring buffer: its 8-byte
# header's length, the times, and the kind (the record from KIND_AT on, as bytes).
# Packets of one kind print the same but for their times.
EVENT_TIMES = struct.Struct("<I4x%dQ%dx%ds" % (NSTAGES, KIND_AT - 8 * NSTAGES,
                                               PKT.size - KIND_AT))

assert EVENT_TIMES.size == 8 + PKT.size, "the record is padded to 8 bytes"

# --explain: what an event adds after the record, declared once like the record (C's
# struct explain, Python's EXPL)
EXPLAIN_CAUSES = ("asleep", "stopped", "run_queue", "running", "irq", "unknown")
EXPLAIN_FIELDS = [
    ("x_ns", "u64", len(EXPLAIN_CAUSES), "ns of the segment in each Cause"),
    ("x_tid", "u32", 1, "the thread that ended it (0: idle, in a softirq)"),
    ("x_behind", "u32", 1, "the task that held the CPU longest while it last waited"),
    ("x_cpu", "u16", 1, "the CPU it waited for (where it got to run)"),
    ("x_from", "u8", 1, "the segment's first stage"),
    ("x_to", "u8", 1, "and its last"),
    ("x_flags", "u8", 1, "XF_FOLLOWED, XF_PARTIAL"),
    ("x_behind_comm", "u8", 16, "that task's name"),
]
EXPL, EXPL_INDEX = record_struct(EXPLAIN_FIELDS)
X = namedtuple("ExplainIndex", [name for name, _t, _n, _w in EXPLAIN_FIELDS])(
    *[EXPL_INDEX[name] for name, _t, _n, _w in EXPLAIN_FIELDS])
assert Cause.UNKNOWN + 1 == len(EXPLAIN_CAUSES) == C.NCAUSES


# --- the program's types ---

# prog_info: {field: offset} of struct bpf_prog_info's run-time statistics (5.1+;
# recursion_misses 5.12+), for the metrics of the tool's own cost; None without BTF
# sched: {macro: offset} of the task_struct fields --explain reads (and SWITCH_STATE_ARG:
# sched_switch passes prev's state, 5.18+), None without BTF
Layout = namedtuple("Layout", "source offsets sizes netns drop_reasons kfree_skb_reason "
                              "tracepoints prog_info sched")

Capabilities = namedtuple("Capabilities", "ringbuf probe_read_kernel how")

# A kernel's probe points as the planner sees them. --dry-run plans with every one of
# them present, so that the verifier checks every stage's program.
KernelView = namedtuple("KernelView", "kprobes_ok kprobe_why symbols tracepoints "
                                        "tp_btf_why")

# method None: not traced (reason says why); probes: [(kprobe symbol or "cat:tracepoint", arg)]
Plan = namedtuple("Plan", "stage method probes reason")
Attachment = namedtuple("Attachment", "method probe arg fn_name stages")

# a VM as its process shows it: QEMU's -name and -uuid, the pid, the process name
VmInfo = namedtuple("VmInfo", "name uuid pid comm")

# whose per-VM tables these are: the VM's label, name, devices; VM-to-VM: the
# receiving VM's too (peer_label None for the rest)
VmTables = namedtuple("VmTables", "label name devs peer_label peer_name peer_devs")

# the devices the user selected: --vm-dev, --vm, --phy-dev (lists, maybe empty)
DeviceSelection = namedtuple("DeviceSelection", "vm_devs vms phy_devs")
NO_VM = VmInfo(None, None, None, None)

# Events reach user space through the ring buffer, or the perf buffer before 5.8.
EventSource = namedtuple("EventSource", "poll drain")


# ============================================================================
# Kernel: struct layouts, what it can attach to, what its BPF can do
# ============================================================================

class Fatal(Exception):
    """The tool cannot run here: one line on stderr, exit 2."""


# --- BTF: struct layouts of the running kernel, read with the standard library ---

BTF_KIND_INT, BTF_KIND_PTR, BTF_KIND_ARRAY, BTF_KIND_STRUCT, BTF_KIND_UNION = 1, 2, 3, 4, 5
BTF_KIND_ENUM, BTF_KIND_FWD, BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST = 6, 7, 8, 9, 10
BTF_KIND_RESTRICT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO, BTF_KIND_VAR = 11, 12, 13, 14
BTF_KIND_DATASEC, BTF_KIND_FLOAT, BTF_KIND_DECL_TAG, BTF_KIND_TYPE_TAG = 15, 16, 17, 18
BTF_KIND_ENUM64 = 19

# bytes that follow the 12-byte common header, per kind: (fixed, per vlen entry)
_BTF_EXTRA = {
    BTF_KIND_INT: (4, 0), BTF_KIND_PTR: (0, 0), BTF_KIND_ARRAY: (12, 0),
    BTF_KIND_STRUCT: (0, 12), BTF_KIND_UNION: (0, 12), BTF_KIND_ENUM: (0, 8),
    BTF_KIND_FWD: (0, 0), BTF_KIND_TYPEDEF: (0, 0), BTF_KIND_VOLATILE: (0, 0),
    BTF_KIND_CONST: (0, 0), BTF_KIND_RESTRICT: (0, 0), BTF_KIND_FUNC: (0, 0),
    BTF_KIND_FUNC_PROTO: (0, 8), BTF_KIND_VAR: (4, 0), BTF_KIND_DATASEC: (0, 12),
    BTF_KIND_FLOAT: (0, 0), BTF_KIND_DECL_TAG: (4, 0), BTF_KIND_TYPE_TAG: (0, 0),
    BTF_KIND_ENUM64: (0, 12),
}

_MODIFIERS = (BTF_KIND_TYPEDEF, BTF_KIND_VOLATILE, BTF_KIND_CONST, BTF_KIND_RESTRICT,
              BTF_KIND_TYPE_TAG)


class BTFError(Exception):
    pass


class BTF(object):
    """Just enough of a BTF reader to find member offsets, enums and tracepoint prototypes.

    One pass records where each type starts; names are compared by string-table
    offset, so no string is decoded unless it is asked for.
    """

    def __init__(self, data):
        if len(data) < 24:
            raise BTFError("file too short")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != 0xEB9F:
            raise BTFError("not a BTF file (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self.data = data
        self.strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        # Where each type starts and its name's offset, by type id (0 is void), in
        # arrays of C integers: a list of positions and a dict of names, 100,000+ Python
        # objects, peaked 16 MB higher here, and what they left in Python's allocator
        # raised the tool's peak (BCC's compile, right after) by 2 MB.
        self.type_start = array.array("I", [0])
        names = array.array("I", [0])
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<III").unpack_from
        extra = _BTF_EXTRA
        starts = self.type_start
        while pos < end:
            name, info, _size = unpack(data, pos)
            kind = (info >> 24) & 0x1f
            try:
                fixed, per = extra[kind]
            except KeyError:
                raise BTFError("unknown BTF kind %d" % kind)
            starts.append(pos)
            names.append(name)
            pos += 12 + fixed + per * (info & 0xffff)
        self.name_offsets = names.tobytes()    # searched with bytes.find(): C speed

    @classmethod
    def from_file(cls, path):
        with open(path, "rb") as f:
            return cls(f.read())

    # -- low level --
    def _header(self, tid):
        return struct.unpack_from("<III", self.data, self.type_start[tid])

    def kind(self, tid):
        return (self._header(tid)[1] >> 24) & 0x1f

    def name(self, tid):
        off = self._header(tid)[0]
        return self._string(off)

    def _string(self, off):
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode("ascii", "replace")

    def _name_offset(self, name):
        key = b"\0" + name.encode() + b"\0"
        i = self.strings.find(key)
        if i < 0:
            return None if self.strings[:len(key) - 1] != key[1:] else 0
        return i + 1

    def find(self, name, kinds):
        """Type ids with this name and one of these kinds."""
        off = self._name_offset(name)
        if not off:         # not there, or the empty name of anonymous types
            return []
        needle, found = struct.pack("=I", off), []
        at = self.name_offsets.find(needle)
        while at >= 0:
            if at % 4:      # straddles two entries: not an entry
                at = self.name_offsets.find(needle, at + 1)
                continue
            if self.kind(at // 4) in kinds:
                found.append(at // 4)
            at = self.name_offsets.find(needle, at + 4)
        return found

    def strip(self, tid):
        """Follow typedefs and qualifiers to the real type."""
        for _ in range(32):
            _n, info, ref = self._header(tid)
            if (info >> 24) & 0x1f not in _MODIFIERS:
                return tid
            tid = ref
        raise BTFError("typedef loop")

    def size(self, tid):
        tid = self.strip(tid)
        _n, info, size_or_type = self._header(tid)
        kind = (info >> 24) & 0x1f
        if kind == BTF_KIND_PTR:
            return 8
        if kind == BTF_KIND_ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self.data,
                                                      self.type_start[tid] + 12)
            return self.size(elem) * nelems
        return size_or_type

    def members(self, tid):
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        start = self.type_start[tid]
        _n, info, _size = struct.unpack_from("<III", self.data, start)
        kind_flag = info >> 31
        out = []
        for i in range(info & 0xffff):
            name_off, mtype, offset = struct.unpack_from("<III", self.data, start + 12 + 12 * i)
            if kind_flag:
                out.append((self._string(name_off), mtype, offset & 0xffffff, offset >> 24))
            else:
                out.append((self._string(name_off), mtype, offset, 0))
        return out

    def _member(self, tid, name):
        """Find a member by name, descending into anonymous structs and unions."""
        for mname, mtype, bit_off, bitfield in self.members(tid):
            if mname == name:
                return mtype, bit_off, bitfield
            if not mname:
                inner = self.strip(mtype)
                if self.kind(inner) in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                    found = self._member(inner, name)
                    if found:
                        return found[0], bit_off + found[1], found[2]
        return None

    def struct_id(self, name):
        ids = self.find(name, (BTF_KIND_STRUCT, BTF_KIND_UNION))
        for tid in ids:  # prefer a complete definition
            if self.members(tid):
                return tid
        if ids:
            return ids[0]
        for tid in self.find(name, (BTF_KIND_TYPEDEF,)):  # possible_net_t is a typedef
            inner = self.strip(tid)
            if self.kind(inner) in (BTF_KIND_STRUCT, BTF_KIND_UNION):
                return inner
        raise BTFError("struct %s not found" % name)

    def offset(self, struct_name, path):
        """Byte offset and size of struct_name.path ("nd_net.net" walks nested members)."""
        tid = self.struct_id(struct_name)
        total_bits = 0
        mtype = None
        for part in path.split("."):
            found = self._member(tid, part)
            if found is None:
                raise BTFError("%s has no member %s" % (struct_name, path))
            mtype, bit_off, bitfield = found
            if bitfield or bit_off % 8:
                raise BTFError("%s.%s is a bitfield" % (struct_name, path))
            total_bits += bit_off
            tid = self.strip(mtype)
        return total_bits // 8, self.size(mtype)

    def enum_values(self, name):
        """{value: name} of an enum."""
        for tid in self.find(name, (BTF_KIND_ENUM, BTF_KIND_ENUM64)):
            start = self.type_start[tid]
            _n, info, _size = struct.unpack_from("<III", self.data, start)
            out = {}
            if (info >> 24) & 0x1f == BTF_KIND_ENUM:
                for i in range(info & 0xffff):
                    n, v = struct.unpack_from("<Ii", self.data, start + 12 + 8 * i)
                    out[v] = self._string(n)
            else:
                for i in range(info & 0xffff):
                    n, lo, hi = struct.unpack_from("<III", self.data, start + 12 + 12 * i)
                    out[(hi << 32) | lo] = self._string(n)
            if out:
                return out
        return {}

    def tracepoint_type(self, tp):
        """The type id of a vmlinux tracepoint's btf_trace_<name> typedef (what a tp_btf
        program attaches to), or None."""
        ids = self.find("btf_trace_" + tp, (BTF_KIND_TYPEDEF,))
        return ids[0] if ids else None

    def tracepoint_params(self, tp):
        """Parameter type names of a vmlinux tracepoint, or None when it does not exist.

        Every tracepoint has a typedef btf_trace_<name>: a pointer to a function whose
        first parameter is the tracepoint's private data, the rest its TP_PROTO.
        """
        ids = self.find("btf_trace_" + tp, (BTF_KIND_TYPEDEF,))
        if not ids:
            return None
        ptr = self._header(ids[0])[2]
        proto = self._header(ptr)[2]
        start = self.type_start[proto]
        _n, info, _ret = struct.unpack_from("<III", self.data, start)
        names = []
        for i in range(1, info & 0xffff):
            _pn, ptype = struct.unpack_from("<II", self.data, start + 12 + 8 * i)
            names.append(self.type_name(ptype))
        return names

    def type_name(self, tid):
        for _ in range(8):
            if tid == 0:
                return "void"
            _n, info, ref = self._header(tid)
            kind = (info >> 24) & 0x1f
            if kind == BTF_KIND_PTR:
                return self.type_name(ref) + " *"
            if kind in (BTF_KIND_CONST, BTF_KIND_VOLATILE, BTF_KIND_RESTRICT, BTF_KIND_TYPE_TAG):
                tid = ref
                continue
            prefix = {BTF_KIND_STRUCT: "struct ", BTF_KIND_UNION: "union ",
                      BTF_KIND_ENUM: "enum ", BTF_KIND_ENUM64: "enum "}.get(kind, "")
            return prefix + self.name(tid)
        return "?"


# The fields the program reads, as (C name, struct, member path).
LAYOUT_FIELDS = [
    ("SKB_DEV", "sk_buff", "dev"),
    ("SKB_LEN", "sk_buff", "len"),
    ("SKB_DATA_LEN", "sk_buff", "data_len"),
    ("SKB_MAC_HEADER", "sk_buff", "mac_header"),
    ("SKB_HEAD", "sk_buff", "head"),
    ("DEV_IFINDEX", "net_device", "ifindex"),
]

NETNS_FIELDS = [
    ("DEV_ND_NET", "net_device", "nd_net.net"),
    ("NET_NS_INUM", "net", "ns.inum"),
]

PROG_INFO_FIELDS = ("run_time_ns", "run_cnt", "recursion_misses")

# --explain's task_struct fields, each with the paths it has had: the state is __state
# since 5.14; the CPU moved into thread_info in 5.16
SCHED_FIELDS = [
    ("TASK_PID", ("pid",)),
    ("TASK_COMM", ("comm",)),
    ("TASK_STATE", ("__state", "state")),
    ("TASK_CPU", ("cpu", "thread_info.cpu")),
]


def sched_layout(btf):
    """{macro: offset} of what --explain reads of a task, and SWITCH_STATE_ARG (1 where
    sched_switch passes the previous task's state as its 4th argument, 5.18+: reading
    it back from the task races with its wake-up); None when a field is missing."""
    out = {}
    for macro, paths in SCHED_FIELDS:
        for path in paths:
            try:
                out[macro] = btf.offset("task_struct", path)[0]
                break
            except BTFError:
                continue
        else:
            return None
    params = btf.tracepoint_params("sched_switch") or []
    out["SWITCH_STATE_ARG"] = int(len(params) >= 4)
    return out


def prog_info_layout(btf):
    out = {}
    for field in PROG_INFO_FIELDS:
        try:
            out[field] = btf.offset("bpf_prog_info", field)[0]
        except BTFError:
            pass
    try:
        out["size"] = btf.size(btf.struct_id("bpf_prog_info"))
    except BTFError:
        return None
    return out


def layout_from_btf(btf):
    """Offsets and sizes the program needs, from the running kernel's own BTF."""
    offsets, sizes = {}, {}
    for cname, sname, path in LAYOUT_FIELDS:
        offsets[cname], sizes[cname] = btf.offset(sname, path)
    netns = True
    try:
        for cname, sname, path in NETNS_FIELDS:
            offsets[cname], sizes[cname] = btf.offset(sname, path)
    except BTFError:
        netns = False  # a kernel without network namespaces: every device is in init_net
    params = btf.tracepoint_params("kfree_skb") or []
    has_reason = len(params) >= 3 and params[2] == "enum skb_drop_reason"
    # {tracepoint: its BTF type id} for those vmlinux has (a module's are in its own BTF)
    type_ids = dict((tp, btf.tracepoint_type(tp)) for tp in TRACEPOINTS_USED)
    tracepoints = dict((tp, tid) for tp, tid in type_ids.items() if tid is not None)
    # the kernel passes a reason as a u32 (BTF's values are signed: the subsystem mask
    # 0xffff0000 reads as -65536)
    reasons = dict((code & 0xffffffff, name) for code, name in
                   btf.enum_values("skb_drop_reason").items()) if has_reason else {}
    return Layout("BTF", offsets, sizes, netns, reasons,
                  has_reason, tracepoints, prog_info_layout(btf), sched_layout(btf))


# --- what this kernel can attach to ---

TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_dir():
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def mount_tracefs():
    """Mount tracefs if nobody has (BCC's legacy kprobe interface needs it): the one
    change to the system before tracing; the queries above only look."""
    if tracefs_dir() is None and os.path.isdir(TRACEFS_PATHS[0]):
        subprocess.call(["mount", "-t", "tracefs", "tracefs", TRACEFS_PATHS[0]],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kprobes_available():
    if os.path.exists("/sys/bus/event_source/devices/kprobe/type"):
        return True, "kprobe PMU"
    tfs = tracefs_dir()
    if tfs and os.path.exists(os.path.join(tfs, "kprobe_events")):
        return True, "kprobe_events"
    return False, "this kernel has no kprobe support (no kprobe PMU, no kprobe_events)"


def kernel_symbols(wanted):
    """{function: symbol to attach to}: exact names first, else .isra/.constprop clones."""
    found = {}
    pattern = re.compile(r"^([A-Za-z0-9_]+)((?:\.(?:isra|constprop|part|cold)\.\d+)*)$")
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in "tTwW":
                    continue
                m = pattern.match(parts[2])
                if not m or m.group(1) not in wanted or ".cold" in m.group(2):
                    continue
                if not m.group(2) or m.group(1) not in found:
                    found[m.group(1)] = parts[2]
    except (IOError, OSError):
        pass
    return found


def tracepoint_exists(layout, view, category, name):
    if view.tracepoints is not None:     # --dry-run: as if every one existed
        return name in view.tracepoints
    if name in layout.tracepoints:
        return True
    tfs = tracefs_dir()
    return bool(tfs) and os.path.isdir(os.path.join(tfs, "events", category, name))


def drop_reasons_from_tracefs():
    """{code: SKB_DROP_REASON_name} from the kfree_skb tracepoint's format, or None
    when the tracepoint has no reason field (kernels before drop reasons, 5.17)."""
    tfs = tracefs_dir()
    try:
        with open(os.path.join(tfs or "", "events/skb/kfree_skb/format")) as f:
            fmt = f.read()
    except (IOError, OSError):
        return None
    if not re.search(r"field:enum skb_drop_reason reason;|field:\S+ reason;", fmt):
        return None
    return dict((int(code), "SKB_DROP_REASON_" + name) for code, name in
                re.findall(r'\{\s*(\d+),\s*"([A-Z0-9_]+)"\s*\}', fmt))


def headers_release(build_dir):
    path = os.path.join(build_dir, "include/generated/utsrelease.h")
    try:
        with open(path) as f:
            m = re.search(r'UTS_RELEASE\s+"([^"]+)"', f.read())
            return m.group(1) if m else None
    except (IOError, OSError):
        return None


def layout_from_headers(release):
    """Without BTF: trust the kernel headers only if they are the running kernel's."""
    build = "/lib/modules/%s/build" % release
    found = headers_release(build)
    if found is None:
        raise Fatal("no BTF (%s) and no kernel headers at %s: install the headers of "
                    "the running kernel (linux-headers-%s / kernel-devel-%s)"
                    % (DEFAULT_BTF, build, release, release))
    if found != release:
        raise Fatal("no BTF, and the kernel headers at %s are for %s, not the running "
                    "kernel %s: struct layouts from them would be wrong; install the "
                    "headers of %s or run a kernel with BTF (CONFIG_DEBUG_INFO_BTF)"
                    % (build, found, release, release))
    offsets = dict((c, "offsetof(struct %s, %s)" % (s, p)) for c, s, p in LAYOUT_FIELDS)
    sizes = dict((c, "sizeof(((struct %s *)0)->%s)" % (s, p)) for c, s, p in LAYOUT_FIELDS)
    reasons = drop_reasons_from_tracefs()
    # no BTF to list the tracepoints: tracefs says which exist (tracepoint_exists)
    return Layout("kernel headers " + found, offsets, sizes, False, reasons or {},
                  reasons is not None, {}, None, None)


def find_layout(btf_path, release):
    if btf_path not in ("none", DEFAULT_BTF) and not os.path.exists(btf_path):
        raise UsageError("--btf %s: no such file (the running kernel's BTF is %s; "
                         "'--btf none' uses the kernel headers)" % (btf_path, DEFAULT_BTF))
    if btf_path != "none" and os.path.exists(btf_path):
        if not stat.S_ISREG(os.stat(btf_path).st_mode):     # /dev/zero would never end
            raise UsageError("--btf %s: not a regular file" % btf_path)
        try:
            return layout_from_btf(BTF.from_file(btf_path))
        except (BTFError, IOError, OSError, struct.error, ValueError, IndexError) as e:
            raise Fatal("cannot read struct layouts from %s: %s" % (btf_path, e))
    return layout_from_headers(release)


# --- what this kernel's BPF can do: asked by trial, never read off the version ---

# Distribution kernels backport (RHEL 8's 4.18 has the ring buffer and
# bpf_probe_read_kernel), so each feature is tried: a map created, a tiny program
# loaded, then closed again at once. Nothing stays behind.

BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "ppc64": 361,
               "s390x": 351, "riscv64": 280}

BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_RAW_TRACEPOINT, BPF_PROG_TYPE_TRACING = 17, 26
BPF_TRACE_RAW_TP = 23       # expected_attach_type of a BTF-typed tracepoint (tp_btf)
BPF_FUNC_probe_read, BPF_FUNC_probe_read_kernel = 4, 113
BPF_OBJ_GET_INFO_BY_FD = 15
_memlock_lifted = []


def lift_memlock_limit():
    """Before 5.11 the kernel charges BPF maps and programs to the user's locked memory,
    RLIMIT_MEMLOCK, summed over all the user's processes: with another BPF tool running
    (a second instance of this one, say), even a probe's one-instruction program fails
    with EPERM, which reads as a kernel that refuses BPF. libbpf and BCC lift the limit;
    so does this, before its first bpf() call. Later kernels charge the memory cgroup."""
    if _memlock_lifted:
        return
    _memlock_lifted.append(True)
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):   # no CAP_SYS_RESOURCE: as far as the hard limit
        try:
            hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            pass        # what the kernel then refuses is reported


def bpf_call(cmd, attr):
    """bpf(cmd, attr) with attr's bytes: the result or -errno; None if the arch is unknown."""
    nr = BPF_SYSCALL.get(os.uname()[4])
    if nr is None:
        return None
    lift_memlock_limit()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr, len(attr))
    res = libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    return -ctypes.get_errno() if res < 0 else res


def _bpf_syscall(cmd, attr):
    """A bpf() command that makes an fd: the fd (closed at once) or -errno."""
    fd = bpf_call(cmd, attr)
    if fd is not None and fd >= 0:
        os.close(fd)
    return fd


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def bpf_prog_load(prog_type, code, name, attach_btf_id=0, log_size=0):
    """BPF_PROG_LOAD of these instructions: (fd or -errno, the verifier's log).

    attach_btf_id: a tp_btf program (BPF_PROG_TYPE_TRACING) and the btf_trace_<name>
    type it attaches to. BCC cannot load those itself (it knows fentry's prefixes, not
    tp_btf's): it compiles them, the tool loads its instructions here."""
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(log_size) if log_size else None
    attach_type = BPF_TRACE_RAW_TP if attach_btf_id else 0
    # bpf_attr's prog_load part, up to attach_btf_id (5.5+); the kernel zero-checks the rest
    attr = struct.pack("<IIQQIIQII16sIIIIQIIQII", prog_type, len(code) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license),
                       1 if log else 0, log_size, ctypes.addressof(log) if log else 0,
                       0, 0, name.encode()[:15], 0, attach_type, 0, 0, 0, 0, 0, 0, 0,
                       attach_btf_id)
    fd = bpf_call(BPF_PROG_LOAD, attr + b"\0" * 8)
    return fd, (log.value.decode("ascii", "replace") if log else "")


def raw_tracepoint_open(prog_fd):
    """Attach a tp_btf program to its tracepoint: the link's fd (closing it detaches)."""
    return bpf_call(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QII", 0, prog_fd, 0))


def tp_btf_refused(type_id):
    """Why this kernel will not load tp_btf programs (None: it will), by loading one."""
    if type_id is None:
        return "the kernel's BTF has no tracepoint types"
    fd, _log = bpf_prog_load(BPF_PROG_TYPE_TRACING, _insn(0xb7, dst=0, imm=0) + _insn(0x95),
                             "vnl_probe", type_id)
    if fd is None:
        return "not probed on %s" % os.uname()[4]
    if fd < 0:
        return "the kernel refuses BPF_PROG_TYPE_TRACING programs (%s)" % os.strerror(-fd)
    os.close(fd)
    return None


def _try_raw_tracepoint_program(helper=None):
    """Load (never attach) a raw tracepoint program; with a helper, one that calls it
    as bpf_probe_read*(stack, 8, NULL) would. Returns the fd (closed) or -errno."""
    code = b""
    if helper is not None:
        code += (_insn(0xbf, dst=1, src=10) +          # r1 = r10 (frame pointer)
                 _insn(0x07, dst=1, imm=-8) +          # r1 += -8
                 _insn(0xb7, dst=2, imm=8) +           # r2 = 8
                 _insn(0xb7, dst=3, imm=0) +           # r3 = 0
                 _insn(0x85, imm=helper))              # call helper
    code += _insn(0xb7, dst=0, imm=0) + _insn(0x95)     # r0 = 0; exit
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQIIQII16s", BPF_PROG_TYPE_RAW_TRACEPOINT, len(code) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license), 0, 0, 0, 0, 0,
                       b"vnl_probe")
    return _bpf_syscall(BPF_PROG_LOAD, attr)


def _try_ringbuf_map():
    return _bpf_syscall(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_RINGBUF, 0, 0,
                                                    4096, 0))


def lockdown_mode():
    try:
        with open("/sys/kernel/security/lockdown") as f:
            m = re.search(r"\[(\w+)\]", f.read())
            return m.group(1) if m else None
    except (IOError, OSError):
        return None


def probe_capabilities(force_perf_buffer=False):
    """What this kernel lets BPF do, by trying it; Fatal when the tool cannot run."""
    base = _try_raw_tracepoint_program()
    if base is None:   # an architecture this table does not know: let BCC find out
        return Capabilities(not force_perf_buffer, True, "not probed on %s" % os.uname()[4])
    if base in (-errno.EPERM, -errno.EACCES):
        raise Fatal("the kernel refuses to load BPF programs for this process (%s): run as "
                    "root with CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), outside a "
                    "container that drops them" % os.strerror(-base))
    if base < 0:
        raise Fatal("this kernel cannot load raw tracepoint programs (%s), which every "
                    "stage needs: it lacks BPF_PROG_TYPE_RAW_TRACEPOINT (Linux 4.17) or "
                    "has BPF turned off (CONFIG_BPF_SYSCALL)" % os.strerror(-base))
    prk = _try_raw_tracepoint_program(BPF_FUNC_probe_read_kernel) >= 0
    if not prk and _try_raw_tracepoint_program(BPF_FUNC_probe_read) < 0:
        mode = lockdown_mode()
        raise Fatal("BPF programs may not read kernel memory here%s: the tool needs "
                    "bpf_probe_read_kernel or bpf_probe_read" % (
                        " (kernel lockdown=%s; boot with lockdown=integrity or none)" % mode
                        if mode == "confidentiality" else ""))
    ringbuf = not force_perf_buffer and _try_ringbuf_map() >= 0
    how = "%s; %s" % ("BPF ring buffer" if ringbuf else "perf buffer (%s)" % (
        "forced" if force_perf_buffer else "no BPF_MAP_TYPE_RINGBUF"),
        "bpf_probe_read_kernel" if prk else "bpf_probe_read (no bpf_probe_read_kernel)")
    return Capabilities(ringbuf, prk, how)


def bpf_prog_stats(fd, prog_info):
    """{run_time_ns, run_cnt, recursion_misses} of a loaded program, from the kernel."""
    info = ctypes.create_string_buffer(prog_info["size"])
    attr = struct.pack("<IIQ", fd, prog_info["size"], ctypes.addressof(info))
    if bpf_call(BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return None
    return dict((f, struct.unpack_from("<Q", info.raw, prog_info[f])[0])
                for f in PROG_INFO_FIELDS if f in prog_info)


def kernel_view(attach, dry_run, list_stages, layout):
    """What the planner may attach to, for --attach, --dry-run and --list-stages."""
    kprobes_ok, kprobe_why = kprobes_available()
    wanted = set(f for st in STAGES for f, _a in st.kprobes)
    tp_btf_why = "not asked for (--attach %s)" % attach
    if attach in ("auto", "tp_btf"):
        tp_btf_why = ("no BTF (struct layouts from %s)" % layout.source
                      if layout.source != "BTF" else
                      tp_btf_refused(layout.tracepoints.get("netif_receive_skb")))
        if attach == "tp_btf" and tp_btf_why:
            raise Fatal("--attach tp_btf: %s" % tp_btf_why)
    if dry_run and not list_stages:
        # every probe point as if it existed (tp_btf as the kernel says), so that the
        # verifier sees every stage; --list-stages says what this kernel really has
        return KernelView(True, "assumed for --dry-run", dict((f, f) for f in wanted),
                          TRACEPOINTS_USED, tp_btf_why)
    symbols = kernel_symbols(wanted) if (kprobes_ok or list_stages) else {}
    return KernelView(kprobes_ok, kprobe_why, symbols, None, tp_btf_why)


def host_netns_inum():
    return os.stat("/proc/self/ns/net").st_ino


# ============================================================================
# Host: devices, tunnels, VMs
# ============================================================================


# --- which devices are the VM side and which the physical side ---

SYS_NET = "/sys/class/net"


def _sysfs(dev, *parts):
    return os.path.join(SYS_NET, dev, *parts)


def is_tap(dev):
    return os.path.exists(_sysfs(dev, "tun_flags"))


def is_macvtap(dev):
    """A macvtap (libvirt's <interface type='direct'>): the VM holds its /dev/tapN."""
    return os.path.isdir(_sysfs(dev, "macvtap"))


def is_vm_device(dev):
    return is_tap(dev) or is_macvtap(dev)


def lower_devices(dev):
    """The devices dev sits on (its lower_* links: a VLAN's device, a bond's or team's
    ports, a macvlan's or macvtap's NIC)."""
    try:
        return sorted(e[len("lower_"):] for e in os.listdir(_sysfs(dev))
                      if e.startswith("lower_"))
    except OSError:
        return []


def uplink_leaves(dev, _depth=0):
    """{NIC: [the devices stacked on it, from dev down]} of a switch port or a given
    physical device: a NIC itself ({dev: []}); a VLAN, a bond, a team: the NICs under
    them, each with the devices between (bond0.100 -> bond0 -> eth0: {"eth0":
    ["bond0.100", "bond0"]}). A packet leaves and arrives on a NIC: its queue and driver
    are the path's, its receive is where RX starts."""
    lows = lower_devices(dev) if _depth < 8 else []
    if not lows:
        return {dev: []}
    out = {}
    for low in lows:
        for leaf, chain in uplink_leaves(low, _depth + 1).items():
            out.setdefault(leaf, [dev] + chain)
    return out


def device_master(dev):
    try:
        return os.path.basename(os.readlink(_sysfs(dev, "master")))
    except OSError:
        return None


def device_ifindex(dev):
    with open(_sysfs(dev, "ifindex")) as f:
        return int(f.read())


def list_devices():
    try:
        return sorted(os.listdir(SYS_NET))
    except OSError:
        return []


def hardware_devices(devices):
    return [d for d in devices if os.path.exists(_sysfs(d, "device")) and not is_tap(d)]


def switch_ports(taps, devices):
    """The other ports of the switches (bridge or OVS) the taps are on."""
    masters = set(m for m in (device_master(t) for t in taps) if m)
    return [d for d in devices if d not in taps and not is_vm_device(d)
            and device_master(d) in masters and not is_ovs_internal(d)]


def device_kind(dev):
    """The kernel's device type (uevent DEVTYPE: vxlan, geneve, bridge, ...) or None."""
    try:
        with open(_sysfs(dev, "uevent")) as f:
            for line in f:
                if line.startswith("DEVTYPE="):
                    return line.strip().split("=", 1)[1]
    except (IOError, OSError):
        pass
    return None


def is_tunnel(dev):
    return device_kind(dev) in TUNNEL_PORTS


_LINK_DETAILS = {}


def link_details(dev):
    """iproute2's view of a device (ip -d -j link: its kind and settings), cached per
    device instance (name and ifindex)."""
    try:
        key = (dev, device_ifindex(dev))
    except (IOError, OSError, ValueError):
        return {}
    if key not in _LINK_DETAILS:
        link = {}
        try:
            out = subprocess.check_output(["ip", "-d", "-j", "link", "show", "dev", dev],
                                          stderr=subprocess.DEVNULL)
            link = json.loads(out.decode())[0]
            if not isinstance(link, dict):
                link = {}
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
            pass
        _LINK_DETAILS[key] = link
    return _LINK_DETAILS[key]


def tunnel_info(dev):
    """A tunnel device's settings: id (the VNI), remote, local, link (the underlay
    given), port, external (OVS's metadata mode)."""
    link = link_details(dev)
    try:
        info = dict(link.get("linkinfo", {}).get("info_data", {}))
    except (AttributeError, TypeError, ValueError):
        info = {}
    info["link"] = info.get("link") or link.get("link")
    return info


def is_ovs_internal(dev):
    """An OVS internal port (the bridge's own device, ovsbr0): the host's own interface
    on the switch, not a way out of the host."""
    try:
        return link_details(dev).get("linkinfo", {}).get("info_kind") == "openvswitch"
    except AttributeError:
        return False


def route_device(address):
    """The device this machine routes address through (ip route get)."""
    try:
        out = subprocess.check_output(["ip", "-j", "route", "get", address],
                                      stderr=subprocess.DEVNULL)
        return json.loads(out.decode())[0].get("dev")
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def tunnel_underlay(dev, devices):
    """Where a tunnel's outer packets leave: the device it is bound to, else the route
    to its fixed remote end, else (metadata mode, a remote per flow: OVS, OVN) the
    devices backed by hardware."""
    info = tunnel_info(dev)
    if info.get("link") in devices:
        return [info["link"]]
    remote = info.get("remote") or info.get("remote6")
    via = route_device(remote) if remote else None
    if via and via != dev and via in devices:
        return [via]
    return hardware_devices(devices)


def tunnel_ports(devices):
    """{kind: UDP ports}: the IANA ports and those of this host's tunnel devices."""
    ports = dict((kind, set([port])) for kind, port in TUNNEL_PORTS.items())
    for dev in devices:
        kind = device_kind(dev)
        if kind in ports and tunnel_info(dev).get("port"):
            ports[kind].add(int(tunnel_info(dev)["port"]))
    return ports


# what resolve_roles() found: {ifindex: Role}, {ifindex: name}, the VM devices selected
# (taps and macvtaps), the NICs, {NIC: the devices stacked on it (a VLAN, a bond)}
Resolved = namedtuple("Resolved", "roles names vm_devs phys uplinks")


def resolve_roles(selection, owners=None):
    """The roles of the host's devices, for the devices the user selected
    (DeviceSelection) or, by default, found.

    The VM side: taps and macvtaps (owners, {device: VmInfo} from find_vms(), picks
    those of the VMs named by --vm); a VM's device the selection leaves out is a PEER:
    its packets count when they go to or come from a selected VM. The physical side:
    the NICs under the other ports of the taps' switches (a tunnel port: its underlay)
    and under the selected macvtaps, through VLANs, bonds and teams; --phy-dev the same
    from the devices it names."""
    devices = list_devices()
    vm_all = [d for d in devices if is_vm_device(d)]
    if selection.vm_devs or selection.vms:
        vm_devs = list(selection.vm_devs)
        wanted = set(selection.vms)
        vm_devs += sorted(t for t, vm in (owners or {}).items()
                          if vm.name in wanted and t not in vm_devs and t in devices)
    else:
        vm_devs = vm_all
    peers = [d for d in vm_all if d not in vm_devs]
    taps = [d for d in vm_devs if not is_macvtap(d)]
    ports = switch_ports(taps, devices)
    tunnels = [d for d in ports if is_tunnel(d)]
    # where macvtaps sit: their frames to another macvtap of the same device come back
    # through it (bridge mode)
    mvt_lowers = set(low for d in vm_all if is_macvtap(d) for low in lower_devices(d))
    if selection.phy_devs:
        uplinks = list(selection.phy_devs)
    else:
        # a tunnel on the switch is not the physical side: its underlay is
        uplinks = [d for d in ports if d not in tunnels]
        for tun in tunnels:
            uplinks += [u for u in tunnel_underlay(tun, devices) if u not in uplinks]
        uplinks += [low for d in vm_devs if is_macvtap(d) for low in lower_devices(d)
                    if low not in uplinks]
        uplinks = uplinks or hardware_devices(devices)
    leaves = {}
    for dev in uplinks:
        for leaf, chain in uplink_leaves(dev).items():
            leaves.setdefault(leaf, chain)
    kinds = dict((t, Role.TUN_VXLAN if device_kind(t) == "vxlan" else Role.TUN_GENEVE)
                 for t in tunnels)
    wanted_roles = [(Role.VM, [d for d in taps]),
                    (Role.MVTAP, [d for d in vm_devs if is_macvtap(d)]),
                    (Role.VM | Role.PEER, [d for d in peers if not is_macvtap(d)]),
                    (Role.MVTAP | Role.PEER, [d for d in peers if is_macvtap(d)]),
                    (Role.MVT_LOWER, sorted(mvt_lowers)),
                    (Role.PHY, sorted(leaves))] + [(r, [t]) for t, r in kinds.items()]
    roles, names = {}, {}
    for role, devs in wanted_roles:
        for dev in devs:
            try:
                idx = device_ifindex(dev)
            except (IOError, OSError, ValueError):
                continue  # vanished since the listing
            # a NIC macvtaps sit on: both at once
            roles[idx] = Role.PHY_MVT if role == Role.PHY and dev in mvt_lowers else role
            names[idx] = dev
    return Resolved(roles, names, vm_devs, sorted(leaves), dict(
        (leaf, chain) for leaf, chain in leaves.items() if chain))


def uplink_notes(found):
    """What to say about the physical side found: a bond or team without NICs under it
    (--phy-dev naming it, or a VLAN on it) has no packet leave or arrive."""
    notes = []
    for dev in found.phys:
        if device_kind(dev) in ("bond", "team") or os.path.isdir(_sysfs(dev, "bonding")):
            notes.append("%s%s is a %s with no NIC under it: no packet leaves or arrives "
                         "there until it has one" % (
                             dev, " (under %s)" % "/".join(found.uplinks[dev])
                             if found.uplinks.get(dev) else "", device_kind(dev) or "bond"))
    return notes


def check_devices_exist(selection):
    for dev in selection.vm_devs + selection.phy_devs:
        if not os.path.isdir(_sysfs(dev)):
            raise UsageError("device %r does not exist in this network namespace "
                             "(see 'ip link')" % dev)
    both = set(selection.vm_devs) & set(selection.phy_devs)
    if both:
        raise UsageError("device %s cannot be both --vm-dev and --phy-dev" % sorted(both)[0])


def all_taps():
    """The VM devices there are now: taps and macvtaps."""
    return set(d for d in list_devices() if is_vm_device(d))


# --- which VM owns a tap: the process holding its /dev/net/tun descriptor ---
# The tun driver names the device of each descriptor in /proc/PID/fdinfo/FD
# ("iff:\tvnet3"); the VM's name is the -name QEMU was started with (libvirt, nova,
# Proxmox all pass one: "-name guest=web-03,debug-threads=on"), its UUID -uuid. No
# libvirt needed: /proc is enough, for any VMM that holds a tap.

def qemu_opts(text):
    """QEMU's "a=b,c=d" option syntax, where ",," is a literal comma: [(key, value)];
    a first item without "=" is the option's implied value (key None)."""
    items, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    items.append(cur)
    out = []
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        out.append((key, value) if eq else (None, item) if n == 0 else (item, ""))
    return out


def vm_identity(argv):
    """(name, uuid) from a VMM's command line: QEMU's -name and -uuid, or None."""
    name = uuid = None
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-name", "--name"):
            for key, value in qemu_opts(argv[i + 1]):
                if key in (None, "guest"):
                    name = value
        elif arg in ("-uuid", "--uuid"):
            uuid = argv[i + 1]
    return name or None, uuid


def _read_proc(pid, what):
    try:
        with open("/proc/%d/%s" % (pid, what), "rb") as f:
            return f.read()
    except (IOError, OSError):
        return None


def macvtap_chardevs():
    """{(major, minor): macvtap} of this namespace's macvtaps: each one's /dev/tapN is
    named after its ifindex but numbered by the kernel, read from sysfs
    (/sys/class/net/DEV/macvtap/tapN/dev: "MAJOR:MINOR")."""
    out = {}
    for dev in list_devices():
        try:
            for entry in os.listdir(_sysfs(dev, "macvtap")):
                with open(_sysfs(dev, "macvtap", entry, "dev")) as f:
                    major, minor = f.read().strip().split(":")
                out[(int(major), int(minor))] = dev
        except (IOError, OSError, ValueError):
            continue
    return out


def vm_device_fds(pid, macvtaps):
    """[(fd, device, is a tap)] of a process's descriptors of VM devices: a tap's
    /dev/net/tun (fdinfo names the tap: "iff:\tvnet3"), or a macvtap's character device
    (macvtaps: from macvtap_chardevs())."""
    fddir = "/proc/%d/fd" % pid
    out = []
    try:
        fds = os.listdir(fddir)
    except OSError:
        return out
    for fd in fds:
        path = os.path.join(fddir, fd)
        try:
            target = os.readlink(path)
            if target == "/dev/net/tun":
                with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                    for line in f:
                        if line.startswith("iff:"):
                            out.append((int(fd), line.split(None, 1)[1].strip(), True))
            elif macvtaps and target.startswith("/dev/"):
                st = os.stat(path)
                dev = macvtaps.get((os.major(st.st_rdev), os.minor(st.st_rdev)))
                if dev and stat.S_ISCHR(st.st_mode):
                    out.append((int(fd), dev, False))
        except (IOError, OSError, IndexError, ValueError):
            continue
    return out


# pidfd_open and pidfd_getfd have one number on every architecture (5.3+, 5.6+)
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
TUNGETDEVNETNS = 0x54e3     # _IO('T', 227): the tap's network namespace as an fd (5.2+)


def tap_netns(pid, fd):
    """The network namespace (inode) of the tap behind a process's tun descriptor.

    A tap's name is only unique within its namespace: a process in another one can
    hold a tap of the same name as a host's. So the descriptor itself is asked which
    namespace its device is in (a copy of it, pidfd_getfd, 5.6+; TUNGETDEVNETNS,
    5.2+). Where the kernel cannot say, the holder's own namespace stands in for it:
    a tap is created in its creator's namespace, and moving it needs privileges there."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pidfd = libc.syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_int(pid), ctypes.c_uint(0))
    if pidfd >= 0:
        copy = libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd),
                            ctypes.c_int(fd), ctypes.c_uint(0))
        os.close(pidfd)
        if copy >= 0:
            try:
                nsfd = fcntl.ioctl(copy, TUNGETDEVNETNS)
                try:
                    return os.fstat(nsfd).st_ino
                finally:
                    os.close(nsfd)
            except (IOError, OSError):
                pass
            finally:
                os.close(copy)
    try:
        return os.stat("/proc/%d/ns/net" % pid).st_ino
    except OSError:
        return None


def find_vms():
    """{device: VmInfo} for every tap or macvtap of this network namespace some process
    holds. Where several hold one (a management daemon passing the descriptor on), a
    named VM wins, then the lowest pid. (A macvtap's character device is only this
    namespace's when its numbers are: macvtap_chardevs() lists no other.)"""
    found = {}
    here = host_netns_inum()
    macvtaps = macvtap_chardevs()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        taps = [name for fd, name, tun in vm_device_fds(pid, macvtaps)
                if not tun or tap_netns(pid, fd) == here]
        if not taps:
            continue
        argv = (_read_proc(pid, "cmdline") or b"").split(b"\0")
        argv = [a.decode("utf-8", "replace") for a in argv if a]
        name, uuid = vm_identity(argv)
        comm = (_read_proc(pid, "comm") or b"?").decode("utf-8", "replace").strip()
        info = VmInfo(name, uuid, pid, comm)
        for tap in taps:
            old = found.get(tap)
            if old is None or (info.name and not old.name) or \
                    (bool(info.name) == bool(old.name) and pid < old.pid):
                found[tap] = info
    return found


def vm_label(info, tap):
    """How a VM is named in tables and metrics: its name, else its process, else the tap."""
    if info and info.name:
        return info.name
    if info:
        return "%s[%d]" % (info.comm, info.pid)
    return tap


def check_vms_exist(wanted, owners):
    """Every VM named by --vm runs (wanted: those names)."""
    names = set(vm.name for vm in owners.values() if vm.name)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise UsageError("no running VM is named %s (running: %s)" % (
            ", ".join(repr(n) for n in missing), ", ".join(sorted(names)) or "none"))


def threads_to_follow(owners):
    """--explain: {tid: XF flags} of the threads whose scheduling explains a packet's
    wait: every thread of the processes holding VM devices (QEMU's I/O threads; since
    6.4 the vhost workers too), the vhost workers that are kernel threads (before 6.4:
    vhost-PID, PID the VMM's), and ksoftirqd (softirq work deferred to a thread)."""
    pids = set(vm.pid for vm in owners.values() if vm and vm.pid)
    out = {}
    for pid in pids:
        try:
            out.update((int(t), 0) for t in os.listdir("/proc/%d/task" % pid) if t.isdigit())
        except OSError:
            continue            # gone since
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        comm = (_read_proc(int(entry), "comm") or b"").strip()
        if comm.startswith(b"ksoftirqd/"):
            out[int(entry)] = XF.KSOFTIRQD
        elif comm.startswith(b"vhost-") and comm[6:].isdigit() and int(comm[6:]) in pids:
            out[int(entry)] = 0
    return out


def explain_tracepoints():
    """The tracepoints --explain attaches: the scheduler's, and the interrupts' where
    this kernel has them (tracefs says)."""
    events = os.path.join(tracefs_dir() or TRACEFS_PATHS[0], "events")
    missing = [tp for cat, tp, _w in SCHED_TRACEPOINTS
               if not os.path.isdir(os.path.join(events, cat, tp))]
    if missing:
        raise Fatal("--explain: this kernel has no tracepoint %s" % ", ".join(missing))
    return SCHED_TRACEPOINTS + [t for t in IRQ_TRACEPOINTS
                                if os.path.isdir(os.path.join(events, t[0], t[1]))]


class FollowedThreads(object):
    """--explain: the kernel's table of followed threads, kept in step with the VMs
    (their threads come and go: QEMU starts workers, VMs stop). A thread keeps its
    scheduling history while it stays."""
    RESCAN_S = 5.0

    def __init__(self, table):
        self.table = table
        self.tids = {}
        self.scanned = None
        self.not_followed = 0       # threads the full table had no room for

    def update(self, owners, force=False):
        now = time.monotonic()
        if not force and self.scanned is not None and now - self.scanned < self.RESCAN_S:
            return
        self.scanned = now
        wanted = threads_to_follow(owners)
        for tid in set(self.tids) - set(wanted):
            try:
                del self.table[self.table.Key(tid)]
            except KeyError:
                pass
        kept = {}
        for tid, flags in wanted.items():
            if self.tids.get(tid) != flags:
                leaf = self.table.Leaf()
                leaf.flags = flags
                try:
                    self.table[self.table.Key(tid)] = leaf
                except Exception:       # bcc says only "Could not update table"
                    self.not_followed += 1      # (full: EXPLAIN_THREADS)
                    continue
            kept[tid] = flags
        self.tids = kept


def switch_of(dev):
    """The bridge a device is a port of ("ovs-system" means an OVS datapath port); for a
    macvtap, the device it is on (macvtap@eth0): the macvlan there is its switch."""
    if is_macvtap(dev):
        return "macvtap@" + (lower_devices(dev) or ["?"])[0]
    return device_master(dev) or "-"


ROLE_WORDS = {Role.VM: "vm", Role.MVTAP: "vm (macvtap)", Role.PHY: "phy",
              Role.PHY_MVT: "phy (macvtaps on it)", Role.MVT_LOWER: "macvtaps' lower",
              Role.TUN_VXLAN: "vxlan", Role.TUN_GENEVE: "geneve"}


class HostDevices(object):
    """Which devices are the VM side and which the physical side, kept in step with the
    host: VMs start and stop, restart with new taps of the same names, get their names
    late. The /proc scan for tap owners runs when the set of VM devices changed, and
    every few seconds while one has no named owner (a daemon may hand it to QEMU later)."""
    OWNER_RESCAN_S = 5.0

    def __init__(self, selection):
        self.selection = selection
        self.taps_seen, self.owners, self.owners_at = all_taps(), find_vms(), time.monotonic()
        self.found = resolve_roles(selection, self.owners)

    @property
    def roles(self):
        return self.found.roles

    @property
    def names(self):
        return self.found.names

    @property
    def uplinks(self):
        """{NIC's ifindex: the devices stacked on it}."""
        by_name = dict((n, i) for i, n in self.found.names.items())
        return dict((by_name[leaf], chain) for leaf, chain in self.found.uplinks.items()
                    if leaf in by_name)

    def refresh(self):
        """Look again: True when the roles changed (the names are new then too)."""
        taps, now = all_taps(), time.monotonic()
        unnamed = any(not (self.owners.get(t) and self.owners[t].name) for t in taps)
        if taps != self.taps_seen or (unnamed and now - self.owners_at >= self.OWNER_RESCAN_S):
            self.taps_seen, self.owners, self.owners_at = taps, find_vms(), now
        found = resolve_roles(self.selection, self.owners)
        if found.roles == self.found.roles:
            return False
        self.found = found
        return True

    def describe(self):
        return ", ".join("%s=%s%s" % (self.names[i], ROLE_WORDS[r & ~Role.PEER],
                                      " (not selected)" if r & Role.PEER else "")
                         for i, r in sorted(self.roles.items()))


def read_comm(path):
    """A process's or thread's name (the kernel side only keeps the ids)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except (IOError, OSError):
        return "?"    # gone already


def ksym_name(ksym, addr):
    if ksym is None:
        return "0x%x" % addr
    try:
        return ksym(addr, show_offset=True).decode("utf-8", "replace")
    except Exception:
        return "0x%x" % addr


# ============================================================================
# Planning: how each stage attaches, and what follows from it
# ============================================================================

def why_not(st, attach, view):
    """Why a stage cannot attach with this --attach method on this kernel."""
    kprobes_ok, kprobe_why, symbols = view.kprobes_ok, view.kprobe_why, view.symbols
    if attach in ("tracepoint", "tp_btf") and not st.tracepoint:
        return "no tracepoint at this point (needs --attach kprobe or auto)"
    if st.module == "openvswitch":
        if not os.path.isdir("/sys/module/openvswitch"):
            return "the openvswitch module is not loaded (no OVS kernel datapath)"
        if attach in ("tracepoint", "tp_btf"):
            return "this kernel has no %s:%s tracepoint (--attach kprobe or auto use " \
                   "the %s kprobe instead)" % (st.tracepoint[0], st.tracepoint[1],
                                               st.kprobes[0][0])
        if attach != "kprobe":
            return "this kernel has no %s:%s tracepoint, and %s" % (
                st.tracepoint[0], st.tracepoint[1], kprobe_why if not kprobes_ok else
                "no %s symbol" % st.kprobes[0][0])
    if st.module == "bridge" and not any(f in symbols for f, _a in st.kprobes) and kprobes_ok:
        return "the bridge module is not loaded (no Linux bridge)"
    if st.hook in VHOST_HOOKS:
        if attach not in ("kprobe", "auto"):
            return "no tracepoint at this point (needs --attach kprobe or auto)"
        if not kprobes_ok:
            return kprobe_why
        if not os.path.isdir("/sys/module/vhost_net"):
            return "the vhost_net module is not loaded (no vhost-net)"
        if st.hook == "kick":
            return "needs kprobes on handle_tx_kick, handle_tx_net and vhost_work_queue " \
                   "or vhost_worker_queue: not all are in /proc/kallsyms"
        return "needs kprobes on handle_rx_kick, handle_rx_net, " \
               "vhost_add_used_and_signal_n and eventfd_signal or eventfd_signal_mask: " \
               "not all are in /proc/kallsyms"
    if attach == "kprobe" and not st.kprobes:
        return "no kprobe at this point"
    if not kprobes_ok:
        return kprobe_why
    return "none of %s is in /proc/kallsyms" % ", ".join(f for f, _ in st.kprobes)


def plan_stages(direction, attach, layout, view):
    """Choose, per stage, how it attaches on this kernel (or why it cannot), for
    --direction and --attach."""
    kprobes_ok, symbols = view.kprobes_ok, view.symbols
    wanted_dirs = wanted_directions(direction)
    plans = []
    for st in STAGES:
        if not set(st.directions) & set(wanted_dirs):
            plans.append(Plan(st, None, [], "not traced: --direction %s" % direction))
            continue
        tp = typed = None
        if st.tracepoint and tracepoint_exists(layout, view, st.tracepoint[0], st.tracepoint[1]):
            tp = Plan(st, "tracepoint", [("%s:%s" % st.tracepoint[:2], st.tracepoint[2])], "")
            if view.tp_btf_why is None and st.tracepoint[1] in layout.tracepoints and \
                    (attach == "tp_btf" or st.hook in TYPED_HOOKS):
                typed = tp._replace(method="tp_btf")
        kp = None
        syms = [(symbols[f], a) for f, a in st.kprobes if f in symbols]
        # the upcall stage's kprobes work together: it needs all of them, the kick
        # stage its worker's two and one of the queueings, the signal stage all but
        # one of the eventfd's two; elsewhere each is a way to the same point
        # (host_rcv: any of TCP, UDP, ICMP)
        complete = len(syms) == len(st.kprobes) or st.hook not in ("upcall",) + VHOST_HOOKS
        if st.hook == "kick":
            complete = "handle_tx_kick" in symbols and "handle_tx_net" in symbols and (
                "vhost_work_queue" in symbols or "vhost_worker_queue" in symbols)
        if st.hook == "signal":
            complete = all(f in symbols for f in (
                "handle_rx_kick", "handle_rx_net", "vhost_add_used_and_signal_n")) and (
                "eventfd_signal" in symbols or "eventfd_signal_mask" in symbols)
        if kprobes_ok and syms and complete:
            kp = Plan(st, "kprobe", syms, "")
        # auto prefers the tracepoint: it sits at the same point, costs less, is a
        # stable ABI, and netif_receive_skb also sees GRO's list receive path, which
        # the __netif_receive_skb kprobe misses
        # --attach kprobe: phy_xmit has no kprobe of its own and keeps its tracepoint;
        # --attach tracepoint never uses a kprobe (bridge and host_rcv are left out)
        # tp_btf where the kernel has the tracepoint's BTF type (a module's, OVS's, is
        # not in vmlinux's BTF: attached raw); auto only for the stages it pays for
        if attach == "kprobe":
            order = [kp] if st.kprobes else [tp]
        elif attach == "tracepoint":
            order = [tp]
        elif attach == "tp_btf":   # tracepoints only, as --attach tracepoint
            order = [typed, tp]
        else:
            order = [typed, tp, kp]
        chosen = next((p for p in order if p), None)
        if chosen:
            plans.append(chosen)
            continue
        plans.append(Plan(st, None, [], why_not(st, attach, view)))
    return plans


# the C function of an attach point is named after its method and probe
ATTACH_PREFIX = {"kprobe": "kp_", "tracepoint": "rtp_", "tp_btf": "tpb_"}


def group_attachments(plans):
    """One BPF function per attach point, calling the handler of each stage there."""
    groups = {}
    order = []
    for p in plans:
        for probe, arg in p.probes if p.method else []:
            key = (p.method, probe, arg)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(p)
    out = []
    for method, probe, arg in order:
        safe = re.sub(r"[^A-Za-z0-9_]", "_", probe)
        fn = ATTACH_PREFIX[method] + safe + ("_return" if method == "kprobe" and arg == 0
                                             else "")
        out.append(Attachment(method, probe, arg, fn, groups[(method, probe, arg)]))
    return out


def histogram_segments(path):
    """[(direction, segment name)] by index in the kernel's histogram array, for the
    traced stages of each direction in path order ({direction: [stage names]}).

    Per direction: every pair of traced stages in path order (a packet may skip a
    stage, e.g. ovs_upcall), then the total. Pair (i, j) of n stages is at
    i*n - i*(i+1)/2 + j - i - 1, which the C computes the same way (PAIR)."""
    out = []
    for direction in DIRECTIONS:
        names = path[direction]
        out += [(direction, "%s->%s" % (a, b)) for i, a in enumerate(names)
                for b in names[i + 1:]]
        out.append((direction, "total"))
    return out


class TracePlan(object):
    """How each stage attaches, and what follows from it, derived once: program
    generation, the loader, the kernel's counters and the run all take this."""

    def __init__(self, plans):
        self.plans = plans
        self.traced = set(p.stage.name for p in plans if p.method)
        # each direction's traced stages, in path order
        self.path = dict((d, [n for n in PATH_ORDER[d] if n in self.traced])
                         for d in DIRECTIONS)
        self.attachments = group_attachments(plans)
        self.upcalls = any(p.method for p in plans if p.stage.hook == "upcall")
        self.segments = histogram_segments(self.path)
        # the last stage of each direction's path that this run can see (-1: none)
        self.final = dict((d, next((STAGE_BY_NAME[n].sid for n in END_STAGES[d]
                                    if n in self.traced), -1)) for d in DIRECTIONS)

    def require_path_ends(self, direction):
        """Each direction traced needs a stage where packets enter and one where they
        end (--direction)."""
        for d in wanted_directions(direction):
            starts = [p for p in self.plans if p.stage.name in START_STAGES[d]]
            if not any(p.method for p in starts) or self.final[d] < 0:
                raise Fatal("cannot trace %s: %s" % (d.upper(), starts[0].reason or
                                                      "no stage can see the end of the path"))


# ============================================================================
# Program generation
# ============================================================================


# --- histogram buckets: the kernel's bucketing and its inverse ---

# The kernel's histogram bucketing (bucket_bounds() below says what a bucket holds;
# the unit tests run this C in the kernel, through BPF_PROG_TEST_RUN, against it).
HIST_ADD_C = r"""
// 16 linear sub-buckets per power of two of v = ns * 1.024 (units of 1/1024 us,
// so the power-of-two rows are whole microseconds). u64: minutes do not wrap.
static __always_inline u32 hist_bucket(u64 ns)
{
    // v = ns + floor(3 ns / 125). A division by a constant stays a 64-bit div in BPF
    // (tens of cycles, three a packet); below 2^31 (0.7 s) it is a multiply and a
    // shift, exactly: 2199023256 = ceil(2^38 / 125), and 125 * it - 2^38 <= 2^7.
    u64 x = ns * 3;
    u64 v = ns + (x < (1ULL << 31) ? (x * 2199023256ULL) >> 38 : x / 125);
    u32 bucket = v;
    if (v >= (1 << (HIST_SUB_BITS + 1))) {
        u32 lg = bpf_log2l(v) - 1;      // bcc's bpf_log2l() is floor(log2(v)) + 1
        bucket = ((lg - HIST_SUB_BITS + 1) << HIST_SUB_BITS) +
                 ((v >> (lg - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1));
        if (bucket >= HIST_BUCKETS)
            bucket = HIST_BUCKETS - 1;
    }
    return bucket;
}

static __always_inline void hist_add(u32 seg, u64 ns)
{
    u32 idx = seg * HIST_BUCKETS + hist_bucket(ns);
    u64 *count = hist.lookup(&idx);
    if (count)
        __sync_fetch_and_add(count, 1);
}
"""


def hist_slots(segments):
    return max(1, len(segments)) * C.HIST_BUCKETS


def vm_explain_base(segments):
    """--explain with the per-VM table: the slot of a VM's first explanation sum, after
    its histogram rows (then EXPLAIN_SLOTS of them, indexed as explain_sums)."""
    return max(1, len(segments)) * C.VM_HIST_ROW


def bucket_of(ns):
    """hist_bucket() of the C, in Python: joined hosts' segments are bucketed here."""
    v = ns + 3 * ns // 125
    if v < 1 << (C.HIST_SUB_BITS + 1):
        return v
    lg = v.bit_length() - 1
    bucket = ((lg - C.HIST_SUB_BITS + 1) << C.HIST_SUB_BITS) + \
        ((v >> (lg - C.HIST_SUB_BITS)) & ((1 << C.HIST_SUB_BITS) - 1))
    return min(bucket, C.HIST_BUCKETS - 1)


def bucket_bounds(bucket):
    """[lo, hi) of a bucket, in microseconds; the last one is open-ended (38 hours+)."""
    sub = 1 << C.HIST_SUB_BITS
    if bucket < 2 * sub:
        lo, hi = bucket, bucket + 1
    else:
        lg = (bucket >> C.HIST_SUB_BITS) + C.HIST_SUB_BITS - 1
        step = 1 << (lg - C.HIST_SUB_BITS)
        lo = (1 << lg) + (bucket & (sub - 1)) * step
        hi = lo + step if bucket < C.HIST_BUCKETS - 1 else float("inf")
    return lo / 1024.0, hi / 1024.0


def bucket_middle_us(bucket):
    """A value standing for a bucket's (its middle; the open-ended last one's start)."""
    lo, hi = bucket_bounds(bucket)
    return lo if hi == float("inf") else (lo + hi) / 2


# --- the program ---

# --explain: a followed thread's last scheduling events and a CPU's last switches, and the
# C that attributes a segment's time from them and names whom a thread waited behind
# (EXPLAIN_WALK_C, also run alone in the kernel by the tests)
EXPLAIN_TYPES_C = r"""
// One scheduling event of a thread: from ts on it was in state kind (a Cause: ASLEEP,
// STOPPED, RUN_QUEUE, RUNNING); irq: the thread's interrupt time so far (thist.irq)
struct tev { u64 ts; u64 irq; u32 kind; u32 pad; };
struct thist {
    u32 head;                   // events written so far; the next one's slot: head % RING
    u32 flags;                  // XF_KSOFTIRQD (user space sets it)
    u64 irq;                    // ns interrupts cut into its running, since followed
    u32 behind;                 // its last run-queue wait's: the task that held the
                                // CPU longest (of the CPU's last EXPLAIN_RUNNERS)
    u32 wait_cpu;               // the CPU it last waited for (where it got to run)
    char behind_comm[16];
    struct tev ev[EXPLAIN_RING];
};
// per CPU: the followed thread running here, the interrupts cutting into it, and the
// last tasks that ran (each until a switch), to name whom a followed thread waited behind
struct runner { u64 until; u64 task; u32 tid; u32 pad; };
struct oncpu {
    u32 tid; u32 depth; u64 since; u32 irq_counts; u32 head;
    struct runner ran[EXPLAIN_RUNNERS];
    struct runner best;         // longest_runner()'s so far (until: how long it ran)
};
"""

EXPLAIN_WALK_C = r"""
static __always_inline void thread_event(struct thist *h, u64 ts, u32 kind)
{
    u32 i = h->head & (EXPLAIN_RING - 1);
    h->head = h->head + 1;
    h->ev[i].ts = ts;
    h->ev[i].irq = h->irq;
    h->ev[i].kind = kind;
}

static __always_inline u32 last_kind(struct thist *h)
{
    u32 head = h->head;
    return head ? h->ev[(head - 1) & (EXPLAIN_RING - 1)].kind : CAUSE_UNKNOWN;
}

// What the thread h did from a to b, walking its events from the newest: each state
// lasted from its event to the next one (x_ns[kind] += its share of [a, b]; x is a map
// value, so kind may index it). What its oldest event kept does not reach back to is
// UNKNOWN (XF_PARTIAL). Interrupts: the thread's interrupt time between its last
// event at or before a and its first after b (an event is rare while it runs), taken
// out of its running.
static __always_inline void explain_walk(struct thist *h, u64 a, u64 b, struct explain *x)
{
    u64 hi = b, irq_a = h->irq, irq_b = h->irq;
    u32 head = h->head, covered = 0;
    for (u32 i = 0; i < EXPLAIN_RING; i++) {
        // clang would fold the two bounds into one "i != min(head, RING)", which 5.10's
        // verifier cannot bound (it walks the loop until it gives up): hide i from it
        u32 seen = i;
        asm volatile("" : "+r"(seen));
        if (seen >= head)
            break;
        struct tev *e = &h->ev[(head - 1 - i) & (EXPLAIN_RING - 1)];
        u64 ts = e->ts, lo = ts > a ? ts : a;
        irq_a = e->irq;
        if (ts >= b)
            irq_b = e->irq;
        if (hi > lo)
            x->x_ns[e->kind & 3] += hi - lo;
        if (ts <= a) {
            covered = 1;
            break;
        }
        hi = ts < hi ? ts : hi;
    }
    u64 irq = irq_b - irq_a;
    if (irq > x->x_ns[CAUSE_RUNNING])
        irq = x->x_ns[CAUSE_RUNNING];
    x->x_ns[CAUSE_RUNNING] -= irq;
    x->x_ns[CAUSE_IRQ] = irq;
    x->x_ns[CAUSE_UNKNOWN] = covered ? 0 : hi - a;
    x->x_flags = XF_FOLLOWED | (covered ? 0 : XF_PARTIAL);
    x->x_cpu = h->wait_cpu;
}

// The task that held this CPU longest since `since` (when a followed thread began to
// wait for it), from the CPU's last switches: each task ran from the switch before its
// own. With more switches than the ring keeps, the longest of those it keeps. The best
// so far lives in the map value, not in registers: the verifier would otherwise follow
// each combination of the iterations' outcomes (6.12's, with LLVM 19, gave up).
static __always_inline u32 longest_runner(struct oncpu *c, u64 since, u64 *task)
{
    u32 head = c->head;
    c->best.until = 0;
    c->best.task = 0;
    c->best.tid = 0;
    for (u32 i = 0; i + 1 < EXPLAIN_RUNNERS; i++) {
        u32 k = i;                  // (5.10's verifier must see the bound: explain_walk)
        asm volatile("" : "+r"(k));
        if (k + 1 >= head)
            break;                  // the switch before it is not known
        struct runner *r = &c->ran[(head - 1 - k) & (EXPLAIN_RUNNERS - 1)];
        u64 from = c->ran[(head - 2 - k) & (EXPLAIN_RUNNERS - 1)].until;
        u64 until = r->until;
        if (until <= since)
            break;
        if (from < since)
            from = since;
        if (until - from > c->best.until) {
            c->best.until = until - from;
            c->best.task = r->task;
            c->best.tid = r->tid;
        }
        if (from == since)
            break;                  // it ran when the wait began: none before counts
    }
    *task = c->best.task;
    return c->best.tid;
}
"""

EXPLAIN_C = r"""
#if EXPLAIN
/*EXPLAIN_WALK*/

// At each stage: is the segment it ends the packet's longest so far of at least
// EXPLAIN_MIN_NS? Then remember it, with the thread that ended it (the explanation is
// made when the packet completes, from that thread's events, which outlive the
// segment by up to EXPLAIN_RING switches)
static __always_inline void explain_mark(struct pkt *p, u32 stage, u64 now)
{
    u32 last = p->last;
    asm volatile("" : "+r"(last));      // one index, checked alone (see stamp())
    if (last >= NSTAGES)
        return;
    u64 start = p->ts[last];
    if (!start || now < start + EXPLAIN_MIN_NS || now - start <= p->wait_end - p->wait_start)
        return;
    p->wait_start = start;
    p->wait_end = now;
    p->wait_from = last;
    p->wait_to = stage;
    p->wait_tid = bpf_get_current_pid_tgid();
    // in an interrupt or softirq that cut into a followed thread (a qdisc's dequeue on
    // a timer, say), the work is not that thread's: it is not what ended the segment
    u32 zero = 0;
    struct oncpu *c = oncpu.lookup(&zero);
    p->wait_flags = c && c->depth ? XF_IN_IRQ : 0;
}

// The explanation of the packet's longest segment; NULL when none was long enough
static __always_inline struct explain *explain_packet(struct pkt *p)
{
    u64 a = p->wait_start, b = p->wait_end;
    if (!b)
        return 0;
    u32 zero = 0;
    struct xevent *xe = xscratch.lookup(&zero);
    if (!xe)
        return 0;
    struct explain *x = &xe->x;
    __builtin_memset(x, 0, sizeof(*x));
    x->x_from = p->wait_from;
    x->x_to = p->wait_to;
    u32 tid = p->wait_tid;
    x->x_tid = tid;
    if (p->wait_flags & XF_IN_IRQ) {
        x->x_flags = XF_IN_IRQ;
        x->x_ns[CAUSE_UNKNOWN] = b - a;
        return x;
    }
    struct thist *h = threads.lookup(&tid);
    if (!h) {
        x->x_ns[CAUSE_UNKNOWN] = b - a;        // not a followed thread
        return x;
    }
    explain_walk(h, a, b, x);
    if (x->x_ns[CAUSE_RUN_QUEUE]) {
        x->x_behind = h->behind;
        __builtin_memcpy(x->x_behind_comm, h->behind_comm, sizeof(x->x_behind_comm));
    }
    return x;
}

#if HISTOGRAM
// The ns of each cause, added up for all VMs and, with the per-VM table, for the packet's
// VM (its slots follow the VM's histogram rows: VM_EXPLAIN_BASE + the same index)
static __always_inline void explain_add(struct pkt *p, struct explain *x)
{
    u32 base = ((p->dir * NSTAGES + x->x_from) * NSTAGES + x->x_to) * NCAUSES;
    for (u32 c = 0; c < NCAUSES; c++) {
        u32 idx = base + c;
        u64 ns = x->x_ns[c];
        if (!ns)
            continue;
        u64 *sum = explain_sums.lookup(&idx);
        if (sum)
            __sync_fetch_and_add(sum, ns);
#if PER_VM
        struct vm_hist_key k = {.vm_ifindex = p->vm_ifindex, .peer_ifindex = p->peer_ifindex,
                                .slot = VM_EXPLAIN_BASE + idx};
        u64 zero = 0;
        u64 *vm_sum = vm_hist.lookup_or_try_init(&k, &zero);
        if (vm_sum)
            __sync_fetch_and_add(vm_sum, ns);
        else
            stat_add(STAT_vm_hist_full, p->dir);
#endif
    }
}
#endif
#endif
"""

C_PROGRAM = r"""
#include <uapi/linux/ptrace.h>

/*CONFIG*/

/*RECORD*/

struct fate_key { u32 reason; u8 dir, last, pad[2]; };

// Packets in flight: a direct-mapped table indexed by a hash of the sk_buff address,
// INFLIGHT_WAYS slots per hash, the address kept as the slot's tag. Looking a packet
// up is two array reads the verifier inlines (no hashing, no bucket locks: most
// sk_buffs on a host are not tracked, and one cache line of tags says so); starting
// and ending one are stores. When every slot of its hash is taken, a packet is
// counted as not tracked, never lost silently.
struct ways { u64 skb[INFLIGHT_WAYS]; u32 lock, pad; };
BPF_ARRAY(inflight_tags, struct ways, INFLIGHT_GROUPS);
BPF_ARRAY(inflight, struct pkt, INFLIGHT_GROUPS * INFLIGHT_WAYS);
BPF_PERCPU_ARRAY(scratch, struct pkt, 1);
// Role of each device by ifindex: an array (no hashing) for the usual small ifindex
BPF_ARRAY(devroles, u8, DEVROLE_SLOTS);
BPF_HASH(devroles_big, u32, u8, 1024);
BPF_ARRAY(hostnet, u64, 1);
BPF_PERCPU_ARRAY(stats, u64, NSTATS);
BPF_HASH(fates, struct fate_key, u64, 4096);
#if TRACE_UPCALLS
// Packets ovs-vswitchd is handling (a datapath miss): it sends back a new sk_buff,
// recognised by its headers and IP id.
struct upcall_key { u8 saddr[16], daddr[16]; u16 sport, dport, ip_id; u8 proto, pad; };
BPF_HASH(upcalls, struct upcall_key, struct pkt, 4096);
BPF_ARRAY(upcall_pending, s64, 1);
#endif
#if HISTOGRAM
// Cumulative counts per direction, segment and bucket, added to atomically; user
// space reads the whole array each interval and reports what changed.
BPF_ARRAY(hist, u64, HIST_SLOTS);
#endif
#if PER_VM
// --per-vm: the same counts per tap (the VM's; VM-to-VM: per sender and receiver), only
// for the buckets that are used
struct vm_hist_key { u32 vm_ifindex; u32 peer_ifindex; u32 slot; };
BPF_HASH(vm_hist, struct vm_hist_key, u64, VM_HIST_ENTRIES);
#endif
#if VHOST_KICK
// vhost-net's kicks: when each work was queued (its first queueing since the worker last
// took it; a work the tool does not follow, an RX one, ages out of the LRU), the kick
// each worker thread hands to the first frame it sends, and the worker threads (whose
// own queueing, past their weight, is no kick)
BPF_TABLE("lru_hash", u64, u64, vhost_kicks, 4096);
BPF_HASH(vhost_sending, u32, u64, 4096);
BPF_TABLE("lru_hash", u32, u8, vhost_workers, 4096);
#endif
#if VHOST_SIGNAL
// vhost-net's RX workers: in an RX pass or not, handing a batch to the guest or not,
// when that batch's signal went (0: none yet), and the frames read and not yet handed
// over, held in the in-flight table under keys of their own (vhost_held_key) from
// sequence number head to tail
struct vhost_rx { u32 in_rx; u32 in_batch; u64 signalled; u32 head; u32 tail; };
BPF_TABLE("lru_hash", u32, struct vhost_rx, vhost_rxs, 4096);
// the drain of the held frames, which runs itself again for the next ones (a tail call)
BPF_PROG_ARRAY(vhost_drain_prog, 1);
#endif
#if USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(emitted, u64, 1);      // events this CPU put in the ring (wake-ups)
#else
BPF_PERF_OUTPUT(events);
#endif
#if EXPLAIN
/*EXPLAIN_TYPES*/
// An event: the record and what explains its longest segment
struct xevent { struct pkt p; struct explain x; };
BPF_PERCPU_ARRAY(xscratch, struct xevent, 1);
// The followed threads (the VMs' QEMU threads and vhost workers, ksoftirqd: user space
// fills the table), each with its last scheduling events
BPF_HASH(threads, u32, struct thist, EXPLAIN_THREADS);
// per CPU: the followed thread on it, its interrupts, the CPU's last switches
BPF_PERCPU_ARRAY(oncpu, struct oncpu, 1);
#if HISTOGRAM
// ns of the explained segments by direction, first and last stage, and cause
BPF_ARRAY(explain_sums, u64, NDIRS * NSTAGES * NSTAGES * NCAUSES);
#endif
#endif

static __always_inline void stat_add(u32 stat, u32 dir)
{
    u32 idx = stat * NDIRS + dir;
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

// (a packet counted in one direction moves to another: the per-CPU sum stays exact)
static __always_inline void stat_sub(u32 stat, u32 dir)
{
    u32 idx = stat * NDIRS + dir;
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)--;
}

static __always_inline struct ways *ways_of(u64 key, u32 *group)
{
    // sk_buffs come from slab caches: multiplying spreads the address's varying bits
    *group = (u32)((key * 0x9E3779B97F4A7C15ULL) >> 32) % INFLIGHT_GROUPS;
    return inflight_tags.lookup(group);
}

static __always_inline struct pkt *slot_record(u32 group, u32 way)
{
    u32 idx = group * INFLIGHT_WAYS + way;
    return inflight.lookup(&idx);
}

// The packet record of this sk_buff, if it is being tracked.
static __always_inline struct pkt *tracked(u64 key)
{
    u32 group;
    struct ways *w = ways_of(key, &group);
    if (!w)
        return 0;
    #pragma unroll
    for (u32 i = 0; i < INFLIGHT_WAYS; i++) {
        if (w->skb[i] == key)
            return slot_record(group, i);
    }
    return 0;
}

// Start tracking (p is copied): 0 on success, -ERR_EEXIST if this sk_buff still had
// a record (its packet vanished unseen; replaced), -1 if every slot is taken. A CPU
// holds a hash's lock only while it fills a slot; another one starting a packet of
// the same hash at that moment does not wait: its packet is not tracked (counted).
static __always_inline int track(u64 key, struct pkt *p)
{
    u32 group;
    struct ways *w = ways_of(key, &group);
    if (!w)
        return -1;
    int ret = -1;
    __sync_fetch_and_add(&w->lock, 1);
    if (*(volatile u32 *)&w->lock == 1) {
        int way = -1;
        #pragma unroll
        for (int i = 0; i < INFLIGHT_WAYS; i++) {
            if (way < 0 && w->skb[i] == key) {
                way = i;
                ret = -ERR_EEXIST;
            }
        }
        #pragma unroll
        for (int i = 0; i < INFLIGHT_WAYS; i++) {
            if (way < 0 && !w->skb[i]) {
                way = i;
                ret = 0;
            }
        }
        struct pkt *rec = way >= 0 ? slot_record(group, way) : 0;
        if (rec) {
            __builtin_memcpy(rec, p, sizeof(*rec));
            w->skb[way & (INFLIGHT_WAYS - 1)] = key;  // the tag last: then it is whole
        } else {
            ret = -1;
        }
    }
    __sync_fetch_and_add(&w->lock, -1);
    return ret;
}

static __always_inline void untrack(u64 key)
{
    u32 group;
    struct ways *w = ways_of(key, &group);
    if (!w)
        return;
    #pragma unroll
    for (int i = 0; i < INFLIGHT_WAYS; i++) {
        if (w->skb[i] == key)
            w->skb[i] = 0;
    }
}

/*READERS*/

// typed: the skb is a BTF tracepoint's argument, whose fields are plain loads (the
// kernel catches a fault); otherwise its address is a number, read through the helper.
// The flag is a constant in each program: the compiler keeps one of the two.
static __always_inline void *skb_dev(void *skb, const int typed)
{
    void *dev = 0;
    if (typed)
        dev = *(void **)((u8 *)skb + SKB_DEV);
    else
        bpf_probe_read_kernel(&dev, sizeof(dev), (u8 *)skb + SKB_DEV);
    return dev;
}

// The sk_buff's address, the key of its record. A BTF tracepoint's argument is a typed
// pointer, on which the verifier allows no arithmetic (the key is hashed): its value
// is read from the argument as a number. (Stored in a per-CPU map slot and loaded back
// it is a number too, 5 ns cheaper here; but a program that an interrupt runs on the
// same CPU between the store and the load, netconsole's transmit say, would change it,
// and a check of the number against the pointer lets the compiler use the pointer.)
static __always_inline u64 skb_key(void *ctx, void *skb, const int btf_arg)
{
    if (btf_arg < 0)
        return (u64)skb;
    u64 key = 0;
    bpf_probe_read_kernel(&key, sizeof(key), (u64 *)ctx + btf_arg);
    return key;
}

// Our devices are the host's: a namespace's device with the same ifindex is not.
static __always_inline int in_host_netns(u64 net)
{
#if CHECK_NETNS
    u32 zero = 0;
    u64 *host = hostnet.lookup(&zero);
    if (!host)
        return 0;
    if (*host != net) {
        if (*host)
            return 0;
        u32 inum = 0;   // first match: learn the host's struct net by its inode number
        bpf_probe_read_kernel(&inum, sizeof(inum), (u8 *)net + NET_NS_INUM);
        if (inum != HOST_NETNS_INUM)
            return 0;
        *host = net;
    }
#endif
    return 1;
}

// A device's role by its ifindex, 0 for none. Two call sites on purpose: a lookup
// whose map is chosen at run time is a helper call, one of an array alone the
// verifier inlines into a bounds check and a load.
static __always_inline u32 role_of(u32 idx)
{
    if (idx < DEVROLE_SLOTS) {
        u8 *role = devroles.lookup(&idx);
        return role ? *role : 0;
    }
    u32 big = idx;
    u8 *role = devroles_big.lookup(&big);
    return role ? *role : 0;
}

// Is this device one of ours (0: no)? By ifindex, and in the host's namespace: its
// ifindex and namespace are read together (one probe read where they are close, as
// in 6.x kernels).
static __always_inline u32 dev_role(void *dev, const int typed, u32 *ifindex)
{
    if (!dev)
        return 0;
    u32 idx = 0;
    u64 net = 0;
    read_dev(dev, typed, &idx, &net);
    u32 role = role_of(idx);
    if (!role || !in_host_netns(net))
        return 0;
    *ifindex = idx;
    return role;
}

static __always_inline u32 be16(const u8 *p) { return ((u32)p[0] << 8) | p[1]; }
static __always_inline u32 be32(const u8 *p)
{
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

// The L4 header (8 bytes in l4) of a packet whose protocol is p->proto: ports, or an
// ICMP/ICMPv6 echo's id and sequence; then the port filters. 0: not ours.
static __always_inline int parse_l4(const u8 *l4, struct pkt *p)
{
    // values first, then choose: lets clang select values, never pointers
    u32 w0 = be16(l4), w1 = be16(l4 + 2), w2 = be16(l4 + 4), w3 = be16(l4 + 6);
    u8 icmp = p->proto == PROTO_ICMP || p->proto == PROTO_ICMP6;
    if (icmp) {
        p->icmp_type = l4[0];
        if (IS_ICMP_ECHO(p->proto, l4[0])) {        // they carry an id and a sequence
            p->sport = w2;
            p->dport = w3;
        }
    } else {
        p->sport = w0;
        p->dport = w1;
        if (p->proto == PROTO_TCP)
            p->tcp_seq = (w2 << 16) | w3;
    }
#if FILTER_SPORT
    if (icmp || p->sport != FILTER_SPORT)
        return 0;
#endif
#if FILTER_DPORT
    if (icmp || p->dport != FILTER_DPORT)
        return 0;
#endif
    return 1;
}

static __always_inline int wanted_proto(u8 proto, u8 version)
{
#if FILTER_PROTO
    // tcp and udp match both families; icmp is ICMPv4 only, icmp6 ICMPv6 only
    return proto == FILTER_PROTO;
#else
    return proto == PROTO_TCP || proto == PROTO_UDP ||
           (version == 4 ? proto == PROTO_ICMP : proto == PROTO_ICMP6);
#endif
}

// IPv4 header at constant offset L3 of the frame bytes in b. Returns 0 for
// anything that is not a well-formed, filter-matching TCP/UDP/ICMP packet.
static __always_inline int parse_ipv4(const u8 *b, const int L3, const u8 *head,
                                      u32 mac, u32 len, u32 headlen, struct pkt *p)
{
#if FILTER_FAMILY == 6
    return 0;
#endif
    u32 vihl = b[L3];
    if ((vihl >> 4) != 4 || (vihl & 15) < 5)
        return 0;
    u32 ihl = (vihl & 15) * 4;
    u32 tot = be16(b + L3 + 2);
    // the packet must fit in the frame, its headers in the frame's linear data
    // (payload often sits in page fragments: data_len > 0 is normal)
    if (tot < ihl + 8 || (L3 - 14) + tot > len || (L3 - 14) + ihl + 8 > headlen)
        return 0;
    if (be16(b + L3 + 6) & 0x1fff)
        return 0;           // a non-first fragment has no L4 header
    p->proto = b[L3 + 9];
    if (!wanted_proto(p->proto, 4))
        return 0;
#if FILTER_SADDR4
    u32 sa;
    __builtin_memcpy(&sa, b + L3 + 12, 4);
    if (sa != FILTER_SADDR4)
        return 0;
#endif
#if FILTER_DADDR4
    u32 da;
    __builtin_memcpy(&da, b + L3 + 16, 4);
    if (da != FILTER_DADDR4)
        return 0;
#endif
    p->ip_version = 4;
    p->ip_id = be16(b + L3 + 4);
    __builtin_memcpy(p->saddr, b + L3 + 12, 4);
    __builtin_memcpy(p->daddr, b + L3 + 16, 4);
    u8 l4[8] = {};
    if (ihl == 20) {
        __builtin_memcpy(l4, b + L3 + 20, 8);
    } else {
        bpf_probe_read_kernel(l4, 8, head + mac + L3 + ihl);
    }
    return parse_l4(l4, p);
}

#if FILTER_SADDR6 || FILTER_DADDR6
static __always_inline int addr6_is(const u8 *a, u64 hi, u64 lo)
{
    u64 h, l;
    __builtin_memcpy(&h, a, 8);
    __builtin_memcpy(&l, a + 8, 8);
    return h == hi && l == lo;
}
#endif

// IPv6 header at constant offset L3 of the frame bytes in b: up to four extension
// headers (hop-by-hop, routing, destination options, fragment) are skipped; a
// non-first fragment is not traced (no L4 header), as for IPv4.
static __always_inline int parse_ipv6(const u8 *b, const int L3, const u8 *head,
                                      u32 mac, u32 len, u32 headlen, struct pkt *p)
{
#if FILTER_FAMILY == 4
    return 0;
#endif
    if ((b[L3] >> 4) != 6 || (L3 - 14) + 40 + be16(b + L3 + 4) > len)
        return 0;
#if FILTER_SADDR6
    if (!addr6_is(b + L3 + 8, FILTER_SADDR6_HI, FILTER_SADDR6_LO))
        return 0;
#endif
#if FILTER_DADDR6
    if (!addr6_is(b + L3 + 24, FILTER_DADDR6_HI, FILTER_DADDR6_LO))
        return 0;
#endif
    u8 nh = b[L3 + 6];
    u32 off = L3 + 40;          // from the MAC header
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        if (nh != 0 && nh != 43 && nh != 60 && nh != 44)
            break;
        u8 ext[8] = {};
        if ((off - 14) + 8 > headlen || bpf_probe_read_kernel(ext, 8, head + mac + off))
            return 0;
        if (nh == 44 && (be16(ext + 2) & 0xfff8))
            return 0;           // a non-first fragment
        off += nh == 44 ? 8 : ((u32)ext[1] + 1) * 8;
        nh = ext[0];
    }
    p->proto = nh;
    if (!wanted_proto(nh, 6) || (off - 14) + 8 > headlen)
        return 0;
    p->ip_version = 6;
    __builtin_memcpy(p->saddr, b + L3 + 8, 16);
    __builtin_memcpy(p->daddr, b + L3 + 24, 16);
    u8 l4[8] = {};
    if (bpf_probe_read_kernel(l4, 8, head + mac + off))
        return 0;
    return parse_l4(l4, p);
}

static __always_inline int parse_l3(u32 eth, const u8 *b, const int L3, const u8 *head,
                                    u32 mac, u32 len, u32 headlen, struct pkt *p)
{
    if (eth == 0x0800)
        return parse_ipv4(b, L3, head, mac, len, headlen, p);
    if (eth == 0x86dd)
        return parse_ipv6(b, L3, head, mac, len, headlen, p);
    return 0;
}

static __always_inline u32 be24(const u8 *p)
{
    return ((u32)p[0] << 16) | ((u32)p[1] << 8) | p[2];
}

#if TUNNELS
// An overlay's outer headers, at the MAC header (b: its first 64 bytes): IPv4 or IPv6,
// UDP to a VXLAN or Geneve port, and that header. Fills p's tunnel fields and returns
// the offset of the inner Ethernet frame from the MAC header; 0: not a tunnel packet.
static __always_inline u32 tunnel_header(const u8 *b, const u8 *head, u32 mac,
                                         u32 headlen, struct pkt *p)
{
    u32 eth = be16(b + 12), l4;
    u8 t[16] = {};                  // UDP header, then the tunnel header
    if (eth == 0x0800 && b[14] == 0x45 && b[23] == PROTO_UDP) {
        l4 = 34;
        __builtin_memcpy(t, b + 34, 16);
        p->outer_version = 4;
        __builtin_memcpy(p->outer_saddr, b + 26, 4);
        __builtin_memcpy(p->outer_daddr, b + 30, 4);
    } else if (eth == 0x86dd && (b[14] >> 4) == 6 && b[20] == PROTO_UDP) {
        l4 = 54;
        if (bpf_probe_read_kernel(t, 16, head + mac + 54))
            return 0;
        p->outer_version = 6;
        __builtin_memcpy(p->outer_saddr, b + 22, 16);
        __builtin_memcpy(p->outer_daddr, b + 38, 16);
    } else {
        return 0;
    }
    u32 dport = be16(t + 2), inner;
    if (IS_VXLAN_PORT(dport) && (t[8] & 0x08)) {              // the VNI-valid flag
        p->tunnel = TUNNEL_VXLAN;
        inner = l4 + 16;
    } else if (IS_GENEVE_PORT(dport) && be16(t + 10) == 0x6558) {   // Ethernet inside
        p->tunnel = TUNNEL_GENEVE;
        inner = l4 + 16 + (t[8] & 0x3f) * 4;                  // and its options
    } else {
        p->outer_version = 0;
        return 0;
    }
    p->vni = be24(t + 12);
    // the inner Ethernet header must be in the linear data (skb->data: mac + 14)
    if ((inner - 14) + 14 > headlen)
        return 0;
    return inner;
}
#endif

// Read the frame from its MAC header and fill p. Up to two VLAN tags in the frame.
// outer: an RX frame from the physical side, which may be an overlay's: then the
// inner frame (the VM's own packet) is the one parsed and filtered.
static __always_inline int parse_frame(u32 len, u32 data_len, u32 mac, u8 *head,
                                       struct pkt *p, int outer)
{
    if (mac == 0xffff || !head || data_len > len)
        return 0;
    u32 headlen = len - data_len;     // skb->data is past the Ethernet header here
    u8 b[64];       // not zeroed first: the read fills it (with zeros if it faults)
    if (bpf_probe_read_kernel(b, sizeof(b), head + mac))
        return 0;
#if TUNNELS
    if (outer) {
        u32 inner = tunnel_header(b, head, mac, headlen, p);
        if (inner) {
            // the inner frame stands for the frame: its offsets, lengths, bytes
            mac += inner;
            len -= inner;
            headlen -= inner;
            if (bpf_probe_read_kernel(b, sizeof(b), head + mac))
                return 0;
        }
#if FILTER_VNI
        if (!inner || p->vni != FILTER_VNI_VALUE)
            return 0;
#endif
    }
#endif
    u32 eth = be16(b + 12);
    if (eth == 0x0800 || eth == 0x86dd)
        return parse_l3(eth, b, 14, head, mac, len, headlen, p);
    if (eth != 0x8100 && eth != 0x88a8)
        return 0;
    p->vlan = (be16(b + 14) & 0xfff) + 1;
    eth = be16(b + 16);
    if (eth == 0x0800 || eth == 0x86dd)
        return parse_l3(eth, b, 18, head, mac, len, headlen, p);
    if (eth != 0x8100)
        return 0;
    return parse_l3(be16(b + 20), b, 22, head, mac, len, headlen, p);
}

#if EXPLAIN
#define EVENT_T struct xevent
#else
#define EVENT_T struct pkt
#endif

#if EXPLAIN
// An event with --explain: the record, and its explanation (zeros: none). x may be
// the scratch event's own (perf buffer path): copying it onto itself is a no-op.
static __always_inline void fill_xevent(struct xevent *ev, struct pkt *p, void *x)
{
    __builtin_memcpy(&ev->p, p, sizeof(struct pkt));
    if (x)
        __builtin_memcpy(&ev->x, x, sizeof(struct explain));
    else
        __builtin_memset(&ev->x, 0, sizeof(struct explain));
}
#endif

// x: what explains its longest segment (--explain; else, or for a drop, NULL)
static __always_inline void emit(void *ctx, struct pkt *p, void *x)
{
#if USE_RINGBUF
    EVENT_T *ev = events.ringbuf_reserve(sizeof(EVENT_T));
    if (!ev) {
        stat_add(STAT_lost, p->dir);
        return;
    }
#if EXPLAIN
    fill_xevent(ev, p, x);
#else
    __builtin_memcpy(ev, p, sizeof(struct pkt));
#endif
    // Wake the reader at one event in WAKE_EVERY of a CPU, not at each: a wake-up is an
    // interrupt and a cross-CPU kick paid on the packet's own path (under this VM, a
    // second tracer saw 8-25 us added to 30-60% of packets). The reader
    // drains the ring at least every 100 ms besides, so no event waits longer.
    u32 zero = 0;
    u64 *n = emitted.lookup(&zero);
    u64 flags = BPF_RB_NO_WAKEUP;
    if (!n || ++*n % WAKE_EVERY == 0)
        flags = BPF_RB_FORCE_WAKEUP;
    events.ringbuf_submit(ev, flags);
#else
#if EXPLAIN
    u32 zero = 0;
    struct xevent *ev = xscratch.lookup(&zero);
    if (!ev)
        return;
    fill_xevent(ev, p, x);
    if (events.perf_submit(ctx, ev, sizeof(struct xevent)))
        stat_add(STAT_lost, p->dir);
#else
    if (events.perf_submit(ctx, p, sizeof(struct pkt)))
        stat_add(STAT_lost, p->dir);
#endif
#endif
}

#if TRACE_UPCALLS
static __always_inline void upcall_key_of(struct pkt *p, struct upcall_key *k)
{
    __builtin_memcpy(k->saddr, p->saddr, 16);
    __builtin_memcpy(k->daddr, p->daddr, 16);
    k->sport = p->sport;
    k->dport = p->dport;
    k->ip_id = p->ip_id;
    k->proto = p->proto;
}

static __always_inline void upcall_pending_add(s64 n)
{
    u32 zero = 0;
    s64 *v = upcall_pending.lookup(&zero);
    if (v)
        __sync_fetch_and_add(v, n);
}

// The original of an upcalled packet ended: forget the copy (if still waiting).
static __always_inline void upcall_forget(struct pkt *p)
{
    struct upcall_key k = {};
    upcall_key_of(p, &k);
    if (upcalls.delete(&k) == 0)
        upcall_pending_add(-1);
}
#endif

#if HISTOGRAM
/*HIST_ADD*/

#if PER_VM
static __always_inline void hist_add_vm(u32 vm_ifindex, u32 peer_ifindex, u32 dir, u32 seg,
                                        u64 ns)
{
    struct vm_hist_key k = {.vm_ifindex = vm_ifindex, .peer_ifindex = peer_ifindex,
                            .slot = seg * VM_HIST_ROW + hist_bucket(ns)};
    u64 zero = 0;
    u64 *count = vm_hist.lookup_or_try_init(&k, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        stat_add(STAT_vm_hist_full, dir);
#if HIST_SUMS
    // Prometheus histograms carry the sum of what they count: one more counter
    k.slot = seg * VM_HIST_ROW + HIST_BUCKETS;
    u64 *sum = vm_hist.lookup_or_try_init(&k, &zero);
    if (sum)
        __sync_fetch_and_add(sum, ns);
#endif
}
#define HIST_ADD(p, seg, ns) hist_add_vm((p)->vm_ifindex, (p)->peer_ifindex, (p)->dir, seg, ns)
#else
#define HIST_ADD(p, seg, ns) hist_add(seg, ns)
#endif

/*SEGMENTS*/
#endif

// What happened to a packet that leaves the path: counted (the summary's fates, by reason,
// direction and last stage) unless it was never counted in (PF_PENDING), and forgotten.
static __always_inline void count_fate(struct pkt *p, u32 reason)
{
    stat_add(reason == FATE_LEFT ? STAT_left_path : STAT_dropped, p->dir);
    struct fate_key fk = {.reason = reason, .dir = p->dir, .last = p->last};
    // lookup_or_try_init + an atomic add, not fates.atomic_increment(): that one
    // arrived in BCC 0.21, and Ubuntu 22.04 and Debian 11 ship BCC 0.18
    u64 zero64 = 0;
    u64 *count = fates.lookup_or_try_init(&fk, &zero64);
    if (count)
        __sync_fetch_and_add(count, 1);
}

static __always_inline void leave(struct pkt *p, u64 key)
{
    if (!(p->pflags & PF_PENDING))
        count_fate(p, FATE_LEFT);
    untrack(key);
}

/*EXPLAIN*/

static __always_inline void complete(void *ctx, u64 key, struct pkt *p, u64 now)
{
    if (p->pflags & PF_PENDING) {   // never counted in: not one of the wanted packets
        untrack(key);
        return;
    }
    u64 total = now - FIRST_TS(p);
    stat_add(STAT_completed, p->dir);
#if TRACE_UPCALLS
    if (p->upcalled)        // a userspace action took a copy; this one went on
        upcall_forget(p);
#endif
    if (total < THRESHOLD_NS) {
        stat_add(STAT_below_threshold, p->dir);
    } else {
#if EXPLAIN
        struct explain *x = explain_packet(p);
#else
        void *x = 0;
#endif
#if HISTOGRAM
        hist_packet(p);
#if EXPLAIN
        if (x)
            explain_add(p, x);
#endif
#else
        p->type = EV_PACKET;
        emit(ctx, p, x);
#endif
    }
    untrack(key);
}

static __always_inline void stamp(struct pkt *p, u32 stage, u64 now)
{
    // never true; but where clang knows which of two constants a stage is, it may keep
    // one it knows cannot reach here, and the verifier does not know: hide the value
    asm volatile("" : "+r"(stage));
    if (stage >= NSTAGES)
        return;
    if (!p->ts[stage]) {
#if EXPLAIN
        explain_mark(p, stage, now);
#endif
        p->ts[stage] = now;
        p->seen |= 1 << stage;
        p->last = stage;
    }
}

// A TX packet reaches another VM's device (a tap's queue, a macvtap's ring or read): it
// is VM-to-VM from here on. It counts if one of the two VMs is a selected one and
// VM-to-VM is wanted, else it leaves the path here. 1: it goes on.
static __always_inline int to_vm(struct pkt *p, u64 key, u32 role, u32 ifindex)
{
    if (((role & ROLE_PEER) && (p->pflags & PF_PEER)) || !WANT_VM2VM) {
        leave(p, key);
        return 0;
    }
    if (p->pflags & PF_PENDING)
        p->pflags &= ~PF_PENDING;
    else
        stat_sub(STAT_started, DIR_TX);     // counted in as TX: it was not
    stat_add(STAT_started, DIR_VM2VM);
    p->dir = DIR_VM2VM;
    p->peer_ifindex = ifindex;
    return 1;
}

// --- one handler per kind of stage; the attach wrappers below only pass the skb ---

#if VHOST_KICK
// A vhost work queued for its worker: from a guest's kick (KVM's ioeventfd, in a vCPU
// thread), or the socket's wake-up. Its first queueing's time stands until the worker
// takes it (the kernel queues a work once; later kicks find it queued).
static __always_inline int on_vhost_queue(void *work)
{
    u32 tid = bpf_get_current_pid_tgid();
    if (vhost_workers.lookup(&tid))
        return 0;       // the worker requeueing itself (its weight spent): no kick
    u64 key = (u64)work, now = bpf_ktime_get_ns();
    vhost_kicks.insert(&key, &now);
    return 0;
}

// This thread is a vhost worker (it runs a TX work): its own queueings are no kicks
static __always_inline u32 vhost_worker_seen(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    if (!vhost_workers.lookup(&tid)) {
        u8 one = 1;
        vhost_workers.update(&tid, &one);
    }
    return tid;
}

// The worker takes the TX ring's work (handle_tx_kick): the kick goes to the first
// frame it sends, the only one sure to have been in the ring when the guest kicked
static __always_inline int on_vhost_tx_kick(void *work)
{
    u32 tid = vhost_worker_seen();
    u64 key = (u64)work;
    u64 *kick = vhost_kicks.lookup(&key);
    if (kick) {
        u64 when = *kick;
        vhost_sending.update(&tid, &when);
        vhost_kicks.delete(&key);
    } else {
        vhost_sending.delete(&tid);     // queued before the tool started: unknown
    }
    return 0;
}

// The worker sends because its socket has room again (handle_tx_net): not for a kick
static __always_inline int on_vhost_tx_net(void *work)
{
    u32 tid = vhost_worker_seen();
    vhost_sending.delete(&tid);
    return 0;
}

// The kick this thread's next frame gets (once), 0 if none: a TX frame from a tap
static __always_inline u64 vhost_kick_taken(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    u64 *kick = vhost_sending.lookup(&tid);
    if (!kick)
        return 0;
    u64 when = *kick;
    vhost_sending.delete(&tid);
    return when;
}
#endif

#if VHOST_SIGNAL
// The frames a worker holds: as many as VHOST_DRAIN_EACH completions in one program
// run, times the runs a chain of tail calls allows (33: MAX_TAIL_CALL_CNT is 32 or 33),
// can hand over at once: a batch, 65 buffers at most (the worker hands over past 64),
// a frame one buffer or more. (Each completion is compiled in whole: 2 keep the
// drain's compilation short.)
#define VHOST_DRAIN_EACH 2
#define VHOST_DRAIN_RUNS 33
#define VHOST_HELD_MAX (VHOST_DRAIN_EACH * VHOST_DRAIN_RUNS)

// A held frame's key: the worker's tid and the frame's number; never a kernel address
// (an sk_buff's key), which has its top bits set
static __always_inline u64 vhost_held_key(u32 tid, u32 seq)
{
    return (u64)tid << 32 | seq;
}

// The worker starts an RX pass (handle_rx_kick: the guest gave it buffers;
// handle_rx_net: the tap has frames)
static __always_inline int on_vhost_rx_pass(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (!w) {
        struct vhost_rx fresh = {};
        vhost_rxs.update(&tid, &fresh);
        w = vhost_rxs.lookup(&tid);
        if (!w)
            return 0;
    }
    w->in_rx = 1;
    w->in_batch = 0;
    return 0;
}

// A frame the worker read in its RX pass waits for its batch to be handed to the guest:
// its record moves to a key of its own (the sk_buff is freed once read). 1 if held.
static __always_inline int vhost_hold(u64 key, struct pkt *p)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (!w || !w->in_rx || (p->pflags & PF_PENDING) || w->tail - w->head >= VHOST_HELD_MAX)
        return 0;
    u32 seq = w->tail;
    if (track(vhost_held_key(tid, seq), p) != 0)
        return 0;
    w->tail = seq + 1;
    untrack(key);
    return 1;
}

// The worker hands a batch to the guest (vhost_add_used_and_signal_n): the buffers it
// filled go into the used ring, then the guest is signalled unless it asked not to be
static __always_inline int on_vhost_batch(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (w && w->in_rx) {
        w->in_batch = 1;
        w->signalled = 0;
    }
    return 0;
}

// The guest's call eventfd signalled (KVM's irqfd injects the interrupt), by a worker
// handing over its RX batch; any other eventfd's costs one lookup
static __always_inline int on_vhost_signal(void)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (w && w->in_batch && !w->signalled)
        w->signalled = bpf_ktime_get_ns();
    return 0;
}

// Complete the held frames: each gets the batch's signal, if there was one, else it
// ends at its read (the guest was polling, or the frame was discarded). A program can
// only complete a few (each completion is the whole of complete()): it runs again for
// the next few, through the tail call, until none is left.
int vhost_drain(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (!w)
        return 0;
    u64 signalled = w->signalled;
    #pragma unroll
    for (int i = 0; i < VHOST_DRAIN_EACH; i++) {
        u32 seq = w->head;
        if (seq == w->tail)
            return 0;
        w->head = seq + 1;
        u64 key = vhost_held_key(tid, seq);
        struct pkt *p = tracked(key);
        if (!p)
            continue;
        u32 last = p->last;
        asm volatile("" : "+r"(last));
        if (last >= NSTAGES)
            continue;
        u64 end = p->ts[last];
        if (signalled > end) {
            stamp(p, STAGE_VHOST_SIGNAL, signalled);
            end = signalled;
        }
        complete(ctx, key, p, end);
    }
    if (w->head != w->tail)
        vhost_drain_prog.call(ctx, 0);
    return 0;
}

// The batch is the guest's: its frames complete
static __always_inline int on_vhost_batch_done(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (!w || !w->in_batch)
        return 0;
    w->in_batch = 0;
    if (w->head != w->tail)
        vhost_drain_prog.call(ctx, 0);
    return 0;
}

// The RX pass ends: frames read and never handed over (discarded: longer than the
// guest's buffers) end at their read
static __always_inline int on_vhost_rx_pass_done(struct pt_regs *ctx)
{
    u32 tid = bpf_get_current_pid_tgid();
    struct vhost_rx *w = vhost_rxs.lookup(&tid);
    if (!w)
        return 0;
    w->in_rx = w->in_batch = 0;
    w->signalled = 0;
    if (w->head != w->tail)
        vhost_drain_prog.call(ctx, 0);
    return 0;
}
#endif

// A packet enters the path at a VM's device (TX) or a physical one (RX): parse it,
// filter it, start its record. A TX packet of a VM not selected (a peer), or one
// while only VM-to-VM is wanted, is followed but not counted in (PF_PENDING) until it
// turns out to go to a selected VM.
static __always_inline void start_packet(void *ctx, void *skb, const int btf_arg,
                                         void *dev, u32 role, u32 ifindex, u8 dir,
                                         u32 stage)
{
    const int typed = btf_arg >= 0;
#if VHOST_KICK
    // a vhost worker's first frame after a kick takes it, whether it is followed or not
    u64 kick = dir == DIR_TX ? vhost_kick_taken() : 0;
#endif
#if SAMPLE > 1
    // --sample: one packet in SAMPLE, at random (no flow is favoured), before parsing
    if (bpf_get_prandom_u32() % SAMPLE)
        return;
#endif
    // then where its frame is, the sk_buff's fields in one go
    u32 len = 0, data_len = 0;
    u16 mac = 0;
    u8 *head = 0;
    read_skb(skb, typed, &dev, &len, &data_len, &mac, &head);
    u32 zero = 0;
    struct pkt *p = scratch.lookup(&zero);
    if (!p)
        return;
    __builtin_memset(p, 0, sizeof(*p));
    if (!parse_frame(len, data_len, mac, head, p, dir == DIR_RX))
        return;
    u64 now = bpf_ktime_get_ns();
    p->dir = dir;
#if VHOST_KICK
    if (kick && kick < now) {
        p->ts[STAGE_VHOST_KICK] = kick;
        p->seen = 1 << STAGE_VHOST_KICK;
        p->last = STAGE_VHOST_KICK;
#if EXPLAIN
        explain_mark(p, stage, now);
#endif
    }
#endif
    p->ts[stage] = now;
    p->seen |= 1 << stage;
    p->last = stage;
    p->dev = (u64)dev;
    p->dev_role = role;
    if (dir == DIR_TX) {
        p->vm_ifindex = ifindex;
        u64 id = bpf_get_current_pid_tgid();      // the VM's writer: QEMU or vhost
        p->pid = id >> 32;
        p->tid = id;
        if (role & ROLE_PEER)
            p->pflags = PF_PENDING | PF_PEER;
        else if (!WANT_TX)
            p->pflags = PF_PENDING;
    } else {
        p->phy_ifindex = ifindex;
    }
    u64 key = skb_key(ctx, skb, btf_arg);     // only now: filtered packets need none
    int err = track(key, p);
    if (err == -ERR_EEXIST) {   // the packet that had this sk_buff vanished untraced
        stat_add(STAT_vanished, dir);
        err = 0;
    }
    if (p->pflags & PF_PENDING)
        return;
    stat_add(err ? STAT_not_tracked : STAT_started, dir);
}

// netif_receive_skb: a frame from a tap starts TX, one from a physical NIC starts RX.
static __always_inline int on_receive(void *ctx, void *skb, const int btf_arg, int vm_stage,
                                      int phy_stage, int tun_stage, int mvt_stage)
{
    // the device first: most frames a host receives are not ours, and for those it is
    // all a raw program reads (8 bytes, not the sk_buff's fields in one 184-byte read)
    const int typed = btf_arg >= 0;
    void *dev = skb_dev(skb, typed);
    u32 ifindex = 0;
    u32 role = dev_role(dev, typed, &ifindex);
    if (!role)
        return 0;
#if TUNNELS
    if (IS_TUN(role) && tun_stage >= 0) {
        // decap: the tunnel device receives the inner frame, in the same sk_buff
        u64 key = skb_key(ctx, skb, btf_arg);
        struct pkt *t = tracked(key);
        if (t && t->dir == DIR_RX && t->tunnel) {
            stamp(t, tun_stage, bpf_ktime_get_ns());
            t->tun_ifindex = ifindex;
        }
        return 0;
    }
#endif
#if MACVTAPS
    if ((role == ROLE_PHY_MVT || role == ROLE_MVT_LOWER) && phy_stage >= 0) {
        // a bridge-mode macvtap's frame to another macvtap of the same device comes
        // back through it (dev_forward_skb): the same sk_buff, a VM's TX packet
        u64 key = skb_key(ctx, skb, btf_arg);
        struct pkt *t = tracked(key);
        if (t && t->dir == DIR_TX && t->ts[STAGE_MVT_QUEUE])
            stamp(t, phy_stage, bpf_ktime_get_ns());
        if (t || role == ROLE_MVT_LOWER)
            return 0;       // (a VLAN's or bond's receive: not where RX starts)
    }
#endif
    if (ROLE_KIND(role) == ROLE_VM && vm_stage >= 0)
        start_packet(ctx, skb, btf_arg, dev, role, ifindex, DIR_TX, vm_stage);
    else if (IS_PHY(role) && phy_stage >= 0 && WANT_RX)
        start_packet(ctx, skb, btf_arg, dev, role, ifindex, DIR_RX, phy_stage);
    return 0;
}

// A device stage: the tap's stage counts for RX packets, the NIC's for TX packets.
#if TUNNELS
// A TX packet that went through a tunnel device, at the underlay's first stage: its
// outer headers are in the sk_buff now. 0: filtered out here (--vni).
static __always_inline int learn_outer(void *skb, const int typed, struct pkt *p)
{
    void *dev = 0;
    u32 len = 0, data_len = 0;
    u16 mac = 0;
    u8 *head = 0;
    read_skb(skb, typed, &dev, &len, &data_len, &mac, &head);
    u8 b[64] = {};
    if (mac != 0xffff && head && data_len <= len &&
            bpf_probe_read_kernel(b, sizeof(b), head + mac) == 0) {
        u8 kind = p->tunnel;
        tunnel_header(b, head, mac, len - data_len, p);
        p->tunnel = kind;       // what the device is, even if its header is odd
    }
#if FILTER_VNI
    if (!p->tunnel || !p->outer_version || p->vni != FILTER_VNI_VALUE)
        return 0;
#endif
    return 1;
}
#endif

// The VM's backend (QEMU or a vhost worker) read the frame: RX and VM-to-VM end here,
// or, read by a vhost worker, when it hands the frame to the guest
static __always_inline void read_by_vm(void *ctx, u64 key, struct pkt *p, u64 now)
{
    u64 id = bpf_get_current_pid_tgid();
    p->pid = id >> 32;
    p->tid = id;
#if VHOST_SIGNAL
    if (vhost_hold(key, p))
        return;
#endif
    complete(ctx, key, p, now);
}

// The VM's side (a tap, a macvtap) at one of its stages: an RX packet or a VM-to-VM
// one arriving, or the sender's own macvtap passing its TX packet on.
static __always_inline void at_vm_device(void *ctx, u64 key, struct pkt *p, u32 role,
                                         u32 ifindex, u32 stage, u64 now)
{
    if (p->dir == DIR_TX && ifindex == p->vm_ifindex) {
        if (stage == STAGE_MVT_XMIT)
            stamp(p, stage, now);       // the sender's macvtap: its qdisc is done
        return;
    }
    if (stage == STAGE_MVT_QUEUE || stage == STAGE_MVT_XMIT)
        return;                         // another VM's macvtap transmits nothing to it
    if (p->dir == DIR_TX && !to_vm(p, key, role, ifindex))
        return;
    if (p->dir == DIR_RX) {
        if (role & ROLE_PEER) {         // for a VM not selected
            leave(p, key);
            return;
        }
        p->vm_ifindex = ifindex;
    }
    stamp(p, stage, now);
    if (stage == FINAL_RX_VM)
        read_by_vm(ctx, key, p, now);
}

static __always_inline int on_device(void *ctx, void *skb, const int btf_arg, int vm_stage,
                                     int phy_stage, int tun_stage, int mvt_stage)
{
    const int typed = btf_arg >= 0;
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (!p) {
#if MACVTAPS
        // a VM's frame from its macvtap: TX starts at the macvtap's queue
        if (mvt_stage == STAGE_MVT_QUEUE) {
            void *dev = skb_dev(skb, typed);
            u32 ifindex = 0;
            u32 role = dev_role(dev, typed, &ifindex);
            if (ROLE_KIND(role) == ROLE_MVTAP)
                start_packet(ctx, skb, btf_arg, dev, role, ifindex, DIR_TX, mvt_stage);
        }
#endif
        return 0;
    }
    u32 ifindex = 0, role;
    void *dev = skb_dev(skb, typed);
    if ((u64)dev == p->dev) {     // the same device as the last stage: known already
        role = p->dev_role;
        ifindex = IS_VM_SIDE(role) ? (p->dir == DIR_VM2VM ? p->peer_ifindex : p->vm_ifindex)
                  : IS_PHY(role) ? p->phy_ifindex : p->tun_ifindex;
    } else {
        role = dev_role(dev, typed, &ifindex);
        p->dev = (u64)dev;
        p->dev_role = role;
#if TUNNELS
        if (IS_TUN(role))               // seen first at its queue (noqueue), not stamped
            p->tun_ifindex = ifindex;
#endif
    }
    u64 now = bpf_ktime_get_ns();
    int vm_side = ROLE_KIND(role) == ROLE_MVTAP ? mvt_stage : vm_stage;
    if (IS_VM_SIDE(role) && vm_side >= 0) {
        at_vm_device(ctx, key, p, role, ifindex, vm_side, now);
    } else if (IS_PHY(role) && phy_stage >= 0 && p->dir == DIR_TX) {
        if (p->pflags & PF_PENDING) {   // leaving the host: not one of the wanted packets
            untrack(key);
            return 0;
        }
#if TUNNELS
        if (p->tunnel ? !p->outer_version : FILTER_VNI) {
            if (!learn_outer(skb, typed, p)) {         // another tenant's network: not ours
                stat_add(STAT_other_vni, p->dir);
                untrack(key);
                return 0;
            }
        }
#endif
        stamp(p, phy_stage, now);
        p->phy_ifindex = ifindex;
        if (phy_stage == FINAL_TX)
            complete(ctx, key, p, now);
#if TUNNELS
    } else if (IS_TUN(role) && tun_stage >= 0 && p->dir == DIR_TX) {
        stamp(p, tun_stage, now);              // encap: the tunnel device's transmit
        p->tun_ifindex = ifindex;
        p->tunnel = role - ROLE_TUN_VXLAN + TUNNEL_VXLAN;
#endif
    }
    return 0;
}

// The switch: any tracked packet it processes.
static __always_inline int on_switch(void *ctx, void *skb, const int btf_arg, u32 stage)
{
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (p)
        stamp(p, stage, bpf_ktime_get_ns());
    return 0;
}

#if TRACE_UPCALLS
// The datapath has no flow for the packet: it goes to ovs-vswitchd, which sends a
// copy back to be executed. Keep the record under the packet's headers until then.
static __always_inline int on_upcall(void *ctx, void *skb, const int btf_arg, u32 stage)
{
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (!p)
        return 0;
    stamp(p, stage, bpf_ktime_get_ns());
    u32 zero = 0;
    struct pkt *copy = scratch.lookup(&zero);
    if (!copy)
        return 0;
    __builtin_memcpy(copy, p, sizeof(*copy));
    copy->ts[STAGE_OVS_EXECUTE] = 0;   // stamped again when the actions run on the copy
    copy->seen &= ~(1 << STAGE_OVS_EXECUTE);
    struct upcall_key k = {};
    upcall_key_of(p, &k);
    if (upcalls.insert(&k, copy) == 0) {
        p->upcalled = 1;
        upcall_pending_add(1);
    }
    return 0;
}

// Actions run on a packet: stamp a tracked one; an untracked one may be the copy
// ovs-vswitchd sends back after an upcall (looked for only while upcalls wait).
static __always_inline int on_ovs_execute(void *ctx, void *skb, const int btf_arg,
                                          u32 stage)
{
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (p) {
        stamp(p, stage, bpf_ktime_get_ns());
        return 0;
    }
    u32 zero = 0;
    s64 *pending = upcall_pending.lookup(&zero);
    if (!pending || *pending <= 0)
        return 0;
    struct pkt *q = scratch.lookup(&zero);
    if (!q)
        return 0;
    __builtin_memset(q, 0, sizeof(*q));
    void *dev = 0;
    u32 len = 0, data_len = 0;
    u16 mac = 0;
    u8 *head = 0;
    read_skb(skb, btf_arg >= 0, &dev, &len, &data_len, &mac, &head);
    if (!parse_frame(len, data_len, mac, head, q, 0))
        return 0;
    struct upcall_key k = {};
    upcall_key_of(q, &k);
    struct pkt *rec = upcalls.lookup(&k);
    if (!rec)
        return 0;
    rec->upcalled = 0;
    stamp(rec, stage, bpf_ktime_get_ns());
    int err = track(key, rec);
    if (err && err != -ERR_EEXIST && !(rec->pflags & PF_PENDING))
        stat_add(STAT_not_tracked, rec->dir);
    upcalls.delete(&k);
    upcall_pending_add(-1);
    return 0;
}

#endif

// The VM's backend copies the frame out of its tap or macvtap: only for packets put on
// a VM's device, so that a host socket reading a tracked packet is never taken for a
// VM. A macvtap's packet is known by the device it is read from (its ring has no
// tracepoint).
static __always_inline int on_vm_read(void *ctx, void *skb, const int btf_arg, u32 stage)
{
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (!p || p->dir == DIR_TX && !MACVTAPS)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (!ON_TAP(p)) {
#if MACVTAPS
        const int typed = btf_arg >= 0;
        u32 ifindex = 0;
        u32 role = dev_role(skb_dev(skb, typed), typed, &ifindex);
        if (ROLE_KIND(role) != ROLE_MVTAP)
            return 0;
        at_vm_device(ctx, key, p, role, ifindex, stage, now);
#endif
        return 0;
    }
    stamp(p, stage, now);
    read_by_vm(ctx, key, p, now);
    return 0;
}

// The host's own stack takes an RX packet that never went towards a VM.
static __always_inline int on_host_rcv(void *ctx, void *skb, const int btf_arg, u32 stage)
{
    u64 key = skb_key(ctx, skb, btf_arg);
    struct pkt *p = tracked(key);
    if (!p || p->dir != DIR_RX || ON_TAP(p) || p->tunnel)
        return 0;       // (a tunnel's outer frame reaches the host's UDP: not the end)
    u64 now = bpf_ktime_get_ns();
    stamp(p, stage, now);
    complete(ctx, key, p, now);
    return 0;
}

// A tracked packet freed before completing its path: dropped, or gone elsewhere. Its
// tracepoints stay raw: they only need the address, which a raw argument is.
static __always_inline int on_free(void *ctx, u64 key, u32 reason, u64 location)
{
    struct pkt *p = tracked(key);
    if (!p)
        return 0;
#if TRACE_UPCALLS
    if (p->upcalled) {
        if (reason == FATE_LEFT) {  // freed after its upcall: the copy carries on
            untrack(key);
            return 0;
        }
        upcall_forget(p);           // the upcall failed (ovs-dpctl show: lost)
    }
#endif
    if (p->pflags & PF_PENDING) {   // never counted in
        untrack(key);
        return 0;
    }
    count_fate(p, reason);
#if EMIT_DROPS
    if (reason != FATE_LEFT) {
        p->type = EV_DROP;
        p->reason = reason;
        p->location = location;
        emit(ctx, p, 0);
    }
#endif
    untrack(key);
    return 0;
}

int rtp_kfree_skb(struct bpf_raw_tracepoint_args *ctx)
{
#if KFREE_SKB_HAS_REASON
    return on_free(ctx, ctx->args[0], (u32)ctx->args[2], ctx->args[1]);
#else
    return on_free(ctx, ctx->args[0], 0, ctx->args[1]);
#endif
}

int rtp_consume_skb(struct bpf_raw_tracepoint_args *ctx)
{
    return on_free(ctx, ctx->args[0], FATE_LEFT, 0);
}

#if EXPLAIN
// --explain: the scheduler's events of the followed threads. These fire on every
// context switch and interrupt of the machine: for a thread not followed they cost a
// lookup (two per switch) and the CPU's note of who ran until when.
int rtp_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    void *prev = (void *)ctx->args[1], *next = (void *)ctx->args[2];
    u32 prev_tid = 0, next_tid = 0;
    bpf_probe_read_kernel(&prev_tid, 4, (u8 *)prev + TASK_PID);
    bpf_probe_read_kernel(&next_tid, 4, (u8 *)next + TASK_PID);
    struct thist *h = threads.lookup(&prev_tid);
    struct thist *n = threads.lookup(&next_tid);
    u32 zero = 0;
    struct oncpu *c = oncpu.lookup(&zero);
    if (!c)
        return 0;
    u64 now = bpf_ktime_get_ns();
    c->tid = n ? next_tid : 0;
    c->depth = 0;
    c->irq_counts = n && !(n->flags & XF_KSOFTIRQD);    // ksoftirqd's softirqs: its work
    struct runner *r = &c->ran[c->head & (EXPLAIN_RUNNERS - 1)];
    r->until = now;
    r->task = (u64)prev;
    r->tid = prev_tid;
    c->head = c->head + 1;
    if (h) {
        // the thread switched out is prev (not next): preempted, it stays runnable
        u32 kind = CAUSE_RUN_QUEUE;
        if (!ctx->args[0]) {
#if SWITCH_STATE_ARG
            u32 state = ctx->args[3];
#else
            u32 state = 0;
            bpf_probe_read_kernel(&state, sizeof(state), (u8 *)prev + TASK_STATE);
#endif
            if (state & TASK_STOPPED_BITS)
                kind = CAUSE_STOPPED;
            else if (state)
                kind = CAUSE_ASLEEP;
        }
        if (kind == CAUSE_RUN_QUEUE) {
            h->wait_cpu = bpf_get_smp_processor_id();
            h->behind = 0;          // known when it gets its CPU back
        }
        thread_event(h, now, kind);
    }
    if (n) {
        u32 head = n->head;
        struct tev *e = &n->ev[(head - 1) & (EXPLAIN_RING - 1)];
        if (head && e->kind == CAUSE_RUN_QUEUE) {
            // it waited since e->ts: behind whoever held this CPU longest since then
            u64 task = 0;
            n->wait_cpu = bpf_get_smp_processor_id();
            n->behind = longest_runner(c, e->ts, &task);
            __builtin_memset(n->behind_comm, 0, sizeof(n->behind_comm));
            if (task)
                bpf_probe_read_kernel(n->behind_comm, sizeof(n->behind_comm),
                                      (u8 *)task + TASK_COMM);
        }
        thread_event(n, now, CAUSE_RUNNING);
    }
    return 0;
}

static __always_inline int on_wakeup(void *task)
{
    u32 tid = 0;
    bpf_probe_read_kernel(&tid, 4, (u8 *)task + TASK_PID);
    struct thist *h = threads.lookup(&tid);
    if (!h)
        return 0;
    u32 kind = last_kind(h);
    if (kind != CAUSE_ASLEEP && kind != CAUSE_STOPPED)
        return 0;       // woken before it was off its CPU: it never stopped running
    u32 cpu = 0;        // the CPU it is queued on
    bpf_probe_read_kernel(&cpu, sizeof(cpu), (u8 *)task + TASK_CPU);
    h->wait_cpu = cpu;
    h->behind = 0;      // known when it gets its CPU
    thread_event(h, bpf_ktime_get_ns(), CAUSE_RUN_QUEUE);
    return 0;
}

int rtp_sched_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
    return on_wakeup((void *)ctx->args[0]);
}

int rtp_sched_wakeup_new(struct bpf_raw_tracepoint_args *ctx)
{
    return on_wakeup((void *)ctx->args[0]);
}

// Interrupts cutting into a followed thread's running (outermost entry to exit)
static __always_inline int irq_entered(void)
{
    u32 zero = 0;
    struct oncpu *c = oncpu.lookup(&zero);
    if (c && c->irq_counts && c->depth++ == 0)
        c->since = bpf_ktime_get_ns();
    return 0;
}

static __always_inline int irq_left(void)
{
    u32 zero = 0;
    struct oncpu *c = oncpu.lookup(&zero);
    if (!c || !c->irq_counts || !c->depth || --c->depth)
        return 0;
    u32 tid = c->tid;
    struct thist *h = threads.lookup(&tid);
    if (h)
        h->irq += bpf_ktime_get_ns() - c->since;
    return 0;
}

int rtp_softirq_entry(struct bpf_raw_tracepoint_args *ctx) { return irq_entered(); }
int rtp_softirq_exit(struct bpf_raw_tracepoint_args *ctx) { return irq_left(); }
int rtp_irq_handler_entry(struct bpf_raw_tracepoint_args *ctx) { return irq_entered(); }
int rtp_irq_handler_exit(struct bpf_raw_tracepoint_args *ctx) { return irq_left(); }
#endif

/*WRAPPERS*/
"""


def _c_reader(fn_name, base, fields, max_span=96):
    """C that reads several struct fields with as few probe reads as possible.

    fields: [(out parameter, C type, offset macro, offset value or None, size)].
    Fields within max_span bytes of each other share one bpf_probe_read_kernel.
    typed (a BTF tracepoint's pointer): one plain load per field instead."""
    params = ", ".join("%s *%s" % (ctype, name) for name, ctype, _m, _o, _s in fields)
    lines = ["static __always_inline void %s(void *%s, const int typed, %s)"
             % (fn_name, base, params), "{", "    if (typed) {"]
    for name, ctype, macro, _off, _size in fields:
        lines.append("        *%s = *(%s *)((u8 *)%s + %s);" % (name, ctype, base, macro))
    lines += ["        return;", "    }"]
    known = all(isinstance(off, int) for _n, _t, _m, off, _s in fields)
    if known:
        groups = []
        for f in sorted(fields, key=lambda f: f[3]):
            if groups and f[3] + f[4] - groups[-1][0][3] <= max_span:
                groups[-1].append(f)
            else:
                groups.append([f])
        for i, group in enumerate(groups):
            start = group[0][3]
            span = group[-1][3] + group[-1][4] - start
            words = (span + 7) // 8
            lines.append("    u64 s%d[%d];      // filled by the read (zeroed if it faults)" % (i, words))
            lines.append("    bpf_probe_read_kernel(s%d, %d, (u8 *)%s + %d);"
                         % (i, span, base, start))
            for name, _ctype, _macro, off, size in group:
                lines.append("    __builtin_memcpy(%s, (u8 *)s%d + %d, %d);"
                             % (name, i, off - start, size))
    else:  # offsets are offsetof() expressions from kernel headers
        for name, _ctype, macro, _off, size in fields:
            lines.append("    bpf_probe_read_kernel(%s, %s, (u8 *)%s + %s);"
                         % (name, size, base, macro))
    lines.append("}")
    return "\n".join(lines)


def _int_or_none(v):
    return v if isinstance(v, int) else None


def generate_readers(layout):
    """C that reads the sk_buff fields a packet's parsing needs, in as few reads as can be."""
    o, s = layout.offsets, layout.sizes
    skb_fields = [
        ("dev", "void *", "SKB_DEV", _int_or_none(o["SKB_DEV"]), 8),
        ("len", "u32", "SKB_LEN", _int_or_none(o["SKB_LEN"]), 4),
        ("data_len", "u32", "SKB_DATA_LEN", _int_or_none(o["SKB_DATA_LEN"]), 4),
        ("mac", "u16", "SKB_MAC_HEADER", _int_or_none(o["SKB_MAC_HEADER"]), 2),
        ("head", "u8 *", "SKB_HEAD", _int_or_none(o["SKB_HEAD"]), 8),
    ]
    expected = dict((macro, size) for _n, _t, macro, _o, size in skb_fields)
    expected.update({"SKB_DEV": 8, "DEV_IFINDEX": 4, "DEV_ND_NET": 8})
    for macro, size in expected.items():
        if isinstance(s.get(macro), int) and s[macro] != size:
            raise Fatal("unexpected size %d of %s in this kernel" % (s[macro], macro))
    readers = [_c_reader("read_skb", "skb", skb_fields, max_span=256)]
    if layout.netns and isinstance(o["DEV_IFINDEX"], int):
        readers.append(_c_reader("read_dev", "dev", [
            ("ifindex", "u32", "DEV_IFINDEX", o["DEV_IFINDEX"], 4),
            ("net", "u64", "DEV_ND_NET", o["DEV_ND_NET"], 8)]))
    else:   # no namespaces, or offsetof() from the headers (namespaces: #if CHECK_NETNS)
        # (typed is ignored: BTF tracepoints need BTF, whose layouts take the branch above)
        readers.append("""static __always_inline void read_dev(void *dev, const int typed, u32 *ifindex,
                                     u64 *net)
{
    bpf_probe_read_kernel(ifindex, 4, (u8 *)dev + DEV_IFINDEX);
#if CHECK_NETNS
    bpf_probe_read_kernel(net, 8, (u8 *)dev + DEV_ND_NET);
#endif
}""")
    return "\n\n".join(readers)


def _handler_call(att, upcalls):
    """The C call that handles this attach point's stages.

    Every handler gets (ctx, skb, btf_arg, ...): btf_arg is the tracepoint argument the
    skb is, if it is a typed (tp_btf) pointer, else -1 (a number: kprobe, raw)."""
    plan = att.stages[0]
    skb = "ctx, skb, %d" % (att.arg if att.method == "tp_btf" else -1)
    hooks = set(p.stage.hook for p in att.stages)
    if len(hooks) == 1 and plan.stage.hook in ROLE_SPLIT_HOOKS:
        by_role = dict((p.stage.role, p.stage.sid) for p in att.stages)
        return "%s(%s, %d, %d, %d, %d)" % (HOOK_HANDLERS[plan.stage.hook], skb,
                                           by_role.get("vm", -1), by_role.get("phy", -1),
                                           by_role.get("tun", -1), by_role.get("mvtap", -1))
    if len(att.stages) != 1:
        raise AssertionError("stages %s share %s" % ([p.stage.name for p in att.stages],
                                                     att.probe))
    hook, sid = plan.stage.hook, plan.stage.sid
    if hook in VHOST_HOOKS:     # the argument is no skb (a struct vhost_work; none)
        return VHOST_HANDLERS.get((att.probe.split(".")[0], att.arg), "on_vhost_queue(skb)")
    if hook == "upcall" and att.probe.startswith("ovs_execute_actions"):
        # the kprobe way to see a packet ovs-vswitchd returns (no ovs_dp_process_packet)
        return "%s(%s, %d)" % (OVS_EXECUTE, skb, OVS_SID)
    if hook == "ovs" and upcalls and att.method != "kprobe":
        # the ovs_do_execute_action tracepoint also sees packets returned by upcalls
        return "%s(%s, %d)" % (OVS_EXECUTE, skb, sid)
    return "%s(%s, %d)" % (HOOK_HANDLERS[hook], skb, sid)


def _wrapper(att, upcalls):
    """The thin per-attach-method wrapper: fetch the skb, call the stage handler.

    A kprobe's or raw tracepoint's skb goes through a u64 first: BCC then does not take
    it for a kernel pointer, and does not turn the typed path's plain loads (in the
    helpers both share) into probe reads. A tp_btf program's ctx is a plain u64 array
    to BCC, so it leaves that program's loads alone too."""
    if att.method == "kprobe" and att.arg == 0:    # at the function's return: no skb
        head = "int %s(struct pt_regs *ctx)\n{\n    u64 arg = 0;" % att.fn_name
    elif att.method == "kprobe" and att.arg < 0:   # a pointer to the skb's pointer
        head = "int %s(struct pt_regs *ctx)\n{\n    u64 arg = 0;\n    " \
               "bpf_probe_read_kernel(&arg, sizeof(arg), (void *)PT_REGS_PARM%d(ctx));" \
            % (att.fn_name, -att.arg)
    elif att.method == "kprobe":
        head = "int %s(struct pt_regs *ctx)\n{\n    u64 arg = PT_REGS_PARM%d(ctx);" \
            % (att.fn_name, att.arg)
    elif att.method == "tp_btf":
        head = "int %s(u64 *ctx)\n{\n    u64 arg = ctx[%d];" % (att.fn_name, att.arg)
    else:
        head = "int %s(struct bpf_raw_tracepoint_args *ctx)\n{\n" \
               "    u64 arg = ctx->args[%d];" % (att.fn_name, att.arg)
    return "%s\n    void *skb = (void *)arg;\n    return %s;\n}" % (
        head, _handler_call(att, upcalls))


def _hist_c(path):
    """hist_packet(): one histogram increment per segment the packet passed, and total
    (path: {direction: its traced stages in path order})."""
    lines = ["#define PAIR(i, j, n) ((i) * (n) - (i) * ((i) + 1) / 2 + (j) - (i) - 1)",
             "static __always_inline void hist_packet(struct pkt *p)", "{",
             "    u64 prev_ts = 0, first_ts = 0;",
             "    u32 prev = 0;      // position of the last stage seen, in path order"]
    base = 0
    for d, direction in enumerate(DIRECTIONS):
        names = path[direction]
        n = len(names)
        lines.append("    %sif (p->dir == %d) {" % ("} else " if d else "", d))
        for pos, name in enumerate(names):
            sid = STAGE_BY_NAME[name].sid
            lines += [
                "        if (p->ts[%d]) {     // %s" % (sid, name),
                "            if (prev_ts)",
                "                HIST_ADD(p, %d + PAIR(prev, %d, %d), p->ts[%d] - prev_ts);"
                % (base, pos, n, sid),
                "            else",
                "                first_ts = p->ts[%d];" % sid,
                "            prev_ts = p->ts[%d];" % sid,
                "            prev = %d;" % pos,
                "        }"]
        lines.append("        HIST_ADD(p, %d, prev_ts - first_ts);   // total"
                     % (base + n * (n - 1) // 2))
        base += n * (n - 1) // 2 + 1
    lines += ["    }", "}"]
    return "\n".join(lines)


# What the program needs from the command line and this machine, gathered once: program
# generation reads nothing else (the plan and the layouts aside).
ProgramOptions = namedtuple("ProgramOptions", [
    "histogram", "per_vm", "vm_table_size", "hist_sums", "sample", "emit_drops",
    "threshold_ns", "protocol", "src_ip", "dst_ip", "src_port", "dst_port", "vni",
    "max_inflight", "tunnels", "tunnel_ports", "ringbuf", "probe_read_kernel",
    "netns_inum", "directions", "macvtaps", "explain_ns"])


def program_options(args, features, devices):
    """ProgramOptions of this run: args, the kernel's features, the host's devices (the
    overlay parsing is on when the host has tunnel devices, or --vni asks; macvtaps are
    followed when the host has one: a first one made later needs a restart)."""
    return ProgramOptions(
        histogram=args.mode == "histogram", per_vm=keeps_per_vm_counts(args),
        vm_table_size=args.vm_table_size,
        hist_sums=bool(args.prometheus or args.prometheus_textfile), sample=args.sample,
        emit_drops=args.drops, threshold_ns=int(round(args.latency_threshold * 1000)),
        protocol=args.protocol, src_ip=args.src_ip, dst_ip=args.dst_ip,
        src_port=args.src_port, dst_port=args.dst_port, vni=args.vni,
        max_inflight=args.max_inflight,
        # (--dry-run: everything the program can do goes through the verifier)
        tunnels=args.dry_run or args.vni is not None or any(is_tunnel(d) for d in devices),
        tunnel_ports=tunnel_ports(devices), ringbuf=features.ringbuf,
        probe_read_kernel=features.probe_read_kernel, netns_inum=host_netns_inum(),
        directions=wanted_directions(args.direction),
        macvtaps=args.dry_run or any(is_macvtap(d) for d in devices),
        # --explain US: the longest segments at least this long (0: off)
        explain_ns=int(round(args.explain * 1000)) if args.explain is not None else 0)


def tunnel_defines(opts):
    """The overlay parsing, off unless the host has tunnels: then it costs plain
    IPv4/IPv6 packets nothing. Its UDP ports: the IANA ones and the devices'."""
    def test(kind):
        return "(%s)" % " || ".join("(p) == %d" % port
                                    for port in sorted(opts.tunnel_ports[kind]))
    return [("TUNNELS", int(opts.tunnels)), ("IS_VXLAN_PORT(p)", test("vxlan")),
            ("IS_GENEVE_PORT(p)", test("geneve")), ("FILTER_VNI", int(opts.vni is not None)),
            ("FILTER_VNI_VALUE", "%dU" % (opts.vni or 0))]


def address_filters(opts):
    """The address filters as #defines: IPv4 as the 32-bit word the C loads from the
    frame, IPv6 as its two 64-bit halves (both as loaded, little-endian, from the bytes)."""
    out = []
    versions = set()
    for name, text in (("SADDR", opts.src_ip), ("DADDR", opts.dst_ip)):
        ip = ipaddress.ip_address(text) if text else None
        versions.add(ip.version if ip else None)
        v4 = struct.unpack("<I", ip.packed)[0] if ip and ip.version == 4 else 0
        out.append(("FILTER_%s4" % name, "0x%08xU" % v4))
        hi, lo = struct.unpack("<QQ", ip.packed) if ip and ip.version == 6 else (0, 0)
        out += [("FILTER_%s6" % name, int(bool(ip and ip.version == 6))),
                ("FILTER_%s6_HI" % name, "0x%016xULL" % hi),
                ("FILTER_%s6_LO" % name, "0x%016xULL" % lo)]
    versions.discard(None)
    # an address filter, or icmp/icmp6, says which family; tcp and udp match both
    family = versions.pop() if versions else \
        {"icmp": 4, "icmp6": 6}.get(opts.protocol, 0)
    return out + [("FILTER_FAMILY", family)]


def first_ts_c():
    """C for when a packet entered the path: the time of its first start stage in path
    order, or the vhost kick before it (the stages it did not pass are 0)."""
    sids = sorted(set(sid for sids in START_SIDS for sid in sids) | {KICK_SID})
    return "(%s(p)->ts[%d])" % ("".join("(p)->ts[%d] ? (p)->ts[%d] : " % (sid, sid)
                                        for sid in sids[:-1]), sids[-1])


def _c_value(value):
    """A #define's value: numbers past int's range as unsigned hexadecimal."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0x7fffffff:
        return "0x%xU" % value
    return str(int(value)) if isinstance(value, int) else value


def generate_program(opts, plan, layout):
    """The whole C program for these options, this plan and these struct layouts."""
    defines = shared_defines() + [
        ("INFLIGHT_GROUPS", -(-opts.max_inflight // C.INFLIGHT_WAYS)),
        ("HISTOGRAM", int(opts.histogram)), ("SAMPLE", opts.sample),
        ("PER_VM", int(opts.per_vm)), ("VM_HIST_ENTRIES", opts.vm_table_size),
        ("HIST_SUMS", int(opts.hist_sums)), ("USE_RINGBUF", int(opts.ringbuf)),
        ("EMIT_DROPS", int(opts.emit_drops)), ("THRESHOLD_NS", "%dULL" % opts.threshold_ns),
        ("FILTER_PROTO", PROTOCOLS.get(opts.protocol, 0)),
    ] + address_filters(opts) + tunnel_defines(opts) + [
        ("FILTER_SPORT", opts.src_port or 0), ("FILTER_DPORT", opts.dst_port or 0),
        ("HOST_NETNS_INUM", "%dU" % opts.netns_inum),
        ("KFREE_SKB_HAS_REASON", int(layout.kfree_skb_reason)),
        ("HIST_SLOTS", hist_slots(plan.segments)),
        ("VM_EXPLAIN_BASE", vm_explain_base(plan.segments)),
        ("TRACE_UPCALLS", int(plan.upcalls)),
        ("FINAL_TX", plan.final["tx"]), ("FINAL_RX_VM", plan.final["rx"]),
        ("STAGE_OVS_EXECUTE", OVS_SID),
        ("STAGE_MVT_QUEUE", STAGE_BY_NAME["mvt_queue"].sid),
        ("STAGE_MVT_XMIT", STAGE_BY_NAME["mvt_xmit"].sid),
        ("VHOST_KICK", int("vhost_kick" in plan.traced)), ("STAGE_VHOST_KICK", KICK_SID),
        ("VHOST_SIGNAL", int("vhost_signal" in plan.traced)),
        ("STAGE_VHOST_SIGNAL", SIGNAL_SID),
        ("WANT_TX", int("tx" in opts.directions)), ("WANT_RX", int("rx" in opts.directions)),
        ("WANT_VM2VM", int("vm2vm" in opts.directions)), ("MACVTAPS", int(opts.macvtaps)),
        # when a packet entered: its first start stage in path order (unseen ones are 0)
        ("FIRST_TS(p)", first_ts_c()),
        # an RX or VM-to-VM packet was put on a VM's device: a VM-side stage of RX saw it
        ("ON_TAP(p)", "(%s)" % " | ".join("(p)->ts[%d]" % s.sid for s in STAGES
                                          if "rx" in s.directions and
                                          s.role in ("vm", "mvtap"))),
        ("EXPLAIN", int(bool(opts.explain_ns))), ("EXPLAIN_MIN_NS", "%dULL" % opts.explain_ns),
    ] + sorted(layout.offsets.items())
    if opts.explain_ns:
        if not layout.sched:
            raise Fatal("--explain needs the running kernel's BTF (the scheduler's task "
                        "fields): this kernel has none (%s)" % layout.source)
        defines += sorted(layout.sched.items())
    if not opts.probe_read_kernel:
        defines.append(("bpf_probe_read_kernel", "bpf_probe_read"))
    config = "\n".join("#define %s %s" % (k, _c_value(v)) for k, v in defines)
    if isinstance(layout.offsets["SKB_DEV"], int):
        config += "\n#define CHECK_NETNS %d" % int(layout.netns)
    else:   # the running kernel's own headers (checked): they know the namespace fields
        config = ("#include <linux/skbuff.h>\n#include <linux/netdevice.h>\n"
                  "#include <net/net_namespace.h>\n" + config + """
#ifdef CONFIG_NET_NS
#define CHECK_NETNS 1
#define DEV_ND_NET offsetof(struct net_device, nd_net)
#define NET_NS_INUM offsetof(struct net, ns.inum)
#else
#define CHECK_NETNS 0
#endif""")
    wrappers = "\n\n".join(_wrapper(a, plan.upcalls) for a in plan.attachments)
    return (C_PROGRAM.replace("/*CONFIG*/", config)
            .replace("/*RECORD*/", record_c_struct())
            .replace("/*EXPLAIN_TYPES*/", record_c_struct("explain", EXPLAIN_FIELDS) +
                     EXPLAIN_TYPES_C)
            .replace("/*EXPLAIN*/", EXPLAIN_C.replace("/*EXPLAIN_WALK*/", EXPLAIN_WALK_C))
            .replace("/*HIST_ADD*/", HIST_ADD_C)
            .replace("/*SEGMENTS*/", _hist_c(plan.path))
            .replace("/*READERS*/", generate_readers(layout))
            .replace("/*WRAPPERS*/", wrappers))


# ============================================================================
# Loading and attaching
# ============================================================================

def import_bcc():
    try:
        import bcc  # noqa: F401  (BCC's bindings live in the system python3)
        return bcc
    except ImportError:
        raise Fatal("cannot import BCC's Python module 'bcc': install python3-bpfcc "
                    "(Debian/Ubuntu) or python3-bcc (RHEL/Fedora) and run with the "
                    "system interpreter, /usr/bin/python3 (%s is running)" % sys.executable)


def clear_stale_kprobe_events(verbose):
    """Remove kprobe events a killed (SIGKILL) BCC tool left in tracefs.

    BCC names them ..._bcc_<pid>; those whose process is gone are dead weight."""
    tfs = tracefs_dir()
    if not tfs:
        return
    path = os.path.join(tfs, "kprobe_events")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (IOError, OSError):
        return
    for line in lines:
        m = re.match(r"^[pr]:((?:\S+/)?(\S+_bcc_(\d+)))\s", line)
        if not m or os.path.exists("/proc/%s" % m.group(3)):
            continue
        try:
            # O_APPEND without a seek: Python's open(path, "a") seeks to the end, which
            # tracefs refuses; "w" would truncate, deleting every kprobe event there is
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, ("-:%s\n" % m.group(1)).encode())
            finally:
                os.close(fd)
            if verbose:
                log("removed stale kprobe event %s" % m.group(2))
        except (IOError, OSError) as e:
            log("warning: cannot remove stale kprobe event %s: %s" % (m.group(1), e))


def release_compiler_memory():
    """BCC's compiler (LLVM) frees what it used, but glibc keeps the pages resident
    until malloc_trim() gives them back: ~25 MB the tool would hold as long as it runs,
    on which detailed mode's ring buffer would stack a new peak (153 MB, measured)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass            # not glibc (musl has no malloc_trim): nothing to give back this way


class Tracer(object):
    """The loaded program and what is attached; detach() undoes everything."""

    def __init__(self, bcc, text, plan, verbose, type_ids=None, explain=()):
        # -Wno-macro-redefined: BCC 0.18 with 5.10's headers warns about its own
        # __HAVE_BUILTIN_BSWAP*__ definitions on every start (harmless, and noisy)
        self.bpf = bcc.BPF(text=text, cflags=["-Wno-macro-redefined"])
        release_compiler_memory()
        self.plan = plan
        self.bcc = bcc
        self.attachments = plan.attachments
        self.attached = []
        self.verbose = verbose
        self.type_ids = type_ids or {}     # tracepoint: btf_trace_<name> type id
        self.typed_fds = {}                # fn_name: fd of a tp_btf program the tool loaded
        self.explain = explain             # --explain: the scheduler's tracepoints it uses

    def load_typed(self, att):
        """A tp_btf program: BCC compiled it (map fds in place), the tool loads it."""
        if att.fn_name in self.typed_fds:
            return self.typed_fds[att.fn_name]
        code = self.bpf.dump_func(att.fn_name)
        type_id = self.type_ids[att.probe.split(":")[1]]
        fd, _log = bpf_prog_load(BPF_PROG_TYPE_TRACING, code, att.fn_name, type_id)
        if fd is None or fd < 0:     # again, for the verifier's words
            err = os.strerror(-fd) if fd is not None else "unknown architecture"
            _fd, log = bpf_prog_load(BPF_PROG_TYPE_TRACING, code, att.fn_name, type_id,
                                     log_size=1 << 22)
            if _fd is not None and _fd >= 0:
                os.close(_fd)
            last = [l for l in log.splitlines() if l.strip()][-3:]
            raise Exception("Failed to load BPF program %s: %s%s" % (
                att.fn_name, err, (": " + " | ".join(last)) if last else ""))
        self.typed_fds[att.fn_name] = fd
        return fd

    def load_only(self):
        """Run every program through the verifier without attaching it."""
        BPF = self.bcc.BPF
        count = 0
        for att in self.attachments:
            if att.method == "tp_btf":
                self.load_typed(att)
            else:
                self.bpf.load_func(att.fn_name, BPF.KPROBE if att.method == "kprobe"
                                   else BPF.RAW_TRACEPOINT)
            count += 1
        for _cat, tp, _what in FREE_TRACEPOINTS + list(self.explain):
            self.bpf.load_func("rtp_" + tp, BPF.RAW_TRACEPOINT)
            count += 1
        return count + self.load_tail_calls()

    def load_tail_calls(self):
        """The programs others run through a tail call (vhost_drain): loaded and put
        in their program array. How many."""
        if "vhost_signal" not in self.plan.traced:
            return 0
        fn = self.bpf.load_func("vhost_drain", self.bcc.BPF.KPROBE)
        self.bpf["vhost_drain_prog"][ctypes.c_int(0)] = ctypes.c_int(fn.fd)
        return 1

    def programs(self):
        """[(name, fd)] of every loaded program, BCC's and the tool's own."""
        return sorted([(name.decode() if isinstance(name, bytes) else name, fn.fd)
                       for name, fn in self.bpf.funcs.items()] +
                      list(self.typed_fds.items()))

    def attach(self):
        self.load_tail_calls()      # before anything that calls them is attached
        for att in self.attachments:
            if att.method == "kprobe" and att.arg == 0:
                self.bpf.attach_kretprobe(event=att.probe, fn_name=att.fn_name)
                self.attached.append(("kretprobe", att.probe))
            elif att.method == "kprobe":
                self.bpf.attach_kprobe(event=att.probe, fn_name=att.fn_name)
                self.attached.append(("kprobe", att.probe))
            elif att.method == "tp_btf":
                link = raw_tracepoint_open(self.load_typed(att))
                if link < 0:
                    raise Exception("cannot attach %s to %s: %s" % (
                        att.fn_name, att.probe, os.strerror(-link)))
                self.attached.append(("link", link))
            else:
                tp = att.probe.split(":")[1]
                self.bpf.attach_raw_tracepoint(tp=tp, fn_name=att.fn_name)
                self.attached.append(("raw_tracepoint", tp))
            if self.verbose:
                log("attached %s %s -> %s" % (att.method, att.probe,
                                              ", ".join(p.stage.name for p in att.stages)))
        for cat, tp, what in FREE_TRACEPOINTS + list(self.explain):
            self.bpf.attach_raw_tracepoint(tp=tp, fn_name="rtp_" + tp)
            self.attached.append(("raw_tracepoint", tp))
            if self.verbose:
                log("attached tracepoint %s:%s -> %s" % (cat, tp, what))

    def detach(self):
        while self.attached:
            kind, probe = self.attached.pop()
            try:
                if kind == "kprobe":
                    self.bpf.detach_kprobe(event=probe)
                elif kind == "kretprobe":
                    self.bpf.detach_kretprobe(event=probe)
                elif kind == "link":
                    os.close(probe)
                else:
                    self.bpf.detach_raw_tracepoint(tp=probe)
            except Exception:  # keep detaching the rest whatever one of them says
                pass

    def close(self):
        self.detach()
        while self.typed_fds:
            os.close(self.typed_fds.popitem()[1])
        try:
            self.bpf.cleanup()
        except Exception:
            pass


def set_device_roles(bpf, old, roles):
    """Tell the kernel which devices are VM ports and which the physical side."""
    small, big = bpf["devroles"], bpf["devroles_big"]
    for idx in set(old) - set(roles):
        if idx < C.DEVROLE_SLOTS:
            small[small.Key(idx)] = small.Leaf(0)
        else:
            del big[big.Key(idx)]
    for idx, role in roles.items():
        table = small if idx < C.DEVROLE_SLOTS else big
        table[table.Key(idx)] = table.Leaf(role)


# --- where a run's counters come from: the kernel's maps ---

def batch_lookup(table, size, value_size):
    """(keys, values as one bytes) of a whole BPF array in one syscall, where the kernel
    (5.6+) and BCC (0.20+; Debian 11 has 0.18) have batch lookups; else None.

    (BCC's own items_lookup_batch() shares one variable for the batch position and
    the count, so it can stop short; this reads the array whole.)"""
    from bcc.libbcc import lib
    if not hasattr(lib, "bpf_lookup_batch"):
        return None
    keys = (ctypes.c_uint32 * size)()
    values = ctypes.create_string_buffer(size * value_size)
    count = ctypes.c_uint32(size)
    out_batch = ctypes.c_uint32(0)
    res = lib.bpf_lookup_batch(table.map_fd, None, ctypes.byref(out_batch),
                               ctypes.cast(keys, ctypes.c_void_p),
                               ctypes.cast(values, ctypes.c_void_p), ctypes.byref(count))
    if (res == 0 or ctypes.get_errno() == errno.ENOENT) and count.value == size:
        return keys, values.raw
    return None


def read_array_bytes(table, size, value_size):
    """All values of a BPF array, as bytes each."""
    batch = batch_lookup(table, size, value_size)
    if batch is None:        # a syscall per entry
        return [ctypes.string_at(ctypes.addressof(v), value_size) for v in table.values()]
    keys, raw = batch
    out = [b""] * size
    for i in range(size):
        out[keys[i]] = raw[i * value_size:(i + 1) * value_size]
    return out


class U64ArrayReader(object):
    """A BPF array of u64, read whole at each interval into the same buffers: after
    the first read, nothing is allocated. (New buffers and lists of its size at every
    interval, 0.5 MB in all, fragmented the heap: histogram mode's resident memory
    grew by 150 kB a second in steps, 123 -> 151 MB in ten minutes, measured.)"""

    def __init__(self, table, size):
        self.table, self.size = table, size
        self.keys = (ctypes.c_uint32 * size)()
        self.buf = (ctypes.c_uint64 * size)()
        self.values = memoryview(self.buf).cast("B").cast("Q")
        self.count, self.out_batch = ctypes.c_uint32(), ctypes.c_uint32()
        from bcc.libbcc import lib
        self.lookup_batch = getattr(lib, "bpf_lookup_batch", None)

    def read(self):
        """The values, by index (a view of the reader's buffer: valid until the next
        read). One syscall where the kernel (5.6+) and BCC (0.20+) have batch lookups;
        else one per entry. (BCC's own items_lookup_batch() shares one variable for the
        batch position and the count, so it can stop short; this reads it whole.)"""
        if self.lookup_batch is not None:
            self.count.value = self.size
            res = self.lookup_batch(self.table.map_fd, None, ctypes.byref(self.out_batch),
                                    ctypes.cast(self.keys, ctypes.c_void_p),
                                    ctypes.cast(self.buf, ctypes.c_void_p),
                                    ctypes.byref(self.count))
            # an array's batch comes in key order: 0 .. size - 1
            if (res == 0 or ctypes.get_errno() == errno.ENOENT) and \
                    self.count.value == self.size and self.keys[0] == 0 and \
                    self.keys[self.size - 1] == self.size - 1:
                return self.values
            self.lookup_batch = None
        for k, v in self.table.items():
            self.buf[k.value] = v.value
        return self.values


class KernelCounters(object):
    """The loaded program's maps, read when asked."""

    def __init__(self, tracer):
        self.bpf = tracer.bpf
        self.upcalls = tracer.plan.upcalls
        self.hist_reader = None
        leaf = ctypes.sizeof(self.bpf["inflight"].Leaf)
        if leaf != PKT.size:    # the declaration and the compiled struct must agree
            raise Fatal("internal error: struct pkt is %d bytes in C, %d in Python"
                        % (leaf, PKT.size))

    def hist(self, size):
        """The histogram array's cumulative counts (a view, valid until the next call)."""
        if self.hist_reader is None:
            self.hist_reader = U64ArrayReader(self.bpf["hist"], size)
        return self.hist_reader.read()

    def explain_sums(self):
        """--explain in histogram mode: the cumulative ns of the explained segments,
        EXPLAIN_SLOTS of them (ExplainDiff says which is which)."""
        if getattr(self, "explain_reader", None) is None:
            self.explain_reader = U64ArrayReader(self.bpf["explain_sums"], EXPLAIN_SLOTS)
        return self.explain_reader.read()

    def vm_hist(self):
        """--per-vm: {(tap ifindex, slot): cumulative count}."""
        return dict(((k.vm_ifindex, k.peer_ifindex, k.slot), v.value)
                    for k, v in self.bpf["vm_hist"].items())

    def forget_vm_counts(self, keys):
        table = self.bpf["vm_hist"]
        for tap, peer, slot in keys:
            try:
                del table[table.Key(tap, peer, slot)]
            except KeyError:
                pass

    def stats(self):
        """The per-CPU counters, summed (mod 2^64: a count moved from one direction to
        another on two CPUs is a decrement on one of them)."""
        values = [0] * C.NSTATS
        for k, v in self.bpf["stats"].items():
            if k.value < len(values):
                values[k.value] = sum(v) & COUNT_MASK
        return values

    def fates(self):
        """[(reason, direction index, last stage, count)], in the map's order."""
        return [(k.reason, k.dir, k.last, v.value) for k, v in self.bpf["fates"].items()]

    def inflight(self):
        """The packets still being tracked (slots with a tag): (how many, how many of
        them wait for ovs-vswitchd to return a copy, the raw records of the first
        INFLIGHT_EXAMPLES)."""
        tags = self.bpf["inflight_tags"]
        size = len(tags)
        raw = read_array_bytes(tags, size, ctypes.sizeof(tags.Leaf))
        records = self.bpf["inflight"]
        count, upcalled, first = 0, 0, []
        for group, value in enumerate(raw):
            for way in range(C.INFLIGHT_WAYS):
                if struct.unpack_from("<Q", value, 8 * way)[0]:
                    rec = records[ctypes.c_uint32(group * C.INFLIGHT_WAYS + way)]
                    data = ctypes.string_at(ctypes.addressof(rec), PKT.size)
                    count += 1
                    upcalled += PKT.unpack(data)[F.upcalled]
                    if len(first) < INFLIGHT_EXAMPLES:
                        first.append(data)
        return count, upcalled, first

    def upcalls_waiting(self):
        return sum(1 for _ in self.bpf["upcalls"].keys()) if self.upcalls else 0


# ============================================================================
# Events: from the ring buffer to records
# ============================================================================

class RingReader(object):
    """The BPF ring buffer, read by the tool itself: every record there in one pass,
    decoded where it lies. BCC's reader calls back into Python through ctypes once per
    event, which costs as much as decoding it (bench/overhead.py: detailed mode).

    The map's pages (kernel/bpf/ringbuf.c): the consumer position, which the reader
    writes; the producer position; then the data pages, mapped twice in a row so that a
    record that wraps around the end is contiguous. A record: u32 length (bit 31: still
    being written, bit 30: discarded), u32 page offset, the data, padded to 8 bytes.
    Every event is one struct pkt, so records follow each other EVENT_TIMES.size apart:
    a run of them is unpacked in one call (struct.iter_unpack), header and all."""
    BUSY, DISCARD = 1 << 31, 1 << 30
    RELEASE_EVERY = 256     # records read between two releases of their space

    def __init__(self, ring, consumed, size, deliver, fast=None, done=None, epoll=None,
                 record_size=None):
        # ring: the producer's page and the data pages, twice; consumed: a ctypes
        # c_uint64 on the consumer position
        self.ring, self.consumed, self.epoll = ring, consumed, epoll
        self.page, self.mask = mmap.PAGESIZE, size - 1
        # deliver(buf, offset): an event, decoded whole; fast(EVENT_TIMES tuple): the
        # same, False if it needs deliver(); done(): after each RELEASE_EVERY records
        self.deliver, self.fast = deliver, fast or (lambda _t: False)
        self.done = done or (lambda: None)
        # events longer than the record (--explain's): a run of them read by their
        # headers only, each delivered whole
        self.record_size = record_size or PKT.size
        self.events = EVENT_TIMES if self.record_size == PKT.size else struct.Struct(
            "<I4x%ds" % ((self.record_size + 7) & ~7))

    @classmethod
    def of_map(cls, map_fd, size, *callbacks, **kw):
        page = mmap.PAGESIZE
        consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        ring = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                         offset=page)
        epoll = select.epoll()
        epoll.register(map_fd, select.EPOLLIN)
        # the consumer position is written with one aligned 8-byte store (the kernel
        # reads it while we write; struct's "<Q" would store it byte by byte)
        return cls(ring, ctypes.c_uint64.from_buffer(consumer), size, *callbacks,
                   epoll=epoll, **kw)

    def poll(self, ms):
        self.epoll.poll(ms / 1000.0)

    def drain(self):
        try:
            self._drain()
        finally:
            self.done()

    def _drain(self):
        u64, u32 = struct.Struct("Q").unpack_from, struct.Struct("I").unpack_from  # native
        ring, page, mask, deliver, fast = self.ring, self.page, self.mask, self.deliver, \
            self.fast
        size, stride, events = self.record_size, self.events.size, self.events.iter_unpack
        pos = self.consumed.value
        end = u64(ring, 0)[0]
        while pos < end:
            at = page + (pos & mask)
            n = min((end - pos) // stride, self.RELEASE_EVERY)
            done = 0
            if n:
                with memoryview(ring) as whole:
                    with whole[at:at + n * stride] as run:
                        for done, t in enumerate(events(run)):
                            if t[0] != size:        # busy, discarded: one by one below
                                break
                            if not fast(t):
                                deliver(ring, at + done * stride + 8)
                        else:
                            done = n
                pos += done * stride
            if done < n or not n:
                length = u32(ring, page + (pos & mask))[0]
                if length & self.BUSY:
                    break               # reserved, not submitted yet: the next pass
                if not length & self.DISCARD and length & 0x3fffffff == size:
                    deliver(ring, page + (pos & mask) + 8)
                pos += ((length & 0x3fffffff) + 8 + 7) & ~7
            self.consumed.value = pos
            self.done()
            if pos >= end:
                end = u64(ring, 0)[0]
        self.consumed.value = pos


# RingReader reads the producer position and each record's header with plain loads,
# which x86 keeps in order; libbpf (BCC's reader) uses acquire loads, which weaker
# architectures need, so there BCC reads the ring
ORDERED_LOADS = ("x86_64", "i686", "i386")


def open_events(tracer, this):
    table = tracer.bpf["events"]
    if type(table).__name__ == "RingBuf" and os.uname()[4] in ORDERED_LOADS:
        # recording or capturing: every event is taken whole, by on_record()
        ring = RingReader.of_map(table.map_fd, C.RINGBUF_PAGES * mmap.PAGESIZE, this.on_record,
                                 None if this.recorder or this.explain or this.pcap
                                 else this.on_times,
                                 this.write_pending, record_size=this.event_size)
        return EventSource(ring.poll, ring.drain)
    if type(table).__name__ == "RingBuf":
        table.open_ring_buffer(lambda _ctx, data, size: this.on_event(data, size))
        return EventSource(lambda ms: tracer.bpf.ring_buffer_poll(ms),
                           tracer.bpf.ring_buffer_consume)
    table.open_perf_buffer(lambda _cpu, data, size: this.on_event(data, size),
                           page_cnt=PERF_BUFFER_PAGES, lost_cb=this.on_perf_lost)
    return EventSource(lambda ms: tracer.bpf.perf_buffer_poll(ms), lambda: None)


def poll_events(events, seconds):
    """Deliver the events that are there (waiting up to `seconds` for a wake-up).

    The kernel side wakes the reader only now and then (WAKE_EVERY): what came in since
    without a wake-up is drained here, each time."""
    if events is None:
        time.sleep(seconds)
        return
    events.poll(int(seconds * 1000))
    events.drain()


# --- decoding ---

_IP_CACHE = {}


def ip_text(value, version):
    """An address of the record (16 bytes) in its usual text form."""
    key = (value, version)
    text = _IP_CACHE.get(key)
    if text is None:
        if len(_IP_CACHE) > 65536:
            _IP_CACHE.clear()
        text = _IP_CACHE[key] = socket.inet_ntop(
            socket.AF_INET6 if version == 6 else socket.AF_INET,
            value if version == 6 else value[:4])
    return text


def tunnel_record(fields, names):
    version = fields[F.outer_version]
    tun_if = fields[F.tun_ifindex]
    return {"type": TUNNEL_NAMES.get(fields[F.tunnel], str(fields[F.tunnel])),
            "vni": fields[F.vni] if version else None,
            "dev": names.get(tun_if) if tun_if else None,
            "outer_src_ip": ip_text(fields[F.outer_saddr], version) if version else None,
            "outer_dst_ip": ip_text(fields[F.outer_daddr], version) if version else None}


def wall_ns(wall_offset):
    """The offset of the wall clock from the monotonic one (a float of seconds), as a
    whole number of ns: its fraction scaled alone, the seconds times 10**9 exactly."""
    seconds = math.floor(wall_offset)
    return int(seconds) * 10 ** 9 + int(round((wall_offset - seconds) * 1e9))


def wall_us(wall_offset, ns):
    """The wall-clock time of a monotonic time in ns, in whole microseconds. By integer
    arithmetic: a float of today's seconds since 1970 is only good to about 0.24 us."""
    return (wall_ns(wall_offset) + ns + 500) // 1000


def timestamp_text(us):
    """Seconds with up to six decimals, as repr() gives the float of the same text
    (floats this size are 2**-22 s apart: each microsecond has its own, and no shorter
    text names it)."""
    text = ("%d.%06d" % divmod(us, 1000000)).rstrip("0")
    return text + "0" if text[-1] == "." else text


def json_us(ns):
    """repr(round(ns / 1000.0, 3)), as packet_record() and json give it, for a whole
    number of ns: by integer arithmetic, cheaper than the float's round() and repr()
    (tests/test_records.py checks the two agree)."""
    if not 0 <= ns < 10 ** 12:         # beyond 1000 s (or a negative): the float way
        return repr(round(ns / 1000.0, 3))
    us, frac = divmod(ns, 1000)
    if not frac:
        return "%d.0" % us
    return ("%d.%03d" % (us, frac)).rstrip("0")


def packet_record(fields, book, wall_offset, why=None):
    """A decoded packet (or drop) event, as the dict the JSON output prints (book: the
    NameBook of devices, VMs and processes; why: --explain's tail of the event).

    Runs once per event in detailed mode: keep it plain."""
    direction = DIRECTIONS[fields[F.dir]]
    seen = [(name, fields[sid]) for name, sid in _PATH_FIELDS[direction] if fields[sid]]
    segments = [{"from": a[0], "to": b[0], "us": round((b[1] - a[1]) / 1000.0, 3)}
                for a, b in zip(seen, seen[1:])]
    proto = fields[F.proto]
    version = fields[F.ip_version]
    is_icmp = proto == Proto.ICMP or proto == Proto.ICMP6
    echo = fields[F.icmp_type] in ICMP_ECHO.get(proto, ())   # it has an id and a sequence
    pid = fields[F.pid]
    thread = book.thread_name(pid, fields[F.tid]) if pid else None
    end_ns = seen[-1][1] if seen else 0
    vm_if, phy_if = fields[F.vm_ifindex], fields[F.phy_ifindex]
    vm = book.vms.get(vm_if, NO_VM) if vm_if else NO_VM
    peer_if = fields[F.peer_ifindex]
    peer = book.vms.get(peer_if, NO_VM) if peer_if else NO_VM
    rec = {
        "type": "packet" if fields[F.type] == Ev.PACKET else "drop",
        "timestamp": float(timestamp_text(wall_us(wall_offset, end_ns))),
        "direction": direction,
        "protocol": PROTO_NAMES.get(proto, str(proto)),
        "ip_version": version,
        "src_ip": ip_text(fields[F.saddr], version), "dst_ip": ip_text(fields[F.daddr], version),
        "src_port": None if is_icmp else fields[F.sport],
        "dst_port": None if is_icmp else fields[F.dport],
        "icmp_type": fields[F.icmp_type] if is_icmp else None,
        "icmp_id": fields[F.sport] if echo else None,
        "icmp_seq": fields[F.dport] if echo else None,
        "vlan": fields[F.vlan] - 1 if fields[F.vlan] else None,
        "tunnel": tunnel_record(fields, book.devices) if fields[F.tunnel] else None,
        "vm_dev": book.devices.get(vm_if) if vm_if else None,
        "vm": vm.name, "vm_uuid": vm.uuid, "vm_pid": vm.pid,
        "phy_dev": book.devices.get(phy_if) if phy_if else None,
        "uplink": book.uplinks.get(phy_if) if phy_if else None,
        "peer_vm_dev": book.devices.get(peer_if) if peer_if else None,
        "peer_vm": peer.name, "peer_vm_uuid": peer.uuid, "peer_vm_pid": peer.pid,
        "pid": pid or None,
        "comm": book.process_name(pid) if pid else None,
        "thread": thread,
        "stages": [name for name, _ in seen],
        "segments": segments,
        "total_us": round((end_ns - seen[0][1]) / 1000.0, 3) if seen else 0.0,
    }
    if why is not None:
        rec["explain"] = explain_record(why, fields, book)
    if rec["type"] == "drop":
        rec["last_stage"] = STAGE_NAMES[fields[F.last]]
    return rec


def vm_json_fields(vm):
    """A --per-vm output's owner (VmTables) as JSON fields; none for all VMs."""
    if not vm:
        return {}
    out = {"vm": vm.name, "vm_label": vm.label, "vm_dev": vm.devs}
    if vm.peer_label:
        out.update({"peer_vm": vm.peer_name, "peer_vm_label": vm.peer_label,
                    "peer_vm_dev": vm.peer_devs})
    return out


def vm_heading(vm):
    """The same as the start of a text heading ("VM web1 (tap0): "), escaped."""
    if not vm:
        return ""
    who = "VM %s (%s)" % (shown_name(vm.label), ", ".join(shown_name(d) for d in vm.devs))
    if vm.peer_label:
        who += " -> VM %s (%s)" % (shown_name(vm.peer_label), ", ".join(
            shown_name(d) for d in vm.peer_devs))
    return who + ": "


# how text output names --explain's causes ("queue": a qdisc's hold, see explain_record)
EXPLAIN_WORDS = {"asleep": "asleep", "stopped": "stopped", "run_queue": "run-queue",
                 "running": "running", "irq": "interrupts", "unknown": "unknown",
                 "queue": "queue"}
# segments that end where a queue hands the packet on: the time nobody was scheduled
# for (the dequeuing thread asleep, or a softirq, which is never followed) is the queue's
QUEUE_SEGMENTS = set("%s->%s" % pair for pair in (
    ("phy_queue", "phy_xmit"), ("tap_queue", "tap_xmit"), ("mvt_queue", "mvt_xmit")))


def explain_causes(segment, ns):
    """{cause: ns} of an explained segment's time ([ns] by Cause), as reports name the
    causes: in a queue segment, the time nobody was scheduled for is "queue"."""
    out = dict(zip(EXPLAIN_CAUSES, ns))
    out["queue"] = 0
    if segment in QUEUE_SEGMENTS:
        out["queue"] = out["asleep"] + out["unknown"]
        out["asleep"] = out["unknown"] = 0
    return out


def explained(why):
    """Does an event's --explain tail explain a segment (its two stages differ; the
    thread may be 0, the idle task a softirq cut into)?"""
    return why[X.x_from] != why[X.x_to]


def explain_record(why, fields, book):
    """--explain's part of a record: its longest segment's time by cause (us), the
    thread that ended it, and what it waited behind; None when no segment was explained
    (none as long as --explain's threshold)."""
    if not explained(why):
        return None
    tid = why[X.x_tid]
    followed = bool(why[X.x_flags] & XF.FOLLOWED)
    segment = "%s->%s" % (STAGE_NAMES[why[X.x_from]], STAGE_NAMES[why[X.x_to]])
    us = dict((c, round(ns / 1000.0, 3)) for c, ns in explain_causes(
        segment, why[X.x_ns:X.x_ns + C.NCAUSES]).items())
    run_queue = why[X.x_ns + Cause.RUN_QUEUE]
    behind = None
    if run_queue and why[X.x_behind]:
        behind = {"pid": why[X.x_behind],
                  "comm": why[X.x_behind_comm].split(b"\0", 1)[0].decode("utf-8", "replace")}
    in_irq = bool(why[X.x_flags] & XF.IN_IRQ)
    return {"segment": segment, "in_irq": in_irq,
            "tid": None if in_irq else tid,
            "thread": book.thread_name(tid, tid) if tid and not in_irq else None,
            "followed": followed, "partial": bool(why[X.x_flags] & XF.PARTIAL),
            "cpu": why[X.x_cpu] if run_queue else None, "behind": behind, "us": us}


MARK = "\x01"      # where a time goes in an output template


class PacketFormatter(object):
    """Detailed mode's per-event work, done once per kind of packet.

    The first packet of a kind (same flow, devices, process and stages seen: the same
    bytes from KIND_AT on) goes through packet_record() and the Reporter, which also
    give its output with marks where the times go; the next ones of that kind only
    have their times filled in, and each time's text is made once per value of ns.
    The output is the same, byte for byte (tests/test_records.py checks it against
    packet_record() and the Reporter for every kind of record)."""
    LIMIT = 4096            # kinds kept
    US_LIMIT = 1 << 16      # texts of times kept

    def __init__(self, reporter, wall_offset):
        self.reporter = reporter
        self.wall_ns = wall_ns(wall_offset)
        # {kind bytes: (output's parts, times of the record, times of an EVENT_TIMES
        # tuple, direction, tap ifindex)}, or False: not templated
        self.kinds = {}
        self.us = {}                # {ns: its text}

    def clear(self):
        """Names changed (devices, VMs): kinds are made again."""
        self.kinds.clear()

    def packet(self, fields, kind, record):
        """The output of one EV_PACKET event (decoded: fields; its kind bytes), None if
        it is not templated; record() makes its packet_record()."""
        entry = self.kinds.get(kind)
        if entry is None:
            entry = self.template(fields, record)
            if len(self.kinds) >= self.LIMIT:
                self.kinds.clear()
            self.kinds[kind] = entry
        return self.fill(entry[0], entry[1](fields)) if entry else None

    def template(self, fields, record):
        sids = [sid for sid in _PATH_SIDS[fields[F.dir]] if fields[sid]]
        path = sum(1 << sid for sid in _PATH_SIDS[fields[F.dir]])
        if len(sids) < 2 or fields[F.seen] & path != sum(1 << sid for sid in sids):
            return False        # no segment, or times the kernel did not mark as seen
        parts = self.reporter.packet_template(record())
        if not parts:
            return False
        # the output's parts with a place between each two for the times, filled in
        # by fill() (a join: cheaper than "%" scanning the whole line for its marks)
        slots = [None] * (2 * len(parts) - 1)
        slots[::2] = parts
        return (slots, operator.itemgetter(*sids), operator.itemgetter(*[1 + s for s in sids]),
                DIRECTIONS[fields[F.dir]], fields[F.vm_ifindex])

    def fill(self, slots, times):
        """The output with the times of a packet: its end, each segment, the total."""
        end = times[-1]
        when = (self.wall_ns + end + 500) // 1000       # wall_us(), inlined
        values = [timestamp_text(when) if self.reporter.json else self.reporter.clock_us(when)]
        texts = self.us
        prev = times[0]
        for t in times[1:]:
            values.append(texts.get(t - prev) or self.us_text(t - prev))
            prev = t
        values.append(texts.get(end - times[0]) or self.us_text(end - times[0]))
        slots[1::2] = values
        return "".join(slots)

    def us_text(self, ns):
        if len(self.us) >= self.US_LIMIT:
            self.us.clear()
        text = self.us[ns] = json_us(ns) if self.reporter.json else \
            self.reporter.fmt_us(round(ns / 1000.0, 3))
        return text


# ============================================================================
# Accounting and reporting
# ============================================================================

def percentile(buckets, fraction):
    """Percentile (us) from {bucket: count}, interpolated inside its bucket."""
    total = sum(buckets.values())
    if not total:
        return None
    rank = fraction * total
    seen = 0
    for b in sorted(buckets):
        count = buckets[b]
        if seen + count >= rank:
            lo, hi = bucket_bounds(b)
            if hi == float("inf"):
                return lo
            inside = (rank - seen) / float(count)
            return lo + (hi - lo) * inside
        seen += count
    return bucket_bounds(max(buckets))[1]


def histogram_json(buckets):
    """A histogram's percentiles and non-empty power-of-two rows, as JSON fields."""
    return {"p50_us": _round(percentile(buckets, 0.50)),
            "p90_us": _round(percentile(buckets, 0.90)),
            "p99_us": _round(percentile(buckets, 0.99)),
            "buckets": [{"lo_us": lo, "hi_us": hi, "count": c}
                        for lo, hi, c in log2_rows(buckets) if c]}


def log2_rows(buckets):
    """Power-of-two rows [lo, hi) us with counts, from the first to the last non-empty."""
    rows = {}
    for b, count in buckets.items():
        lo, _hi = bucket_bounds(b)
        exp = -11 if lo <= 0 else int(lo * 1024).bit_length() - 1 - 10
        rows[exp] = rows.get(exp, 0) + count
    if not rows:
        return []
    out = []
    for exp in range(min(rows), max(rows) + 1):
        lo = 0.0 if exp == -11 else 2.0 ** exp
        out.append((lo, 2.0 ** (exp + 1), rows.get(exp, 0)))
    return out


def order_tables(tables):
    """{(direction index, segment): buckets} as [(direction, segment, buckets)] in path
    order, each direction's total last."""
    out = []
    for d, direction in enumerate(DIRECTIONS):
        order = PATH_ORDER[direction]
        segs = [s for (dd, s) in tables if dd == d and s != "total"]
        segs.sort(key=lambda s: [order.index(x) for x in s.split("->")])
        for s in segs + (["total"] if (d, "total") in tables else []):
            out.append((direction, s, tables[(d, s)]))
    return out


def stats_by_direction(values):
    """The kernel's stats array as {name: (tx, rx)}."""
    n = C.NDIRS     # (a per-CPU count moved between directions can wrap: mod 2^64)
    return dict((name, tuple(values[n * i + d] & COUNT_MASK for d in range(n)))
                for i, name in enumerate(STAT_NAMES))


def can_encode(stream, text):
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def endpoint(ip, port):
    """ADDR:PORT, an IPv6 address in brackets ([fd00::2]:443) as URLs write it."""
    return ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, port)


def _round(v):
    return None if v is None else round(v, 3)


def _num(v):
    return ("%g" % v) if v < 1 else "%d" % v


def summary_line(s):
    # VM-to-VM packets named only when there were some: the line of hosts without them
    # stays the one scripts already read
    vm2vm = ", vm2vm %d" % s["reported_vm2vm"] if s["reported_vm2vm"] else ""
    return ("Summary: %d packets reported (tx %d, rx %d%s); %d below the latency "
            "threshold; %d dropped by the kernel; %d left the traced path before its end; "
            "%d still in flight; %d not tracked (tracking table full); "
            "%d lost by the output buffer; %d vanished untraced"
            % (s["reported"], s["reported_tx"], s["reported_rx"], vm2vm,
               s["below_threshold"], s["dropped"], s["left_path"], s["in_flight"],
               s["not_tracked"], s["lost"], s["vanished"]))


class Reporter(object):
    """Records, histograms and the summary, as text for people or JSON lines."""

    def __init__(self, output, protocol, out=None, sample=1):
        self.out = out or sys.stdout
        self.sample = sample
        fancy = can_encode(self.out, u"\u03bc\u2588")   # over SSH with LANG=C: plain ASCII
        self.us = u"\u03bcs" if fancy else "us"
        self.bar = u"\u2588" if fancy else "#"
        self.json = output == "json"
        self.proto_title = protocol.upper() if protocol != "all" else "ALL"
        self._second, self._hms = None, ""
        self._json = json.JSONEncoder(check_circular=False)

    def write(self, text):
        self.out.write(text)

    def emit_json(self, obj):
        self.out.write(self._json.encode(obj) + "\n")

    def flush(self):
        self.out.flush()

    def clock(self, timestamp):
        """HH:MM:SS.mmm of a time in seconds."""
        return self.clock_us(int(round(timestamp * 1e6)))

    def clock_us(self, us):
        """HH:MM:SS.mmm of a time in whole microseconds, formatting each second once."""
        second, us = divmod(us, 1000000)
        if second != self._second:
            self._second = second
            self._hms = time.strftime("%H:%M:%S", time.localtime(second))
        return "%s.%03d" % (self._hms, us // 1000)

    def fmt_us(self, us):
        return "%.2f%s" % (us, self.us)

    def packet(self, rec):
        if self.json:
            self.emit_json(rec)
        else:
            self.write(self.packet_text(rec))

    def packet_template(self, rec):
        """The output of rec with MARK where its times go (the timestamp, each segment,
        the total), split there; None if a name of the packet holds MARK itself."""
        if self.json:
            marked = dict(rec, timestamp=MARK, total_us=MARK,
                          segments=[dict(seg, us=MARK) for seg in rec["segments"]])
            parts = (self._json.encode(marked) + "\n").split(self._json.encode(MARK))
        else:
            parts = self.packet_text(rec, lambda _t: MARK, lambda _us: MARK).split(MARK)
        return parts if len(parts) == len(rec["segments"]) + 3 else None

    @staticmethod
    def flow_text(rec):
        """What a record's packet is: "10.0.0.1 -> 10.0.0.2 id=7 seq=1", or with ports."""
        if rec["icmp_type"] is not None:
            what = "%s -> %s" % (rec["src_ip"], rec["dst_ip"])
            if rec["icmp_id"] is not None:
                return what + " id=%d seq=%d" % (rec["icmp_id"], rec["icmp_seq"])
            return what + " type=%d" % rec["icmp_type"]
        return "%s -> %s" % (endpoint(rec["src_ip"], rec["src_port"]),
                             endpoint(rec["dst_ip"], rec["dst_port"]))

    @staticmethod
    def vm_text(rec):
        """The record's VM and its device ("web-03 vnet0"), or the device alone."""
        return "%s %s" % (shown_name(rec["vm"]), shown_name(rec["vm_dev"])) if rec["vm"] \
            else shown_name(rec["vm_dev"]) if rec["vm_dev"] else None

    def packet_text(self, rec, clock=None, fmt_us=None):
        clock, fmt_us = clock or self.clock, fmt_us or self.fmt_us
        when = clock(rec["timestamp"])
        proto = rec["protocol"].upper()
        what = self.flow_text(rec)
        vm = self.vm_text(rec)
        phy = rec["phy_dev"] and shown_name(rec["phy_dev"]) + (
            " (%s)" % "/".join(shown_name(d) for d in rec["uplink"]) if rec["uplink"] else "")
        if rec["direction"] == "vm2vm":
            peer = "%s %s" % (shown_name(rec["peer_vm"]), shown_name(rec["peer_vm_dev"])) \
                if rec["peer_vm"] else rec["peer_vm_dev"] and shown_name(rec["peer_vm_dev"])
            ends = (vm, peer)
        else:
            ends = (vm, phy) if rec["direction"] == "tx" else (phy, vm)
        path = " -> ".join(d for d in ends if d)
        if rec["direction"] == "rx" and rec["vm"]:      # "web-03 eth1 -> vnet0", as ever
            path = "%s %s" % (shown_name(rec["vm"]), " -> ".join(
                d for d in (phy, shown_name(rec["vm_dev"])) if d))
        vlan = " vlan=%d" % rec["vlan"] if rec["vlan"] is not None else ""
        tun = rec["tunnel"]
        if tun:
            path += " %s%s" % (tun["type"].upper(), " vni %d" % tun["vni"]
                               if tun["vni"] is not None else "")
        if rec["type"] == "drop":
            return "[%s] DROP %s %s%s %s %s after %s: %s at %s\n" % (
                when, proto, what, vlan, rec["direction"].upper(), path, rec["last_stage"],
                shown_name(rec["reason"]), printable(rec["location"], 2 * NAME_LIMIT))
        segs = " | ".join("%s->%s: %s" % (s["from"], s["to"], fmt_us(s["us"]))
                          for s in rec["segments"])
        who = " | PID: %d (%s)" % (rec["pid"], shown_name(rec["comm"])) \
            if rec["pid"] else ""
        why = rec.get("explain")
        return "[%s] %s %s%s %s %s\n  %s\n  Total Latency: %s%s\n%s" % (
            when, proto, what, vlan, rec["direction"].upper(), path, segs or "-",
            fmt_us(rec["total_us"]), who, ("  why: %s\n" % self.why_text(why, rec))
            if why else "")

    def joined(self, rec):
        """A packet across two hosts (--read-events A --read-events B)."""
        if self.json:
            self.emit_json(rec)
            return
        src, dst = rec["from"], rec["to"]

        def side(r):
            return "%s: %s" % (shown_name(r["host"]), " | ".join(
                "%s->%s: %s" % (s["from"], s["to"], self.fmt_us(s["us"]))
                for s in r["segments"]) or "-")
        ends = ["%s %s" % (shown_name(r["host"]), self.vm_text(r) or shown_name(
            r["phy_dev"] or "-")) for r in (src, dst)]
        unc = rec["clock_uncertainty_us"]
        if rec["wire_us"] is not None:
            wire = "%s \u00b1%s" % (self.fmt_us(rec["wire_us"]), self.fmt_us(unc)) \
                if unc else self.fmt_us(rec["wire_us"])
            total = "%s%s" % (self.fmt_us(rec["total_us"]), " \u00b1%s" % self.fmt_us(unc)
                              if unc else "")
        elif rec["wire_max_us"] is not None:
            wire = "at most %s (the clocks' uncertainty, \u00b1%s, is larger)" % (
                self.fmt_us(rec["wire_max_us"]), self.fmt_us(unc))
            total = "at most %s" % self.fmt_us(rec["total_max_us"])
        else:
            wire = "unknown (no packet went the other way to set the clocks: give " \
                   "--clock-offset)"
            total = "unknown"
        if self.us != u"\u03bcs":
            wire, total = wire.replace(u"\u00b1", "+/-"), total.replace(u"\u00b1", "+/-")
        self.write("[%s] %s %s %s -> %s\n  %s\n  wire %s: %s\n  %s\n  Total Latency: "
                   "%s\n" % (self.clock(rec["timestamp"]), rec["protocol"].upper(),
                              self.flow_text(rec), ends[0], ends[1], side(src), rec["wire"],
                              wire, side(dst), total))

    def join_summary(self, s):
        if self.json:
            self.emit_json(s)
            return
        lines = ["Joined: %d packets across hosts (%s)" % (s["joined"], ", ".join(
            "%s -> %s %d" % (shown_name(p["from"]), shown_name(p["to"]), p["joined"])
            for p in s["pairs"] if p["joined"]))]
        for c in s["clocks"]:
            a, b = (shown_name(h) for h in c["hosts"])
            if c["offset_us"] is None:
                lines.append("  clocks of %s and %s: unknown (no packet went both ways "
                             "between them; give --clock-offset)" % (a, b))
                continue
            lines.append("  clocks: %s's wall clock is %s ahead of %s's, %s (%s)" % (
                b, self.fmt_us(c["wall_clock_ahead_us"]), a,
                "\u00b1" + self.fmt_us(c["uncertainty_us"]) if c["source"] == "estimated"
                else "as given", "from the packets both ways" if c["consistent"] else
                "the packets disagree: the clocks drift apart, or a match is wrong"
                if c["source"] == "estimated" else "--clock-offset"))
        for p in s["pairs"]:
            if p["joined"] or p["sent_only"] or p["received_only"]:
                lines.append("  %s -> %s: %d joined; of those flows, %d left %s and were "
                             "not seen arriving, %d arrived and were not seen leaving" % (
                                 shown_name(p["from"]), shown_name(p["to"]), p["joined"],
                                 p["sent_only"], shown_name(p["from"]), p["received_only"]))
        for h in s["hosts"]:
            lines.append("  %s (%s): %d records, %d not joined (another host's traffic, or "
                         "not seen there), %d VM to VM on the host, %d drops%s" % (
                             shown_name(h["host"]), shown_name(h["file"]), h["records"],
                             h["not_joined"], h["vm2vm"], h["drops"],
                             "; cut short" if h["truncated"] else ""))
        text = "\n".join(lines) + "\n"
        if self.us != u"\u03bcs":
            text = text.replace(u"\u00b1", "+/-")
        self.write(text)

    def why_text(self, why, rec):
        """--explain's line: the segment (its time as the line above prints it) = its
        causes, largest first."""
        causes = [(us, c) for c, us in why["us"].items() if us > 0]
        causes.sort(reverse=True)
        parts = []
        for us, cause in causes:
            text = "%s %s" % (EXPLAIN_WORDS[cause], self.fmt_us(us))
            if cause == "run_queue":
                text += " on CPU %d" % why["cpu"] if why["cpu"] is not None else ""
                if why["behind"]:
                    text += " behind %s[%d]" % (shown_name(why["behind"]["comm"]),
                                               why["behind"]["pid"])
            elif cause == "unknown" and why["in_irq"]:
                text += " (it ended in an interrupt or softirq)"
            elif cause == "unknown" and not why["tid"]:
                text += " (it ended in a softirq on an idle CPU)"
            elif cause == "unknown" and not why["followed"]:
                text += " (%s[%d] is not followed)" % (shown_name(why["thread"] or "?"),
                                                       why["tid"])
            elif cause == "unknown":
                text += " (before the oldest of its events kept)"
            parts.append(text)
        total = [g["us"] for g in rec["segments"]
                 if "%s->%s" % (g["from"], g["to"]) == why["segment"]]
        total = total[0] if total else sum(us for us, _c in causes)
        return "%s %s = %s" % (why["segment"], self.fmt_us(total), " + ".join(parts) or "-")

    def explanations(self, when, added, vm=None):
        """--explain in histogram mode: each explained segment's time this interval, by
        cause ({(direction, segment): [ns by Cause]}); vm: whose (--per-vm)."""
        rows = []
        for (direction, segment), ns in sorted(added.items()):
            causes = explain_causes(segment, ns)
            total = sum(causes.values())
            if total:
                rows.append((direction, segment, causes, total))
        if self.json:
            for direction, segment, causes, total in rows:
                obj = {"type": "explain", "timestamp": round(when, 3)}
                obj.update(vm_json_fields(vm))
                obj.update({"direction": direction, "segment": segment,
                            "us": dict((c, round(v / 1000.0, 3)) for c, v in
                                       sorted(causes.items()))})
                self.emit_json(obj)
            return
        if not rows:
            return
        lines = ["[%s] %sWhy (the explained segments' time, by what the thread that ended "
                 "them did):" % (time.strftime("%H:%M:%S", time.localtime(when)),
                                 vm_heading(vm))]
        for direction, segment, causes, total in rows:
            parts = ["%s %.0f%%" % (EXPLAIN_WORDS[c], 100.0 * v / total)
                     for c, v in sorted(causes.items(), key=lambda cv: -cv[1]) if v]
            lines.append("  %s %s %s: %s" % (direction.upper(), segment,
                                             self.fmt_us(total / 1000.0), " | ".join(parts)))
        self.write("\n".join(lines) + "\n\n")

    def histograms(self, when, tables, vm=None):
        """tables: [(direction, segment, {bucket: count})], segment 'total' last.
        vm: VmTables of --per-vm tables (whose they are)."""
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        if self.json:
            for direction, segment, buckets in tables:
                count = sum(buckets.values())
                obj = {"type": "histogram", "timestamp": round(when, 3)}
                if self.sample > 1:
                    obj["sample"] = self.sample
                obj.update(vm_json_fields(vm))
                obj.update({"direction": direction, "segment": segment, "count": count})
                obj.update(histogram_json(buckets))
                self.emit_json(obj)
            return
        who = vm_heading(vm)
        if not tables:
            self.write("[%s] %sno packets completed the path in this interval\n\n"
                       % (stamp, who))
            return
        current = None
        for direction, segment, buckets in tables:
            if direction != current:
                current = direction
                total = sum(b for d, s, bk in tables if d == direction and s == "total"
                            for b in bk.values())
                self.write("[%s] %sLatency Distribution (%s) - %s %s Path: %d packets%s\n" % (
                    stamp, who, self.us, self.proto_title, direction.upper(), total,
                    " (sampled: 1 in %d)" % self.sample if self.sample > 1 else ""))
            title = "Total" if segment == "total" else "Stage: %s" % segment.replace(
                "->", " -> ")
            self.write(self.histogram_text(title, buckets))
        self.write("\n")

    def histogram_text(self, title, buckets):
        """One table: its title, a bar per power of two, the percentiles."""
        lines = [title]
        rows = log2_rows(buckets)
        peak = max(c for _lo, _hi, c in rows) or 1
        for lo, hi, count in rows:
            label = "[%s-%s)" % (_num(lo), _num(hi))
            lines.append("  %-14s: %-20s %s" % (label, self.bar * int(round(
                20.0 * count / peak)), "{:,}".format(count)))
        lines.append("  Percentiles: P50=%s P90=%s P99=%s" % tuple(
            self.fmt_us(percentile(buckets, f)) for f in (0.5, 0.9, 0.99)))
        return "\n".join(lines) + "\n"

    def joined_histograms(self, tables):
        """Joined hosts' packets as distributions: per pair of hosts, each host's
        segments, the wire and the total ([(sender, receiver, [(segment, buckets)],
        packets, of which without a known wire)])."""
        for sender, receiver, segments, packets, unknown in tables:
            if self.json:
                for segment, buckets in segments:
                    obj = {"type": "histogram", "from_host": sender, "to_host": receiver,
                           "segment": segment, "count": sum(buckets.values())}
                    obj.update(histogram_json(buckets))
                    self.emit_json(obj)
                continue
            self.write("Latency Distribution (%s) - %s -> %s: %d packets%s\n" % (
                self.us, shown_name(sender), shown_name(receiver), packets,
                " (%d with a wire time shorter than the clocks' uncertainty: not in wire "
                "and total)" % unknown if unknown else ""))
            for segment, buckets in segments:
                title = "Total" if segment == "total" else "Wire: phy_xmit -> phy_rx" \
                    if segment == "wire" else "Stage: %s" % shown_name(segment).replace(
                        "->", " -> ")
                self.write(self.histogram_text(title, buckets))
            self.write("\n")

    def summary(self, s):
        if self.json:
            obj = {"type": "summary"}
            obj.update(s)
            self.emit_json(obj)
            return
        self.write(summary_line(s) + "\n")
        if s.get("sample", 1) > 1:
            self.write("  sampled: one packet in %d was traced; every count above is of "
                       "those\n" % s["sample"])
        for f in s["fates"]:
            what = "left the traced path" if f["fate"] == "left_path" else \
                "dropped (%s)" % shown_name(f["reason"])
            self.write("  %s %s after %s: %d\n" % (f["direction"].upper(), what,
                                                   f["last_stage"], f["count"]))
        for v in s["vms"]:
            self.write("  VM %s (%s): %d packets reported\n" % (
                shown_name(v["label"]), ", ".join(shown_name(d) for d in v["vm_dev"]),
                v["reported"]))
        if s["other_vni"]:
            self.write("  %d of another VXLAN/Geneve network (--vni): not followed further\n"
                       % s["other_vni"])
        if s["vm_hist_full"]:
            self.write("  %d histogram counts (or --explain sums) not kept: the --per-vm "
                       "table was full\n" % s["vm_hist_full"])
        for p in s["in_flight_examples"]:
            ends = "%s -> %s" % (p["src_ip"], p["dst_ip"]) if p["src_port"] is None else \
                "%s -> %s" % (endpoint(p["src_ip"], p["src_port"]),
                              endpoint(p["dst_ip"], p["dst_port"]))
            self.write("  still in flight: %s %s %s, after %s for %s\n" % (
                p["direction"].upper(), p["protocol"].upper(), ends, p["last_stage"],
                self.fmt_us(p["waiting_us"])))


def stage_directions(stage):
    """The directions a stage is on, as --list-stages and the metrics say them."""
    return "all" if len(stage.directions) == len(DIRECTIONS) else ",".join(stage.directions)


def probe_names(plan):
    """Where a stage attaches, as perf names it: a return probe is FUNCTION%return."""
    return ",".join(n + ("%return" if plan.method == "kprobe" and a == 0 else "")
                    for n, a in plan.probes)


def list_stages_report(plans, layout, out_json, reporter):
    if out_json:
        for p in plans:
            reporter.emit_json({"type": "stage", "name": p.stage.name,
                                "direction": stage_directions(p.stage), "method": p.method,
                                "probe": probe_names(p) or None,
                                "reason": p.reason or None,
                                "meaning": p.stage.meaning})
        return
    reporter.write("%-12s %-8s %-11s %-34s %s\n" % ("STAGE", "DIR", "METHOD", "PROBE",
                                                     "MEANING / WHY NOT TRACED"))
    for p in plans:
        reporter.write("%-12s %-8s %-11s %-34s %s\n" % (
            p.stage.name, stage_directions(p.stage), p.method or "-",
            probe_names(p) or "-",
            p.stage.meaning if p.method else p.reason))
    reporter.write("struct layouts: %s\n" % layout.source)


def list_vms_report(owners, out_json, reporter):
    rows = sorted(owners.items(), key=lambda kv: (vm_label(kv[1], kv[0]), kv[0]))
    if out_json:
        by_vm = {}
        for tap, vm in rows:
            by_vm.setdefault(vm, []).append({"dev": tap, "switch": switch_of(tap)})
        for vm, taps in sorted(by_vm.items(), key=lambda kv: vm_label(kv[0], kv[1][0]["dev"])):
            reporter.emit_json({"type": "vm", "name": vm.name, "uuid": vm.uuid,
                                "pid": vm.pid, "comm": vm.comm, "taps": taps})
        return
    reporter.write("%-24s %-36s %-8s %-16s %-12s %s\n" % ("VM", "UUID", "PID", "PROCESS",
                                                         "TAP", "SWITCH"))
    for tap, vm in rows:
        reporter.write("%-24s %-36s %-8d %-16s %-12s %s\n" % tuple(
            printable(v, NAME_LIMIT) if isinstance(v, str) else v for v in (
                vm.name or "-", vm.uuid or "-", vm.pid, vm.comm, tap, switch_of(tap))))
    if not rows:
        reporter.write("(no process holds a tap device)\n")


# --- a run: what was reported, and every counter its summary accounts with ---

class RecordedCounters(object):
    """The counters a run ended with: read once from the kernel (final_counters()), or
    a recording's "final" line."""

    def __init__(self, final):
        self.final = final

    def stats(self):
        return self.final["stats"]

    def fates(self):
        return [tuple(f) for f in self.final["fates"]]

    def inflight(self):
        return (self.final["inflight_count"], self.final["inflight_upcalled"],
                self.final["inflight"])

    def upcalls_waiting(self):
        return self.final["upcalls_waiting"]


def final_counters(counters, now, perf_lost):
    """What a run's summary accounts with, read once from the kernel after detaching
    (the summary and the recording's "final" line both use it, as a replay does)."""
    count, upcalled, first = counters.inflight()
    return {"kind": "final", "now": now, "stats": counters.stats(),
            "fates": [list(f) for f in counters.fates()], "inflight": first,
            "inflight_count": count, "inflight_upcalled": upcalled,
            "upcalls_waiting": counters.upcalls_waiting(), "perf_lost": perf_lost}


# What the accounting and reporting of a run need of its options: from the command
# line while tracing, from the recording's meta when replaying.
# explain: --explain's threshold in us (events carry an explanation), None when off
RunSettings = namedtuple("RunSettings", "mode per_vm sample quiet drops explain")
RunSettings.__new__.__defaults__ = (None,)


def run_settings(args):
    return RunSettings(args.mode, args.per_vm, args.sample, args.quiet, args.drops,
                       args.explain)


class NameBook(object):
    """The names of what the kernel side only knows by number: devices and VMs (by
    ifindex), processes and threads (by pid), drop locations (by address).

    Live, each is looked up once (/proc, the kernel's symbols) and recorded before
    the first event that needs it. A replay has only the recording's: this machine's
    processes are others, its devices too."""
    LIMIT = 4096        # names of one kind kept (a pid reused is looked up again)

    def __init__(self, live=True, ksym=None, recorder=None):
        self.devices = {}               # {ifindex: device name}
        self.uplinks = {}               # {NIC ifindex: [devices stacked on it]}
        self.vms = {}                   # {tap ifindex: VmInfo}
        self.known = {"comm": {}, "thread": {}, "location": {}}
        self.live = live
        self.ksym = ksym                # BCC's BPF.ksym (None: addresses as numbers)
        self.recorder = recorder

    def take_recorded(self, kind, value):
        """A recording's line of names (RecordingReader's value): taken; False for a
        line of another kind."""
        if kind == "names":
            self.devices.update(value[0])
            self.uplinks.update(value[1])
        elif kind == "vms":
            self.vms = value
        elif kind in self.known:
            self.known[kind][value[0]] = value[1]
        else:
            return False
        return True

    def _resolve(self, kind, key, lookup):
        cache = self.known[kind]
        name = cache.get(key)
        if name is None:
            name = lookup() if self.live else "?"
            if len(cache) > self.LIMIT:
                cache.clear()
            cache[key] = name
            if self.recorder:
                self.recorder.write({"kind": kind, "key": key, "name": name})
        return name

    def process_name(self, pid):
        return self._resolve("comm", pid, lambda: read_comm("/proc/%d/comm" % pid))

    def thread_name(self, pid, tid):
        return self._resolve("thread", tid,
                             lambda: read_comm("/proc/%d/task/%d/comm" % (pid, tid)))

    def location(self, addr):
        if not addr:
            return "?"
        return self._resolve("location", addr, lambda: ksym_name(self.ksym, addr))

    def set_devices(self, names, uplinks=None):
        """{ifindex: name}; uplinks: {NIC's ifindex: [the VLAN, bond... above it]}."""
        self.devices.update(names)
        self.uplinks.update(uplinks or {})
        if self.recorder:
            self.recorder.write({"kind": "names", "names": dict(
                (str(k), v) for k, v in sorted(self.devices.items())), "uplinks": dict(
                (str(k), v) for k, v in sorted(self.uplinks.items()))})

    def set_vms(self, owners):
        """The VM of each tap ({tap name: VmInfo}), as ifindex -> VmInfo; True if that
        changed. A VM that stopped keeps its name: its packets were counted under it,
        and stay so."""
        by_name = dict((v, k) for k, v in self.devices.items())  # newest ifindex wins
        vms = dict(self.vms)
        vms.update((by_name[t], vm) for t, vm in owners.items() if t in by_name)
        if vms == self.vms:
            return False
        self.vms = vms
        if self.recorder:
            self.recorder.write({"kind": "vms", "vms": dict(
                (str(k), list(v)) for k, v in sorted(vms.items()))})
        return True

    def vm_of(self, tap):
        """(label, VM name or None, device name) of a tap ifindex (0: the host)."""
        if not tap:
            return "host", None, "host"
        vm = self.vms.get(tap)
        dev = self.devices.get(tap, "-")
        return vm_label(vm, dev), vm.name if vm else None, dev


class HistogramDiff(object):
    """The kernel's histogram array counts since the start: what each read added,
    as {(direction index, segment): {bucket: count}}. The last read is kept in place,
    in one array of C integers (no new one per interval)."""

    def __init__(self, segments):
        self.segments = segments
        self.prev = array.array("Q", bytes(8 * hist_slots(segments)))

    def backwards(self, counts):
        return any(c < p for c, p in zip(counts, self.prev))

    def added(self, counts):
        tables, prev = {}, self.prev
        for idx, count in enumerate(counts):
            if count != prev[idx]:
                direction, segment = self.segments[idx // C.HIST_BUCKETS]
                tables.setdefault((DIRECTIONS.index(direction), segment), {})[
                    idx % C.HIST_BUCKETS] = count - prev[idx]
                prev[idx] = count
        return tables


EXPLAIN_SLOTS = C.NDIRS * NSTAGES * NSTAGES * C.NCAUSES


class ExplainDiff(object):
    """--explain in histogram mode: what each read of the kernel's explain_sums added,
    as {(direction, "from->to"): [ns in each cause]} (slot: ((direction * NSTAGES +
    from) * NSTAGES + to) * NCAUSES + cause)."""

    def __init__(self):
        self.prev = array.array("Q", bytes(8 * EXPLAIN_SLOTS))

    def added(self, counts):
        out, prev = {}, self.prev
        for idx, ns in enumerate(counts):
            if ns != prev[idx]:
                key, cause = explain_slot(idx)
                out.setdefault(key, [0] * C.NCAUSES)[cause] += (ns - prev[idx]) & COUNT_MASK
                prev[idx] = ns
        return out


def explain_slot(idx):
    """An explain_sums index as ((direction, "from->to"), cause)."""
    rest, cause = divmod(idx, C.NCAUSES)
    rest, to = divmod(rest, NSTAGES)
    direction, frm = divmod(rest, NSTAGES)
    return (DIRECTIONS[direction], "%s->%s" % (STAGE_NAMES[frm], STAGE_NAMES[to])), cause


def explain_sums_by_vm(counts, base):
    """The per-VM table's explanation sums ({(tap, peer, slot): ns}, slots from
    `base`) as {(tap, peer): {(direction, segment): [ns by cause]}}."""
    out = {}
    for (tap, peer, slot), ns in counts.items():
        if slot >= base and ns:
            key, cause = explain_slot(slot - base)
            out.setdefault((tap, peer), {}).setdefault(key, [0] * C.NCAUSES)[cause] += ns
    return out


class VmHistogramDiff(object):
    """The same for the per-VM table, {(tap, peer, slot): count} (tap: the VM's device;
    VM-to-VM: the sender's, peer the receiver's, else 0): what each (tap, peer) added
    since the last read, as {(tap, peer): {(direction index, segment): {bucket:
    count}}}. A slot past a segment's buckets holds the sum of its ns (the metrics').
    With --explain, the slots after the histogram rows hold each VM's explanation sums:
    what they added comes second, as explain_sums_by_vm() gives it."""

    def __init__(self, segments):
        self.segments = segments
        self.explain_base = vm_explain_base(segments)
        self.prev = {}

    def backwards(self, counts):
        return any(c < self.prev.get(k, 0) for k, c in counts.items())

    def added(self, counts):
        per, prev = {}, self.prev
        for (tap, peer, slot), count in counts.items():
            added = count - prev.get((tap, peer, slot), 0)
            seg, bucket = divmod(slot, C.VM_HIST_ROW)
            if not added or bucket == C.HIST_BUCKETS or slot >= self.explain_base:
                continue
            direction, segment = self.segments[seg]
            buckets = per.setdefault((tap, peer), {}).setdefault(
                (DIRECTIONS.index(direction), segment), {})
            buckets[bucket] = buckets.get(bucket, 0) + added
        explained = explain_sums_by_vm(dict(
            (k, (ns - prev.get(k, 0)) & COUNT_MASK) for k, ns in counts.items()
            if k[2] >= self.explain_base), self.explain_base)
        self.prev = dict(counts)
        return per, explained

    def forget(self, taps):
        for key in [k for k in self.prev if k[0] in taps or k[1] in taps]:
            del self.prev[key]


class Run(object):
    """One run's accounting: what was reported, and every counter its summary
    accounts with. Fed by the kernel while tracing, or by a recording (--read-events);
    the output is the same either way."""

    def __init__(self, settings, reporter, segments, kfree_skb_reason, drop_reasons,
                 wall_offset, book, recorder=None, pcap=None):
        self.settings = settings
        self.reporter = reporter
        self.book = book                # the names of devices, VMs, processes
        self.segments = segments        # [(direction, segment)] of the hist array
        self.kfree_skb_reason = kfree_skb_reason
        self.drop_reasons = drop_reasons
        self.wall_offset = wall_offset
        self.recorder = recorder
        self.pcap = pcap                # --write-pcap: PcapWriter
        self.drop_sink = None           # --top: (VM label, reason) of each drop, not printed
        self.counters = None            # KernelCounters or RecordedCounters
        self.reported = dict.fromkeys(DIRECTIONS, 0)
        self.per_vm_reported = {}       # {tap ifindex: packets reported}
        self.hist_totals = dict.fromkeys(DIRECTIONS, 0)
        self.vm_hist_totals = {}        # --per-vm: {tap ifindex: packets in its totals}
        self.hist = HistogramDiff(segments)
        self.vm_hist = VmHistogramDiff(segments)
        self.perf_lost = 0
        self.output_broken = False
        self.formatter = PacketFormatter(reporter, wall_offset)
        self.pending = []               # outputs of on_times(), written by write_pending()
        # an event: the record, and with --explain what explains its longest segment
        self.explain = settings.explain is not None
        self.event_size = PKT.size + (EXPL.size if self.explain else 0)
        self.explain_sums = ExplainDiff()

    def reason_name(self, code):
        if not self.kfree_skb_reason:
            return "unknown (kernel has no drop reasons)"
        name = self.drop_reasons.get(code)
        return name[len("SKB_DROP_REASON_"):] if name and name.startswith(
            "SKB_DROP_REASON_") else (name or str(code))

    def set_names(self, names, uplinks=None):
        """Devices by ifindex: the outputs made of the old names are made again."""
        self.book.set_devices(names, uplinks)
        self.formatter.clear()

    def set_vms(self, owners):
        if self.book.set_vms(owners):
            self.formatter.clear()

    # -- what happens during a run --
    def on_event(self, data, size=None):
        """One event from BCC's readers (a ctypes pointer) or a recording (bytes)."""
        self.on_record(data if isinstance(data, bytes) else
                       ctypes.string_at(data, self.event_size))

    def on_record(self, buf, off=0):
        """One event, read where it lies: in the ring buffer's pages (RingReader), or
        in bytes. Under BCC's readers this runs inside a ctypes callback: an exception
        would only be printed."""
        if self.output_broken:
            return
        fields = PKT.unpack_from(buf, off)
        why = EXPL.unpack_from(buf, off + PKT.size) if self.explain else None

        def record():
            return packet_record(fields, self.book, self.wall_offset, why)
        text = None
        if fields[F.type] == Ev.PACKET:
            self.reported[DIRECTIONS[fields[F.dir]]] += 1
            vm_if = fields[F.vm_ifindex]
            self.per_vm_reported[vm_if] = self.per_vm_reported.get(vm_if, 0) + 1
            if not (why and explained(why)):        # explained: its own output
                text = self.formatter.packet(fields, bytes(buf[off + KIND_AT:off + PKT.size]),
                                             record)
        if text is None or self.pcap:   # a drop, a packet not templated, a capture
            rec = record()
            if rec["type"] == "drop":
                rec["reason"] = self.reason_name(fields[F.reason])
                rec["location"] = self.book.location(fields[F.location])
            if self.pcap:
                self.pcap.packet(fields, rec, self.wall_offset)
        if self.recorder:       # after the names it needed: a replay meets them first
            self.recorder.event(bytes(buf[off:off + self.event_size]))
        self.write_pending()
        if self.drop_sink and text is None and rec["type"] == "drop":
            self.drop_sink(self.book.vm_of(fields[F.vm_ifindex])[0], rec["reason"])
            return
        try:
            if text is None:
                self.reporter.packet(rec)
            else:
                self.reporter.write(text)
        except (IOError, OSError):
            self.output_broken = True   # the terminal or pipe went away (SIGHUP, EPIPE)

    def on_times(self, t):
        """The common case of on_record(), from an EVENT_TIMES tuple: a packet of a
        kind already templated. False: on_record() must decode it. The output waits
        in `pending` for write_pending() (the reader calls it every RELEASE_EVERY
        records and at the end of each pass)."""
        entry = self.formatter.kinds.get(t[-1])
        if not entry:
            return False
        if self.output_broken:
            return True
        self.pending.append(self.formatter.fill(entry[0], entry[2](t)))
        self.reported[entry[3]] += 1
        self.per_vm_reported[entry[4]] += 1     # set for the tap by on_record()
        return True

    def write_pending(self):
        if not self.pending:
            return
        text = "".join(self.pending)
        del self.pending[:]
        try:
            self.reporter.write(text)
        except (IOError, OSError):
            self.output_broken = True

    def on_perf_lost(self, count):
        # Every sample the perf buffer loses was a perf_submit() that failed, which the
        # program already counted as lost: this is the kernel's own tally of the same
        # losses (kept for --verbose), never added to them.
        self.perf_lost += count

    def histograms(self, when, counts, last=False):
        """The kernel's cumulative counts at `when`: the tables of what this interval
        added (last: the read after detaching, reported only when it added anything).

        A packet completing during the read may have its segments in one interval and
        its total in the next; over the run every count is exact."""
        if self.recorder:
            self.recorder.write({"kind": "hist", "when": when, "last": last, "counts": dict(
                (str(i), c) for i, c in enumerate(counts) if c)})
        tables = order_tables(self.hist.added(counts))
        for direction, segment, buckets in tables:
            if segment == "total":
                self.hist_totals[direction] += sum(buckets.values())
        return tables

    def vm_histograms(self, when, counts, last=False):
        """--per-vm: [((label, name, [taps]), tables, explained)] of what each VM's taps
        added since the last read (VM-to-VM: each sender and receiver's), in the order of
        their labels; explained: with --explain, {(direction, segment): [ns by cause]}."""
        if self.recorder:
            self.recorder.write({"kind": "vmhist", "when": when, "last": last, "counts": dict(
                ("%d:%d:%d" % k, c) for k, c in sorted(counts.items()))})
        per = {}

        def entry_of(tap, peer):
            label, name, dev = self.book.vm_of(tap)
            to = self.book.vm_of(peer) if peer else None    # (label, name, device)
            entry = per.setdefault((label, to and to[0]), (VmTables(label, name, [], to and
                                                                    to[0], to and to[1],
                                                                    []), {}, {}))
            if dev not in entry[0].devs:
                entry[0].devs.append(dev)
            if to and to[2] not in entry[0].peer_devs:
                entry[0].peer_devs.append(to[2])
            return entry

        added, explained = self.vm_hist.added(counts)
        for (tap, peer), by_segment in explained.items():
            into = entry_of(tap, peer)[2]
            for key, ns in by_segment.items():
                into[key] = [a + b for a, b in zip(into.get(key, [0] * C.NCAUSES), ns)]
        for (tap, peer), tables in added.items():
            entry = entry_of(tap, peer)
            for key, buckets in tables.items():
                into = entry[1].setdefault(key, {})
                for b, n in buckets.items():
                    into[b] = into.get(b, 0) + n
                if key[1] == "total":
                    added = sum(buckets.values())
                    self.hist_totals[DIRECTIONS[key[0]]] += added
                    self.vm_hist_totals[tap] = self.vm_hist_totals.get(tap, 0) + added
        return [(who, order_tables(tables), why)
                for _l, (who, tables, why) in sorted(per.items())]

    def report_histograms(self, when, tables, last):
        if (tables or not last) and not self.settings.quiet:
            self.reporter.histograms(when, tables)

    def report_vm_histograms(self, when, per_vm, last):
        """--per-vm: one set of tables per VM; otherwise (the metrics') all VMs' tables
        added up."""
        if self.settings.quiet:
            return
        if not self.settings.per_vm:
            merged = {}
            for _who, tables, _why in per_vm:
                for direction, segment, buckets in tables:
                    into = merged.setdefault((DIRECTIONS.index(direction), segment), {})
                    for b, n in buckets.items():
                        into[b] = into.get(b, 0) + n
            if merged or not last:
                self.reporter.histograms(when, order_tables(merged))
            return
        for who, tables, why in per_vm:
            if tables or not last:
                self.reporter.histograms(when, tables, who)
            if why:
                self.reporter.explanations(when, why, who)
        if not per_vm and not last:
            self.reporter.histograms(when, [])

    def explanations(self, when, counts, last=False):
        """--explain in histogram mode: the kernel's cumulative ns of the explained
        segments at `when`; what this interval added, {(direction, segment): [ns by
        cause]}."""
        if self.recorder:
            self.recorder.write({"kind": "explain", "when": when, "last": last, "counts": dict(
                (str(i), c) for i, c in enumerate(counts) if c)})
        return self.explain_sums.added(counts)

    def report_explanations(self, when, added, last):
        """All VMs' explanations; with --per-vm each VM's come with its histograms."""
        if added and not self.settings.quiet and not self.settings.per_vm:
            self.reporter.explanations(when, added)

    def forget_taps(self, taps):
        """The per-VM counts of these taps were taken out of the kernel's table."""
        if self.recorder:
            self.recorder.write({"kind": "prune", "taps": sorted(taps)})
        self.vm_hist.forget(taps)

    def summary(self, now):
        """Every packet accounted for; `now` (monotonic) dates the in-flight ones."""
        st = stats_by_direction(self.counters.stats())
        in_flight, in_upcall, stuck = self.packets_in_flight(now)
        totals = self.hist_totals if self.settings.mode == "histogram" else self.reported
        fates = []
        for reason, direction, last, count in self.counters.fates():
            fates.append({"direction": DIRECTIONS[direction],
                          "fate": "left_path" if reason == C.FATE_LEFT else "dropped",
                          "reason": None if reason == C.FATE_LEFT else
                          self.reason_name(reason),
                          "last_stage": STAGE_NAMES[last], "count": count})
        fates.sort(key=lambda f: -f["count"])
        out = {"reported": sum(totals.values())}
        out.update(("reported_" + d, totals[d]) for d in DIRECTIONS)
        out.update({
            "started": sum(st["started"]), "completed": sum(st["completed"]),
            "below_threshold": sum(st["below_threshold"]), "dropped": sum(st["dropped"]),
            "left_path": sum(st["left_path"]), "in_flight": in_flight,
            "not_tracked": sum(st["not_tracked"]), "lost": sum(st["lost"]),
            "vanished": sum(st["vanished"]), "in_upcall": in_upcall, "fates": fates,
            "in_flight_examples": stuck, "vms": self.vm_counts(),
            "vm_hist_full": sum(st["vm_hist_full"]), "other_vni": sum(st["other_vni"]),
            "sample": self.settings.sample,
        })
        return out

    def vm_counts(self):
        """Packets reported per VM (its taps' packets), when more than one VM was seen."""
        per = {}
        counts = self.per_vm_reported if self.settings.mode == "detailed" else \
            self.vm_hist_totals
        for vm_if, n in counts.items():
            if not vm_if:
                continue        # host-local traffic: no VM
            vm = self.book.vms.get(vm_if)
            dev = self.book.devices.get(vm_if, str(vm_if))
            key = vm_label(vm, dev)
            entry = per.setdefault(key, {"vm": vm.name if vm else None, "label": key,
                                         "vm_dev": [], "reported": 0})
            if dev not in entry["vm_dev"]:
                entry["vm_dev"].append(dev)
            entry["reported"] += n
        return sorted(per.values(), key=lambda e: e["label"]) if len(per) > 1 else []

    def packets_in_flight(self, now):
        """(in flight, of which waiting for ovs-vswitchd, the first few): each packet
        counted once (an upcalled one is counted by its copy, not by the original)."""
        count, upcalled, first = self.counters.inflight()
        stuck = []
        for raw in first:       # to say where they are waiting
            fields = PKT.unpack(raw)
            rec = packet_record(fields, self.book, self.wall_offset)
            last = STAGE_NAMES[fields[F.last]]
            stuck.append({
                "direction": rec["direction"], "protocol": rec["protocol"],
                "src_ip": rec["src_ip"], "dst_ip": rec["dst_ip"],
                "src_port": rec["src_port"], "dst_port": rec["dst_port"],
                "icmp_seq": rec["icmp_seq"], "last_stage": last,
                "waiting_us": round((now - fields[STAGE_BY_NAME[last].sid] / 1e9) * 1e6, 1)})
        waiting = self.counters.upcalls_waiting()
        return count - upcalled + waiting, waiting, stuck

    def record_final(self, final):
        if self.recorder:
            self.recorder.write(dict(final, inflight=[binascii.hexlify(r).decode()
                                                      for r in final["inflight"]]))


# --- --write-events: a run recorded; --read-events: replayed without root or BPF ---

# A recording is input from outside: it travels with tickets and may be anything. Every
# line is parsed and checked before it is used; what is wrong is one line naming the
# file's line, exit 2. Impossible values (a stage time beyond any uptime, a direction
# that is neither, counts that go backwards) are refused, never printed.

# 2: names before the events, host, "final" in summary; 3: VM-to-VM (a third direction,
# per-VM counts by sender and receiver); 4: the record's longest segment, --explain's tail;
# 5: the TCP sequence (joins); 6: a 32-bit seen (vhost_kick, the 17th stage);
# 7: vhost_signal (18 stages)
RECORDING_FORMAT = 7


def create_private_file(path, option):
    """A file the tool writes as root, opened safely: never through a symbolic link
    (a user who can write to /tmp could point one at a file of root's), never a file
    of another user or one with other hard links, not a FIFO or device; mode 0600 (a
    recording holds every packet's addresses and the VMs' names). Emptied. An fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | \
        getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError("%s %s: a symbolic link, which the tool does not follow: "
                             "give the file's own path" % (option, path))
        raise UsageError("%s %s: %s" % (option, path, e.strerror or e))
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "not a regular file"
    elif st.st_uid != os.geteuid():
        why = "the file belongs to another user (uid %d): not overwritten" % st.st_uid
    elif st.st_nlink != 1:
        why = "the file has other hard links: not overwritten"
    if why:
        os.close(fd)
        raise UsageError("%s %s: %s" % (option, path, why))
    os.ftruncate(fd, 0)
    os.fchmod(fd, 0o600)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def write_all(fd, data):
    """os.write until all of data is written: the count written, or OSError with
    .written set to how much was."""
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except OSError as e:
            e.written = done
            raise
    return done


# --- --write-pcap: the reported packets for Wireshark ---
#
# pcapng (the IETF draft draft-ietf-opsawg-pcapng, its blocks 4.1-4.3): a section header, one interface description per device (the VM's
# tap or macvtap where a packet entered from a VM, the NIC where one came from the
# network), then one enhanced packet block per reported packet or drop, in ns, with the
# record as the packet's comment. The tool reads no payload: the packet's headers are
# rebuilt from the record (raw IP, LINKTYPE_RAW: no made-up MAC addresses), and the
# section's comment says so.
PCAPNG_LINKTYPE_RAW = 101
PCAP_SECTION_COMMENT = ("vm_network_latency: the headers of each packet are rebuilt from "
                        "the tool's record (addresses, protocol, ports, IPv4 id, TCP "
                        "sequence, ICMP echo id and sequence; through tunnels the inner "
                        "packet); no payload, lengths of the headers only. Each packet's "
                        "comment is its record: direction, VM, stages and segments, total, "
                        "a drop's reason.")


def _pcapng_option(code, value):
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _pcapng_block(kind, body):
    body += b"\0" * (-len(body) % 4)
    return struct.pack("<II", kind, len(body) + 12) + body + struct.pack("<I", len(body) + 12)


def _checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff


def rebuilt_headers(f):
    """The packet's IP and L4 headers as far as its record knows them."""
    proto, v6 = f[F.proto], f[F.ip_version] == 6
    size = 16 if v6 else 4
    src, dst = bytes(f[F.saddr][:size]), bytes(f[F.daddr][:size])
    if proto == Proto.TCP:
        l4 = struct.pack("!HHIIBBHHH", f[F.sport], f[F.dport], f[F.tcp_seq], 0, 5 << 4, 0,
                         0, 0, 0)
    elif proto == Proto.UDP:
        l4 = struct.pack("!HHHH", f[F.sport], f[F.dport], 8, 0)
    elif f[F.icmp_type] in ICMP_ECHO.get(proto, ()):
        l4 = struct.pack("!BBHHH", f[F.icmp_type], 0, 0, f[F.sport], f[F.dport])
    else:
        l4 = struct.pack("!BBHI", f[F.icmp_type], 0, 0, 0)
    if v6:
        pseudo = src + dst + struct.pack("!I3xB", len(l4), proto)
    else:
        pseudo = src + dst + struct.pack("!xBH", proto, len(l4))
    at = {Proto.TCP: 16, Proto.UDP: 6}.get(proto, 2)
    summed = l4 if proto == Proto.ICMP else pseudo + l4
    l4 = l4[:at] + struct.pack("!H", _checksum(summed) or 0xffff) + l4[at + 2:]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + src + dst + l4
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(l4), f[F.ip_id], 0, 64, proto, 0) + \
        src + dst
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + l4


def pcap_comment(rec, fmt_us):
    """A packet's record as its comment (as the text output says it, without escapes:
    Wireshark shows text as text)."""
    parts = ["vm_network_latency %s" % rec["direction"].upper()]
    if rec["vm"] or rec["vm_dev"]:
        parts.append("VM %s (%s)" % (rec["vm"] or "-", rec["vm_dev"] or "-"))
    if rec["peer_vm_dev"]:
        parts.append("to VM %s (%s)" % (rec["peer_vm"] or "-", rec["peer_vm_dev"]))
    if rec["phy_dev"]:
        parts.append("NIC %s" % rec["phy_dev"])
    if rec["vlan"] is not None:
        parts.append("vlan %d" % rec["vlan"])
    tun = rec["tunnel"]
    if tun:
        parts.append("%s vni %s outer %s -> %s" % (tun["type"], tun["vni"],
                                                   tun["outer_src_ip"], tun["outer_dst_ip"]))
    text = "; ".join(parts) + "\n" + (" | ".join(
        "%s->%s: %s" % (s["from"], s["to"], fmt_us(s["us"])) for s in rec["segments"])
        or "-")
    if rec["type"] == "drop":
        text += "\nDROPPED after %s: %s at %s" % (rec["last_stage"], rec["reason"],
                                                   rec["location"])
    else:
        text += "\nTotal Latency: %s" % fmt_us(rec["total_us"])
    if rec["pid"]:
        text += " | PID: %d (%s)" % (rec["pid"], rec["comm"])
    why = rec.get("explain")
    if why and why.get("segment"):
        text += "\nwhy: %s" % ", ".join("%s %s" % (c, fmt_us(us)) for c, us in
                                        sorted(why["us"].items()) if us)
    return text


class PcapWriter(object):
    """--write-pcap FILE: opened as --write-events' file is (never through a symbolic
    link, mode 0600, before anything is compiled); each reported packet appended."""

    def __init__(self, path):
        self.path = path
        self.fd = create_private_file(path, "--write-pcap")
        self.ifaces = {}        # {device name: interface id}
        self.pending = []
        self.failed = False
        self.fmt_us = lambda us: "%.2fus" % us
        self._write(_pcapng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) +
                                  _pcapng_option(1, PCAP_SECTION_COMMENT.encode()) +
                                  _pcapng_option(4, ("vm_network_latency " + VERSION)
                                                 .encode()) + _pcapng_option(0, b"")))

    def interface(self, name):
        if name not in self.ifaces:
            self.ifaces[name] = len(self.ifaces)
            self._write(_pcapng_block(1, struct.pack("<HHI", PCAPNG_LINKTYPE_RAW, 0, 0) +
                                      _pcapng_option(2, name.encode("utf-8", "replace")) +
                                      _pcapng_option(9, b"\x09") + _pcapng_option(0, b"")))
        return self.ifaces[name]

    def packet(self, fields, rec, wall_offset):
        """One reported packet or drop: on the device where it entered the path, at the
        time it did (its first stage)."""
        direction = DIRECTIONS[fields[F.dir]]
        dev = (rec["vm_dev"] if direction != "rx" else rec["phy_dev"]) or \
            rec["vm_dev"] or rec["phy_dev"] or "?"
        iface = self.interface(dev)
        seen = [fields[sid] for _n, sid in _PATH_FIELDS[direction] if fields[sid]]
        when = wall_ns(wall_offset) + (seen[0] if seen else 0)
        data = rebuilt_headers(fields)
        comment = pcap_comment(rec, self.fmt_us).encode("utf-8", "replace")
        self._write(_pcapng_block(6, struct.pack("<IIIII", iface, when >> 32,
                                                 when & 0xffffffff, len(data), len(data)) +
                                  data + b"\0" * (-len(data) % 4) +
                                  _pcapng_option(1, comment) + _pcapng_option(0, b"")))

    def _write(self, block):
        self.pending.append(block)
        if len(self.pending) >= 256:
            self.flush()

    def flush(self):
        if not self.pending or self.failed:
            return
        data = b"".join(self.pending)
        del self.pending[:]
        try:
            write_all(self.fd, data)
        except OSError as e:
            self.failed = True
            log("warning: --write-pcap %s: %s: the capture file stops here; tracing goes "
                "on" % (self.path, e.strerror or e))

    def close(self):
        self.flush()
        os.close(self.fd)


# --- --heatmap: latency over time from a recording, as SVG ---
#
# One panel per direction and segment (and the total): x the time, y the latency on a
# log scale (HEAT_ROWS_PER_DECADE rows a decade), each cell's colour how many packets
# took that long then. Per VM with --per-vm. Plain SVG text: any browser shows it.
HEAT_PLOT_W, HEAT_PLOT_H = 900, 150     # a panel's plot area, px
HEAT_LEFT, HEAT_RIGHT, HEAT_TOP = 80, 30, 40
HEAT_PANEL_GAP = 70                     # from one plot area to the next panel's title
HEAT_COLUMNS = 300                      # time bins across a plot (3 px each)
HEAT_ROWS_PER_DECADE = 8
# yellow to dark red (ColorBrewer's YlOrRd without its palest): one packet is seen
HEAT_COLOURS = ["#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]


def _xml(text):
    """A name from a recording, safe in SVG text and attributes."""
    return (printable(text, 4 * NAME_LIMIT).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))


def _us_label(us):
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return "%g %s" % (us / scale, unit)
    return "%g \u00b5s" % us


def _time_ticks(t0, t1):
    """Tick times (seconds since the epoch) at a round step, 4 to 10 of them."""
    span = max(t1 - t0, 1e-3)
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600,
                 7200, 21600, 43200, 86400):
        if span / step <= 10:
            break
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) / step) + 1)]


class HeatPanel(object):
    def __init__(self, title, vm):
        self.title, self.vm = title, vm
        self.points = []        # [(wall time s, latency us)]


def heatmap_panels(run_records, per_vm):
    """[(VM heading or None, [HeatPanel])] from [(packet record)] in time order."""
    groups = {}
    for rec in run_records:
        who = None
        if per_vm:
            who = "VM %s (%s)" % (rec["vm"] or rec["vm_dev"] or "host", rec["vm_dev"] or "-")
            if rec["peer_vm_dev"]:
                who += " -> VM %s (%s)" % (rec["peer_vm"] or rec["peer_vm_dev"],
                                           rec["peer_vm_dev"])
        panels = groups.setdefault(who, {})
        when = rec["timestamp"]
        for seg in rec["segments"]:
            key = (DIRECTIONS.index(rec["direction"]), "%s->%s" % (seg["from"], seg["to"]))
            panels.setdefault(key, HeatPanel("%s %s" % (rec["direction"].upper(), key[1]),
                                             who)).points.append((when, seg["us"]))
        key = (DIRECTIONS.index(rec["direction"]), "total")
        panels.setdefault(key, HeatPanel("%s total" % rec["direction"].upper(), who)
                          ).points.append((when, rec["total_us"]))
    out = []
    for who in sorted(groups, key=lambda w: w or ""):
        by_path = groups[who]
        order = sorted(by_path, key=lambda k: (k[0], k[1] == "total",
                                                path_position(k[0], k[1])))
        out.append((who, [by_path[k] for k in order]))
    return out


def path_position(direction, segment):
    """Where a segment's first stage is on its direction's path (the panels' order)."""
    names = PATH_ORDER[DIRECTIONS[direction]]
    first = segment.split("->")[0]
    return names.index(first) if first in names else len(names)


def heatmap_svg(groups, source):
    """The SVG text of the panels, all on one time axis."""
    times = [t for _w, panels in groups for p in panels for t, _us in p.points]
    t0, t1 = min(times), max(times)
    if t1 - t0 < 1e-3:
        t1 = t0 + 1e-3
    count = sum(len(panels) for _w, panels in groups)
    height = HEAT_TOP + 40 + count * (HEAT_PLOT_H + HEAT_PANEL_GAP) + \
        sum(30 for who, _p in groups if who)
    width = HEAT_LEFT + HEAT_PLOT_W + HEAT_RIGHT + 110
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">'
           % (width, height, width, height),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="24" font-size="16">vm_network_latency: latency over time '
           '(%s)</text>' % (HEAT_LEFT, _xml(source))]
    y = HEAT_TOP + 20
    n = 0
    for who, panels in groups:
        if who:
            y += 30
            out.append('<text x="10" y="%d" font-size="15" font-weight="bold">%s</text>'
                       % (y - 8, _xml(who)))
        for panel in panels:
            out += heatmap_panel_svg(panel, n, y, t0, t1)
            y += HEAT_PLOT_H + HEAT_PANEL_GAP
            n += 1
    out.append("</svg>")
    return "\n".join(out) + "\n"


def heatmap_panel_svg(panel, n, top, t0, t1):
    lat = [us for _t, us in panel.points if us > 0]
    lo = 10 ** math.floor(math.log10(min(lat))) if lat else 1.0
    hi = 10 ** math.ceil(math.log10(max(lat))) if lat else 10.0
    if hi <= lo:
        hi = lo * 10
    decades = int(round(math.log10(hi / lo)))
    rows = decades * HEAT_ROWS_PER_DECADE
    x0, y0 = HEAT_LEFT, top + 20          # the plot area's top left
    cells = {}
    for t, us in panel.points:
        col = min(HEAT_COLUMNS - 1, int((t - t0) / (t1 - t0) * HEAT_COLUMNS))
        row = min(rows - 1, max(0, int(math.log10(max(us, lo) / lo) * HEAT_ROWS_PER_DECADE)))
        cells[(col, row)] = cells.get((col, row), 0) + 1
    peak = max(cells.values()) if cells else 1
    cw, rh = HEAT_PLOT_W / float(HEAT_COLUMNS), HEAT_PLOT_H / float(rows)
    bin_s = (t1 - t0) / HEAT_COLUMNS
    title = "%s%s: %d packets" % ((panel.vm + ": ") if panel.vm else "", panel.title,
                                  len(panel.points))
    out = ['<g id="panel-%d">' % n,
           '<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>'
           % (x0, top + 12, _xml(title)),
           # the plot area, and what the tests read back from the picture
           '<rect id="plot-%d" x="%d" y="%d" width="%d" height="%d" fill="none" '
           'stroke="#888" data-panel="%s" data-vm="%s" data-t0="%.6f" data-t1="%.6f" '
           'data-lat-min-us="%g" data-lat-max-us="%g"/>'
           % (n, x0, y0, HEAT_PLOT_W, HEAT_PLOT_H, _xml(panel.title), _xml(panel.vm or ""),
              t0, t1, lo, hi)]
    for (col, row), c in sorted(cells.items()):
        shade = HEAT_COLOURS[min(len(HEAT_COLOURS) - 1, int(
            math.log(c) / math.log(peak) * (len(HEAT_COLOURS) - 1) + 0.5) if peak > 1 else 0)]
        out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%d '
                   'packets</title></rect>' % (x0 + col * cw, y0 + HEAT_PLOT_H - (row + 1) * rh,
                                               cw + 0.05, rh + 0.05, shade, c))
    for d in range(decades + 1):        # the latency axis, a line a decade
        yy = y0 + HEAT_PLOT_H - d * HEAT_ROWS_PER_DECADE * rh
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ccc"/>'
                   % (x0 - 4, yy, x0 + HEAT_PLOT_W, yy))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (x0 - 6, yy + 4, _us_label(lo * 10 ** d)))
    for t in _time_ticks(t0, t1):       # the time axis
        xx = x0 + (t - t0) / (t1 - t0) * HEAT_PLOT_W
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#888"/>'
                   % (xx, y0 + HEAT_PLOT_H, xx, y0 + HEAT_PLOT_H + 4))
        out.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (
            xx, y0 + HEAT_PLOT_H + 16, time.strftime("%H:%M:%S", time.localtime(t)) +
            ("" if abs(t - round(t)) < 1e-6 else (".%d" % int(round((t % 1) * 10))))))
    out.append('<text x="%d" y="%d" text-anchor="end" fill="#444">latency (log), time '
               '(%s a column), colour: packets (1 to %d)</text>' % (
                   x0 + HEAT_PLOT_W, y0 + HEAT_PLOT_H + 32,
                   "%.3g s" % bin_s, peak))
    for i, shade in enumerate(HEAT_COLOURS):        # the colour key
        out.append('<rect x="%d" y="%.1f" width="14" height="%.1f" fill="%s"/>' % (
            x0 + HEAT_PLOT_W + 12, y0 + HEAT_PLOT_H - (i + 1) * HEAT_PLOT_H /
            float(len(HEAT_COLOURS)), HEAT_PLOT_H / float(len(HEAT_COLOURS)), shade))
    out.append('<text x="%d" y="%d">1</text>' % (x0 + HEAT_PLOT_W + 30, y0 + HEAT_PLOT_H))
    out.append('<text x="%d" y="%d">%d</text>' % (x0 + HEAT_PLOT_W + 30, y0 + 10, peak))
    out.append("</g>")
    return out


def write_heatmap(path, out_path, per_vm):
    """--read-events F --heatmap OUT: every packet record of F, drawn."""
    reader = RecordingReader(path)
    if reader.meta["mode"] != "detailed":
        reader.fail("recorded in histogram mode: a heat map is drawn from each packet's "
                    "record (record with --mode detailed)", line=False)
    book = NameBook(live=False)
    records = []
    for _line, kind, value in reader:
        if kind == "event":
            fields = PKT.unpack_from(value)
            if fields[F.type] == Ev.PACKET:
                records.append(packet_record(fields, book, reader.meta["wall_offset"]))
        else:
            book.take_recorded(kind, value)
    if not records:
        raise UsageError("--heatmap: %s holds no packet to draw" % path)
    svg = heatmap_svg(heatmap_panels(records, per_vm), os.path.basename(path))
    fd = create_private_file(out_path, "--heatmap")
    try:
        write_all(fd, svg.encode("utf-8"))
    except OSError as e:
        raise Fatal("--heatmap %s: %s" % (out_path, e.strerror or e))
    finally:
        os.close(fd)
    log("--heatmap %s: %d packets, %d panels" % (out_path, len(records), svg.count(
        '<g id="panel-')))
    return 0


class Recorder(object):
    """--write-events: the run's raw events and what is needed to read them again.

    One JSON object a line: "meta" first, then a blank line held in reserve; "names"
    (ifindex -> device), "vms", "comm", "thread" and "location" the first time each is
    resolved, always before the first event that needs it; "event" (the raw record,
    hex) as each arrives; "hist" and "vmhist" (the kernel's cumulative counts) at each
    interval, "prune" when per-VM counts of taps that are gone are forgotten; "final"
    (counters, the first few packets still in flight) last. --read-events replays it
    (RecordingReader).

    The file is opened before anything is compiled (a bad path is reported at once).
    A write that fails (a full disk) ends the recording, not the run: the file is cut
    back to its last whole line, and the reserved line is overwritten in place (no new
    space needed) with a "truncated" mark saying where and why, so it still replays."""
    FLUSH_BYTES = 1 << 16
    RESERVE = 255           # bytes of the reserved line, before its newline

    def __init__(self, path):
        self.path = path
        self.fd = create_private_file(path, "--write-events")
        self._json = json.JSONEncoder(check_circular=False, sort_keys=True)
        self.pending, self.pending_bytes = [], 0
        self.written = self.lines = 0   # whole lines in the file, and their bytes
        self.reserved_at = None
        self.failed = None

    def write_meta(self, meta):
        self.write(meta)
        self.flush()
        self.reserved_at = self.written
        self._line(" " * self.RESERVE + "\n")

    def write(self, obj):
        self._line(self._json.encode(obj) + "\n")

    def event(self, raw):
        self._line('{"kind": "event", "raw": "%s"}\n' % binascii.hexlify(raw).decode())

    def _line(self, text):
        if self.failed is None:
            self.pending.append(text)
            self.pending_bytes += len(text)
            if self.pending_bytes >= self.FLUSH_BYTES:
                self.flush()

    def flush(self):
        if not self.pending or self.failed is not None:
            return
        data = "".join(self.pending).encode()
        count = len(self.pending)
        del self.pending[:]
        self.pending_bytes = 0
        try:
            self.written += write_all(self.fd, data)
            self.lines += count
        except OSError as e:
            self.fail(e, data[:e.written])

    def fail(self, error, partial):
        """Keep what was written up to its last whole line, mark the cut, say so once."""
        self.failed = error
        whole = partial[:partial.rfind(b"\n") + 1]
        self.written += len(whole)
        self.lines += whole.count(b"\n")
        why = error.strerror or str(error)
        mark = self._json.encode({"kind": "truncated", "why": why[:100],
                                  "after_line": self.lines}).encode()
        try:
            os.ftruncate(self.fd, self.written)
            if self.reserved_at is not None:
                os.pwrite(self.fd, mark.ljust(self.RESERVE), self.reserved_at)
        except OSError:
            pass        # then the replay says the recording ends before the run did
        log("warning: --write-events %s: %s: the recording stops here (it replays up to "
            "this point); tracing goes on" % (self.path, why))

    def close(self):
        self.flush()
        os.close(self.fd)


def host_identity():
    """Which host made a recording: its name, this boot of it, its kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except (IOError, OSError):
        boot_id = ""
    u = os.uname()
    return {"hostname": socket.gethostname(), "boot_id": boot_id, "kernel": u[2],
            "machine": u[4]}


def recording_meta(settings, opts, plan, layout, wall_offset):
    """The recording's first line: what it needs to be read again, and its host."""
    return {"kind": "meta", "tool": "vm_network_latency", "version": VERSION,
            "format": RECORDING_FORMAT, "host": host_identity(),
            "record": PKT.format, "record_fields": [[n, t, c] for n, t, c, _w in RECORD_FIELDS],
            "stages": STAGE_NAMES, "plans": dict((p.stage.name, p.method) for p in plan.plans),
            "segments": [list(x) for x in plan.segments], "mode": settings.mode,
            "protocol": opts.protocol, "drops": settings.drops, "per_vm": settings.per_vm,
            "sample": settings.sample, "per_vm_kernel": opts.per_vm,
            "explain": settings.explain, "explain_record": EXPL.format,
            "kfree_skb_reason": layout.kfree_skb_reason,
            "drop_reasons": dict((str(k), v) for k, v in layout.drop_reasons.items()),
            "wall_offset": wall_offset}


RECORDING_LINE_MAX = 64 << 20   # bytes: the longest line a run writes is far below
TIME_MAX_NS = 1 << 60           # 36 years of uptime: a monotonic stamp is below it
WALL_MAX_S = 1 << 34            # the wall clock's offset from it: before year 2514
COUNT_MAX = COUNT_MASK


class BadRecording(Exception):
    """What is wrong with one line of a recording (the reader adds where)."""


def _want(ok, what, *args):
    if not ok:
        raise BadRecording(what % args if args else what)


def _shown(v):
    """A value of a recording in a message (json's and repr()'s text is printable)."""
    return printable(json.dumps(v) if not isinstance(v, str) else repr(v), 40)


def _int(v, lo, hi, what):
    _want(isinstance(v, int) and not isinstance(v, bool), "%s is not a whole number: %s",
          what, _shown(v))
    _want(lo <= v <= hi, "%s %d is outside %d-%d", what, v, lo, hi)
    return v


def _number(v, lo, hi, what):
    _want(isinstance(v, (int, float)) and not isinstance(v, bool) and
          not (isinstance(v, float) and (math.isnan(v) or math.isinf(v))),
          "%s is not a number: %s", what, _shown(v))
    _want(lo <= v <= hi, "%s %s is outside %s-%s", what, _shown(v), lo, hi)
    return v


def _text(v, what, limit=4096):
    _want(isinstance(v, str), "%s is not a string: %s", what, _shown(v))
    _want(len(v) <= limit, "%s is longer than %d characters", what, limit)
    return v


def _bool(v, what):
    _want(isinstance(v, bool), "%s is not true or false: %s", what, _shown(v))
    return v


def _list(v, what, length=None, limit=1 << 20):
    _want(isinstance(v, list), "%s is not a list: %s", what, _shown(v))
    _want(length is None or len(v) == length, "%s has %d items, not %s", what, len(v),
          length)
    _want(len(v) <= limit, "%s has more than %d items", what, limit)
    return v


def _dict(v, what):
    _want(isinstance(v, dict), "%s is not an object: %s", what, _shown(v))
    return v


def _key(obj, key, kind):
    _want(key in obj, "%s without %r", kind, key)
    return obj[key]


def _int_key(text, lo, hi, what):
    """A number that JSON could only hold as an object's key (a string)."""
    _want(re.match(r"^(0|[1-9][0-9]{0,19})$", text) is not None,
          "%s %s is not a whole number", what, _shown(text))
    return _int(int(text), lo, hi, what)


def check_explain_fields(why, fields):
    """An event's explanation: a stage it passed, flags it can have, times within the
    packet's own; nothing explained is all zeros."""
    if not explained(why):
        _want(not any(why[X.x_ns:X.x_ns + C.NCAUSES]) and not why[X.x_behind]
              and not why[X.x_tid] and not why[X.x_flags],
              "an explanation of nothing has times")
        return
    for end in (X.x_from, X.x_to):
        _want(why[end] < NSTAGES and fields[why[end]],
              "explained stage %d, which the packet did not pass", why[end])
    _want(fields[why[X.x_from]] < fields[why[X.x_to]], "an explained segment that ends "
          "before it starts")
    _want(not why[X.x_flags] & ~(XF.FOLLOWED | XF.PARTIAL | XF.IN_IRQ),
          "explanation flags %d", why[X.x_flags])
    total = sum(why[X.x_ns:X.x_ns + C.NCAUSES])
    _want(total <= fields[why[X.x_to]] - fields[why[X.x_from]] + 1,
          "an explanation longer than its segment")


def _hex_record(v, what, size=None):
    size = size or PKT.size
    _text(v, what, 2 * size)
    _want(len(v) == 2 * size, "%s has %d bytes, a record has %d", what, len(v) // 2, size)
    try:
        raw = binascii.unhexlify(v)
    except (binascii.Error, TypeError, ValueError):
        raise BadRecording("%s is not hexadecimal" % what)
    return raw


def check_packet_fields(fields, what, event=True):
    """A record's values as the kernel writes them, or BadRecording."""
    d = fields[F.dir]
    _want(d in (Dir.TX, Dir.RX, Dir.VM2VM), "%s: direction %d is not tx (0), rx (1) or "
          "vm2vm (2)", what, d)
    if event:
        _want(fields[F.type] in (Ev.PACKET, Ev.DROP), "%s: type %d is neither a packet "
              "(%d) nor a drop (%d)", what, fields[F.type], Ev.PACKET, Ev.DROP)
    _want(fields[F.last] < NSTAGES, "%s: stage %d does not exist (%d stages)", what,
          fields[F.last], NSTAGES)
    _want(fields[F.ip_version] in (4, 6), "%s: IP version %d", what, fields[F.ip_version])
    _want(fields[F.outer_version] in (0, 4, 6), "%s: outer IP version %d", what,
          fields[F.outer_version])
    _want(fields[F.tunnel] in (0,) + tuple(TUNNEL_NAMES), "%s: tunnel type %d", what,
          fields[F.tunnel])
    seen = 0
    for sid in range(NSTAGES):
        t = fields[sid]
        _want(t < TIME_MAX_NS, "%s: the time of stage %s (%d ns) is beyond any uptime",
              what, STAGE_NAMES[sid], t)
        if t:
            seen |= 1 << sid
    path = _PATH_SIDS[d]
    _want(not seen & ~sum(1 << sid for sid in path), "%s: a stage off the %s path has a "
          "time", what, DIRECTIONS[d])
    _want(fields[F.seen] == seen, "%s: the stages marked seen are not those with a time",
          what)
    _want(any(fields[sid] for sid in START_SIDS[d]), "%s: no time where the %s path starts",
          what, DIRECTIONS[d])
    times = [fields[sid] for sid in path if fields[sid]]
    _want(times == sorted(times), "%s: stage times out of path order", what)
    return fields


class RecordingReader(object):
    """A recording's lines, parsed and checked: .meta, then (line number, kind, value)
    from iterating. UsageError (the file, the line, what is wrong) for anything else."""

    def __init__(self, path):
        self.path = path
        self.line = 0
        try:
            self.f = open(path, "rb")
        except (IOError, OSError) as e:
            raise UsageError("--read-events %s: %s" % (path, e.strerror or e))
        if not stat.S_ISREG(os.fstat(self.f.fileno()).st_mode):
            self.f.close()
            raise UsageError("--read-events %s: not a regular file" % path)
        self.hist_slots = self.vm_slots = 0
        first = self._next()
        if first is None:
            self.fail("an empty file, not a recording of this tool", line=False)
        try:
            self.meta = self.check_meta(first)
        except BadRecording as e:
            self.fail(str(e))

    def fail(self, what, line=True):
        self.f.close()
        raise UsageError("--read-events %s: %s%s" % (
            self.path, "line %d: " % self.line if line else "", what))

    def _next(self):
        """The next line's object (None at the end); events' fixed form without JSON."""
        while True:
            data = self.f.readline(RECORDING_LINE_MAX + 1)
            if not data:
                return None
            self.line += 1
            if len(data) > RECORDING_LINE_MAX:
                self.fail("longer than %d bytes" % RECORDING_LINE_MAX)
            if data.startswith(b'{"kind": "event", "raw": "') and data.endswith(b'"}\n') \
                    and len(data) == 2 * PKT.size + 30:
                return {"kind": "event", "raw": data[26:-3].decode("ascii", "replace")}
            if data.strip():
                break
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            self.fail("not UTF-8 text")
        except RecursionError:
            self.fail("JSON nested too deeply")
        except ValueError as e:
            self.fail("not JSON (%s)" % printable(e, 80))
        if not isinstance(obj, dict):
            self.fail("not a JSON object but %s" % _shown(obj))
        return obj

    def __iter__(self):
        with self.f:
            while True:
                obj = self._next()
                if obj is None:
                    return
                try:
                    kind = _text(_key(obj, "kind", "an object"), "kind", 32)
                    check = self.CHECKS.get(kind)
                    _want(check is not None, "unknown kind %s", _shown(kind))
                    value = check(self, obj)
                except BadRecording as e:
                    self.fail("%s" % e)
                yield self.line, kind, value

    # -- one check per kind; each returns what replay() uses --
    def check_meta(self, obj):
        _want(obj.get("kind") == "meta" and obj.get("tool") == "vm_network_latency",
              "not a recording of this tool")
        version = _text(_key(obj, "version", "meta"), "version", 64)
        fmt = obj.get("format", 1)
        _want(fmt == RECORDING_FORMAT, "recorded by version %s in format %s; this version "
              "reads format %d: replay it with the version that made it", version,
              _shown(fmt), RECORDING_FORMAT)
        _want(obj.get("record") == PKT.format and obj.get("stages") == STAGE_NAMES,
              "recorded by version %s, whose record or stages differ from this version's",
              version)
        segments = []
        for seg in _list(_key(obj, "segments", "meta"), "segments", limit=4096):
            _list(seg, "a segment", 2)
            _want(seg[0] in DIRECTIONS, "segment direction %s", _shown(seg[0]))
            names = _text(seg[1], "a segment's name", 64)
            _want(names == "total" or all(n in STAGE_NAMES for n in names.split("->")),
                  "segment %s", _shown(names))
            segments.append((seg[0], names))
        meta = {
            "version": version, "segments": segments,
            "mode": _key(obj, "mode", "meta"), "protocol": _key(obj, "protocol", "meta"),
            "drops": _bool(_key(obj, "drops", "meta"), "drops"),
            "per_vm": _bool(_key(obj, "per_vm", "meta"), "per_vm"),
            "sample": _int(_key(obj, "sample", "meta"), 1, 1000000, "sample"),
            "kfree_skb_reason": _bool(_key(obj, "kfree_skb_reason", "meta"),
                                      "kfree_skb_reason"),
            "wall_offset": _number(_key(obj, "wall_offset", "meta"), 0, WALL_MAX_S,
                                   "wall_offset"),
            "drop_reasons": dict(
                (_int_key(k, 0, 0xffffffff, "a drop reason"), _text(v, "a drop reason"))
                for k, v in _dict(_key(obj, "drop_reasons", "meta"),
                                  "drop_reasons").items()),
            "host": dict((_text(k, "host", 64), _text(v, "host", 256)) for k, v in
                         _dict(_key(obj, "host", "meta"), "host").items()),
        }
        _want(meta["mode"] in ("detailed", "histogram"), "mode %s", _shown(meta["mode"]))
        _want(meta["protocol"] in PROTOCOL_CHOICES, "protocol %s", _shown(meta["protocol"]))
        explain = _key(obj, "explain", "meta")
        meta["explain"] = None if explain is None else \
            _number(explain, 0, LATENCY_THRESHOLD_MAX_US, "explain")
        _want(explain is None or obj.get("explain_record") == EXPL.format,
              "recorded by version %s, whose explanations differ from this version's",
              version)
        self.event_size = PKT.size + (EXPL.size if explain is not None else 0)
        self.hist_slots = hist_slots(segments)
        self.vm_slots = vm_explain_base(segments) + (EXPLAIN_SLOTS if explain is not None
                                                     else 0)
        return meta

    def check_event(self, obj):
        raw = _hex_record(_key(obj, "raw", "an event"), "the event", self.event_size)
        fields = PKT.unpack_from(raw)
        check_packet_fields(fields, "the event")
        if self.event_size > PKT.size:
            check_explain_fields(EXPL.unpack_from(raw, PKT.size), fields)
        return raw

    def check_explain(self, obj):
        when, last, counts = self._counts(obj)
        return when, last, dict(
            (_int_key(k, 0, EXPLAIN_SLOTS - 1, "an explanation's index"),
             _int(v, 0, COUNT_MAX, "ns")) for k, v in counts.items())

    def check_names(self, obj):
        names = dict((_int_key(k, 0, 0xffffffff, "an ifindex"), _text(v, "a device name"))
                     for k, v in _dict(_key(obj, "names", "names"), "names").items())
        uplinks = dict((_int_key(k, 0, 0xffffffff, "an ifindex"),
                        [_text(d, "a device name") for d in _list(v, "an uplink", limit=8)])
                       for k, v in _dict(_key(obj, "uplinks", "names"), "uplinks").items())
        return names, uplinks

    def check_vms(self, obj):
        vms = {}
        for k, v in _dict(_key(obj, "vms", "vms"), "vms").items():
            name, uuid, pid, comm = _list(v, "a VM", 4)
            vms[_int_key(k, 0, 0xffffffff, "an ifindex")] = VmInfo(
                None if name is None else _text(name, "a VM's name"),
                None if uuid is None else _text(uuid, "a VM's UUID"),
                None if pid is None else _int(pid, 0, 0xffffffff, "a VM's pid"),
                None if comm is None else _text(comm, "a VM's process name"))
        return vms

    def check_name(self, obj):
        limit = COUNT_MAX if obj["kind"] == "location" else 0xffffffff
        return (_int(_key(obj, "key", obj["kind"]), 0, limit, "the key"),
                _text(_key(obj, "name", obj["kind"]), "the name"))

    def _counts(self, obj):
        return (_number(_key(obj, "when", obj["kind"]), 0, WALL_MAX_S, "when"),
                _bool(_key(obj, "last", obj["kind"]), "last"),
                _dict(_key(obj, "counts", obj["kind"]), "counts"))

    def check_hist(self, obj):
        when, last, counts = self._counts(obj)
        _want(self.hist_slots, "histogram counts, but the run has no histograms")
        return when, last, dict(
            (_int_key(k, 0, self.hist_slots - 1, "a histogram index"),
             _int(v, 0, COUNT_MAX, "a count")) for k, v in counts.items())

    def check_vmhist(self, obj):
        when, last, counts = self._counts(obj)
        out = {}
        for k, v in counts.items():
            parts = k.split(":")
            _want(len(parts) == 3, "per-VM key %s is not TAP:PEER:SLOT", _shown(k))
            out[(_int_key(parts[0], 0, 0xffffffff, "a per-VM ifindex"),
                 _int_key(parts[1], 0, 0xffffffff, "a per-VM peer ifindex"),
                 _int_key(parts[2], 0, self.vm_slots - 1, "a per-VM slot"))] = \
                _int(v, 0, COUNT_MAX, "a count")
        return when, last, out

    def check_prune(self, obj):
        return [_int(t, 0, 0xffffffff, "an ifindex") for t in
                _list(_key(obj, "taps", "prune"), "taps")]

    def check_final(self, obj):
        def count(key):
            return _int(_key(obj, key, "final"), 0, COUNT_MAX, key)
        stats = [_int(v, 0, COUNT_MAX, "a counter") for v in
                 _list(_key(obj, "stats", "final"), "stats", C.NSTATS)]
        fates = []
        for f in _list(_key(obj, "fates", "final"), "fates"):
            reason, d, last, n = _list(f, "a fate", 4)
            fates.append((_int(reason, 0, 0xffffffff, "a drop reason"),
                          _int(d, 0, C.NDIRS - 1, "a direction"),
                          _int(last, 0, NSTAGES - 1, "a stage"),
                          _int(n, 0, COUNT_MAX, "a count")))
        inflight = []
        for h in _list(_key(obj, "inflight", "final"), "inflight", limit=INFLIGHT_EXAMPLES):
            raw = _hex_record(h, "a record in flight")
            check_packet_fields(PKT.unpack(raw), "a record in flight", event=False)
            inflight.append(raw)
        final = {"now": _number(_key(obj, "now", "final"), 0, TIME_MAX_NS / 1e9, "now"),
                 "stats": stats, "fates": fates, "inflight": inflight,
                 "inflight_count": count("inflight_count"),
                 "inflight_upcalled": count("inflight_upcalled"),
                 "upcalls_waiting": count("upcalls_waiting"),
                 "perf_lost": count("perf_lost")}
        _want(final["inflight_upcalled"] <= final["inflight_count"] >= len(inflight),
              "more packets in flight listed than counted")
        return final

    def check_truncated(self, obj):
        return (_text(_key(obj, "why", "truncated"), "why", 256),
                _int(_key(obj, "after_line", "truncated"), 1, COUNT_MAX, "after_line"))

    CHECKS = {"event": check_event, "names": check_names, "vms": check_vms,
              "comm": check_name, "thread": check_name, "location": check_name,
              "hist": check_hist, "vmhist": check_vmhist, "prune": check_prune,
              "explain": check_explain, "final": check_final, "truncated": check_truncated}


# --- metrics for Prometheus (--prometheus, --prometheus-textfile) ---

# Classic cumulative buckets on powers of two, 1 us to 2^26 us (67 s), then +Inf. Each
# bound is an edge of the kernel's own buckets: the counts are exact, never re-sampled
# (a latency of exactly 2^k us, to the nanosecond, is counted in the next bucket).
PROM_BUCKETS_US = [float(2 ** k) for k in range(27)]


def import_prometheus():
    """prometheus_client, the ecosystem's own library: needed only by the metrics."""
    try:
        import prometheus_client
        from prometheus_client import core
    except ImportError:
        raise Fatal("--prometheus and --prometheus-textfile need the Python package "
                    "prometheus_client: install python3-prometheus-client (Debian/Ubuntu) "
                    "or python3-prometheus_client (RHEL/Fedora)")
    return prometheus_client, core


def _prom_bucket_index():
    """For each kernel bucket, the first Prometheus bucket (index) that holds it."""
    out = []
    for b in range(C.HIST_BUCKETS):
        hi = bucket_bounds(b)[1]
        out.append(next((i for i, le in enumerate(PROM_BUCKETS_US) if hi <= le),
                        len(PROM_BUCKETS_US)))
    return out


def write_file_atomically(path, data, mode=0o644):
    """data as the whole of path, atomically, never through a link: a new file of a
    random name in the same directory (O_EXCL), then renamed over path (rename replaces
    a symbolic link there, it does not follow it)."""
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + base + ".", dir=directory)
    try:
        os.fchmod(fd, mode)     # node_exporter reads it as its own user
        write_all(fd, data)
        os.close(fd)
        fd = None
        os.rename(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        os.unlink(tmp)
        raise


class MetricsServer(object):
    """/metrics over HTTP, or HTTPS with --prometheus-tls-cert/-key, verifying client
    certificates against --prometheus-client-ca (Prometheus's tls_config: cert_file,
    key_file, ca_file). The standard library's server: each scrape in a thread of its
    own, which only hands out the last interval's exposition."""
    TIMEOUT = 10.0      # seconds a client may take (a TLS handshake included)

    def __init__(self, addr, port, body, content_type, tls=None):
        import http.server
        import socketserver

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = self.TIMEOUT

            def setup(handler):
                http.server.BaseHTTPRequestHandler.setup(handler)
                if tls:     # here, in the request's thread: a slow client holds no other
                    handler.request.do_handshake()

            def do_GET(handler):
                if handler.path.split("?", 1)[0] not in ("/metrics", "/"):
                    handler.send_error(404)
                    return
                data = body()
                handler.send_response(200)
                handler.send_header("Content-Type", content_type)
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)

            def log_message(handler, *_args):
                pass            # a line per scrape would bury the tool's own output

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

            def handle_error(server, request, client_address):
                pass    # a client without a certificate, a dropped connection: its own

        try:
            self.server = Server((addr, port), Handler)
        except OSError as e:
            why = "not an address of this host" if e.errno == errno.EADDRNOTAVAIL else \
                e.strerror or str(e)
            raise UsageError("--prometheus %s:%d: %s" % (addr, port, why))
        if tls:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        thread = threading.Thread(target=self.server.serve_forever, name="metrics")
        thread.daemon = True
        thread.start()


def tls_context(cert, key, client_ca):
    """The server's TLS settings, or None without a certificate: UsageError when a
    file is missing or not what it should be."""
    if not cert:
        return None
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(ssl, "TLSVersion"):      # Python 3.7+; 3.6's default refuses SSLv3 already
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2   # novermin
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError("--prometheus-tls-cert %s, --prometheus-tls-key %s: %s"
                         % (cert, key, getattr(e, "strerror", None) or e))
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as e:
            raise UsageError("--prometheus-client-ca %s: %s"
                             % (client_ca, getattr(e, "strerror", None) or e))
        ctx.verify_mode = ssl.CERT_REQUIRED    # no certificate, no metrics
    return ctx


class Metrics(object):
    """The run's counters for Prometheus. The main loop renders them once per interval
    (snapshot()): a scrape, or the text file, gets that rendering, never a walk of the
    kernel's maps. Counters are since the tool started; a VM whose taps are gone for
    --forget-after seconds leaves them (retire())."""

    def __init__(self, release, sample, drops, textfile):
        self.prom, self.core = import_prometheus()
        self.release, self.sample, self.drops, self.textfile = release, sample, drops, textfile
        self.registry = self.prom.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.run = self.plan = self.tracer = self.prog_info = None
        self.bucket_index = _prom_bucket_index()
        self.families = []      # the last snapshot's
        self.body = b""         # and its exposition
        self.retired = {}       # {(vm label, slot): count} of taps forgotten, their VM alive
        self.server = None

    def serve(self, addr, port, tls=None):
        """Bind now, before any BPF is compiled: a port in use is bad input."""
        self.body = self.prom.generate_latest(self.registry)
        self.server = MetricsServer(addr, port, lambda: self.body,
                                    self.prom.CONTENT_TYPE_LATEST, tls)

    def attach(self, run, tracer, plan, prog_info):
        self.run, self.tracer, self.plan, self.prog_info = run, tracer, plan, prog_info

    def snapshot(self, counts, table_size):
        """Render the metrics of this moment ({(tap, slot): count} of the kernel's per-VM
        table); write the text file. Reference assignments: a scrape thread sees the
        old rendering or the new one, whole."""
        stats = stats_by_direction(self.run.counters.stats())
        fates = self.run.counters.fates() if self.drops else []
        families = [self.stage_info()]
        families += list(self.histograms(counts))
        families += list(self.packet_counters(stats, fates))
        families += list(self.table_usage(len(counts), table_size, stats))
        families += list(self.explained(counts))
        families += list(self.own_cost())
        self.families = families
        self.body = self.prom.generate_latest(self.registry)
        if self.textfile:
            try:
                write_file_atomically(self.textfile, self.body)
            except (IOError, OSError) as e:
                log("warning: --prometheus-textfile %s: %s" % (self.textfile,
                                                                e.strerror or e))

    def collect(self):
        info = self.core.GaugeMetricFamily("vm_network_latency_info", "The tool and the "
                                           "kernel (sample: 1 packet in N is counted)",
                                           labels=["version", "kernel", "sample"])
        info.add_metric([VERSION, self.release, str(self.sample)], 1)
        yield info
        for family in self.families:
            yield family

    def stage_info(self):
        stage = self.core.GaugeMetricFamily("vm_network_latency_stage_info",
                                            "How each traced stage is attached",
                                            labels=["stage", "direction", "method", "probe"])
        for p in self.plan.plans:
            if p.method:
                stage.add_metric([p.stage.name, stage_directions(p.stage), p.method,
                                  ",".join(n for n, _a in p.probes)], 1)
        return stage

    def label(self, vm_if):
        """A tap's VM as the "vm" label: its name, else the tap's; "" for the host."""
        if not vm_if:
            return ""
        vm = self.run.book.vms.get(vm_if)
        return printable(vm.name if vm and vm.name else
                         self.run.book.devices.get(vm_if, str(vm_if)))

    def retire(self, counts, gone):
        """Taps gone for good: their counts stay in their VM's series while the VM has
        another tap in the table (a VM restarted), so that its counters never go back;
        a VM with none left leaves the metrics (and so do its VM-to-VM series)."""
        alive = set(self.label(t) for tap, peer, _s in counts for t in (tap, peer)
                    if t not in gone)
        for (tap, peer, slot), count in counts.items():
            key = (self.label(tap), self.label(peer), slot)
            if (tap in gone or peer in gone) and key[0] in alive and \
                    (not peer or key[1] in alive):
                self.retired[key] = self.retired.get(key, 0) + count
        for key in [k for k in self.retired if k[0] not in alive or
                    (k[1] and k[1] not in alive)]:
            del self.retired[key]

    def histograms(self, counts):
        rows = {}       # (vm, peer vm, direction, segment) -> [per bucket], sum ns
        by_label = [((self.label(tap), self.label(peer), slot), count)
                    for (tap, peer, slot), count in counts.items()]
        explain_base = vm_explain_base(self.run.segments)
        for (label, peer, slot), count in by_label + list(self.retired.items()):
            if slot >= explain_base:
                continue        # --explain's sums (explained())
            seg, bucket = divmod(slot, C.VM_HIST_ROW)
            direction, segment = self.run.segments[seg]
            row = rows.setdefault((label, peer, direction, segment),
                                  [[0] * (len(PROM_BUCKETS_US) + 1), 0])
            if bucket == C.HIST_BUCKETS:
                row[1] += count
            else:
                row[0][self.bucket_index[bucket]] += count
        fam = self.core.HistogramMetricFamily(
            "vm_network_latency_seconds", "Time between stages of the path, per packet",
            labels=["direction", "segment", "vm", "peer_vm"])
        for (label, peer, direction, segment), (per, sum_ns) in sorted(rows.items()):
            cum, buckets = 0, []
            for le, n in zip(PROM_BUCKETS_US, per):
                cum += n
                buckets.append(("%g" % (le / 1e6), cum))
            buckets.append(("+Inf", cum + per[-1]))
            fam.add_metric([direction, segment, label, peer], buckets, sum_ns / 1e9)
        yield fam

    def table_usage(self, used, size, stats):
        full = self.core.CounterMetricFamily(
            "vm_network_latency_vm_table_full", "Histogram counts (and --explain sums) not "
            "kept because the kernel's per-VM table was full (--vm-table-size)",
            labels=["direction"])
        for d, direction in enumerate(DIRECTIONS):
            full.add_metric([direction], stats["vm_hist_full"][d])
        yield full
        entries = self.core.GaugeMetricFamily(
            "vm_network_latency_vm_table_entries", "Entries of the kernel's per-VM table "
            "in use (its size: vm_network_latency_vm_table_size)")
        entries.add_metric([], used)
        yield entries
        cap = self.core.GaugeMetricFamily("vm_network_latency_vm_table_size",
                                          "Entries the kernel's per-VM table holds")
        cap.add_metric([], size)
        yield cap

    def packet_counters(self, stats, fates):
        core = self.core
        total = core.CounterMetricFamily(
            "vm_network_latency_packets", "What happened to each packet that entered a "
            "path", labels=["fate", "direction"])
        flight = core.GaugeMetricFamily("vm_network_latency_packets_in_flight",
                                        "Packets on their way now", labels=["direction"])
        for d, direction in enumerate(DIRECTIONS):
            v = dict((k, vals[d]) for k, vals in stats.items())
            fate = {"reported": v["completed"] - v["below_threshold"],
                    "below_threshold": v["below_threshold"], "dropped": v["dropped"],
                    "left_path": v["left_path"], "not_tracked": v["not_tracked"],
                    "lost": v["lost"], "vanished": v["vanished"]}
            for name in sorted(fate):
                total.add_metric([name, direction], fate[name])
            flight.add_metric([direction], max(0, v["started"] - v["completed"] - v["dropped"]
                                               - v["left_path"] - v["vanished"]))
        yield total
        yield flight
        if self.drops:
            drops = core.CounterMetricFamily("vm_network_latency_drops",
                                             "Packets the kernel dropped",
                                             labels=["reason", "last_stage", "direction"])
            for reason, direction, last, count in fates:
                if reason != C.FATE_LEFT:
                    drops.add_metric([self.run.reason_name(reason), STAGE_NAMES[last],
                                      DIRECTIONS[direction]], count)
            yield drops

    def explained(self, counts):
        """--explain: the explained segments' time by what the thread ending them did
        (a queue segment's idle time: the queue's), per VM as the histograms are, from
        the per-VM table's slots after the histogram rows."""
        if not self.run.explain:
            return
        fam = self.core.CounterMetricFamily(
            "vm_network_latency_explained_seconds", "Time of the explained segments "
            "(--explain), by cause", labels=["direction", "segment", "cause", "vm",
                                             "peer_vm"])
        rows = {}
        labelled = {}   # {(vm, peer vm, slot): ns}, taps gone but their VM alive included
        for (tap, peer, slot), ns in counts.items():
            key = (self.label(tap), self.label(peer), slot)
            labelled[key] = labelled.get(key, 0) + ns
        for key, ns in self.retired.items():
            labelled[key] = labelled.get(key, 0) + ns
        by_vm = explain_sums_by_vm(labelled, vm_explain_base(self.run.segments))
        for (label, peer), segments in by_vm.items():
            for (direction, segment), ns in segments.items():
                for cause, value in explain_causes(segment, ns).items():
                    rows[(direction, segment, cause, label, peer)] = value / 1e9
        for key in sorted(rows):
            fam.add_metric(list(key), rows[key])
        yield fam

    def own_cost(self):
        """BPF run time and runs per program, when kernel.bpf_stats_enabled is on."""
        try:
            with open("/proc/sys/kernel/bpf_stats_enabled") as f:
                enabled = f.read().strip() == "1"
        except (IOError, OSError):
            enabled = False
        if not enabled or not self.prog_info or "run_cnt" not in self.prog_info:
            return
        secs = self.core.CounterMetricFamily("vm_network_latency_bpf_run_seconds",
                                             "CPU time of the tool's BPF programs",
                                             labels=["program"])
        runs = self.core.CounterMetricFamily("vm_network_latency_bpf_runs",
                                             "Runs of the tool's BPF programs",
                                             labels=["program"])
        for label, fd in self.tracer.programs():
            st = bpf_prog_stats(fd, self.prog_info)
            if st:
                secs.add_metric([label], st["run_time_ns"] / 1e9)
                runs.add_metric([label], st["run_cnt"])
        yield secs
        yield runs


# ============================================================================
# Orchestration
# ============================================================================

def wall_clock_offset(tries=5):
    """Wall-clock time minus the kernel's monotonic clock (the packets' stamps), from the
    reading whose two monotonic reads bracket time.time() most closely: a process
    descheduled between two clock reads would put every timestamp off by the delay (seen
    under emulation with four instances starting together: 17 ms)."""
    best = None
    for _ in range(tries):
        before = time.monotonic()
        wall = time.time()
        after = time.monotonic()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) / 2)
    return best[1]


def announce(verbose, vni, layout, plan, view, devices, features):
    """What the user should know before tracing starts (more with --verbose)."""
    if verbose:
        log("struct layouts from %s: %s" % (layout.source, ", ".join(
            "%s=%s" % kv for kv in sorted(layout.offsets.items()))))
        log("events: %s" % features.how)
        log("drop reasons: %s" % ("yes (%d known)" % len(layout.drop_reasons)
                                  if layout.kfree_skb_reason else
                                  "no (kfree_skb has no reason argument in this kernel)"))
        log("kprobes: %s" % (view.kprobe_why if not view.kprobes_ok else
                             "available (%s)" % view.kprobe_why))
        found = devices.found
        log("VM devices: %s; physical devices: %s" % (
            ", ".join(found.vm_devs) or "none yet", ", ".join(
                "%s%s" % (d, " (under %s)" % ", ".join(found.uplinks[d])
                          if d in found.uplinks else "") for d in found.phys) or "none"))
        tunnels = [d for d in list_devices() if is_tunnel(d)]
        for tun in tunnels:
            info = tunnel_info(tun)
            log("tunnel %s: %s vni %s, port %s, %s" % (
                tun, device_kind(tun), "per flow" if info.get("external") else info.get("id"),
                info.get("port"), "underlay %s" % ", ".join(tunnel_underlay(tun,
                                                                           list_devices()))))
    if vni is not None and not any(is_tunnel(d) for d in list_devices()):
        log("note: --vni %d: no VXLAN or Geneve device here yet: nothing matches until "
            "one exists (and the tool is restarted)" % vni)
    for p in plan.plans:
        if not p.method and "--direction" not in p.reason:
            log("note: stage %s not traced: %s" % (p.stage.name, p.reason))
    for note in uplink_notes(devices.found):
        log("note: " + note)
    if not devices.found.phys:
        log("warning: no physical device found; name it with --phy-dev")


def verify_only(tracer, attach):
    """--dry-run: every program through the verifier, nothing attached."""
    try:
        count = tracer.load_only()
    except Exception as e:
        raise Fatal("the kernel verifier rejected the program: %s" % e)
    finally:
        tracer.close()
    log("%d BPF programs (%s) passed the kernel verifier; nothing was attached"
        % (count, attach))
    return 0


# --- --top: one line per VM, refreshed in place ---

TopRow = namedtuple("TopRow", "name tx rx p50 p99 slowest drops reason")
TOP_SORTS = {"p": ("P99", lambda r: -(r.p99 or 0)), "r": ("rate", lambda r: -(r.tx + r.rx)),
             "n": ("name", lambda r: r.name), "d": ("drops", lambda r: -r.drops)}
TOP_LINE = "%-14.14s %5s %5s %7s %7s %-24.24s %s"     # 80 columns: drops get the rest
TOP_HEAD = TOP_LINE % ("VM", "TX/s", "RX/s", "P50", "P99", "SLOWEST SEGMENT", "DROPS")


def top_rows(per_vm, drops, seconds):
    """--top's rows of one interval: per VM (and VM pair), from what its taps added
    (Run.vm_histograms) and its drops ({label: Counter of reasons})."""
    rows = {}
    for who, tables, _why in per_vm:
        name = who.label + (" -> " + who.peer_label if who.peer_label else "")
        count = {"tx": 0, "rx": 0}
        totals, spent = {}, {}
        for direction, segment, buckets in tables:
            if segment == "total":
                n = sum(buckets.values())
                count["rx" if direction == "rx" else "tx"] += n
                for b, c in buckets.items():
                    totals[b] = totals.get(b, 0) + c
            else:
                spent[segment] = spent.get(segment, 0) + sum(
                    c * bucket_middle_us(b) for b, c in buckets.items())
        all_spent = sum(spent.values())
        slowest = max(spent, key=spent.get) if all_spent else None
        reasons = drops.get(who.label, collections.Counter()) if not who.peer_label else \
            collections.Counter()
        rows[name] = TopRow(name, count["tx"] / seconds, count["rx"] / seconds,
                            percentile(totals, 0.5), percentile(totals, 0.99),
                            "%s %d%%" % (slowest, round(100.0 * spent[slowest] / all_spent))
                            if slowest else "-", sum(reasons.values()),
                            reasons.most_common(1)[0][0] if reasons else "")
    for label, reasons in drops.items():         # dropped, none through
        if label not in rows:
            rows[label] = TopRow(label, 0.0, 0.0, None, None, "-", sum(reasons.values()),
                                 reasons.most_common(1)[0][0])
    return rows


class TopView(object):
    """--top: on a terminal, a screen (curses) of one line per VM, redrawn every
    interval, with keys; otherwise the same lines printed each interval."""

    def __init__(self, interval, out=None):
        self.interval = interval
        self.out = out or sys.stdout
        self.sort, self.paused = "p", False
        self.rows, self.seen = {}, {}       # this interval's, and every VM's last
        self.drops = {}                     # {VM label: Counter of reasons}, this interval
        self.when = None
        self.screen = None
        if self.out.isatty():
            try:
                import curses
                self.curses = curses
                self.screen = curses.initscr()
            except Exception as e:      # (no terminfo for $TERM: curses.error)
                log("note: --top: this terminal cannot be drawn on (%s): plain lines"
                    % printable(e, 80))
                self.screen = None
        if self.screen is not None:
            curses = self.curses
            curses.noecho()
            curses.cbreak()
            self.screen.nodelay(True)
            self.screen.keypad(True)
            try:
                curses.curs_set(0)
            except curses.error:
                pass
            self.draw()

    def close(self):
        if self.screen is not None:
            self.screen.keypad(False)
            self.curses.nocbreak()
            self.curses.echo()
            self.curses.endwin()
            self.screen = None

    def on_drop(self, label, reason):
        self.drops.setdefault(label, collections.Counter())[reason] += 1

    def update(self, when, per_vm):
        rows = top_rows(per_vm, self.drops, self.interval)
        self.drops = {}
        for name, row in self.seen.items():     # quiet this interval: zero
            rows.setdefault(name, TopRow(name, 0.0, 0.0, None, None, "-", 0, ""))
        self.seen = dict(rows)
        if self.paused:
            return
        self.rows, self.when = rows, when
        if self.screen is None:
            lines = ["[%s] %s" % (time.strftime("%H:%M:%S", time.localtime(when)),
                                  TOP_HEAD)]
            lines += [self.line(r) for r in self.ordered()]
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
        else:
            self.draw()

    def ordered(self):
        return sorted(self.rows.values(), key=lambda r: (TOP_SORTS[self.sort][1](r), r.name))

    @staticmethod
    def line(r):
        def us(v):
            return "-" if v is None else "%.0fus" % v if v < 10000 else "%.1fms" % (v / 1e3)
        drops = "%d %s" % (r.drops, shown_name(r.reason)) if r.drops else "0"
        return (TOP_LINE % (shown_name(r.name), "%.0f" % r.tx, "%.0f" % r.rx, us(r.p50),
                            us(r.p99), r.slowest, drops))[:79]

    def draw(self):
        height, width = self.screen.getmaxyx()
        stamp = time.strftime("%H:%M:%S", time.localtime(self.when or time.time()))
        head = "vm_network_latency --top %s, every %gs, by %s%s  p r n d: sort, " \
               "space: pause, q: quit" % (stamp, self.interval, TOP_SORTS[self.sort][0],
                                          " PAUSED" if self.paused else "")
        lines = [head, TOP_HEAD] + [self.line(r) for r in self.ordered()]
        self.screen.erase()
        for y, text in enumerate(lines[:height]):
            try:
                self.screen.addstr(y, 0, text[:max(0, width - 1)],
                                   self.curses.A_REVERSE if y == 1 else 0)
            except self.curses.error:
                pass
        self.screen.refresh()

    def keys(self):
        """The keys pressed since the last call: False once q was."""
        if self.screen is None:
            return True
        while True:
            key = self.screen.getch()
            if key == -1:
                return True
            ch = chr(key) if 0 <= key < 256 else ""
            if ch in ("q", "Q"):
                return False
            if ch in TOP_SORTS:
                self.sort = ch
            elif ch == " ":
                self.paused = not self.paused
            self.draw()


class LiveTrace(object):
    """A live run, from attaching to the summary: the tracer, the run its events and
    counters feed, the metrics, the host's devices and the event reader. trace()
    always detaches, whatever stops it."""

    def __init__(self, args, tracer, run, devices, metrics=None, macvtaps=True):
        self.args, self.tracer, self.run, self.devices, self.metrics = \
            args, tracer, run, devices, metrics
        self.macvtaps = macvtaps        # the program follows macvtaps (the host had one)
        self.events = None              # EventSource, in detailed mode or with --drops
        self.stop_reason = None         # the signal that stopped it, or None
        self.gone_since = {}            # {tap ifindex: since when (monotonic) it is gone}
        self.followed = None            # --explain: FollowedThreads
        self.said_unfollowed = False
        self.top = None                 # --top: TopView

    def trace(self):
        """Attach, report until a stop, detach, account for every packet."""
        def on_signal(signum, _frame):
            self.stop_reason = signum
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # a SIGHUP ignored when the tool started stays ignored: nohup's (else the run
            # would end at logout). SIGINT and SIGTERM always stop it, also where a shell
            # started it as a background job, whose SIGINT it ignores
            if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, on_signal)
        run = self.run
        try:
            run.counters = KernelCounters(self.tracer)
            try:
                self.attach_and_report()
            except (IOError, OSError) as e:
                if getattr(e, "errno", None) not in (errno.EPIPE, errno.EIO):
                    raise
                run.output_broken = True     # the terminal went away (SIGHUP, pipe)
            finally:
                self.tracer.detach()
            self.final_report()
        finally:
            if self.top:
                self.top.close()
            self.tracer.close()
            if run.recorder:
                run.recorder.close()
            if run.pcap:
                run.pcap.close()
        return 0

    def attach_and_report(self):
        args, run = self.args, self.run
        set_device_roles(self.tracer.bpf, {}, self.devices.roles)
        if self.tracer.explain:
            self.followed = FollowedThreads(self.tracer.bpf["threads"])
            self.followed.update(self.devices.owners, force=True)
            self.note_unfollowed()
            if args.verbose:
                log("--explain: following %d threads (the VMs' own, vhost workers, "
                    "ksoftirqd)" % len(self.followed.tids))
        if args.mode == "detailed" or args.drops:
            self.events = open_events(self.tracer, run)
        try:
            self.tracer.attach()
        except Exception as e:
            raise Fatal("attaching failed: %s" % e)
        log("Tracing VM network latency (%s mode, %s)... Hit Ctrl-C to end."
            % (args.mode, ", ".join("%s=%s" % (p.stage.name, p.method)
                                    for p in self.tracer.plan.plans if p.method)))
        if args.top:
            self.top = TopView(args.interval)
            run.drop_sink = self.top.on_drop
        started = time.monotonic()
        next_interval = started + args.interval
        next_refresh = started + 1.0
        while self.stop_reason is None and not run.output_broken:
            now = time.monotonic()
            if args.timeout and now - started >= args.timeout:
                break
            wait = 0.1
            if args.timeout:
                wait = min(wait, max(0.0, args.timeout - (now - started)))
            poll_events(self.events, wait)
            if self.top and not self.top.keys():
                break                   # q
            now = time.monotonic()
            if args.mode == "histogram" and now >= next_interval:
                next_interval += args.interval
                self.report_interval()
                run.reporter.flush()
            if now >= next_refresh:
                # (named devices too: a VM restarted has a new tap of the same name)
                next_refresh = now + 1.0
                self.refresh_devices()
            if args.mode == "detailed":
                run.reporter.flush()
            if run.recorder:
                run.recorder.flush()
            if run.pcap:
                run.pcap.flush()

    def refresh_devices(self):
        """New VMs start and stop: the kernel's device map and the VM names follow."""
        old = self.devices.roles
        if self.devices.refresh():
            if not self.macvtaps and any(r & ~Role.PEER == Role.MVTAP
                                         for r in self.devices.roles.values()):
                self.macvtaps = True     # (said once)
                log("note: a macvtap appeared (%s): the tool follows macvtaps from its "
                    "next start" % ", ".join(d for d in self.devices.found.vm_devs
                                             if is_macvtap(d)))
            set_device_roles(self.tracer.bpf, old, self.devices.roles)
            self.run.set_names(self.devices.names, self.devices.uplinks)
            if self.args.verbose:
                log("devices now: %s" % self.devices.describe())
            changed = True
        else:
            changed = False
        self.run.set_vms(self.devices.owners)
        if self.followed:
            self.followed.update(self.devices.owners, force=changed)
            self.note_unfollowed()

    def note_unfollowed(self):
        if self.followed.not_followed and not self.said_unfollowed:
            self.said_unfollowed = True
            log("note: --explain follows at most %d threads: some are not followed (their "
                "waits are explained as unknown)" % C.EXPLAIN_THREADS)

    def report_interval(self, last=False):
        """One interval's histograms (all of them, or one set per VM with --per-vm); the
        last read, after detaching, is reported only where it added anything. The
        metrics are rendered from the same read."""
        run, when = self.run, time.time()
        sums = run.counters.explain_sums() if run.explain else None
        if keeps_per_vm_counts(self.args):
            counts = run.counters.vm_hist()
            per_vm = run.vm_histograms(when, counts, last)
            if self.top:
                self.top.update(when, per_vm)
            else:
                run.report_vm_histograms(when, per_vm, last)
            counts = self.forget_gone_taps(counts)
            if self.metrics:
                self.metrics.snapshot(counts, self.args.vm_table_size)
        else:
            run.report_histograms(when, run.histograms(when, run.counters.hist(
                hist_slots(run.segments)), last), last)
        if sums is not None:
            run.report_explanations(when, run.explanations(when, sums, last), last)

    def forget_gone_taps(self, counts):
        """The per-VM counts of taps gone for --forget-after seconds leave the kernel's
        table, which then has room for the VMs that come (a long-running exporter sees
        many). The counts without them."""
        now = time.monotonic()
        present = set(i for i, role in self.devices.roles.items()
                      if role & ~Role.PEER in (Role.VM, Role.MVTAP))
        in_table = set(t for tap, peer, _slot in counts for t in (tap, peer) if t)
        for tap in in_table - present:
            self.gone_since.setdefault(tap, now)
        for tap in [t for t in self.gone_since if t in present or t not in in_table]:
            del self.gone_since[tap]
        gone = set(t for t, since in self.gone_since.items()
                   if now - since >= self.args.forget_after)
        if not gone:
            return counts
        going = [k for k in counts if k[0] in gone or k[1] in gone]
        self.run.counters.forget_vm_counts(going)
        if self.metrics:
            self.metrics.retire(counts, gone)
        self.run.forget_taps(gone)
        for tap in gone:
            del self.gone_since[tap]
        going = set(going)
        return dict((k, v) for k, v in counts.items() if k not in going)

    def final_report(self):
        """Nothing is attached any more: drain what is left, then the summary."""
        run = self.run
        try:
            poll_events(self.events, 0)
            if self.args.mode == "histogram" and not run.output_broken and not self.top:
                self.report_interval(last=True)
            if self.top:
                self.top.close()        # the terminal as it was, then the summary
            now = time.monotonic()
            final = final_counters(run.counters, now, run.perf_lost)
            run.counters = RecordedCounters(final)
            summary = run.summary(now)      # (the names it resolves are recorded first)
            run.record_final(final)
            if self.args.verbose and run.perf_lost:
                log("perf buffer: the kernel lost %d samples (in the summary's 'lost')"
                    % run.perf_lost)
            if not run.output_broken:
                run.reporter.summary(summary)
                run.reporter.flush()
        except (IOError, OSError):
            pass


def replay(path, output, pcap_path=None):
    """Produce the recorded run's output again, from its raw events and nothing else:
    every name from the recording, none from this machine (and --write-pcap's file)."""
    reader = RecordingReader(path)
    meta = reader.meta
    if pcap_path and meta["mode"] != "detailed":
        raise UsageError("--write-pcap: %s was recorded in histogram mode: it has no "
                         "packets to write" % path)
    pcap = PcapWriter(pcap_path) if pcap_path else None
    try:
        return replay_into(reader, meta, output, pcap)
    finally:
        if pcap:
            pcap.close()


def replay_into(reader, meta, output, pcap):
    path = reader.path
    settings = RunSettings(meta["mode"], meta["per_vm"], meta["sample"], False,
                           meta["drops"], meta["explain"])
    run = Run(settings, Reporter(output, meta["protocol"], sample=meta["sample"]),
              meta["segments"], meta["kfree_skb_reason"], meta["drop_reasons"],
              meta["wall_offset"], NameBook(live=False), pcap=pcap)
    truncated = final = None
    for line, kind, value in reader:
        if run.output_broken:
            return 0
        if final is not None:
            reader.fail("%s after the recording's end" % kind)
        if truncated and line > truncated[1]:
            reader.fail("%s after the line where the recording was cut short" % kind)
        if kind == "event":
            run.on_event(value)
        elif run.book.take_recorded(kind, value):
            if kind in ("names", "vms"):
                run.formatter.clear()       # the outputs made of the old names
        elif kind == "hist":
            when, last, counts = value
            full = [0] * hist_slots(run.segments)
            for idx, c in counts.items():
                full[idx] = c
            if run.hist.backwards(full):
                reader.fail("histogram counts go backwards")
            run.report_histograms(when, run.histograms(when, full), last)
        elif kind == "vmhist":
            when, last, counts = value
            if run.vm_hist.backwards(counts):
                reader.fail("per-VM histogram counts go backwards")
            run.report_vm_histograms(when, run.vm_histograms(when, counts), last)
        elif kind == "prune":
            run.forget_taps(value)
        elif kind == "explain":
            when, last, counts = value
            full = [0] * EXPLAIN_SLOTS
            for idx, ns in counts.items():
                full[idx] = ns
            run.report_explanations(when, run.explanations(when, full, last), last)
        elif kind == "final":
            if truncated:
                reader.fail("final counters in a recording that was cut short")
            final = value
        elif kind == "truncated":
            if truncated or line != 2:
                reader.fail("a mark of a cut where the recording keeps none")
            truncated = value
        run.write_pending()
    if final is not None:
        run.counters = RecordedCounters(final)
        run.perf_lost = final["perf_lost"]
        run.reporter.summary(run.summary(final["now"]))
        run.reporter.flush()
        return 0
    run.reporter.flush()
    if truncated:
        log("vm_network_latency.py: warning: --read-events %s: the recording was cut "
            "short after line %d (%s) while the run went on: no summary"
            % (path, truncated[1], truncated[0]))
        return 0
    raise UsageError("--read-events %s: the recording ends at line %d, before the run did "
                     "(no final counters: the tool was killed, or the file is cut)"
                     % (path, reader.line))


# --- --read-events A --read-events B: one packet across hosts, from their recordings ---
#
# Each host's records are in its own monotonic clock. A packet that left host X (its TX
# record ends at X's NIC) and arrived at host Y (Y's RX record starts at Y's NIC) is
# found in both by what stays the same on the wire; the offset of Y's clock from X's
# (theta = Y's clock - X's) is bounded by the packets themselves, as NTP does: one sent
# X->Y arrived after it left, so theta <= rx - tx; one sent Y->X gives theta >= tx - rx.
# The estimate is the middle of the tightest bounds, its uncertainty half their width.

JOIN_MAX_WIRE_NS = 10 ** 9      # a match more than a second apart is another packet
TCP_GSO_WINDOW = 1 << 18        # a GSO segment's sequence: this far past its packet's

# one host's packet, for a join, small (a recording may hold millions): the recording
# (index), the record's bytes (decoded again for the few joined), its NIC time and the
# stage there, when its path ended, what identifies it on the wire (wire_flow(),
# wire_ident()), whether it is TCP, its tunnel's network id where known
JoinSide = namedtuple("JoinSide", "host raw nic_ns nic_stage end_ns flow ident tcp net")
ClockOffset = namedtuple("ClockOffset", "theta_ns uncertainty_ns source lower upper")


def wire_flow(f):
    """What the packets of one flow share on the wire (through a tunnel, the inner
    packet's; the network id: same_network())."""
    proto, echo = f[F.proto], f[F.icmp_type] in ICMP_ECHO.get(f[F.proto], ())
    ports = (f[F.icmp_type], f[F.sport] if echo else 0) if proto in (Proto.ICMP,
                                                                     Proto.ICMP6) \
        else (f[F.sport], f[F.dport])
    return (f[F.ip_version], proto, f[F.saddr], f[F.daddr]) + ports


def wire_network(f):
    """A tunnelled packet's network id, where its record knows it (the outer headers
    were seen); else None."""
    return f[F.vni] if f[F.tunnel] and f[F.outer_version] else None


def same_network(a, b):
    """Tunnelled, the inner packets of two tenants may look alike: their network ids
    differ (where each record knows its id)."""
    return a.net is None or b.net is None or a.net == b.net


def wire_ident(f):
    """What tells a packet from the others of its flow: TCP's sequence, an echo's
    sequence and the IPv4 id, the IPv4 id; None (IPv6 UDP): only the order tells."""
    proto, v4 = f[F.proto], f[F.ip_version] == 4
    if proto == Proto.TCP:
        return f[F.tcp_seq]
    if proto in (Proto.ICMP, Proto.ICMP6) and f[F.icmp_type] in ICMP_ECHO.get(proto, ()):
        return (f[F.dport], f[F.ip_id] if v4 else None)
    return f[F.ip_id] if v4 else None


class HostRecording(object):
    """One host's recording, read whole: its TX and RX packet records, with names."""

    def __init__(self, path, index):
        reader = RecordingReader(path)
        meta = reader.meta
        self.path, self.index, self.meta = path, index, meta
        if meta["mode"] != "detailed":
            reader.fail("a recording in histogram mode has no packets to join (record "
                        "with --mode detailed)", line=False)
        host = meta["host"]
        self.name = host.get("hostname") or "host%d" % (index + 1)
        self.boot_id = host.get("boot_id", "")
        self.wall_offset = meta["wall_offset"]
        self.book = NameBook(live=False)
        self.sides = {"tx": [], "rx": []}
        self.local = self.drops = 0
        self.truncated = self.final = None
        for line, kind, value in reader:
            if self.final is not None:
                reader.fail("%s after the recording's end" % kind)
            if self.truncated and line > self.truncated[1]:
                reader.fail("%s after the line where the recording was cut short" % kind)
            if kind == "event":
                self.on_event(value)
            elif self.book.take_recorded(kind, value):
                pass
            elif kind == "final":
                if self.truncated:
                    reader.fail("final counters in a recording that was cut short")
                self.final = value
            elif kind == "truncated":
                if self.truncated or line != 2:
                    reader.fail("a mark of a cut where the recording keeps none")
                self.truncated = value
        if self.final is None and not self.truncated:
            raise UsageError("--read-events %s: the recording ends at line %d, before the "
                             "run did (no final counters: the tool was killed, or the file "
                             "is cut)" % (path, reader.line))

    def on_event(self, raw):
        fields = PKT.unpack_from(raw)
        direction = DIRECTIONS[fields[F.dir]]
        if fields[F.type] != Ev.PACKET:
            self.drops += 1
            return
        if direction == "vm2vm":
            self.local += 1             # from VM to VM on this host: no wire
            return
        seen = [(name, fields[sid]) for name, sid in _PATH_FIELDS[direction] if fields[sid]]
        if not seen:
            return
        # the wire: from the last TX stage (the NIC's driver) to the first RX one
        name, ns = seen[-1] if direction == "tx" else seen[0]
        self.sides[direction].append(JoinSide(
            self.index, bytes(raw[:PKT.size]), ns, name, seen[-1][1], wire_flow(fields),
            wire_ident(fields), fields[F.proto] == Proto.TCP, wire_network(fields)))

    def record(self, side):
        """A side's one-host JSON record (the names as the recording ends: a join reads
        it whole first)."""
        return packet_record(PKT.unpack_from(side.raw), self.book, self.wall_offset)


def wall_offset_resolution_ns(*hosts):
    """How far the recordings' wall_offset floats may be from the true offsets."""
    return int(math.ceil(sum(2.0 ** (math.frexp(h.wall_offset)[1] - 53) for h in hosts)
                         * 1e9))


def estimate_offset(pairs_xy, pairs_yx):
    """theta (Y's clock - X's) from packets matched by identity alone: X->Y ones give
    upper bounds (rx - tx), Y->X ones lower bounds (tx - rx). None without both."""
    upper = min(b.nic_ns - a.nic_ns for a, b in pairs_xy) if pairs_xy else None
    lower = max(b.nic_ns - a.nic_ns for b, a in pairs_yx) if pairs_yx else None
    if upper is None or lower is None:
        return None
    return ClockOffset((upper + lower) // 2, abs(upper - lower) // 2 + abs(upper - lower) % 2,
                       "estimated", lower, upper)


class Join(object):
    """The packets of several hosts' recordings joined: each sent by one host and
    received by another is one record; what was seen on one side only is counted."""

    def __init__(self, hosts, clock_offset_us=None):
        self.hosts = hosts
        self.offsets = {}           # {(x, y): ClockOffset of y's clock from x's}
        self.records = []           # [(x side, y side, offset)]
        self.counts = {}            # {(x, y): {"joined", "sent_only", "received_only"}}
        exact = {}
        for x in hosts:
            for y in hosts:
                if x is not y:
                    exact[(x.index, y.index)] = self.unique_pairs(x, y)
        for x in hosts:
            for y in hosts[x.index + 1:]:
                if clock_offset_us is not None:
                    # wall clocks apart by the given amount: wall = monotonic + offset
                    theta = int(round((x.wall_offset - y.wall_offset) * 1e9 +
                                      clock_offset_us * 1000))
                    # the recordings keep their wall clocks' offsets as floats of
                    # seconds since 1970: to a quarter of a microsecond or so
                    off = ClockOffset(theta, wall_offset_resolution_ns(x, y), "given",
                                      None, None)
                else:
                    off = estimate_offset(exact[(x.index, y.index)],
                                          exact[(y.index, x.index)])
                self.offsets[(x.index, y.index)] = off
                self.offsets[(y.index, x.index)] = off and off._replace(
                    theta_ns=-off.theta_ns,
                    lower=None if off.upper is None else -off.upper,
                    upper=None if off.lower is None else -off.lower)
        for x in hosts:
            for y in hosts:
                if x is not y:
                    self.join_pair(x, y)
        self.records.sort(key=lambda r: self.first_clock(r[1], r[1].end_ns))

    def first_clock(self, side, ns):
        """A time of a host's, in the first recording's monotonic clock (where the
        offset is unknown: its own)."""
        off = self.offsets.get((0, side.host)) if side.host else None
        return ns - off.theta_ns if off else ns

    @staticmethod
    def unique_pairs(x, y):
        """X's TX and Y's RX records of one identity, where each host has exactly one."""
        def by_ident(sides):
            out = {}
            for s in sides:
                if s.ident is not None:
                    out.setdefault((s.flow, s.ident), []).append(s)
            return out
        sent, received = by_ident(x.sides["tx"]), by_ident(y.sides["rx"])
        return [(sent[k][0], received[k][0]) for k in sent
                if len(sent[k]) == 1 and len(received.get(k, ())) == 1]

    def join_pair(self, x, y):
        """Each of Y's RX records to the X TX record it was: the same identity (TCP: the
        same sequence, or the GSO packet whose sequence it follows), sent last before it
        arrived (retransmissions, IP ids that wrapped around)."""
        off = self.offsets[(x.index, y.index)]
        index, gso = {}, {}     # {(flow, identity): [X's records]}, {TCP flow: [(seq, a)]}
        for a in sorted(x.sides["tx"], key=lambda s: s.nic_ns):
            index.setdefault((a.flow, a.ident), []).append(a)
            if a.tcp:
                gso.setdefault(a.flow, []).append((a.ident, a.nic_ns, a))
        for sides in gso.values():
            sides.sort(key=lambda e: e[:2])
        sent_flows = set(k[0] for k in index)
        used, joined_flows, received_only = set(), set(), {}
        first_free = {}         # {(flow, None): the first of its records not taken}
        joined = 0
        for b in sorted(y.sides["rx"], key=lambda s: s.nic_ns):
            flow, ident = b.flow, b.ident
            a = self.same_identity(index.get((flow, ident), ()), b, ident, off, used,
                                   first_free, (flow, ident))
            if a is None and b.tcp:
                a = self.gso_packet(gso.get(flow, ()), b, ident, off)
            if a is None:
                if flow in sent_flows:
                    received_only[flow] = received_only.get(flow, 0) + 1
                continue
            used.add(id(a))
            joined_flows.add(flow)
            joined += 1
            self.records.append((a, b, off))
        self.counts[(x.index, y.index)] = {
            "joined": joined,
            "sent_only": sum(1 for (flow, _i), sides in index.items() if flow in joined_flows
                             for a in sides if id(a) not in used),
            "received_only": sum(n for flow, n in received_only.items()
                                 if flow in joined_flows)}

    @staticmethod
    def in_window(a, b, off):
        """Could b (Y's) have been sent as a (X's)? In the same network, and with the
        clocks' offset: sent before it arrived (within the uncertainty), less than a
        second before."""
        if not same_network(a, b):
            return False
        if off is None:
            return True
        wire = b.nic_ns - off.theta_ns - a.nic_ns
        return -off.uncertainty_ns <= wire <= JOIN_MAX_WIRE_NS

    def same_identity(self, sides, b, ident, off, used, first_free, key):
        """X's record of b's identity not yet taken: the last one sent before b arrived (a
        retransmission after the original was lost, an IP id that wrapped around); without
        an identity (IPv6 UDP), or without the clocks' offset, the first not taken: a
        flow's packets arrive in the order they left."""
        if ident is None or off is None:
            i = first_free.get(key, 0)
            while i < len(sides) and id(sides[i]) in used:
                i += 1
            first_free[key] = i
            for a in sides[i:]:
                if id(a) not in used and self.in_window(a, b, off):
                    return a
            return None
        for a in reversed(sides):
            if id(a) not in used and self.in_window(a, b, off):
                return a
        return None

    def gso_packet(self, sides, b, seq, off):
        """The GSO packet a TCP segment came from: the one whose sequence it follows
        closest (within TCP_GSO_WINDOW; sides sorted by sequence), the last one sent of
        those. It may have given other segments already."""
        i = bisect.bisect_right(sides, (seq, float("inf"))) - 1
        while i >= 0 and seq - sides[i][0] < TCP_GSO_WINDOW:
            start = sides[i][0]
            for j in range(i, -1, -1):
                if sides[j][0] != start:
                    break
                if self.in_window(sides[j][2], b, off):
                    return sides[j][2]
            while i >= 0 and sides[i][0] == start:
                i -= 1
        return None

    def record(self, a, b, off):
        """A joined packet as the JSON output prints it: the sender's record and the
        receiver's, each with its host, and the wire between them."""
        x, y = self.hosts[a.host], self.hosts[b.host]
        f = PKT.unpack_from(a.raw)
        sent, received = x.record(a), y.record(b)
        out = dict((k, sent[k]) for k in JOINED_FLOW_KEYS)
        # when it finished its path (the receiver's last stage), in the first
        # recording's wall clock: one clock for all records (each side's own record
        # keeps its host's); the receiver's own where its clock's offset is unknown
        if b.host and self.offsets.get((0, b.host)) is None:
            end = wall_us(y.wall_offset, b.end_ns)
        else:
            end = wall_us(self.hosts[0].wall_offset, self.first_clock(b, b.end_ns))
        out.update({"type": "joined", "timestamp": float(timestamp_text(end)),
                    "ip_id": f[F.ip_id] if f[F.ip_version] == 4 else None,
                    "tcp_seq": f[F.tcp_seq] if f[F.proto] == Proto.TCP else None,
                    "from": dict(sent, host=x.name), "to": dict(received, host=y.name),
                    "wire": "%s->%s" % (a.nic_stage, b.nic_stage)})
        wire = wire_max = unc = total = total_max = None
        if off is not None:
            ns = b.nic_ns - off.theta_ns - a.nic_ns
            unc = off.uncertainty_ns / 1000.0
            wire_max = round(max(0, ns + off.uncertainty_ns) / 1000.0, 3)
            ends = sent["total_us"] + received["total_us"]
            total_max = round(ends + wire_max, 3)
            if ns >= off.uncertainty_ns:        # never a wire time that may be negative
                wire = round(ns / 1000.0, 3)
                total = round(ends + wire, 3)
        out.update({"wire_us": wire, "wire_max_us": wire_max,
                    "clock_uncertainty_us": unc if unc is None else round(unc, 3),
                    "total_us": total, "total_max_us": total_max})
        return out

    def histograms(self):
        """Per pair of hosts (sender, receiver): each host's segments, the wire and the
        total bucketed as the kernel buckets one host's; a wire time shorter than the
        clocks' uncertainty is counted apart, in neither."""
        pairs = {}
        for a, b, off in self.records:
            rec = self.record(a, b, off)
            key = (rec["from"]["host"], rec["to"]["host"])
            entry = pairs.setdefault(key, ({}, [0, 0]))
            tables, counts = entry
            counts[0] += 1
            names = ["%s:%s->%s" % (side["host"], s["from"], s["to"])
                     for side in (rec["from"], rec["to"]) for s in side["segments"]]
            values = [s["us"] for side in (rec["from"], rec["to"]) for s in side["segments"]]
            if rec["wire_us"] is None:
                counts[1] += 1
            else:
                names += ["wire", "total"]
                values += [rec["wire_us"], rec["total_us"]]
            for name, us in zip(names, values):
                bucket = bucket_of(int(round(us * 1000)))
                table = tables.setdefault(name, {})
                table[bucket] = table.get(bucket, 0) + 1
        out = []
        for (sender, receiver), (tables, (packets, unknown)) in sorted(pairs.items()):
            order = [n for n in tables if n.startswith(sender + ":")] + \
                [n for n in ("wire",) if n in tables] + \
                [n for n in tables if n.startswith(receiver + ":")] + \
                [n for n in ("total",) if n in tables]
            out.append((sender, receiver, [(n, tables[n]) for n in order], packets,
                        unknown))
        return out

    def summary(self):
        joined = set()
        for a, b, _o in self.records:
            joined.add(id(a))
            joined.add(id(b))
        hosts = []
        for h in self.hosts:
            seen = h.sides["tx"] + h.sides["rx"]
            hosts.append({"host": h.name, "boot_id": h.boot_id,
                          "kernel": h.meta["host"].get("kernel"), "file": h.path,
                          "records": len(seen),
                          "not_joined": sum(1 for s in seen if id(s) not in joined),
                          "vm2vm": h.local, "drops": h.drops,
                          "truncated": bool(h.truncated)})
        pairs = [dict({"from": self.hosts[x].name, "to": self.hosts[y].name}, **c)
                 for (x, y), c in sorted(self.counts.items())]
        clocks = []
        for (x, y), off in sorted(self.offsets.items()):
            if x > y:
                continue
            hx, hy = self.hosts[x], self.hosts[y]
            entry = {"hosts": [hx.name, hy.name], "source": off.source if off else None,
                     "offset_us": None, "uncertainty_us": None, "wall_clock_ahead_us": None,
                     "consistent": None}
            if off is not None:
                entry.update({
                    "offset_us": round(off.theta_ns / 1000.0, 3),
                    "uncertainty_us": round(off.uncertainty_ns / 1000.0, 3),
                    # wall = monotonic + wall_offset on each: how far y's wall clock is
                    # ahead of x's at one instant
                    "wall_clock_ahead_us": round(off.theta_ns / 1000.0 + (
                        hy.wall_offset - hx.wall_offset) * 1e6, 3),
                    "consistent": off.lower is None or off.lower <= off.upper})
            clocks.append(entry)
        return {"type": "join_summary", "joined": len(self.records), "hosts": hosts,
                "pairs": pairs, "clocks": clocks}


# the joined record's own fields, the sender's: what the packet was
JOINED_FLOW_KEYS = ("protocol", "ip_version", "src_ip", "dst_ip", "src_port", "dst_port",
                    "icmp_type", "icmp_id", "icmp_seq", "vlan", "tunnel")


def join_recordings(paths, output, clock_offset_us, mode="detailed"):
    """--read-events A --read-events B...: each packet sent by one of the hosts and
    received by another, one record from the sender's VM to the receiver's."""
    hosts = [HostRecording(path, i) for i, path in enumerate(paths)]
    for i, h in enumerate(hosts):
        for other in hosts[:i]:
            if (h.boot_id or h.name) == (other.boot_id or other.name) and \
                    h.name == other.name:
                raise UsageError("--read-events %s and %s were recorded on the same host "
                                 "(%s, boot %s): a join needs two hosts' recordings"
                                 % (other.path, h.path, shown_name(h.name),
                                    shown_name(h.boot_id or "?")))
    join = Join(hosts, clock_offset_us)
    if not join.records:
        raise UsageError("--read-events: the recordings of %s share no packet: nothing "
                         "to join (recorded at the same time, on the same traffic?)"
                         % ", ".join(shown_name(h.name) for h in hosts))
    for h in hosts:
        if h.truncated:
            log("note: --read-events %s: the recording was cut short after line %d (%s): "
                "%s's packets after it are missing" % (h.path, h.truncated[1],
                                                      h.truncated[0], shown_name(h.name)))
    reporter = Reporter(output, "all")
    if mode == "histogram":
        reporter.joined_histograms(join.histograms())
    else:
        for a, b, off in join.records:
            reporter.joined(join.record(a, b, off))
    reporter.join_summary(join.summary())
    reporter.flush()
    return 0


def run_command(args):
    """From the command line to a trace, a listing, or a replay."""
    if args.read_events and len(args.read_events) > 1:
        return join_recordings(args.read_events, args.output, args.clock_offset, args.mode)
    if args.read_events and args.heatmap:
        return write_heatmap(args.read_events[0], args.heatmap, args.per_vm)
    if args.read_events:
        return replay(args.read_events[0], args.output, args.write_pcap)
    selection = DeviceSelection(args.vm_dev or [], args.vm or [], args.phy_dev or [])
    check_devices_exist(selection)
    if args.list_vms:
        list_vms_report(find_vms(), args.output == "json", Reporter(args.output, "all"))
        return 0
    if os.geteuid() != 0:
        raise Fatal("must run as root (BPF programs need CAP_BPF and CAP_PERFMON): "
                    "sudo %s" % " ".join([sys.argv[0]] + sys.argv[1:]))
    # the recording's file first: a path it cannot have is reported before a compile
    recorder = Recorder(args.write_events) if args.write_events else None
    pcap = PcapWriter(args.write_pcap) if args.write_pcap else None
    release = os.uname()[2]
    metrics = None
    if args.prometheus or args.prometheus_textfile:
        metrics = Metrics(release, args.sample, args.drops, args.prometheus_textfile)
        if args.prometheus:
            # bound before any BPF is compiled: a port in use is bad input
            metrics.serve(args.prometheus[0], args.prometheus[1], tls_context(
                args.prometheus_tls_cert, args.prometheus_tls_key,
                args.prometheus_client_ca))
    layout = find_layout(args.btf, release)
    view = kernel_view(args.attach, args.dry_run, args.list_stages, layout)
    plan = TracePlan(plan_stages(args.direction, args.attach, layout, view))
    reporter = Reporter(args.output, args.protocol, sample=args.sample)
    if args.list_stages:
        list_stages_report(plan.plans, layout, args.output == "json", reporter)
        return 0
    plan.require_path_ends(args.direction)
    features = probe_capabilities(args.perf_buffer)
    opts = program_options(args, features, list_devices())
    text = generate_program(opts, plan, layout)
    if args.ebpf:
        print(text)
        return 0
    devices = HostDevices(selection)
    check_vms_exist(selection.vms, devices.owners)
    bcc = import_bcc()
    mount_tracefs()     # BCC's legacy kprobe interface needs it
    announce(args.verbose, args.vni, layout, plan, view, devices, features)
    clear_stale_kprobe_events(args.verbose)
    try:
        tracer = Tracer(bcc, text, plan, args.verbose, layout.tracepoints,
                        explain_tracepoints() if opts.explain_ns else ())
    except Exception as e:
        raise Fatal("the BPF program failed to compile: %s" % str(e).strip().splitlines()[-1])
    if args.dry_run:
        return verify_only(tracer, args.attach)
    settings = run_settings(args)
    run = Run(settings, reporter, plan.segments, layout.kfree_skb_reason,
              layout.drop_reasons, wall_clock_offset(),
              NameBook(ksym=bcc.BPF.ksym, recorder=recorder), recorder, pcap)
    if metrics:
        metrics.attach(run, tracer, plan, layout.prog_info)
    if recorder:
        recorder.write_meta(recording_meta(settings, opts, plan, layout, run.wall_offset))
    run.set_names(devices.names, devices.uplinks)
    run.set_vms(devices.owners)
    return LiveTrace(args, tracer, run, devices, metrics, opts.macvtaps).trace()


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return run_command(args)
    except (UsageError, Fatal) as e:
        sys.stderr.write("vm_network_latency.py: error: %s\n" % printable(e))
        return 2
    except KeyboardInterrupt:       # Ctrl-C before tracing started: nothing to undo
        return 130
    except BrokenPipeError:         # the reader went away (| head): end quietly
        silence_stdout()
        return 0


def silence_stdout():
    """stdout's pipe is closed: what is still buffered goes nowhere, instead of into a
    second BrokenPipeError when Python flushes it at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
