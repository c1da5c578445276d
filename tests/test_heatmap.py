"""--heatmap on a real run of the VM lab, rendered by a real SVG renderer (rsvg-convert).

30 s of pings into the VM at low latency, then 30 s with a token bucket on the VM's tap
holding them (the queue fills to the bucket's 400 ms): the rendered picture of the RX
total shows two bands, low then high, changing where the bucket came. The pixels are
read back from the PNG; the SVG only says where its plot area is and what its axes span.
"""
import math
import re
import subprocess
import time

import pytest

from tests.harness.lab import Lab
from tests.harness.png import read_png
from tests.harness.tool import PYTHON, TOOL
from tests.harness.tracing import wait_qdisc_empty

pytestmark = pytest.mark.lab

TAP, PHY = Lab.TAP, Lab.PHY
PHASE_S = 30


def pings(lab, seconds):
    """1400-byte pings every 20 ms: 570 kbit/s, more than the bucket lets through."""
    count = int(seconds / 0.02)
    lab.remote_run("ping", "-q", "-c", count, "-i", 0.02, "-s", 1400, "-W", 1, Lab.GUEST_IP,
                   timeout=seconds + 30)


def plot_area(svg, panel):
    m = re.search(r'<rect id="plot-\d+" x="(\d+)" y="(\d+)" width="(\d+)" height="(\d+)"[^>]*'
                  r'data-panel="%s" data-vm="[^"]*" data-t0="([\d.]+)" data-t1="([\d.]+)" '
                  r'data-lat-min-us="([\d.e+]+)" data-lat-max-us="([\d.e+]+)"' % panel, svg)
    assert m, "no plot area for %s" % panel
    x, y, w, h = (int(v) for v in m.groups()[:4])
    return x, y, w, h, float(m.group(5)), float(m.group(6)), float(m.group(7)), \
        float(m.group(8))


def cell_pixels(rows, x, y, w, h):
    """(x, y) of the plot's coloured cells: warm colours, not the white, not the grey
    lines."""
    return [(px, py) for py in range(y + 1, y + h - 1) for px in range(x + 1, x + w - 1)
            if rows[py][px][0] - rows[py][px][2] > 60]


def test_a_queue_that_came_midway_shows_as_a_second_band_after_it(lab, traces, tmp_path,
                                                                   recording_dir):
    rec = "%s/run.vnl" % recording_dir
    t = traces("--vm-dev", TAP, "--phy-dev", PHY, "--direction", "rx", "--protocol", "icmp",
               "--write-events", rec)
    pings(lab, PHASE_S)
    subprocess.run(["tc", "qdisc", "replace", "dev", TAP, "root", "tbf", "rate", "200kbit",
                    "burst", "3000", "latency", "400ms"], check=True)
    bucket_at = time.time()
    try:
        pings(lab, PHASE_S)
        wait_qdisc_empty(TAP)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", TAP, "root"], check=False)
    t.stop()
    assert t.returncode == 0, t.stderr
    svg_path, png_path = str(tmp_path / "heat.svg"), str(tmp_path / "heat.png")
    r = subprocess.run([PYTHON, TOOL, "--read-events", rec, "--heatmap", svg_path],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["rsvg-convert", svg_path, "-o", png_path], stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    assert r.returncode == 0 and not r.stderr, r.stderr
    with open(svg_path) as f:
        svg = f.read()
    x, y, w, h, t0, t1, lo, hi = plot_area(svg, "RX total")
    assert "\u00b5s" in svg and ">1 ms<" in svg or ">10 ms<" in svg     # axes with units
    _w, _h, rows = read_png(png_path)
    cells = cell_pixels(rows, x, y, w, h)

    def when(px):
        return t0 + (px - x) / float(w) * (t1 - t0)

    def latency_us(py):
        return lo * 10 ** ((y + h - py) / float(h) * math.log10(hi / lo))
    before = sorted(latency_us(py) for px, py in cells if when(px) < bucket_at - 1)
    after = sorted(latency_us(py) for px, py in cells if when(px) > bucket_at + 5)
    assert len(before) > 100 and len(after) > 100, (len(before), len(after))
    # two bands: below a millisecond before the bucket, tens of milliseconds and more
    # once its queue had filled (it holds up to 400 ms)
    assert before[len(before) // 2] < 1000 and before[int(len(before) * 0.95)] < 3000, before
    assert after[len(after) // 2] > 20000, after[::50]
    # where the picture changes: the first column with a cell above 10 ms, within two
    # seconds of the bucket (ping -i 0.02 fills it in less than one)
    first_high = min(when(px) for px, py in cells if latency_us(py) > 10000)
    assert abs(first_high - bucket_at) < 2.0, (first_high, bucket_at)
