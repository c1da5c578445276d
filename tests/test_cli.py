"""The command line and the files the tool writes, with nothing of the kernel: bad
input is one clear line and exit 2 before any BPF; a recording is never written
through a link or into another user's file; the code runs on Python 3.6."""
import os
import shutil
import subprocess
import tempfile

import socket

import pytest
from hypothesis import given, settings, strategies as st

from tests.harness.prometheus import free_port
from tests.harness.tool import FUZZ_OPTIONS, PYTHON, TOOL, load_tool, run_tool

pytestmark = pytest.mark.offline


# ---------------------------------------------------------------------------
# Bad input: one line saying what is wrong, exit 2, no traceback, nothing compiled
# ---------------------------------------------------------------------------

BAD_INPUT = [
    (["--src-ip", "10.0.0.300"], "not an IPv4 or IPv6 address"),
    (["--dst-ip", "fd77::zz"], "not an IPv4 or IPv6 address"),
    (["--src-ip", "hostname"], "not an IPv4 or IPv6 address"),
    (["--src-ip", "10.0.0.1", "--dst-ip", "fd77::1"], "of different families"),
    (["--src-ip", "fd77::1", "--protocol", "icmp"], "ICMPv4, but the address filter is IPv6"),
    (["--protocol", "icmp6", "--dst-port", "80"], "ICMP has no ports"),
    (["--src-port", "0"], "outside 1-65535"),
    (["--dst-port", "65536"], "outside 1-65535"),
    (["--dst-port", "http"], "not a port number"),
    (["--protocol", "icmp", "--dst-port", "80"], "ICMP has no ports"),
    (["--protocol", "sctp"], "invalid choice"),
    (["--direction", "up"], "invalid choice"),
    (["--mode", "fast"], "invalid choice"),
    (["--output", "xml"], "invalid choice"),
    (["--attach", "uprobe"], "invalid choice"),
    (["--interval", "0"], "positive"),
    (["--interval", "-1"], "positive"),
    (["--interval", "nan"], "positive"),
    (["--latency-threshold", "-5"], "zero or a positive"),
    (["--timeout", "-1"], "zero or a positive"),
    (["--timeout", "soon"], "not a number"),
    (["--vm-dev", "no-such-dev0"], "does not exist"),
    (["--phy-dev", "bad/name"], "not a valid network device name"),
    (["--vm-dev", "lo", "--phy-dev", "lo"], "both --vm-dev and --phy-dev"),
    (["--bogus"], "unrecognized arguments"),
    (["--btf", "/no/such/vmlinux"], "--btf /no/such/vmlinux: no such file"),
    (["--read-events", "x.vnl", "--protocol", "udp"], "only --output, --write-pcap, --heatmap go with it (not --protocol)"),
    (["--vm", ""], "a VM name cannot be empty"),
    (["--per-vm"], "--per-vm splits the histograms by VM: it needs --mode histogram"),
    (["--list-vms", "--protocol", "tcp"], "--list-vms only lists the VMs"),
    (["--vm-d", "vnltap0"], "unrecognized arguments"),     # no abbreviations
    (["--latency-threshold", "1e308"], "more than a day"),
    (["--latency-threshold", "inf"], "zero or a positive"),
    (["--read-events", ""], "--read-events: the file name is empty"),
    (["--write-events", ""], "--write-events: the file name is empty"),
    (["--mode", "histogram", "--prometheus-textfile", ""],
     "--prometheus-textfile: the file name is empty"),
    (["--btf", ""], "--btf: the file name is empty"),
    (["--btf", "/dev/zero", "--dry-run"], "--btf /dev/zero: not a regular file"),
    (["--write-pcap", "/tmp/x.pcapng", "--mode", "histogram"],
     "--write-pcap writes each reported packet: detailed mode only"),
    (["--write-pcap", "/tmp/x.pcapng", "--list-stages"], "--write-pcap records a trace: "
     "not with --list-stages"),
    (["--write-events", "/tmp/x.vnl", "--dry-run"], "--write-events records a trace: "
                                                    "not with --dry-run"),
    (["--write-events", "/tmp", "--timeout", "1"], "--write-events /tmp: Is a directory"),
    (["--write-events", "/no/such/dir/x.vnl", "--btf", "/no/such/vmlinux"],
     "--write-events /no/such/dir/x.vnl: No such file"),   # opened before anything else
    (["--mode", "histogram", "--prometheus-tls-cert", "c.pem"],
     "--prometheus-tls-cert secures the metrics endpoint: it needs --prometheus"),
    (["--mode", "histogram", "--prometheus", "9999", "--prometheus-tls-cert", "c.pem"],
     "--prometheus-tls-cert and --prometheus-tls-key go together"),
    (["--mode", "histogram", "--prometheus", "9999", "--prometheus-client-ca", "ca.pem"],
     "--prometheus-client-ca checks clients over TLS"),
    (["--mode", "histogram", "--vm-table-size", "1000"],
     "--vm-table-size sizes the per-VM counts: it needs --per-vm"),
    (["--mode", "histogram", "--per-vm", "--vm-table-size", "10"], "outside 64-4194304"),
    (["--forget-after", "0", "--mode", "histogram", "--per-vm"], "positive"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUT)
def test_bad_input_exits_2_with_one_clear_line(argv, message):
    r = run_tool(*argv, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert message in r.stderr
    errors = [l for l in r.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, r.stderr
    assert r.stdout == ""
    # what is wrong and where help is: never argparse's whole usage (16 lines)
    assert len(r.stderr.splitlines()) <= 2, r.stderr


def test_not_root_exits_2():
    workdir = tempfile.mkdtemp(prefix="vnl-unit-")
    try:
        os.chmod(workdir, 0o755)
        copy = os.path.join(workdir, "vm_network_latency.py")
        shutil.copy(TOOL, copy)
        os.chmod(copy, 0o755)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            PYTHON, copy, "--protocol", "udp"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    finally:
        shutil.rmtree(workdir)
    assert r.returncode == 2
    assert "must run as root" in r.stderr and "Traceback" not in r.stderr


def test_runs_on_python_36_and_newer():
    vermin = shutil.which("vermin")
    assert vermin, "vermin is installed by test_vm_latency.sh"
    r = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.6-", TOOL],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    assert r.returncode == 0, r.stdout


# ---------------------------------------------------------------------------
# Files the tool writes as root
# ---------------------------------------------------------------------------

@pytest.fixture
def users_dir():
    """A directory of an unprivileged user's (nobody's), as a home directory is: what
    is in it that user made, and root writes there when asked to."""
    d = tempfile.mkdtemp(prefix="vnl-user-")
    os.chown(d, 65534, 65534)
    victim = tempfile.NamedTemporaryFile(prefix="vnl-root-", delete=False)
    victim.write(b"root's own file\n")
    victim.close()
    os.chmod(victim.name, 0o600)
    yield d, victim.name
    shutil.rmtree(d)
    os.unlink(victim.name)


def as_user(*argv):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] +
                          list(argv), check=True)


def stops_early():
    """Options that make the tool stop, exit 2, right after it opened its files."""
    return ["--vm", "no-such-vm-for-this-test", "--timeout", "1"]


@pytest.mark.parametrize("option", ["--write-events", "--write-pcap"])
def test_files_written_as_root_never_follow_a_symlink(users_dir, option):
    d, victim = users_dir
    link = os.path.join(d, "run.vnl")
    as_user("ln", "-s", victim, link)
    r = run_tool(*([option, link] + stops_early()))
    assert r.returncode == 2 and "a symbolic link, which the tool does not follow" in r.stderr
    with open(victim, "rb") as f:
        assert f.read() == b"root's own file\n"
    assert os.path.islink(link)


def test_write_events_leaves_another_users_file_alone(users_dir):
    d, _victim = users_dir
    planted = os.path.join(d, "run.vnl")
    as_user("sh", "-c", "umask 0; echo planted > %s" % planted)
    r = run_tool(*(["--write-events", planted] + stops_early()))
    assert r.returncode == 2 and "belongs to another user (uid 65534): not overwritten" \
        in r.stderr
    with open(planted) as f:
        assert f.read() == "planted\n"


def test_write_events_refuses_a_hard_link_of_roots(users_dir):
    d, victim = users_dir
    link = os.path.join(d, "run.vnl")
    os.link(victim, link)           # (root can; protected_hardlinks stops other users)
    r = run_tool(*(["--write-events", link] + stops_early()))
    assert r.returncode == 2 and "other hard links" in r.stderr
    with open(victim, "rb") as f:
        assert f.read() == b"root's own file\n"


def test_a_recording_is_private_to_root(users_dir):
    d, _victim = users_dir
    new = os.path.join(d, "new.vnl")
    r = run_tool(*(["--write-events", new] + stops_early()))
    assert r.returncode == 2 and "no running VM" in r.stderr     # (opened first)
    st = os.stat(new)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    os.chmod(new, 0o644)                # an old one, readable by all: made private again
    run_tool(*(["--write-events", new] + stops_early()))
    assert os.stat(new).st_mode & 0o777 == 0o600


def test_the_textfile_is_written_through_no_link(tool, users_dir):
    """--prometheus-textfile replaces the file by a rename: a symbolic link at its path
    is replaced, never followed; the temporary file has a name nobody can guess."""
    d, victim = users_dir
    path = os.path.join(d, "vm.prom")
    os.symlink(victim, path)
    tool.write_file_atomically(path, b"# metrics\n")
    with open(victim, "rb") as f:
        assert f.read() == b"root's own file\n"
    assert not os.path.islink(path) and open(path).read() == "# metrics\n"
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(d) == ["vm.prom"]


# ---------------------------------------------------------------------------
# Histogram buckets, in Python
# ---------------------------------------------------------------------------

def test_buckets_are_monotonic_and_contiguous(tool):
    prev_hi = 0.0
    for b in range(0, tool.C.HIST_BUCKETS):
        lo, hi = tool.bucket_bounds(b)
        assert lo == prev_hi and hi > lo
        prev_hi = hi


# ---------------------------------------------------------------------------
# The metrics' options, and fuzzed command lines
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--prometheus", "0"], "outside 1-65535"),
    (["--prometheus", "127.0.0.1:65536"], "outside 1-65535"),
    (["--prometheus", "web01:9100"], "not an IP address"),
    (["--prometheus", "9100"], "needs --mode histogram"),
    (["--prometheus-textfile", "/no/such/dir/x.prom", "--mode", "histogram"], "no directory"),
    (["--prometheus", "203.0.113.7:9100", "--mode", "histogram"], "not an address of this host"),
])
def test_bad_metrics_options_exit_2_before_any_bpf(argv, message):
    r = run_tool(*(argv + ["--verbose", "--timeout", "1"]), timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert "struct layouts" not in r.stderr and "Tracing" not in r.stderr   # nothing compiled


def test_a_port_in_use_is_refused_before_any_bpf():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        r = run_tool("--prometheus", "127.0.0.1:%d" % s.getsockname()[1], "--mode",
                     "histogram", "--verbose", "--timeout", "1", timeout=60)
    finally:
        s.close()
    assert r.returncode == 2 and "Address already in use" in r.stderr
    assert "struct layouts" not in r.stderr and "Traceback" not in r.stderr


def test_a_bad_certificate_is_refused_before_any_bpf(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    r = run_tool("--mode", "histogram", "--prometheus", "%d" % free_port(),
                 "--prometheus-tls-cert", str(cert), "--prometheus-tls-key", str(cert),
                 "--verbose", "--timeout", "1", timeout=60)
    assert r.returncode == 2 and "--prometheus-tls-cert %s" % cert in r.stderr
    assert "Traceback" not in r.stderr and "struct layouts" not in r.stderr


TOOL_MODULE = load_tool()
FUZZ_VALUES = st.one_of(
    st.sampled_from(["tcp", "udp", "icmp", "all", "tx", "rx", "both", "detailed",
                     "histogram", "json", "text", "kprobe", "auto", "lo", "-1", "0", "1",
                     "65535", "65536", "1e309", "nan", "10.0.0.1", "::1", "", " ", "\x00x",
                     "a" * 300, "--", "-"]),
    st.text(max_size=12))


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FUZZ_OPTIONS), FUZZ_VALUES), max_size=6))
def test_fuzzed_command_lines_never_trace_back(pairs):
    tool = TOOL_MODULE
    argv = [x for pair in pairs for x in pair]
    try:
        args = tool.parse_args(argv)
        tool.check_devices_exist(tool.DeviceSelection(args.vm_dev or [], args.vm or [],
                                                      args.phy_dev or []))
    except SystemExit as e:
        assert e.code == 2
    except tool.UsageError:
        pass


