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


def test_tail_reads_the_end_of_a_file_only_and_marks_bad_lines(tmp_path, monkeypatch):
    from twinflow_train import rundir

    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.write({"step": 0, "kind": "teacher", "teacher/fd": 3.0})
    for s in range(1, 3001):
        w.write({"step": s, "kind": "train", "loss/total": 1.0 / s, "pad": "x" * 80})
        if s % 1000 == 0:
            w.write({"step": s, "kind": "val", "val/loss": s / 1e4})
    w.close()
    monkeypatch.setattr(rundir, "TAIL_BLOCK", 4096)
    with open(p, "a") as f:
        f.write('{"step": 3001, "kind": "tr')  # being written
    tail = rundir.tail_metrics(p)
    assert tail.last["train"]["step"] == 3000 and tail.last["val"]["step"] == 3000
    assert tail.bytes_read <= 2 * 4096 and tail.offset == p.stat().st_size - len('{"step": 3001, "kind": "tr')
    assert not tail.problems
    # a val record far back is still found; one beyond the scan limit is not (no whole-file read)
    text = p.read_text().splitlines(keepends=True)
    p.write_text("".join(text[:-1]).replace('"kind":"val","val/loss":0.3}', '"kind":"vax"}'))
    tail = rundir.tail_metrics(p)
    assert tail.last["val"]["step"] == 2000 and tail.bytes_read < p.stat().st_size
    assert "val" not in rundir.tail_metrics(p, scan_bytes=10_000).last
    # a bad line in the part read is named with its byte offset; the records around it are still read
    lines = p.read_text().splitlines(keepends=True)
    lines[-3] = lines[-3][:20] + "\n"
    p.write_text("".join(lines))
    tail = rundir.tail_metrics(p)
    offset = sum(len(x) for x in lines[:-3])
    assert tail.problems == [f"{p}: the line at byte {offset} is not valid JSON"]
    assert tail.last["train"]["step"] == 3000
    follower = rundir.MetricsTail(p, from_end=True)
    assert follower.poll() == [] and follower.last["step"] == 3000 and follower.problems == tail.problems
    with open(p, "a") as f:
        f.write('{"step":3001,"kind":"train","loss/total":0.1}\n')
    assert [r["step"] for r in follower.poll()] == [3001]


def test_a_failed_metrics_write_is_cut_back_off(tmp_path, monkeypatch):
    import errno
    import os

    from twinflow_train import rundir

    p = tmp_path / "metrics.jsonl"
    w = MetricsWriter(p)
    w.write({"step": 1, "loss/total": 1.0})

    def half_then_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "_write_all", half_then_full)
    with pytest.raises(OSError, match="No space left on device: metrics record of step 2 not written"):
        w.write({"step": 2, "loss/total": 0.5})
    w.close()
    assert p.read_text() == '{"step":1,"loss/total":1.0}\n'


def test_unreadable_run_files_raise_naming_them(tmp_path):
    from twinflow_train import rundir

    (tmp_path / "status.json").write_text('{"state": "runn')
    with pytest.raises(rundir.RunDirError, match="status.json: not valid JSON"):
        read_status(tmp_path)
    (tmp_path / "status.json").write_text('{"state": "sleeping"}')
    with pytest.raises(rundir.RunDirError, match="'sleeping' is not one of"):
        read_status(tmp_path)
    ck = tmp_path / "checkpoints" / "latest"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"abc")
    assert rundir.verify_checkpoint(ck) == "no meta.json (incomplete)"
    rundir.write_checkpoint_meta(ck, step=5, fmt="full")
    assert rundir.verify_checkpoint(ck) is None and rundir.resume_step(tmp_path) == 5
    (ck / "meta.json").write_text('{"step": 5')
    assert rundir.checkpoint_step(ck) is None and rundir.resume_step(tmp_path) == 0
    assert rundir.verify_checkpoint(ck).startswith("meta.json unreadable")
