"""Shared fixtures: the tool as a module, and how to run it as a subprocess."""
import importlib.util
import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "vm_network_latency.py")
PYTHON = "/usr/bin/python3"   # BCC's bindings live in the system interpreter


def load_tool():
    spec = importlib.util.spec_from_file_location("vm_network_latency", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tool():
    return load_tool()


def run_tool(*args, timeout=120, python=PYTHON, pre=()):
    """Run the real tool to completion; returns CompletedProcess with text output."""
    return subprocess.run(list(pre) + [python, TOOL] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


@pytest.fixture
def recording_dir():
    """A directory an unprivileged replay (--read-events as nobody) can read."""
    d = tempfile.mkdtemp(prefix="vnl-rec-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture(scope="session")
def lab():
    """The QEMU VM lab (tests/lab.py), booted once for every test of the session."""
    from lab import Lab
    with Lab() as lab:
        # the remote's MAC stays on the physical port: no flooding towards the taps
        subprocess.run(["bridge", "fdb", "replace", Lab.REMOTE_MAC, "dev", Lab.PHY,
                        "master", "static"], check=True)
        yield lab


@pytest.fixture
def traces():
    """Start the real tool (tracing.Trace); every one is closed after the test, and
    every BPF program it had loaded must be gone from the kernel."""
    from tracing import Trace
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
