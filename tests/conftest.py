"""Suite-wide settings: one intra-op thread per process.

The suite runs under pytest-xdist with two workers on two cores and spawns
training subprocesses; torch's default of one thread per core in every process
oversubscribes the machine and slows everything by an order of magnitude.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
