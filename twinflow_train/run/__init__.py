"""One training run: the loop and its step, the run's setup, gradients and learning-rate policies, telemetry, sampling and export of its weights, and its memory plan."""
