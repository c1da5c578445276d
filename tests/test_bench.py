"""One short real run of the benchmark as root (python3 -m bench.overhead), whose counts
must be those of the frames it sent, and whose lab is gone after it."""
import json
import os
import subprocess

import pytest

from tests.harness.tool import PYTHON, ROOT

pytestmark = pytest.mark.host


@pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark needs root")
def test_a_short_benchmark_run_counts_every_frame(tmp_path):
    out = str(tmp_path / "bench.json")
    frames = 20000
    p = subprocess.run([PYTHON, "-m", "bench.overhead", "-r", "1", "-n",
                        str(frames), "--keepup-rates", "10000", "--keepup-seconds", "1",
                        "--startup-runs", "1", "-o", out,
                        "--max-seconds", "600"], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=700)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = json.load(open(out))
    res = saved["result"]["configs"]
    # every tracer saw every frame the generator sent, and the lab carried them all
    assert res["tool_hist"]["summaries"][0]["reported"] == frames
    assert res["tool_thresh"]["summaries"][0]["below_threshold"] == frames
    assert res["tool_filtered"]["summaries"][0]["reported"] == 0
    assert 0 < res["tool_sample"]["summaries"][0]["reported"] < frames / 20
    # tcpdump's filter saw every frame on both devices (what it wrote before it was
    # stopped is its own business: "captured" can be short of it)
    assert res["tcpdump"]["received"] == [2 * frames]
    assert 0 < res["tcpdump"]["captured"][0] <= 2 * frames
    assert res["bpftrace"]["hist_count"] == [frames]
    assert res["floor"]["hits"] == [3 * frames]
    # the other paths: the macvtap's tool saw every frame; the VM-to-VM tool every frame
    # as VM to VM, and the receiving "VM" read every one, in both of its runs
    assert res["mvt_hist"]["summaries"][0]["reported"] == frames
    v2v = res["v2v_hist"]["summaries"][0]
    assert (v2v["reported"], v2v["reported_vm2vm"]) == (frames, frames)
    assert res["v2v_baseline"]["received"] == [frames] and res["v2v_hist"]["received"] == [frames]
    v2v = res["v2v_explain"]["summaries"][0]
    assert (v2v["reported"], v2v["reported_vm2vm"]) == (frames, frames)
    assert res["v2v_explain"]["received"] == [frames]
    assert saved["result"]["path_check_warmup"]["rx"] == frames
    assert saved["result"]["path_check_warmup"]["tx"] == 0
    k = saved["result"]["keepup"][0]
    assert k["kept_up"] and k["reported"] == 10000
    # the short path carried every frame (a kernel with neither a dummy nor an ifb
    # driver has none: the keep-up floods then ran on the long path, counted above)
    assert k["sink_kind"] in ("dummy", "ifb", None)
    assert k["sink_count"] == (10000 if k["sink_kind"] else None)
    # the BPF run-time breakdown: every configuration's programs ran, the floor's
    # variants too, and the least histogram mode can cost is below what it costs
    stats = saved["result"]["bpf_stats"]
    assert set(stats) >= {"tool_hist", "floor", "floor_empty", "floor_clock"}
    assert all(s["bpf_ns_per_frame_total"] > 0 for s in stats.values())
    lb = saved["result"]["bpf_lower_bound"]
    assert lb["tool_hist_runs_per_frame"] == pytest.approx(5, abs=0.01)
    assert lb["clock_read_ns"] > 0
    assert lb["bound_ns_per_frame"] < stats["tool_hist"]["bpf_ns_per_frame_total"]
    # --explain's interrupt time: on this path each frame the writer sends raises one
    # softirq (the veth's receive), timed at its entry and exit
    xb = saved["result"]["explain_interrupt_bound"]
    assert xb["softirqs_per_frame"] == pytest.approx(1, abs=0.1)
    assert xb["handler_runs_per_frame"] == pytest.approx(2, abs=0.2)
    assert set(stats) >= {"v2v_hist", "v2v_explain"}
    # the table printed is the saved analysis, rendered again
    again = subprocess.run([PYTHON, "-m", "bench.report", out], cwd=ROOT,
                           stdout=subprocess.PIPE, universal_newlines=True, check=True)
    assert again.stdout.strip() in p.stdout
    # nothing of the lab is left
    links = subprocess.run(["ip", "-o", "link"], stdout=subprocess.PIPE,
                           universal_newlines=True).stdout
    assert "vnb" not in links
    assert "vnb-remote" not in subprocess.run(["ip", "netns"], stdout=subprocess.PIPE,
                                              universal_newlines=True).stdout
