"""The ``twinflow-lab`` command: the one place that knows both the harness and the reports.

Layering: ``twinflow_lab`` -> ``reports`` -> ``harness`` -> ``twinflow_train``; no package
imports one above it, so the command table lives here (``twinflow_lab.cli``).
"""