# ---------------------------------------------------------------------------
# The documentation that must agree with the code
# ---------------------------------------------------------------------------

def parser_options(tool):
    """{option: hidden?} of every long option argparse has."""
    import argparse
    return dict((o, a.help == argparse.SUPPRESS) for a in tool.build_parser()._actions
                for o in a.option_strings if o.startswith("--") and o != "--help")


def test_the_header_and_the_readme_name_every_option(tool):
    """One list of options, argparse's: the file header's USAGE names every one (and no
    other), the README's option table every one a user can give."""
    import re
    options = parser_options(tool)
    with open(TOOL) as f:
        header = f.read().split("\nfrom __future__", 1)[0]
    usage = header[header.index("# USAGE:"):]
    usage = usage[:usage.index("\n#\n")]
    in_usage = set(re.findall(r"--[a-z0-9-]+", usage))
    visible = set(o for o, hidden in options.items() if not hidden)
    # (a hidden option may be named: --ebpf is, as in bcc's own tools)
    assert visible <= in_usage <= set(options), (sorted(visible - in_usage),
                                                 sorted(in_usage - set(options)))
    with open(os.path.join(os.path.dirname(TOOL), "README.md")) as f:
        readme = f.read()
    rows = [l for l in readme.splitlines() if l.startswith("| `--")]
    in_table = set(o for l in rows for o in re.findall(r"`(--[a-z0-9-]+)", l.split(" | ")[0]))
    assert in_table == visible, (sorted(visible - in_table), sorted(in_table - visible))


