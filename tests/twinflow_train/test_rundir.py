import json
import math

import pytest

from twinflow_train.rundir import MetricsWriter, iter_metrics, read_status, truncate_metrics, write_status


def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    for s in range(1, 6):
        w.write({"step": s, "loss/total": 1.0 / s})
    w.close()
    with open(p, "a") as f:
        f.write('{"step": 6, "loss/to')  # a crash mid-write
    assert [r["step"] for r in iter_metrics(p)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(p, last_step=3) == 3
    assert [json.loads(l)["step"] for l in p.read_text().splitlines()] == [1, 2, 3]


def test_torn_line_in_the_middle_is_an_error(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(iter_metrics(p))


def test_nan_is_kept_visible_not_zeroed(tmp_path):
    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.write({"step": 1, "loss/total": math.nan, "grad_norm/total": math.inf})
    w.close()
    assert '"loss/total":"nan"' in p.read_text() and '"grad_norm/total":"inf"' in p.read_text()
    (rec,) = list(iter_metrics(p))  # the reader decodes them back to floats
    assert math.isnan(rec["loss/total"]) and rec["grad_norm/total"] == math.inf


def test_status_states_are_checked(tmp_path):
    write_status(tmp_path, "diverged", step=7, reason="non-finite loss at step 7")
    s = read_status(tmp_path)
    assert s["state"] == "diverged" and s["step"] == 7 and "step 7" in s["reason"]
    with pytest.raises(ValueError, match="unknown run state"):
        write_status(tmp_path, "exploded", step=1)
