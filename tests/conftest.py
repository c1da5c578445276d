"""Shared fixtures, and the suites: every test belongs to exactly one of

  offline  needs nothing of this machine's kernel (decoding, reporting, recordings,
           the command line; the tool run as a subprocess up to its first BPF call)
  host     this host's kernel: its BTF, the verifier, BPF_PROG_TEST_RUN, the tool
           tracing without a VM, the benchmark
  lab      the QEMU VM lab on this kernel (tests/harness/lab.py)
  kguest   the kernel matrix: guest kernels of Debian releases under QEMU

(pytest.ini declares them; test_vm_latency.sh picks suites with -m).
"""
import os
import shutil
import subprocess
import tempfile

import pytest

from tests.harness.tool import load_tool

SUITES = ("offline", "host", "lab", "kguest")


def pytest_collection_modifyitems(config, items):
    """A test in no suite, or in two, would run in none or twice: refuse."""
    wrong = [(item.nodeid, sorted(set(m.name for m in item.iter_markers()
                                      if m.name in SUITES))) for item in items]
    wrong = [(n, m) for n, m in wrong if len(m) != 1]
    if wrong:
        raise pytest.UsageError("tests need exactly one suite marker (%s): %s" % (
            ", ".join(SUITES), "; ".join("%s has %s" % (n, m or "none") for n, m in wrong[:5])))


@pytest.fixture(scope="session")
def tool():
    return load_tool()


@pytest.fixture
def recording_dir():
    """A directory an unprivileged replay (--read-events as nobody) can read."""
    d = tempfile.mkdtemp(prefix="vnl-rec-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="session")
def lab():
    """The QEMU VM lab (tests/harness/lab.py), booted once for every test of the session."""
    from tests.harness.lab import Lab
    with Lab() as lab:
        # the remote's MAC stays on the physical port: no flooding towards the taps
        subprocess.run(["bridge", "fdb", "replace", Lab.REMOTE_MAC, "dev", Lab.PHY,
                        "master", "static"], check=True)
        yield lab


@pytest.fixture
def traces():
    """Start the real tool (tracing.Trace); every one is closed after the test, and
    every BPF program it had loaded must be gone from the kernel."""
    from tests.harness.tracing import Trace
    started = []

    def start(*args, **kw):
        t = Trace(*args, **kw)
        started.append(t)
        return t
    yield start
    for t in started:
        t.close()
    for t in started:
        assert t.leftover_programs() == [], "BPF programs left loaded after the tool exited"
