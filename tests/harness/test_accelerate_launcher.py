"""``--launcher accelerate``: the command it builds and the accelerate configs it refuses (the 2-process run
against the real trainer is ``test_grid_e2e.py::test_accelerate_launcher``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main
from harness.launchers import AccelerateLauncher, LaunchJob, make_launcher
from twinflow_train.yamlio import InputError

MULTI = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n" \
        "mixed_precision: 'no'\n"


def _job(tmp_path: Path, *argv: str) -> LaunchJob:
    return LaunchJob(name="a/seed-0", argv=list(argv), log_path=tmp_path / "log")


def test_fit_runs_under_accelerate_launch_with_the_users_config(tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(MULTI)
    launcher = make_launcher("accelerate", workers=1, grid_dir=tmp_path, accelerate_config=cfg)
    assert isinstance(launcher, AccelerateLauncher) and launcher.nproc_per_node == 2
    cmd = launcher.command(_job(tmp_path, "fit", "--config", "c.yaml"))
    i = cmd.index("accelerate.commands.launch")
    assert cmd[i + 1:i + 3] == ["--config_file", str(cfg.resolve())]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "0"
    assert cmd[-5:] == ["-m", "twinflow_train.cli", "fit", "--config", "c.yaml"]
    # shared-asset preparation stays one plain process
    assert "accelerate.commands.launch" not in launcher.command(_job(tmp_path, "teacher", "--config", "c.yaml"))
    # --nproc-per-node overrides the config; a config's own port is kept
    cfg.write_text(MULTI + "main_process_port: 29611\n")
    cmd = AccelerateLauncher(config_file=cfg, nproc_per_node=3).command(_job(tmp_path, "fit"))
    assert cmd[cmd.index("--num_processes") + 1] == "3" and "--main_process_port" not in cmd


def test_configs_that_the_trainer_would_not_honour_are_refused_with_every_problem(tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 0\nfsdp_config: {}\n")
    with pytest.raises(InputError) as e:
        AccelerateLauncher(config_file=cfg)
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 3
    assert "distributed_type FSDP" in text and "parallel.fsdp" in text
    assert "mixed_precision 'bf16' would be ignored" in text and "num_processes must be an integer >= 1" in text
    with pytest.raises(InputError, match="no such file"):
        AccelerateLauncher(config_file=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="goes with --launcher accelerate"):
        make_launcher("local", workers=1, grid_dir=tmp_path, accelerate_config=cfg)


def test_the_command_line_takes_the_accelerate_launcher(tmp_path, capsys):
    matrix = tmp_path / "g.yaml"
    matrix.write_text("base: nowhere.yaml\nseeds: [0]\narms: {a: {}}\n")
    assert main(["grid", "run", str(matrix), "--root", str(tmp_path / "runs"), "--accelerate-config",
                 str(tmp_path / "acc.yaml")]) == 2
    assert "--accelerate-config goes with --launcher accelerate (got --launcher local)" in capsys.readouterr().err


@pytest.mark.distributed
def test_accelerate_launch_starts_the_configs_processes_with_the_env_the_trainer_reads(tmp_path):
    import os
    import time

    from harness.launchers import project_root

    (tmp_path / "probe_rank.py").write_text(
        "import os, sys\n"
        "open(os.path.join(sys.argv[2], 'rank-' + os.environ['RANK']), 'w').write(os.environ['WORLD_SIZE'])\n")
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(MULTI)
    launcher = AccelerateLauncher(config_file=cfg)
    launcher.module = "probe_rank"
    job = LaunchJob(name="probe", argv=["fit", str(tmp_path)], log_path=tmp_path / "log",
                    env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(project_root())])})
    handle = launcher.start(job)
    deadline = time.monotonic() + 120
    while handle.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.poll() == 0, (tmp_path / "log").read_text()[-2000:]
    assert {p.name: p.read_text() for p in tmp_path.glob("rank-*")} == {"rank-0": "2", "rank-1": "2"}
