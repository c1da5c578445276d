"""Fleet metrics: the tool's --prometheus endpoint scraped by a real Prometheus server
(Debian's prometheus, started here on loopback, scraping every second), and its
--prometheus-textfile read while it is being rewritten. The oracles: the guest's own
ping counts, and the tool's own histograms of the same packets."""
import collections
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.harness.lab import Lab
from tests.harness.prometheus import Prometheus, free_port, scrape

pytestmark = pytest.mark.lab

PHY, TAP = Lab.PHY, Lab.TAP
REMOTE = Lab.REMOTE_IP


@pytest.fixture
def prometheus():
    servers = []

    def start(target_port, tls=None):
        p = Prometheus(target_port, tls)
        servers.append(p)
        return p
    yield start
    for p in servers:
        p.close()


def ping(vm, n):
    rc, out = vm.guest("ping -c %d -i 0.2 -W 2 %s" % (n, REMOTE), timeout=120)
    assert rc == 0 and "%d packets received" % n in out, out


def le_bucket_width_us(value_us):
    """Width of the power-of-two Prometheus bucket (2^(k-1), 2^k] us holding value_us."""
    k = 0
    while 2 ** k < value_us:
        k += 1
    return 2 ** k - (2 ** (k - 1) if k else 0)


def test_prometheus_counts_every_packet_and_agrees_on_p99(lab, traces, prometheus):
    n = 20
    port = free_port()
    # the metrics are rendered once per interval: 10 s holds all 20 pings (4 s) in the
    # first one, whose text histograms then hold exactly what Prometheus has
    t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
               "--interval", "10", "--prometheus", "127.0.0.1:%d" % port, "--drops")
    prom = prometheus(port)
    ping(lab.vm, n)
    sel = 'segment="total",vm="%s"' % Lab.GUEST_NAME
    for direction in ("tx", "rx"):
        got = prom.wait_value('vm_network_latency_seconds_count{%s,direction="%s"}'
                              % (sel, direction), n)
        assert got == n, (direction, got, prom.query("vm_network_latency_seconds_count"))
    # every packet that entered is accounted for by a fate or is still in flight
    fates = prom.wait_value("sum(vm_network_latency_packets_total) + "
                            "sum(vm_network_latency_packets_in_flight)", 2 * n)
    assert fates == 2 * n
    assert prom.value('sum(vm_network_latency_packets_total{fate="reported"})') == 2 * n
    p99 = {d: prom.value('histogram_quantile(0.99, vm_network_latency_seconds_bucket{%s,'
                         'direction="%s"})' % (sel, d)) for d in ("tx", "rx")}
    sums = {d: prom.value('vm_network_latency_seconds_sum{%s,direction="%s"}' % (sel, d))
            for d in ("tx", "rx")}
    assert prom.value('vm_network_latency_info{version!=""}') == 1
    t.stop()
    assert t.returncode == 0, t.stderr
    own = dict((h["direction"], h) for h in t.histograms() if h["segment"] == "total")
    for d in ("tx", "rx"):
        assert own[d]["count"] == n
        tool_p99 = own[d]["p99_us"]
        width = le_bucket_width_us(tool_p99)
        assert abs(p99[d] * 1e6 - tool_p99) <= width, (d, p99[d] * 1e6, tool_p99, width)
        # the sum is the kernel's exact sum of the packets' totals: within their buckets
        lo = sum(b["lo_us"] * b["count"] for b in own[d]["buckets"])
        hi = sum(b["hi_us"] * b["count"] for b in own[d]["buckets"])
        assert lo <= sums[d] * 1e6 <= hi, (d, sums[d], lo, hi)
    s = t.summary()
    assert s["reported"] == 2 * n


