"""The fast training step: plain modules at world size 1, fused AdamW, device-side update decisions,
the evaluation EMA, and the teacher's learning-rate schedule."""

import math
import subprocess
import sys

import pytest
import torch

from twinflow_train.run import trainer
from twinflow_train.config import ConfigError, ParallelConfig, load_config
from twinflow_train.method.ema import ema_apply_, ema_pairs, ema_update_
from twinflow_train.models.registry import FAMILIES, uses_fsdp
from twinflow_train.distributed.parallel import use_fsdp
from twinflow_train.assets.teacher import teacher_lr
from twinflow_train.rundir import iter_metrics, read_status
from twinflow_train.run.trainer import EXIT_DIVERGED, EXIT_DONE, EXIT_FAILED, fit

_TIMES = ("time/step_s", "time/wall_s", "time/train_s")


# --------------------------------------------------------------------------- fast unit tests


def test_fsdp_is_used_where_needed_only():
    auto = ParallelConfig()
    assert not use_fsdp(auto, world=1, fsdp_in_one_process=False)
    assert use_fsdp(auto, world=2, fsdp_in_one_process=False)
    assert use_fsdp(auto, world=1, fsdp_in_one_process=True)
    assert use_fsdp(ParallelConfig(mixed_precision="bf16"), world=1, fsdp_in_one_process=False)
    assert use_fsdp(ParallelConfig(fsdp="always"), world=1, fsdp_in_one_process=False)
    assert not use_fsdp(ParallelConfig(fsdp="never"), world=1, fsdp_in_one_process=True)
    with pytest.raises(ValueError, match="parallel.fsdp 'never' needs one process"):
        use_fsdp(ParallelConfig(fsdp="never"), world=2, fsdp_in_one_process=False)
    # the families' own answers, through the run's config
    assert FAMILIES["qwen_image"].fsdp_in_one_process and not FAMILIES["mlp"].fsdp_in_one_process
    assert not uses_fsdp(load_config(None, []), world=1)
    assert uses_fsdp(load_config(None, []), world=2)


