"""A ladder's report read in a real browser (headless Chromium) at 1,400 x 900: the verdict table is inside the
first screen, and nothing scrolls sideways (neither the page nor a table inside it).

The report has no script of its own; the test measures a copy of it with one added that writes the layout's
numbers into the page, which Chromium's ``--dump-dom`` prints once the page has loaded.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from harness.claims import Claim, ClaimTest
from reports.build import build_report
from reports.synthetic import write_synthetic_grid

from .test_chromium import CHROMIUM

pytestmark = [pytest.mark.chromium, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's 'chromium' is not installed "
                                 "(apt-get install -y chromium); CI installs it")]
WIDTH, HEIGHT = 1400, 900
# the shape of ablations/blog-digits.yaml: twelve arms, each extending the one before, and its eleven claims
ARMS = ["vanilla", "renoise", "rl_hard", "rl_sigmoid", "rl_clip", "spike_decay", "rl_weight_low", "rl_weight_high",
        "rl_sigmoid_high", "rl_clip_high", "spike_decay_high", "rl_rms"]
STEPS = 120
ONSET = STEPS // 3 - 4 * (STEPS // 40) + 1


def _spikes(text: str, baseline: str, treatment: str, direction: str, window=(ONSET, None)) -> Claim:
    return Claim(text, (ClaimTest(baseline=baseline, treatment=treatment, metric="grad_norm/max", reduce="max",
                                  window=window, direction=direction, scale="log"),))


def _lift(text: str, treatment: str) -> Claim:
    return Claim(text, (
        ClaimTest(baseline="teacher", treatment=treatment, metric="val/reward_nfe2", baseline_metric="teacher/reward",
                  direction="increase"),
        ClaimTest(baseline="vanilla", treatment=treatment, metric="val/fd_nfe2", scale="log", direction="decrease",
                  tolerance=1.5)))


CLAIMS = [
    _spikes("dynamic renoise stabilises the cold start", "vanilla", "renoise", "decrease", (1, STEPS // 3)),
    _spikes("the hard RL switch causes grad-norm spikes", "renoise", "rl_hard", "increase"),
    _spikes("a sigmoid RL ramp prevents the spikes", "rl_hard", "rl_sigmoid", "decrease"),
    _spikes("clipping the RL term prevents the spikes", "rl_sigmoid", "rl_clip", "decrease"),
    _spikes("decay-on-spike helps (a lower peak grad norm once the RL term acts)", "rl_clip", "spike_decay",
            "decrease"),
    _spikes("the hard RL switch causes grad-norm spikes (at 3x the searched weight)", "renoise", "rl_weight_high",
            "increase"),
    _spikes("a sigmoid RL ramp prevents the spikes (at 3x the searched weight)", "rl_weight_high",
            "rl_sigmoid_high", "decrease"),
    _spikes("clipping the RL term prevents the spikes (at 3x the searched weight)", "rl_sigmoid_high",
            "rl_clip_high", "decrease"),
    _spikes("decay-on-spike helps (at 3x the searched weight)", "rl_clip_high", "spike_decay_high", "decrease"),
    _lift("RL at the searched weight lifts the reward above the teacher's without costing fidelity", "rl_hard"),
    _lift("RL lifts the reward above the teacher's without costing fidelity", "spike_decay"),
]

MEASURE = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("#verdicts ~ div.scroll table");
  const r = table.getBoundingClientRect();
  const hidden = [...document.querySelectorAll("div.scroll")].filter(d => d.scrollWidth > d.clientWidth + 1)
    .map(d => d.querySelector("th") ? d.querySelector("th").textContent : "?");
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({inner: [innerWidth, innerHeight], top: r.top, bottom: r.bottom,
    rows: table.rows.length, page: document.documentElement.scrollWidth, hidden: hidden});
  document.body.appendChild(out);
});
</script>"""


def layout(html_path, tmp_path) -> dict:
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", MEASURE + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}",
           "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="layout">(.*?)</pre>', proc.stdout, re.S)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def ladder_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    grid = write_synthetic_grid(root / "ladder", arms=ARMS, seeds=[0, 1, 2], steps=STEPS, log_every=5, val_every=30,
                                diverge={("rl_hard", 2): 70}, per_class=2)
    return build_report(grid_dir=grid, out_dir=root / "report", arm_order=ARMS, claims=CLAIMS,
                        claims_source="the ladder's claims", progress=False)


def test_the_verdict_table_is_the_first_screen_and_nothing_scrolls_sideways(ladder_report, tmp_path):
    got = layout(ladder_report, tmp_path)
    # the page's layout depends on its width only (headless Chromium's window takes its frame off the height)
    assert got["inner"][0] == WIDTH
    assert got["rows"] == 1 + sum(len(c.tests) for c in CLAIMS)  # the header and one row per test
    assert 0 < got["top"] and got["bottom"] <= HEIGHT, got
    assert got["page"] <= WIDTH, got
    assert got["hidden"] == [], f"tables wider than the page, scrolled inside their box: {got['hidden']}"