def test_the_readmes_map_of_the_file_is_the_file(tool):
    """README's "How the file is built": the file's sections in their order, and each
    name it gives defined at the top level of the section it is listed under."""
    import ast
    import re
    with open(TOOL) as f:
        source = f.read()
    lines = source.splitlines()
    banners = [(i + 1, lines[i + 1][2:]) for i in range(len(lines) - 2)
               if lines[i].startswith("# =====") and lines[i + 2].startswith("# =====")]
    with open(os.path.join(os.path.dirname(TOOL), "README.md")) as f:
        readme = f.read()
    part = readme[readme.index("## How the file is built"):]
    part = part[:part.index("Where to add things")]
    entries = re.findall(r"^\d+\. \*\*(.+?)\*\*: (.*?)(?=^\d+\. \*\*|\Z)", part, re.M | re.S)
    assert [t for t, _ in entries] == [b.split(":")[0] for _l, b in banners]
    defined = {}
    for node in ast.parse(source).body:
        names = [node.name] if hasattr(node, "name") else \
            [t.id for n in getattr(node, "targets", []) for t in ast.walk(n)
             if isinstance(t, ast.Name)]
        for name in names:
            defined.setdefault(name, node.lineno)
    starts = [l for l, _b in banners] + [len(lines) + 1]
    for i, (title, text) in enumerate(entries):
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`", text):
            assert name in defined, "README names %s, which the file does not define" % name
            assert starts[i] < defined[name] < starts[i + 1], \
                "%s is not in the section %s" % (name, title)


# ---------------------------------------------------------------------------
# The host's devices: which are the VM side, which the NICs, from sysfs
# ---------------------------------------------------------------------------

class FakeSysfs(object):
    """A /sys/class/net of made-up devices, as the kernel lays it out: ifindex, uevent
    (DEVTYPE), master, lower_* links, tun_flags for taps, macvtap/tapN/dev, device for
    NICs backed by hardware."""

    def __init__(self, root):
        self.root = root
        self.next = 2

    def add(self, name, devtype=None, tap=False, nic=False, master=None, lower=(),
            macvtap=None):
        d = os.path.join(self.root, name)
        os.makedirs(d)
        with open(os.path.join(d, "ifindex"), "w") as f:
            f.write("%d\n" % self.next)
        self.next += 1
        with open(os.path.join(d, "uevent"), "w") as f:
            f.write("INTERFACE=%s\n" % name + ("DEVTYPE=%s\n" % devtype if devtype else ""))
        if tap:
            open(os.path.join(d, "tun_flags"), "w").write("0x1002\n")
        if nic:
            os.makedirs(os.path.join(d, "device"))
        if master:
            os.symlink("../" + master, os.path.join(d, "master"))
        for low in lower:
            os.symlink("../" + low, os.path.join(d, "lower_" + low))
        if macvtap:
            t = os.path.join(d, "macvtap", "tap%d" % (self.next - 1))
            os.makedirs(t)
            open(os.path.join(t, "dev"), "w").write("%d:%d\n" % macvtap)
        return self

    def roles(self, tool, **selection):
        found = tool.resolve_roles(tool.DeviceSelection(
            selection.get("vm_devs", []), selection.get("vms", []),
            selection.get("phy_devs", [])), selection.get("owners", {}))
        return dict((found.names[i], r) for i, r in found.roles.items()), found


@pytest.fixture
def sysfs(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool, "SYS_NET", str(tmp_path))
    return FakeSysfs(str(tmp_path))


def test_a_bridge_on_a_vlan_of_a_bond_has_the_bonds_nics_as_the_physical_side(tool, sysfs):
    """br0 -> bond0.100 -> bond0 -> eth0, eth1: TX ends and RX starts on the NICs; the
    VLAN and the bond are what the record says the NIC carried it under."""
    (sysfs.add("eth0", nic=True, master="bond0").add("eth1", nic=True, master="bond0")
     .add("bond0", devtype="bond", lower=["eth0", "eth1"])
     .add("bond0.100", devtype="vlan", lower=["bond0"], master="br0")
     .add("br0", devtype="bridge", lower=["bond0.100", "vnet0"])
     .add("vnet0", tap=True, master="br0"))
    roles, found = sysfs.roles(tool)
    R = tool.Role
    assert roles == {"vnet0": R.VM, "eth0": R.PHY, "eth1": R.PHY}
    assert found.phys == ["eth0", "eth1"]
    assert found.uplinks == {"eth0": ["bond0.100", "bond0"], "eth1": ["bond0.100", "bond0"]}


def test_a_vlan_on_a_nic_and_a_team(tool, sysfs):
    (sysfs.add("eth2", nic=True).add("eth2.7", devtype="vlan", lower=["eth2"], master="br1")
     .add("eth3", nic=True, master="team0").add("eth4", nic=True, master="team0")
     .add("team0", lower=["eth3", "eth4"], master="br1")
     .add("br1", devtype="bridge", lower=["eth2.7", "team0", "vnet1"])
     .add("vnet1", tap=True, master="br1"))
    roles, found = sysfs.roles(tool)
    assert sorted(found.phys) == ["eth2", "eth3", "eth4"]
    assert found.uplinks == {"eth2": ["eth2.7"], "eth3": ["team0"], "eth4": ["team0"]}
    # --phy-dev may name the bond or team (its NICs), or a NIC
    assert sysfs.roles(tool, phy_devs=["team0"])[1].phys == ["eth3", "eth4"]
    assert sysfs.roles(tool, phy_devs=["eth3"])[1].phys == ["eth3"]


def test_macvtaps_are_vm_devices_and_their_lower_nic_the_physical_side(tool, sysfs):
    """Two macvtaps on eth0 (bridge mode: their frames to each other come back through
    eth0), one on a VLAN of eth1; a VM selected by name: the other macvtaps are peers."""
    R = tool.Role
    (sysfs.add("eth0", nic=True).add("eth1", nic=True)
     .add("eth1.5", devtype="vlan", lower=["eth1"])
     .add("macvtap0", lower=["eth0"], macvtap=(240, 1))
     .add("macvtap1", lower=["eth0"], macvtap=(240, 2))
     .add("macvtap2", lower=["eth1.5"], macvtap=(240, 3)))
    roles, found = sysfs.roles(tool)
    assert roles == {"macvtap0": R.MVTAP, "macvtap1": R.MVTAP, "macvtap2": R.MVTAP,
                     "eth0": R.PHY_MVT, "eth1": R.PHY, "eth1.5": R.MVT_LOWER}
    assert found.uplinks == {"eth1": ["eth1.5"]}
    assert tool.macvtap_chardevs() == {(240, 1): "macvtap0", (240, 2): "macvtap1",
                                       (240, 3): "macvtap2"}
    owners = {"macvtap1": tool.VmInfo("db-01", None, 10, "qemu")}
    roles, found = sysfs.roles(tool, vms=["db-01"], owners=owners)
    assert roles["macvtap1"] == R.MVTAP and found.vm_devs == ["macvtap1"]
    assert roles["macvtap0"] == roles["macvtap2"] == R.MVTAP | R.PEER
    assert found.phys == ["eth0"]       # the selected VM's NIC only


def test_taps_of_a_bridge_a_tunnel_and_vms_not_selected(tool, sysfs, monkeypatch):
    R = tool.Role
    (sysfs.add("vnet0", tap=True, master="br0").add("vnet1", tap=True, master="br0")
     .add("veth0", master="br0").add("br0", devtype="bridge"))
    roles, found = sysfs.roles(tool, vm_devs=["vnet1"])
    assert roles == {"vnet1": R.VM, "vnet0": R.VM | R.PEER, "veth0": R.PHY}
    assert found.vm_devs == ["vnet1"] and found.uplinks == {}


def test_a_vlan_of_a_bond_without_nics_is_a_note_not_an_error(tool, sysfs):
    """--phy-dev naming a bond's VLAN while the bond has no slaves: tracing can go on
    (a slave may be added), and the user is told why nothing arrives there."""
    (sysfs.add("bond7", devtype="bond").add("bond7.100", devtype="vlan", lower=["bond7"])
     .add("vnet0", tap=True))
    _roles, found = sysfs.roles(tool, phy_devs=["bond7.100"])
    assert found.phys == ["bond7"] and found.uplinks == {"bond7": ["bond7.100"]}
    assert tool.uplink_notes(found) == [
        "bond7 (under bond7.100) is a bond with no NIC under it: no packet leaves or "
        "arrives there until it has one"]


def test_top_on_a_terminal_curses_cannot_draw_prints_plain_lines(tool, monkeypatch, capsys):
    """--top where $TERM has no terminfo: a note, then the plain lines, no traceback."""
    master, slave = os.openpty()
    try:
        out = os.fdopen(slave, "w")
        monkeypatch.setenv("TERM", "no-such-terminal-vnl")
        view = tool.TopView(2.0, out=out)
        assert view.screen is None
        assert "--top: this terminal cannot be drawn on" in capsys.readouterr().err
        view.update(1796119200.0, [])
        out.flush()
        assert os.read(master, 4096).decode().startswith("[") and view.keys() is True
        view.close()
        out.close()
    finally:
        os.close(master)