def test_fsdp_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="parallel.fsdp"):
        load_config(None, ["parallel.fsdp=sometimes"])
    with pytest.raises(ConfigError, match="parallel.mixed_precision"):
        load_config(None, ["parallel.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="eval.ema_decay"):
        load_config(None, ["eval.ema_decay=1.0"])


def _pair(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    e = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7))
    m(torch.randn(4, 5))  # moves the running statistics (buffers) away from the EMA's
    return e, m


def test_gated_ema_update_is_the_plain_update_or_nothing():
    for decay in (0.0, 0.3, 0.999):
        e1, m = _pair(0)
        e2, _ = _pair(0)
        ema_update_(e1, m, decay)
        ema_apply_(ema_pairs(e2, m), decay, gate=torch.tensor(1.0))
        for a, b in zip(e1.state_dict().values(), e2.state_dict().values()):
            assert torch.equal(a, b)
        e3, _ = _pair(0)
        before = {k: v.clone() for k, v in e3.state_dict().items()}
        ema_apply_(ema_pairs(e3, m), decay, gate=torch.tensor(0.0))
        for k, v in e3.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_teacher_lr_warms_up_then_decays_to_one_percent():
    peak, steps, warm = 2e-3, 100, 10
    lrs = [teacher_lr(s, steps=steps, peak=peak, warmup=warm) for s in range(1, steps + 1)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lrs[-1] == pytest.approx(0.01 * peak)
    assert teacher_lr(1, steps=steps, peak=peak, warmup=0) < peak and teacher_lr(1, steps=steps, peak=peak, warmup=0) > 0.99 * peak


_HEAP_PROBE = """
import resource, sys, torch
from twinflow_train.distributed.hostmem import retain_freed_heap
if sys.argv[1] == "retain":
    assert retain_freed_heap()
else:
    # glibc's starting thresholds (128 KiB), pinned: left dynamic, glibc raises them after the first free of
    # an mmap'd block at a moment that varies with what the imports allocated, so the baseline would drift
    import ctypes, ctypes.util
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    assert mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
faults = []
for _ in range(6):  # a step's worth of megabyte blocks, allocated, written and freed again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(256 * 1024) for _ in range(24)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_freed_heap_blocks_are_reused_without_page_faults():
    """With the thresholds set, the blocks of a repeated step come back from the heap, not from the kernel."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    retained, default = faults("retain"), faults("glibc-start")
    # 4 rounds of 24 MiB (6,144 pages each); at glibc's starting thresholds every block is mmap'd and
    # unmapped again, so each round faults all its pages in (measured: 24,672 in all, vs 256 with the setting)
    assert retained < 1000, (retained, default)
    assert default > 4 * retained, (retained, default)


def test_time_features_match_the_formula_on_every_call():
    """The cached frequency table gives the same features as computing it afresh, call after call."""
    from twinflow_train.models import embeddings
    from twinflow_train.models.embeddings import sinusoidal

    t = torch.tensor([-1.0, -0.25, 0.0, 0.003, 0.5, 1.0])
    half = 64
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (1000.0 * t)[:, None] * freqs[None]
    want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    embeddings._FREQS.clear()
    with torch.inference_mode():  # the first caller may be an inference-mode evaluation
        assert torch.equal(sinusoidal(t, 2 * half), want)
    for _ in range(2):
        assert torch.equal(sinusoidal(t, 2 * half), want)
    # the cached table is a plain constant: a later grad-mode call may save it for backward
    tg = t.clone().requires_grad_(True)
    sinusoidal(tg, 2 * half).sum().backward()
    assert tg.grad is not None and torch.isfinite(tg.grad).all()


# --------------------------------------------------------------------------- end to end


def _train(run_dir):
    return [r for r in iter_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "latest" / "state.pt", map_location="cpu", weights_only=True)


def _poison(monkeypatch, steps: set[int], gated: list[bool]) -> None:
    """Make the loss, the norm and one gradient non-finite at ``steps`` (after the real step)."""
    real = trainer.train_step

    def wrapped(run, step):
        gated.append(run.gated)
        stats = real(run, step)
        if step in steps:
            nan = torch.tensor(math.nan)
            next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(math.nan)
            stats["loss/total"] = stats["loss/total"] + nan
            stats["grad_norm/total"] = stats["grad_norm/total"] + nan
        return stats

    monkeypatch.setattr(trainer, "train_step", wrapped)


# the host path: the spike policy is on (it reads every norm) but can never fire
HOST = ["schedule.spike.enabled=true", "schedule.spike.k=1e9", "schedule.spike.window=5"]


@pytest.mark.slow
def test_plain_modules_follow_the_fsdp2_path(tiny_overrides, tmp_path):
    over = tiny_overrides + ["run.val_every=0", "run.ckpt_every=0", "eval.teacher=false"]
    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["parallel.fsdp=always"])):
        runs[name] = tmp_path / name
        assert fit(load_config(None, over + extra), runs[name], progress=False) == EXIT_DONE
    a, b = _train(runs["plain"]), _train(runs["fsdp"])
    assert [r["loss/total"] for r in a] == pytest.approx([r["loss/total"] for r in b], rel=1e-5)
    pa, pb = _state(runs["plain"])["model"], _state(runs["fsdp"])["model"]
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_device_decisions_equal_host_decisions(tiny_overrides, tmp_path, monkeypatch):
    """Skipped non-finite steps: the gated run (no host read on steps 1-4, 6-9) and the per-step host
    path make the same decisions, log the same events and end with the same weights."""
    over = tiny_overrides + ["run.log_every=5", "run.val_every=0", "run.ckpt_every=0", "eval.teacher=false"]
    runs = {}
    for name, extra in (("gated", []), ("host", HOST)):
        gated: list[bool] = []
        _poison(monkeypatch, {3, 4, 7}, gated)
        runs[name] = tmp_path / name
        assert fit(load_config(None, over + extra), runs[name], progress=False) == EXIT_DONE
        assert set(gated) == {name == "gated"}
    a, b = _train(runs["gated"]), _train(runs["host"])
    assert [r["step"] for r in a] == [5, 10, 12]
    assert a[0]["event/nonfinite"] == 2 and a[1]["event/nonfinite"] == 1 and a[1]["count/nonfinite"] == 3
    for ra, rb in zip(a, b):
        ra = {k: v for k, v in ra.items() if k not in _TIMES}
        rb = {k: v for k, v in rb.items() if k not in _TIMES}
        assert ra == rb
    sa, sb = _state(runs["gated"]), _state(runs["host"])
    assert sa["state"]["counters"]["nonfinite"] == sb["state"]["counters"]["nonfinite"] == 3
    for part in ("model", "extra"):
        fa, fb = torch.utils._pytree.tree_leaves(sa[part]), torch.utils._pytree.tree_leaves(sb[part])
        assert len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))


