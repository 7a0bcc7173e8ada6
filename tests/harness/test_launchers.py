"""``Launcher.run_blocking(echo=...)``: the shared-asset preparation's log lines reach the harness's terminal."""

from __future__ import annotations

import io
import os

from harness.launchers import LaunchJob, LocalLauncher, project_root


def test_run_blocking_relays_the_lines_the_job_adds_to_its_log(tmp_path):
    (tmp_path / "chatty.py").write_text(
        "import sys, time\n"
        "for k in range(3):\n"
        "    print(f'teacher: {k + 1}/3', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.3)\n"
        "print('teacher: done, no newline at the end', end='')\n")
    log = tmp_path / "teacher.log"
    log.write_text("an earlier attempt's line\n")
    launcher = LocalLauncher(workers=1, module="chatty")
    echo = io.StringIO()
    rc = launcher.run_blocking(LaunchJob(name="teacher", argv=[], log_path=log,
                                         env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(project_root())])}),
                               poll_s=0.05, echo=echo)
    assert rc == 0
    lines = echo.getvalue().splitlines()
    assert lines[0].startswith("  $ ") and "-m chatty" in lines[0]  # the command line the launcher wrote
    # the earlier attempt's line is not repeated; a last line without its newline still comes through
    assert lines[1:] == ["  teacher: 1/3", "  teacher: 2/3", "  teacher: 3/3", "  teacher: done, no newline at the end"]
