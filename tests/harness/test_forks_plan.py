"""Which arm each arm forks from, and which source runs a wave is worth running (configs only, no runs)."""

from __future__ import annotations

from pathlib import Path

from harness.forks import fork_points, plan_forks, sources_worth_running
from harness.matrix import load_matrix

REPO = Path(__file__).resolve().parents[2]


def _ladder():
    return load_matrix(REPO / "ablations" / "blog-digits.yaml", root=Path("/nonexistent"))


def test_the_ladder_forks_its_rl_arms_from_renoise_at_their_onset():
    forks = plan_forks(_ladder())
    hard = {"rl_hard", "rl_weight_low", "rl_weight_high", "rl_rms"}
    cut = {"rl_sigmoid", "rl_clip", "rl_sigmoid_high", "rl_clip_high"}
    assert {a: (f.source, f.step) for a, f in forks.items() if a in hard} == {a: ("renoise", 599) for a in hard}
    assert {a: (f.source, f.step) for a, f in forks.items() if a in cut} == {a: ("renoise", 419) for a in cut}
    # the decay-on-spike arms share no step with an arm without it; the 3x one shares the cut prefix with it
    assert "spike_decay" not in forks and (forks["spike_decay_high"].source, forks["spike_decay_high"].step) == \
        ("spike_decay", 419)
    assert "vanilla" not in forks and "renoise" not in forks  # renoise's time sampler acts from step 1
    assert fork_points(forks) == {"renoise": [419, 599], "spike_decay": [419]}


def test_a_wave_runs_a_source_only_where_its_forks_save_more_than_it_costs():
    g = _ladder()
    forks, runs = plan_forks(g), {r.key: r for r in g.runs}
    # one child alone: renoise's 1,800 steps would be trained to save 419: the child trains from step 0
    wanted, no_fork = sources_worth_running({"rl_clip/seed-4"}, forks, runs, ended=set())
    assert wanted == {"rl_clip/seed-4"} and no_fork == {"rl_clip/seed-4"}
    # four hard-switch children share 4 x 599 > 1,800 steps: the source run pays for itself
    kids = {f"{a}/seed-4" for a in ("rl_hard", "rl_weight_low", "rl_weight_high", "rl_rms")}
    wanted, no_fork = sources_worth_running(kids, forks, runs, ended=set())
    assert wanted == kids | {"renoise/seed-4"} and not no_fork
    # a source that already ran is used whatever it saves
    wanted, no_fork = sources_worth_running({"rl_clip/seed-4"}, forks, runs, ended={"renoise/seed-4"})
    assert wanted == {"rl_clip/seed-4"} and not no_fork
