"""The networks behind the ``FlowModel`` interface (``base``); how each family is built, placed and exported is
its entry in ``registry.FAMILIES``. This file imports only the interface, so importing any model module never
pulls in the registry and, through it, every family."""

from __future__ import annotations

from .base import Cond, FlowModel, cond_cat, cond_len, cond_rows

__all__ = ["Cond", "FlowModel", "cond_cat", "cond_len", "cond_rows"]
