"""A tiny flow model shared by the method and sampler tests."""

import torch

from twinflow_train.models.mlp import MLPFlowModel

SHAPE = (2, 2, 2)


def tiny_model(seed: int = 0) -> MLPFlowModel:
    """A tiny MLP whose zero-initialised (adaLN-zero) layers are randomised, so t, tt and the prompt matter."""
    torch.manual_seed(seed)
    m = MLPFlowModel(shape=SHAPE, num_classes=3, hidden=16, depth=1, time_dim=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m
