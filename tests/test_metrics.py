"""Fleet metrics: the tool's --prometheus endpoint scraped by a real Prometheus server
(Debian's prometheus, started here on loopback, scraping every second), and its
--prometheus-textfile read while it is being rewritten. The oracles: the guest's own
ping counts, and the tool's own histograms of the same packets."""
import collections
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import pytest

from conftest import run_tool
from lab import Lab

PHY, TAP = Lab.PHY, Lab.TAP
REMOTE = Lab.REMOTE_IP


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Prometheus(object):
    """A real Prometheus server on loopback that scrapes one target every second."""

    def __init__(self, target_port):
        self.dir = tempfile.mkdtemp(prefix="vnl-prom-")
        self.port = free_port()
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: vnl\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % target_port)
        self.log = open(os.path.join(self.dir, "log"), "w")
        self.proc = subprocess.Popen(
            ["prometheus", "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/-/ready" % self.port, timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.logs()
                time.sleep(0.2)
        raise AssertionError("prometheus not ready: %s" % self.logs())

    def logs(self):
        with open(os.path.join(self.dir, "log")) as f:
            return f.read()[-3000:]

    def query(self, promql):
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (
            self.port, urllib.parse.urlencode({"query": promql}))
        reply = json.load(urllib.request.urlopen(url, timeout=10))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, promql):
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql, want, timeout=20):
        """Wait until the query returns want (Prometheus scrapes every second)."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(promql)
            if got == want:
                return got
            time.sleep(0.3)
        return got

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, True)


@pytest.fixture
def prometheus():
    servers = []

    def start(target_port):
        p = Prometheus(target_port)
        servers.append(p)
        return p
    yield start
    for p in servers:
        p.close()


def scrape(port):
    return urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read() \
        .decode()


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
    t = traces("--phy-dev", PHY, "--protocol", "icmp", "--mode", "histogram",
               "--interval", "3600", "--prometheus", "127.0.0.1:%d" % port, "--drops")
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
        time.sleep(0.5)
        text = scrape(port)
        assert 'vm_network_latency_seconds_count{direction="tx",segment="total",vm="db-02"} ' \
               '3.0' in text, [l for l in text.splitlines() if "db-02" in l][:5]
    finally:
        lab.remove_guest(vm)
    time.sleep(1.5)
    ping(lab.vm, 2)
    time.sleep(0.5)
    text = scrape(port)                         # still up; counters are since the start
    assert 'vm="db-02"} 3.0' in text
    assert 'vm_network_latency_seconds_count{direction="tx",segment="total",vm="%s"} 2.0' \
        % Lab.GUEST_NAME in text
    t.stop()
    assert t.returncode == 0, t.stderr


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
