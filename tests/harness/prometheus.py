"""A real Prometheus server on loopback (Debian's prometheus), scraping one target, and
the plain ways to reach the tool's endpoint."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Prometheus(object):
    """A real Prometheus server on loopback that scrapes one target every second
    (over HTTPS with a client certificate when tls gives the files)."""

    def __init__(self, target_port, tls=None):
        self.dir = tempfile.mkdtemp(prefix="vnl-prom-")
        self.port = free_port()
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "scrape_configs:\n  - job_name: vnl\n")
            if tls:
                f.write("    scheme: https\n    tls_config:\n      ca_file: %s\n"
                        "      cert_file: %s\n      key_file: %s\n" % (
                            tls["ca"], tls["client_cert"], tls["client_key"]))
            f.write("    static_configs:\n      - targets: ['127.0.0.1:%d']\n" % target_port)
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


def scrape(port):
    return urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read() \
        .decode()
