"""Process and command helpers of the test harness (stdlib only)."""
import ctypes
import os
import signal
import subprocess
import time


class LabError(RuntimeError):
    """The lab could not be built, set up or driven."""


PR_SET_PDEATHSIG = 1
try:
    LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    LIBC = None


def die_with_parent(sig=signal.SIGKILL):
    """preexec_fn: the child gets sig (SIGKILL unless said) when the (forking thread of
    the) lab dies."""
    if LIBC is not None:
        LIBC.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def stop_with_parent():
    """preexec_fn: SIGTERM, the child's clean stop (the tool detaches and prints its
    summary; run_lane.sh kills its QEMU), when the test run that started it dies,
    however it dies."""
    die_with_parent(signal.SIGTERM)


def run(argv, check=True, timeout=30, **kw):
    """Run a host command, capture text output; LabError if check and it fails."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabError("timeout after %ss: %s" % (timeout, " ".join(argv))) from e
    if check and p.returncode != 0:
        raise LabError("command failed (rc=%d): %s\n%s%s" % (
            p.returncode, " ".join(argv), p.stdout, p.stderr))
    return p


def read_tail(path, limit=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
        text = data.decode("utf-8", "replace")
        return ("...\n" if size > limit else "") + text
    except OSError as e:
        return "<%s unreadable: %s>" % (path, e)


def kill_pid(pid, grace=3.0):
    """SIGTERM, then SIGKILL after `grace` seconds, one pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap it if it is our child
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_popen(proc, grace=3.0):
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass
