"""Process groups, device placement, host memory of CPU runs, and distributed checkpoints."""
