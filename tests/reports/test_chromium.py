"""The HTML report renders in a real browser: headless Chromium takes a screenshot showing table and plots."""

import shutil
import subprocess

import numpy as np
import pytest

from reports.build import build_report

from .conftest import ARMS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.chromium, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's 'chromium' is not installed "
                                 "(apt-get install -y chromium); CI installs it")]
TABLE_HEADER = (240, 240, 240)  # th background of the report's CSS
ARM_BLUE = (31, 119, 180)  # tab:blue, the first arm's colour in every plot


def screenshot(html, png, tmp_path, *, width=1400, height=5000):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={width},{height}",
           f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.is_file(), proc.stderr[-2000:]


def test_report_renders_table_and_plots(disk_grid, tmp_path):
    from PIL import Image

    html = build_report(grid_dir=disk_grid, out_dir=tmp_path / "report", arm_order=ARMS, progress=False)
    png = tmp_path / "shot.png"
    screenshot(html, png, tmp_path)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (5000, 1400)

    def count(rgb, rows=slice(None)):
        return int(np.all(img[rows] == np.array(rgb, np.uint8), axis=-1).sum())

    # the summary table sits near the top: its header cells are painted
    assert count(TABLE_HEADER, slice(0, 1500)) > 2000
    # the plots are decoded and drawn: the first arm's line colour covers many pixels below the tables
    assert count(ARM_BLUE, slice(800, None)) > 2000
    # not a blank page
    packed = (img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8) | img[..., 2]
    assert len(np.unique(packed)) > 500