@pytest.mark.slow
def test_deferred_divergence_reports_the_step_that_diverged(tiny_overrides, tmp_path, monkeypatch):
    over = tiny_overrides + ["run.log_every=5", "run.val_every=0", "run.ckpt_every=0", "eval.teacher=false",
                             "run.max_nonfinite=2", "run.steps=9"]
    seen = {}
    for name, extra in (("gated", []), ("host", HOST)):
        _poison(monkeypatch, {2, 3}, [])
        run = tmp_path / name
        assert fit(load_config(None, over + extra), run, progress=False) == EXIT_DIVERGED
        st = read_status(run)
        rows = _train(run)
        seen[name] = (st["step"], st["reason"], [(r["step"], r["event/nonfinite"]) for r in rows])
    assert seen["gated"] == seen["host"]
    assert seen["gated"][0] == 2 and "2 non-finite steps in a row (last at step 3)" in seen["gated"][1]
    assert seen["gated"][2] == [(3, 1)]


@pytest.mark.slow
def test_eval_ema_is_validated_checkpointed_and_resumes_exactly(tiny_overrides, tmp_path, monkeypatch):
    over = tiny_overrides + ["eval.ema_decay=0.95", "eval.teacher=false"]
    cfg = load_config(None, over)
    ref = tmp_path / "ref"
    assert fit(cfg, ref, progress=False) == EXIT_DONE
    state = _state(ref)
    assert set(state["extra"]) == {"target", "eval_ema"}
    # a slower average than the target EMA: the three networks differ
    k = next(iter(state["model"]))
    assert not torch.equal(state["extra"]["eval_ema"][k], state["extra"]["target"][k])
    assert not torch.equal(state["extra"]["eval_ema"][k], state["model"][k])
    run = tmp_path / "crash"
    monkeypatch.setenv("TWINFLOW_FAULT_AT_STEP", "7")
    assert fit(cfg, run, progress=False) == EXIT_FAILED
    monkeypatch.delenv("TWINFLOW_FAULT_AT_STEP")
    assert fit(cfg, run, progress=False) == EXIT_DONE
    resumed = _state(run)
    for part in ("model", "extra"):
        fa, fb = torch.utils._pytree.tree_leaves(state[part]), torch.utils._pytree.tree_leaves(resumed[part])
        assert all(torch.equal(x, y) for x, y in zip(fa, fb))
    val = lambda d: [{k: v for k, v in r.items() if k not in _TIMES}  # noqa: E731
                     for r in iter_metrics(d / "metrics.jsonl") if r["kind"] == "val"]
    assert val(ref) == val(run)
    # the best weights are the evaluation EMA's (validation judged those); checkable when the last validation won
    vals = val(ref)
    if min(vals, key=lambda r: r["val/loss"])["step"] == vals[-1]["step"]:
        best = torch.load(ref / "checkpoints" / "best" / "weights.pt", map_location="cpu", weights_only=True)
        assert all(torch.equal(best[k], state["extra"]["eval_ema"][k]) for k in best)


