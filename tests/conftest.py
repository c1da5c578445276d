"""Shared fixtures: the tool as a module, and how to run it as a subprocess."""
import importlib.util
import os
import subprocess

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