def test_textfile_is_replaced_whole_and_parses(lab, traces):
    from prometheus_client.parser import text_string_to_metric_families
    d = tempfile.mkdtemp(prefix="vnl-textfile-")
    path = os.path.join(d, "vm_network_latency.prom")
    try:
        t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
                   "--interval", "0.2", "--quiet", "--prometheus-textfile", path)
        reads, bad, stop = [], [], threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    with open(path) as f:
                        text = f.read()
                except FileNotFoundError:
                    continue
                try:
                    fams = dict((m.name, m) for m in text_string_to_metric_families(text))
                    assert "vm_network_latency_info" in fams and text.endswith("\n")
                    reads.append(fams)
                except Exception as e:          # a torn file would fail to parse
                    bad.append("%s: %r" % (e, text[-200:]))
        th = threading.Thread(target=reader)
        th.start()
        ping(lab.vm, 5)
        time.sleep(1)
        stop.set()
        th.join()
        t.stop()
        assert t.returncode == 0, t.stderr
        assert not bad, bad[:3]
        assert len(reads) > 20, "the reader saw %d versions" % len(reads)
        assert "Latency Distribution" not in t.stdout        # --quiet
        with open(path) as f:                                 # left consistent at exit
            fams = dict((m.name, m) for m in text_string_to_metric_families(f.read()))
        counts = collections.Counter()
        for sample in fams["vm_network_latency_seconds"].samples:
            if sample.name.endswith("_count") and sample.labels["segment"] == "total":
                counts[(sample.labels["vm"], sample.labels["direction"])] += sample.value
        assert counts == {(Lab.GUEST_NAME, "tx"): 5, (Lab.GUEST_NAME, "rx"): 5}
        assert not [n for n in os.listdir(d) if n != "vm_network_latency.prom"]
    finally:
        shutil.rmtree(d)


def test_endpoint_stays_up_across_a_vm_start_and_stop(lab, traces):
    port = free_port()
    t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
               "--interval", "1", "--prometheus", "%d" % port)
    assert 'vm="db-02"' not in scrape(port)
    vm, _ip = lab.add_guest(4, "db-02")
    try:
        time.sleep(1.5)                         # the tool's device refresh
        ping(vm, 3)
        time.sleep(1.5)                     # the metrics are as fresh as --interval
        text = scrape(port)
        # (peer_vm: the receiving VM of VM-to-VM packets; "" is no label to Prometheus)
        assert 'vm_network_latency_seconds_count{direction="tx",peer_vm="",segment="total",' \
               'vm="db-02"} 3.0' in text, [l for l in text.splitlines() if "db-02" in l][:5]
    finally:
        lab.remove_guest(vm)
    time.sleep(1.5)
    ping(lab.vm, 2)
    time.sleep(1.5)
    text = scrape(port)                         # still up; counters are since the start
    assert 'vm="db-02"} 3.0' in text
    assert 'vm_network_latency_seconds_count{direction="tx",peer_vm="",segment="total",' \
        'vm="%s"} 2.0' % Lab.GUEST_NAME in text
    t.stop()
    assert t.returncode == 0, t.stderr


# --- a long-running exporter: the per-VM table full, VMs that are gone forgotten ---

def test_a_full_per_vm_table_is_counted_and_gone_vms_make_room(lab, traces, prometheus):
    """A small per-VM table fills up: the counts it could not keep are a metric (and
    the summary's), never silent. A VM that stops leaves the table and the metrics
    --forget-after seconds later, and the room it made keeps the next packets; the
    VM that stays never sees its counters go back."""
    port = free_port()
    vm, _ip = lab.add_guest(4, "db-04")
    try:
        t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
                   "--interval", "1", "--prometheus", "%d" % port, "--vm-table-size", "64",
                   "--forget-after", "2", "--quiet")
        prom = prometheus(port)
        sel = 'vm_network_latency_seconds_count{vm="%s",segment="total",direction="tx"}' \
            % Lab.GUEST_NAME
        # the VM that stays has its entries first (else db-04's may fill the table
        # before it has one: the CI saw that once)
        ping(lab.vm, 5)
        assert prom.wait_value(sel, 5) == 5, prom.query(sel)
        full = 0
        for _ in range(10):         # until the table is full: latencies spread over
            ping(vm, 10)            # buckets, each (VM, segment, bucket) an entry
            ping(lab.vm, 5)
            time.sleep(1.5)         # an interval, and a scrape
            full = prom.value("sum(vm_network_latency_vm_table_full_total)")
            if full:
                break
        assert full, prom.query("vm_network_latency_vm_table_entries")
        assert prom.value("vm_network_latency_vm_table_entries") == 64
        assert prom.value('count(vm_network_latency_seconds_count{vm="db-04"})') > 0
    finally:
        lab.remove_guest(vm)
    # db-04 is gone: after --forget-after its series and its entries leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and \
            prom.value('count(vm_network_latency_seconds_count{vm="db-04"})'):
        time.sleep(0.5)
    assert prom.value('count(vm_network_latency_seconds_count{vm="db-04"})') is None
    entries = prom.value("vm_network_latency_vm_table_entries")
    assert entries < 64
    full_before = prom.value("sum(vm_network_latency_vm_table_full_total)")
    before = prom.value(sel)
    ping(lab.vm, 5)
    assert prom.wait_value(sel, before + 5) == before + 5      # kept, every one
    assert prom.value("sum(vm_network_latency_vm_table_full_total)") == full_before
    # the lab VM's counters never went back while db-04 was forgotten
    assert prom.value('sum(resets(vm_network_latency_seconds_count{vm="%s"}[5m]))'
                      % Lab.GUEST_NAME) == 0
    t.stop()
    assert t.returncode == 0, t.stderr
    s = t.summary()
    assert s["vm_hist_full"] == full_before > 0


