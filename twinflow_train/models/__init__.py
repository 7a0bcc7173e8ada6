"""The networks behind the ``FlowModel`` interface, and the model-family registry (``registry.FAMILIES``)."""

from __future__ import annotations

from .base import Cond, FlowModel, cond_cat, cond_len, cond_rows
from .registry import (FAMILIES, Copies, ModelFamily, base_weights_in_model, build_model, model_family, parallelize,
                       place_frozen, uses_fsdp)

__all__ = ["Cond", "Copies", "FAMILIES", "FlowModel", "ModelFamily", "base_weights_in_model", "build_model",
           "cond_cat", "cond_len", "cond_rows", "model_family", "parallelize", "place_frozen", "uses_fsdp"]
