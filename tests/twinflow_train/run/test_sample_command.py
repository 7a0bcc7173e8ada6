"""``twinflow-train sample --n N`` (student, every NFE) and ``--teacher``: counts, seeds, pairing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinflow_train.config import load_config
from twinflow_train.run.inference import COUNT_NOISE, count_prompts, sample_count
from twinflow_train.run.trainer import EXIT_DONE, fit

from ..conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tiny_overrides, tmp_path_factory):
    run = tmp_path_factory.mktemp("sample") / "run"
    over = tiny_overrides + ["run.steps=3", "run.val_every=0", "run.ckpt_every=0", "eval.teacher=false"]
    assert fit(load_config(None, over), run, progress=False) == EXIT_DONE
    return run, over


def test_count_prompts_are_balanced_and_sorted():
    assert count_prompts(23, 10).tolist() == sorted([i % 10 for i in range(23)])
    assert np.bincount(count_prompts(1000, 10).numpy()).tolist() == [100] * 10
    with pytest.raises(ValueError, match="--n"):
        count_prompts(0, 10)


def test_student_samples_any_count_every_nfe_fixed_seed(tiny_run, tmp_path):
    run, over = tiny_run
    cfg = load_config(run / "config.yaml")
    paths = sample_count(cfg, run, n=23, which="final", nfe=None, out_dir=tmp_path / "a", teacher=False)
    assert [p.name for p in paths] == [f"final-n23-seed{cfg.eval.seed}-nfe{k}.npz" for k in cfg.eval.nfe]
    for p in paths:
        z = np.load(p)
        assert z["images"].shape == (23, 1, 8, 8) and z["images"].dtype == np.float32
        assert z["labels"].tolist() == count_prompts(23, 10).tolist()
        assert p.with_suffix(".png").is_file()
    # fixed seed: the same files again; another eval.seed: other samples
    again = sample_count(cfg, run, n=23, which="final", nfe=[2], out_dir=tmp_path / "b", teacher=False)
    assert np.array_equal(np.load(again[0])["images"], np.load(paths[1])["images"])
    other = load_config(run / "config.yaml", ["eval.seed=99"])
    moved = sample_count(other, run, n=23, which="final", nfe=[2], out_dir=tmp_path / "c", teacher=False)
    assert not np.allclose(np.load(moved[0])["images"], np.load(paths[1])["images"])


def test_teacher_samples_at_full_steps_and_the_comparison_guidance(tiny_run, tmp_path):
    from twinflow_train.data.batches import step_generator
    from twinflow_train.evaluation.evaluate import Evaluator
    from twinflow_train.run.setup import build_setup
    from twinflow_train.run.trainer import build_base, preflight_teacher

    run, _ = tiny_run
    cfg = load_config(run / "config.yaml", ["method.enhanced_ratio=0.5"])
    (path,) = sample_count(cfg, run, n=12, which="final", nfe=None, out_dir=tmp_path, teacher=True)
    assert path.name == f"teacher-n12-seed{cfg.eval.seed}-steps{cfg.teacher.sample_steps}-cfg2.npz"  # 1/(1-0.5)
    # the same numbers as the evaluator's teacher sampler on the same noise and prompts
    setup = build_setup(cfg, device=torch.device("cpu"))
    base = build_base(cfg, setup, preflight_teacher(cfg)).eval()
    ev = Evaluator(cfg, setup, device=torch.device("cpu"))
    z = torch.randn((12, *setup.data.latent_shape), generator=step_generator(cfg.eval.seed, COUNT_NOISE))
    lat = ev.teacher_latents(base, steps=cfg.teacher.sample_steps, cfg_scale=2.0, z=z,
                             cond={"labels": count_prompts(12, 10)})
    assert np.allclose(np.load(path)["images"], ev.decode(lat).numpy(), atol=1e-5)


def test_cli_errors_exit_2(tiny_run):
    run, _ = tiny_run
    r = run_cli(["sample", "--run-dir", str(run), "--teacher", "--no-progress"])
    assert r.returncode == 2 and "--teacher writes --n samples" in r.stderr
    r = run_cli(["sample", "--run-dir", str(run), "--n", "0", "--no-progress"])
    assert r.returncode == 2 and "--n must be >= 1" in r.stderr
    r = run_cli(["sample", "--run-dir", str(run), "--n", "5", "--nfe", "1", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert (run / "samples" / "final-n5-seed1234-nfe1.npz").is_file()