# --- the endpoint over TLS, for a client with a certificate of the right CA only ---

def make_pki(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed,
    and a client certificate of another CA: openssl, as an operator makes them."""
    def ssl(*argv):
        subprocess.run(["openssl"] + list(argv), cwd=d, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    files = {}
    for ca in ("ca", "other-ca"):
        ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", ca + ".key", "-out", ca + ".pem", "-days", "2",
            "-subj", "/CN=vnl test %s" % ca)
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1"),
                          ("client", "ca", "extendedKeyUsage=clientAuth"),
                          ("stranger", "other-ca", "extendedKeyUsage=clientAuth")):
        ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=vnl " + name)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write(ext + "\n")
        ssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
            "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", name + ".ext")
    for name in ("ca", "server", "client", "stranger"):
        files[name + "_cert" if name != "ca" else "ca"] = os.path.join(d, name + ".pem")
        files[name + "_key"] = os.path.join(d, name + ".key")
    return files


def test_metrics_over_tls_only_for_clients_with_a_certificate(lab, traces, prometheus):
    import ssl
    d = tempfile.mkdtemp(prefix="vnl-pki-")
    try:
        pki = make_pki(d)
        os.chmod(d, 0o755)
        for f in os.listdir(d):
            os.chmod(os.path.join(d, f), 0o644)     # Prometheus runs as this user here
        port = free_port()
        t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
                   "--interval", "1", "--quiet", "--prometheus", "127.0.0.1:%d" % port,
                   "--prometheus-tls-cert", pki["server_cert"], "--prometheus-tls-key",
                   pki["server_key"], "--prometheus-client-ca", pki["ca"])
        prom = prometheus(port, tls={"ca": pki["ca"], "client_cert": pki["client_cert"],
                                     "client_key": pki["client_key"]})
        ping(lab.vm, 4)
        sel = 'vm_network_latency_seconds_count{vm="%s",segment="total",direction="rx"}' \
            % Lab.GUEST_NAME
        assert prom.wait_value(sel, 4) == 4, prom.query("up")
        assert prom.value('up{job="vnl"}') == 1
        url = "https://127.0.0.1:%d/metrics" % port

        def fetch(cert=None, key=None):
            ctx = ssl.create_default_context(cafile=pki["ca"])
            if cert:
                ctx.load_cert_chain(cert, key)
            return urllib.request.urlopen(url, context=ctx, timeout=10).read().decode()
        assert sel.split("{")[0] in fetch(pki["client_cert"], pki["client_key"])
        for cert, key in ((None, None), (pki["stranger_cert"], pki["stranger_key"])):
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                fetch(cert, key)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
        assert prom.value('up{job="vnl"}') == 1      # the refused ones did it no harm
        t.stop()
        assert t.returncode == 0 and "Traceback" not in t.stderr, t.stderr
    finally:
        shutil.rmtree(d)
