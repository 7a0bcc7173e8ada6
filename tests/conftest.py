"""Suite-wide settings: one intra-op thread per process.

The suite runs under pytest-xdist with two workers on two cores and spawns
training subprocesses; torch's default of one thread per core in every process
oversubscribes the machine and slows everything by an order of magnitude.
"""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    # Auxiliaries trained by tests go to one temporary cache shared by the xdist workers (they inherit
    # the controller's environment), never to the user's ~/.cache; entries are lock-protected.
    if "TWINFLOW_LAB_CACHE" not in os.environ:
        os.environ["TWINFLOW_LAB_CACHE"] = tempfile.mkdtemp(prefix="twinflow-test-cache-")
