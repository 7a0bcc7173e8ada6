"""The model-family registry: one entry per ``model.family`` value, the placement it gives, export's refusal."""

import typing

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from twinflow_train.config import ModelConfig, ParallelConfig, load_config, to_yaml
from twinflow_train.cli import export_main
from twinflow_train.models.registry import FAMILIES, base_weights_in_model, build_model, parallelize, place_frozen
from twinflow_train.distributed.parallel import mixed_precision

SMALL = ["model.hidden=16", "model.depth=3", "model.time_dim=8"]


def test_every_family_value_has_exactly_one_entry():
    values = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    assert set(values) == set(FAMILIES)
    assert all(family.name == name for name, family in FAMILIES.items())
    assert not base_weights_in_model(load_config(None, []))  # the digits MLP's base is a trained teacher file


def test_one_mixed_precision_policy():
    bf16 = mixed_precision(ParallelConfig(mixed_precision="bf16"))
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32 and bf16.cast_forward_inputs
    fp32 = mixed_precision(ParallelConfig(), cast_forward_inputs=False)
    assert fp32.param_dtype is None and fp32.reduce_dtype == torch.float32 and not fp32.cast_forward_inputs


@pytest.fixture
def mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(module: torch.nn.Module) -> bool:
    return all(isinstance(p, DTensor) for p in module.parameters())


def test_student_keeps_its_last_block_for_backward_and_frozen_copies_reshard_every_block(mesh):
    cfg = load_config(None, ["parallel.fsdp=always", *SMALL])
    student = parallelize(build_model(cfg, latent_shape=(2, 2, 2), num_classes=3), mesh, cfg)
    frozen = place_frozen(build_model(cfg, latent_shape=(2, 2, 2), num_classes=3), mesh, cfg)
    x, t, cond = torch.randn(4, 2, 2, 2), torch.rand(4), {"labels": torch.arange(4) % 3}
    loss = student(x, t, t, cond).square().mean()
    frozen(x, t, t, cond)
    first, last = student.shard_blocks()[0], student.shard_blocks()[-1]
    assert _sharded(first) and not _sharded(last)  # the last block stays gathered: backward needs it first
    assert all(_sharded(block) for block in frozen.shard_blocks())  # no backward will ever reshard them
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    loss.backward()
    assert _sharded(last) and all(p.grad is not None for p in student.parameters())


def test_export_refuses_a_family_without_an_export_before_writing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_config(None, [])))
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "model.family: 'mlp' has no export (families that export: 'qwen_image')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
