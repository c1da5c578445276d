"""The tool under test, as the tests run it: a module, or the real program as a
subprocess (as root, or as an unprivileged user)."""
import importlib.util
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "vm_network_latency.py")
PYTHON = "/usr/bin/python3"   # BCC's bindings live in the system interpreter
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def load_tool():
    spec = importlib.util.spec_from_file_location("vm_network_latency", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args, timeout=120, python=PYTHON, pre=()):
    """Run the real tool to completion; returns CompletedProcess with text output."""
    return subprocess.run(list(pre) + [python, TOOL] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def as_nobody(*args, timeout=60):
    """The tool as an unprivileged user (a replay needs neither root nor BPF)."""
    return run_tool(*args, timeout=timeout, pre=NOBODY)


# the options fuzzed command lines draw from (tests/test_cli.py, tests/test_kernel.py)
FUZZ_OPTIONS = ["--src-ip", "--dst-ip", "--src-port", "--dst-port", "--protocol",
                "--direction", "--vm-dev", "--phy-dev", "--mode", "--interval",
                "--latency-threshold", "--timeout", "--output", "--attach", "--max-inflight",
                "--drops", "--verbose", "--bogus"]