@pytest.mark.slow
def test_plain_bf16_runs_the_products_in_bf16_and_follows_fp32(tiny_overrides, tmp_path):
    """``fsdp: never`` + ``mixed_precision: bf16``: plain modules, the step's matrix products in bf16 (an
    autocast), fp32 weights, gradients and model outputs; the losses follow the fp32 run's to bf16 precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from twinflow_train.distributed.parallel import init_distributed, shutdown
    from twinflow_train.run.trainer import preflight_teacher

    over = tiny_overrides + ["run.val_every=0", "run.ckpt_every=0", "eval.teacher=false"]
    bf16 = over + ["parallel.fsdp=never", "parallel.mixed_precision=bf16"]

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm):
                self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    cfg = load_config(None, bf16)
    d = init_distributed(cfg.run, cfg.parallel)
    try:
        run = trainer.build_run(cfg, d, preflight_teacher(cfg))
        assert not run.fsdp
        with Products() as seen:
            stats = trainer.train_step(run, 1)
        assert seen.dtypes == {torch.bfloat16}
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in run.model.parameters() if p.grad is not None)
        x, cond = run.setup.data.micro_batch(step=1, index=0, count=1)
        t = torch.full((x.shape[0],), 0.5)
        assert run.model(x, t, t, cond).dtype == torch.float32 and torch.isfinite(stats["loss/total"])
    finally:
        shutdown()
    runs = {}
    for name, extra in (("fp32", over), ("bf16", bf16)):
        runs[name] = tmp_path / name
        assert fit(load_config(None, extra), runs[name], progress=False) == EXIT_DONE
    a, b = _train(runs["fp32"]), _train(runs["bf16"])
    assert [r["loss/total"] for r in b] == pytest.approx([r["loss/total"] for r in a], rel=0.02)
    assert [r["loss/total"] for r in b] != [r["loss/total"] for r in a]  # really another precision


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gated_update_does_not_synchronise_on_cuda(tiny_overrides):
    """The update of a step that does not log (optimizer, non-finite gate, EMAs) never waits on the GPU."""
    from twinflow_train.distributed.parallel import init_distributed, shutdown
    from twinflow_train.run.trainer import preflight_teacher

    cfg = load_config(None, tiny_overrides + ["run.device=cuda"])
    d = init_distributed(cfg.run, cfg.parallel)
    try:
        run = trainer.build_run(cfg, d, preflight_teacher(cfg))
        assert run.gated
        for step in (1, 2):
            stats = trainer.train_step(run, step)  # the method's row selection may synchronise; the update must not
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                trainer._apply_update(run, step, stats)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        trainer._settle(run)
        assert run.counters.nonfinite == 0 and not run.pending
    finally:
        shutdown()


@pytest.mark.slow
def test_prepare_builds_every_network_in_two_processes(tmp_path):
    from twinflow_train.assets.auxiliary import entry_record
    from twinflow_train.assets.teacher import prepare

    from ..conftest import TINY

    cfg = load_config(None, TINY + [f"aux.cache_dir={tmp_path}", "teacher.steps=30", "codec.steps=30",
                                    "aux.reward_steps=20", "aux.eval_steps=20", "aux.proxy_steps=20"])
    teacher = prepare(cfg, progress=False, workers=2)
    entries = {p.parent.name.split("-")[0]: p for p in tmp_path.glob("*/weights.pt")}
    assert set(entries) == {"codec", "reward", "evalnet", "proxy", "teacher"} and entries["teacher"] == teacher
    pids = {k: entry_record(p)["pid"] for k, p in entries.items()}
    # the classifiers and the proxy came from the second process, the codec and the teacher from this one
    assert pids["reward"] == pids["evalnet"] == pids["proxy"] != pids["codec"] == pids["teacher"]
    assert entry_record(teacher)["info"]["train_cpu_seconds"] > 0
    assert prepare(cfg, progress=False, workers=2) == teacher  # cached: nothing rebuilt
    assert {k: entry_record(p)["pid"] for k, p in entries.items()} == pids


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ema", "frozen"])
def test_bf16_copies_of_the_no_grad_networks_change_no_number(tiny_overrides, tmp_path, monkeypatch, target):
    """The EMA target's (or frozen base model's) Linear weights cast to bf16 once per step give the losses, norms
    and final weights of the autocast casting them on every call, bit for bit; outside the autocast the copies
    are not used and not saved."""
    from twinflow_train.distributed import precast

    over = tiny_overrides + ["run.val_every=0", "run.ckpt_every=0", "eval.teacher=false", "parallel.fsdp=never",
                             "parallel.mixed_precision=bf16", f"method.target={target}"]
    made = []
    real = precast.Bf16Linears

    def counted(module):
        made.append(module)
        return real(module)

    class NoCopies:  # today's path: the Linears untouched, the autocast casts on every call
        def __init__(self, module):
            pass

        def refresh(self):
            pass

    runs = {}
    for name in ("copies", "every_call"):
        monkeypatch.setattr(precast, "Bf16Linears", counted if name == "copies" else NoCopies)
        runs[name] = tmp_path / name
        assert fit(load_config(None, over), runs[name], progress=False) == EXIT_DONE
    monkeypatch.setattr(precast, "Bf16Linears", real)
    assert len(made) == 1
    a, b = _train(runs["copies"]), _train(runs["every_call"])
    assert len(a) == 12
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in _TIMES} == {k: v for k, v in rb.items() if k not in _TIMES}
    sa, sb = _state(runs["copies"]), _state(runs["every_call"])
    assert sa["model"].keys() == sb["model"].keys() and all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    fa, fb = torch.utils._pytree.tree_leaves(sa["extra"]), torch.utils._pytree.tree_leaves(sb["extra"])
    assert len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))
    # off the autocast the fp32 weights are used; under it the copies, current after refresh(); never saved
    F = torch.nn.functional
    net = torch.nn.Sequential(torch.nn.Linear(4, 3)).requires_grad_(False)
    copies = real(net)
    x = torch.randn(2, 4)
    assert torch.equal(net(x), F.linear(x, net[0].weight, net[0].bias))
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, net[0].weight, net[0].bias)  # the autocast casting the fp32 weights itself
        assert not torch.equal(net(x), expected)  # stale until refreshed
        copies.refresh()
        assert torch.equal(net(x), expected)
    assert set(net.state_dict()) == {"0.weight", "0.bias"}
    with pytest.raises(ValueError, match="train"):
        real(torch.nn.Linear(2, 2))
