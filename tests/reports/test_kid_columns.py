"""KID, written beside FD by validation, reaches the report's tables: the summary, the paired differences and the
sample-metrics table (with the teacher's values)."""

import numpy as np

from reports.document import sample_metrics_display, summary_display
from reports.data import prepare
from reports.formatting import fmt_num
from reports.stats import arm_table, metric_specs, run_table, teacher_values
from reports.synthetic import synthetic_grid_frames


def _with_kid(metrics):
    m = metrics.copy()
    val = m["kind"] == "val"
    for n in (1, 2):
        m.loc[val, f"val/kid_nfe{n}"] = m.loc[val, f"val/fd_nfe{n}"] * 1e-3  # lower-better, like FD
    teacher = m["kind"] == "teacher"
    m.loc[teacher, "teacher/kid"] = 0.004
    m.loc[teacher, "teacher/kid_euler1"] = 0.05
    return m


def test_kid_is_shown_beside_fd():
    metrics, statuses = synthetic_grid_frames(arms=["vanilla", "other"], seeds=[0, 1], steps=20, val_every=10,
                                              nfe=(1, 2))
    data = prepare(name="g", metrics=_with_kid(metrics), statuses=statuses)
    runs = run_table(data)
    assert np.allclose(runs["kid_nfe2"], runs["fd_nfe2"] * 1e-3)
    specs = {s.key: s for s in metric_specs([1, 2], 2)}
    assert specs["kid_nfe1"].better == "lower" and specs["kid_nfe1"].label == "KID@1"
    assert "kid_nfe2" not in [s.key for s in metric_specs([1, 2], 2) if s.better == "higher"]
    summary = arm_table(runs, data.arms, list(specs.values()))
    shown = summary_display(summary, nfe=[1, 2], primary_nfe=2, baseline="vanilla")
    cols = list(shown.columns)
    assert cols.index("KID@1") == cols.index("FD@2") + 1 and "kid@2" not in cols
    table = sample_metrics_display(runs, data.arms, [1, 2], teacher_values(data))
    assert {"KID final", "KID best"} <= set(table.columns)
    assert table.loc[0, "KID final"] == fmt_num(0.004)  # the teacher row
    euler = table[table["arm"] == "teacher, Euler"].set_index("NFE")
    assert euler.loc["1", "KID final"] == fmt_num(0.05) and euler.loc["2", "KID final"] == "—"
    # runs written before KID existed: no KID column anywhere, nothing else changes
    plain = prepare(name="g", metrics=metrics, statuses=statuses)
    old = sample_metrics_display(run_table(plain), plain.arms, [1, 2], teacher_values(plain))
    assert not any("KID" in c for c in old.columns)
