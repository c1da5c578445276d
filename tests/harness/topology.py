"""Devices and namespaces of the test topologies: bridges, taps, veths into namespaces,
and the rule that keeps test addresses off the machine's own network.

Every name the tests create starts with "vnl"; everything is removed by remove().
"""
import ipaddress
import os

from .procs import LabError, run


def link_exists(name):
    return os.path.exists("/sys/class/net/%s" % name)


def netns_exists(name):
    return os.path.exists("/run/netns/%s" % name)


def ip(*argv, **kw):
    return run(["ip"] + [str(a) for a in argv], **kw)


def in_ns(ns, *argv, **kw):
    return run(["ip", "netns", "exec", ns] + [str(a) for a in argv], **kw)


def disable_ipv6(dev, ns=None):
    """No autoconfiguration, DAD or MLD on a device: only the tests' traffic."""
    path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % dev
    if ns:
        in_ns(ns, "sh", "-c", "echo 1 > %s" % path, check=False)
    elif os.path.exists(path):
        with open(path, "w") as f:
            f.write("1\n")


def add_bridge(name):
    # multicast snooping would send IGMP reports (224.0.0.106) of its own
    ip("link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0",
       "mcast_snooping", "0")
    disable_ipv6(name)


def add_tap(name, master=None):
    ip("tuntap", "add", "dev", name, "mode", "tap")
    disable_ipv6(name)
    if master:
        ip("link", "set", name, "master", master)


def add_macvtap(name, lower, mac, mode="bridge"):
    """A macvtap on lower with the guest's MAC, up (its /dev/tapN appears with it)."""
    ip("link", "add", "link", lower, "name", name, "address", mac, "type", "macvtap",
       "mode", mode)
    disable_ipv6(name)
    up(name)


def add_netns(ns):
    ip("netns", "add", ns)
    in_ns(ns, "ip", "link", "set", "lo", "up")


def add_veth_into(host_dev, ns, ns_dev, mac=None, address=None, master=None):
    """A veth whose peer is created directly inside ns (never a second host device of
    that name), with the peer's MAC and address; the host end on master if given."""
    ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev, "netns", ns)
    disable_ipv6(host_dev)
    in_ns(ns, "sh", "-c", "for f in all default %s; do echo 1 > "
          "/proc/sys/net/ipv6/conf/$f/disable_ipv6; done" % ns_dev)
    if mac:
        in_ns(ns, "ip", "link", "set", ns_dev, "address", mac)
    if address:
        in_ns(ns, "ip", "addr", "add", address, "dev", ns_dev)
    in_ns(ns, "ip", "link", "set", ns_dev, "up")
    if master:
        ip("link", "set", host_dev, "master", master)


def up(*devs):
    for dev in devs:
        ip("link", "set", dev, "up")


def remove(devs=(), namespaces=()):
    """Delete devices and namespaces that exist; returns what could not be removed."""
    for dev in devs:
        if link_exists(dev):
            ip("link", "del", dev, check=False)
    for ns in namespaces:
        if netns_exists(ns):
            ip("netns", "del", ns, check=False)
    return [d for d in devs if link_exists(d)] + [n for n in namespaces if netns_exists(n)]


def host_routes():
    """The prefixes this machine already routes (main table, IPv4 and IPv6)."""
    out = []
    for family in ("-4", "-6"):
        r = ip(family, "route", "show", "table", "all", check=False)
        for line in r.stdout.splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("unreachable", "local", "broadcast", "anycast", "multicast"):
                word = line.split()[1]
            if word == "default":
                continue
            try:
                out.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    return out


def refuse_routed_overlap(*prefixes, ours=()):
    """Before a host-side device gets an address: refuse any test prefix that overlaps a
    route the machine already has (its own network: 192.0.2.0/24 and its gateway here),
    except the routes of devices the tests made themselves (ours)."""
    mine = set()
    for dev in ours:
        r = ip("route", "show", "dev", dev, check=False)
        mine.update(line.split()[0] for line in r.stdout.splitlines() if line.split())
    for text in prefixes:
        net = ipaddress.ip_network(text, strict=False)
        for routed in host_routes():
            if str(routed) in mine or routed.version != net.version:
                continue
            if routed.prefixlen == 0 or routed.is_link_local or routed.is_loopback or \
                    routed.is_multicast:
                continue
            if net.overlaps(routed):
                raise LabError("test prefix %s overlaps %s, which this machine already "
                               "routes: refusing to touch the host's network" % (net, routed))
