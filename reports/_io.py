"""Atomic file writes (a reader never sees a half-written report): the run directory's one writer."""

from twinflow_train.rundir import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text"]
