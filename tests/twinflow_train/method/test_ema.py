"""EMA warm-up recursion and the in-place EMA update, plain and FSDP2-sharded."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from twinflow_train.method.ema import ema_decay, ema_update_


def recursion(k: int, target: float) -> float:
    d = 0.0
    for _ in range(k):
        d = d + (1 - d) * (target - d) / 2
    return d


def test_warmup_sequence_values():
    # by hand: d1 = 0.99 / 2; d2 = d1 + (1 - d1) * (0.99 - d1) / 2 = 0.495 + 0.505 * 0.495 / 2
    assert ema_decay(0, 0.99) == 0.0
    assert ema_decay(1, 0.99) == pytest.approx(0.495, abs=1e-15)
    assert ema_decay(2, 0.99) == pytest.approx(0.6199875, abs=1e-15)
    for k in (3, 10, 137, 2000):
        assert ema_decay(k, 0.99) == pytest.approx(recursion(k, 0.99), abs=1e-14)


def test_warmup_is_increasing_and_reaches_the_target():
    ds = [ema_decay(k, 0.999) for k in range(0, 20000, 50)]
    assert all(b > a for a, b in zip(ds, ds[1:]) if a < 0.999 - 1e-12)
    assert all(d < 0.999 + 1e-15 for d in ds)
    assert ema_decay(10**6, 0.999) == pytest.approx(0.999, abs=1e-12)
    assert ema_decay(10**6, 0.0) == 0.0


def test_cache_gives_the_same_values_in_any_call_order():
    big = ema_decay(5000, 0.9)
    assert ema_decay(3, 0.9) == pytest.approx(recursion(3, 0.9), abs=1e-15)
    assert big == pytest.approx(recursion(5000, 0.9), abs=1e-14)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        ema_decay(-1, 0.99)
    with pytest.raises(ValueError, match="target"):
        ema_decay(1, 1.0)
    with pytest.raises(ValueError, match="decay"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 4)
        self.register_buffer("count", torch.zeros(3))


def test_update_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    ema, model = Net(), Net()
    model.count.fill_(7.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update_(ema, model, 0.75)
    for name, p in model.named_parameters():
        expect = 0.75 * before[name] + 0.25 * p.detach()
        assert torch.allclose(dict(ema.named_parameters())[name], expect, atol=1e-7)
    assert torch.equal(ema.count, model.count)


def test_zero_decay_is_an_exact_copy():
    ema, model = Net(), Net()
    ema_update_(ema, model, 0.0)
    for (_, e), (_, m) in zip(ema.named_parameters(), model.named_parameters()):
        assert torch.equal(e, m)


def test_mismatched_modules_are_an_error():
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(Net(), nn.Linear(4, 8), 0.5)


def _sharded_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        ema, model = Net(), Net()
        model.count.fill_(3.0)
        full_e = {k: v.clone() for k, v in ema.state_dict().items()}
        full_m = {k: v.clone() for k, v in model.state_dict().items()}
        mesh = init_device_mesh("cpu", (world,))
        for m in (ema, model):
            fully_shard(m.a, mesh=mesh)
            fully_shard(m, mesh=mesh)
        ema_update_(ema, model, 0.6)
        got = {name: p.full_tensor() for name, p in ema.named_parameters()}
        ok = all(torch.allclose(got[k], 0.6 * full_e[k] + 0.4 * full_m[k], atol=1e-7) for k in got)
        ok = ok and torch.equal(ema.count, model.count)
        ok = ok and all(hasattr(p, "to_local") for p in ema.parameters())  # really sharded (DTensor)
        if rank == 0:
            with open(out_file, "w") as f:
                f.write("ok" if ok else "mismatch")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_update_on_fsdp2_sharded_parameters(tmp_path):
    out = tmp_path / "result"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    assert out.read_text() == "ok"
