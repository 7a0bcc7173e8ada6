"""Progress of the shared assets: a bar on a terminal, lines in a log (``twinflow_train.progress``)."""

from __future__ import annotations

import io

import torch

from twinflow_train.progress import progress_range


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_start_line_a_line_per_tenth_and_an_end_line():
    log = io.StringIO()
    assert list(progress_range(100, desc="teacher", start=1, stream=log)) == list(range(1, 101))
    lines = log.getvalue().splitlines()
    assert lines[0] == "teacher: 100 steps"
    assert [ln.split(" (")[0] for ln in lines[1:-1]] == [f"teacher: {k}/100" for k in range(10, 100, 10)]
    assert all("left" in ln for ln in lines[1:-1]) and lines[-1].startswith("teacher: done, 100 steps in ")
    # --no-progress turns bars off, not the log's lines; a short job still says it started and ended
    log = io.StringIO()
    assert list(progress_range(3, desc="codec", progress=False, stream=log)) == [0, 1, 2]
    assert log.getvalue().splitlines()[0] == "codec: 3 steps" and "codec: done, 3 steps" in log.getvalue()


def test_a_terminal_gets_a_bar_unless_progress_is_off():
    term = _Terminal()
    assert list(progress_range(50, desc="evaluation net", stream=term)) == list(range(50))
    assert "evaluation net" in term.getvalue() and "50/50" in term.getvalue() and "steps\n" not in term.getvalue()
    term = _Terminal()
    list(progress_range(5, desc="proxy reward", progress=False, stream=term))
    assert "50/50" not in term.getvalue() and "proxy reward: done, 5 steps" in term.getvalue()


def test_training_an_auxiliary_network_reports_its_progress(capsys):
    from twinflow_train.assets.auxiliary import DigitsMLPClassifier, fit_classifier

    model = DigitsMLPClassifier()
    images, labels = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    fit_classifier(model, images, labels, steps=20, seed=0, noise_max=0.1, shift=False, desc="reward classifier")
    err = capsys.readouterr().err  # not a terminal under pytest: lines
    assert "reward classifier: 20 steps" in err and "reward classifier: 10/20 (50%)" in err
    assert "reward classifier: done, 20 steps" in err
