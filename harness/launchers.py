"""Launchers: start trainer processes and report when they end. They never train in-process.

Three kinds, one interface (``Launcher.start(job) -> Handle``, ``Handle.poll()``):

- ``LocalLauncher``: a pool of ``workers`` plain processes on this machine;
- ``TorchrunLauncher``: the same pool, each run a ``torchrun --standalone
  --nproc_per_node N`` group;
- ``AccelerateLauncher``: the same pool, each run an ``accelerate launch --config_file FILE``
  group (the user's accelerate config decides processes, machines and ports; sharding and
  precision stay the trainer's own ``parallel.*``);
- ``SlurmLauncher``: one submitit job per run (``cluster="slurm"``), or submitit's
  local executor (``cluster="local"``, used by the tests).

Local and torchrun pools divide the machine's cores between the runs (and the
processes of a run) and pass the share as ``OMP_NUM_THREADS``; torch takes its
intra-op thread count from it when ``run.threads`` is 0. The share is not written
into the run's config on purpose: the config is the run's identity, and a run
resumed with a different ``--workers`` is still the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TextIO

import yaml

from twinflow_train.yamlio import InputError, parse_value

from .identity import trainer_package_dir

LauncherKind = Literal["local", "torchrun", "accelerate", "slurm"]
TRAINER_MODULE = "twinflow_train.cli"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and Slurm set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def project_root() -> Path:
    """Directory that holds the ``twinflow_train`` and ``harness`` packages (put on the children's PYTHONPATH)."""
    return trainer_package_dir().parent


@dataclass
class LaunchJob:
    """One trainer invocation: ``python -m twinflow_train.cli <argv>``."""

    name: str
    """Display name (``arm/seed-k`` or ``teacher``)."""
    argv: list[str]
    """Trainer arguments: ``["fit", "--config", FILE, "--run-dir", DIR]``."""
    log_path: Path
    """stdout and stderr of the process go here (appended)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment on top of the harness's own."""


def child_env(extra: Mapping[str, str], *, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(project_root())
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p != root])
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        for var in THREAD_ENV_VARS:
            env[var] = str(threads)
    env.update(extra)
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the child gets SIGKILL when the harness dies, even by SIGKILL, so a killed
    # harness never leaves a trainer behind that a re-run would race on the same directory.
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: a search starts
    # each run from the worker thread that watches it.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Handle(ABC):
    @abstractmethod
    def poll(self) -> int | None:
        """Exit code once the process has ended (negative: killed by that signal), else None."""

    @abstractmethod
    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM or the scheduler's cancel)."""

    @property
    def pid(self) -> int | None:
        return None


class ProcessHandle(Handle):
    """A process started as the leader of its own session: a stop reaches its whole process group (torchrun
    workers, data-loader processes), not only the direct child."""

    def __init__(self, proc: subprocess.Popen, log_file: Any):
        self.proc = proc
        self._log = log_file

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
        return rc

    def _signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        return self.proc.pid


class Launcher(ABC):
    kind: LauncherKind
    slots: int
    """Runs that may be in flight at once."""

    @abstractmethod
    def start(self, job: LaunchJob) -> Handle:
        """Start ``job``; returns at once."""

    def run_blocking(self, job: LaunchJob, *, poll_s: float = 0.2, echo: TextIO | None = None) -> int:
        """Start ``job`` and wait for it (shared-asset preparation); with ``echo``, the lines the job adds to its
        log are copied there as they come (indented), so the terminal shows the progress the log records."""
        offset = job.log_path.stat().st_size if echo is not None and job.log_path.is_file() else 0
        pending = b""

        def relay(*, last: bool = False) -> None:
            nonlocal offset, pending
            if echo is None or not job.log_path.is_file():
                return
            with open(job.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
            offset += len(data)
            *lines, pending = (pending + data).split(b"\n")
            if last and pending:  # the job ended in mid-line
                lines, pending = lines + [pending], b""
            for line in lines:
                echo.write(f"  {line.decode(errors='replace').rstrip()}\n")
            if lines:
                echo.flush()

        handle = self.start(job)
        try:
            while (rc := handle.poll()) is None:
                relay()
                time.sleep(poll_s)
        except BaseException:
            handle.terminate()
            raise
        relay(last=True)
        return rc

    def describe(self) -> str:
        return f"{self.kind} ({self.slots} at once)"


class LocalLauncher(Launcher):
    """``workers`` trainer processes at a time on this machine, each with ``threads`` threads."""

    kind: LauncherKind = "local"

    def __init__(self, *, workers: int = 1, threads: int | None = None, python: str | None = None,
                 module: str = TRAINER_MODULE):
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        self.slots = workers
        self.threads = threads if threads is not None else max(1, available_cores() // workers)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1 (got {self.threads})")
        self.python = python or sys.executable
        self.module = module
        """Module run with ``python -m`` (the trainer's CLI; the scheduler's unit tests script a stand-in)."""

    def command(self, job: LaunchJob) -> list[str]:
        return [self.python, "-m", self.module, *job.argv]

    def start(self, job: LaunchJob) -> Handle:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log_path, "ab")
        log.write(f"$ {' '.join(self.command(job))}\n".encode())
        log.flush()
        # a session of its own: Ctrl-C at the harness's terminal reaches the harness alone, which stops the runs
        # in order (their whole process groups) and records it
        proc = subprocess.Popen(self.command(job), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(job.env, threads=self.threads), start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        return ProcessHandle(proc, log)

    def describe(self) -> str:
        return f"local pool: {self.slots} at once, {self.threads} thread(s) each"


class TorchrunLauncher(LocalLauncher):
    """Each run is a ``torchrun --standalone --nproc_per_node N`` group; ``workers`` groups at a time.

    ``--standalone`` gives every group its own rendezvous on a free port, so
    several groups share a machine without clashing.
    """

    kind: LauncherKind = "torchrun"

    def __init__(self, *, workers: int = 1, nproc_per_node: int = 2, threads: int | None = None,
                 python: str | None = None):
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1 (got {nproc_per_node})")
        per_process = threads if threads is not None else max(1, available_cores() // (workers * nproc_per_node))
        super().__init__(workers=workers, threads=per_process, python=python)
        self.nproc_per_node = nproc_per_node

    def command(self, job: LaunchJob) -> list[str]:
        if job.argv and job.argv[0] != "fit":
            # shared-asset preparation (teacher) is single-process work
            return super().command(job)
        return [self.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.nproc_per_node}", "-m", self.module, *job.argv]

    def describe(self) -> str:
        return (f"torchrun: {self.slots} group(s) at once, {self.nproc_per_node} process(es) each, "
                f"{self.threads} thread(s) per process")


#: accelerate ``distributed_type`` values that hand sharding or precision to accelerate's own engines; the trainer
#: shards with its own FSDP2 (``parallel.fsdp``), so these would be ignored and are refused
_FOREIGN_ENGINES = {"FSDP": "parallel.fsdp", "DEEPSPEED": "parallel.fsdp", "MEGATRON_LM": "parallel.fsdp",
                    "XLA": "a torchrun/accelerate group on GPUs"}


def read_accelerate_config(path: Path) -> dict[str, Any]:
    """The accelerate config file at ``path``, checked for what the trainer would not honour (``InputError``
    listing every problem): accelerate's FSDP/DeepSpeed/Megatron engines and its mixed precision, which the
    trainer sets itself (``parallel.fsdp``, ``parallel.mixed_precision``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError([f"--accelerate-config {path}: no such file"])
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - any parse error is reported with the file's name
        raise InputError([f"--accelerate-config {path}: not YAML/JSON ({type(e).__name__}: {e})"]) from None
    if not isinstance(data, dict):
        raise InputError([f"--accelerate-config {path}: expected a mapping (accelerate config), got "
                          f"{type(data).__name__}"])
    problems = []
    kind = str(data.get("distributed_type", "NO"))
    if kind in _FOREIGN_ENGINES:
        problems.append(f"--accelerate-config {path}: distributed_type {kind} hands the model to accelerate's own "
                        f"engine, which the trainer does not use; use MULTI_GPU (or NO) there and "
                        f"{_FOREIGN_ENGINES[kind]} in the run config")
    precision = data.get("mixed_precision", "no")
    if str(precision).lower() not in ("no", "none"):
        problems.append(f"--accelerate-config {path}: mixed_precision {precision!r} would be ignored (the trainer "
                        "sets precision itself); set mixed_precision: 'no' there and parallel.mixed_precision in "
                        "the run config")
    procs = data.get("num_processes")
    if procs is not None and (not isinstance(procs, int) or isinstance(procs, bool) or procs < 1):
        problems.append(f"--accelerate-config {path}: num_processes must be an integer >= 1 (got {procs!r})")
    if problems:
        raise InputError(problems)
    return data


def default_accelerate_config() -> Path | None:
    """accelerate's default config file (written by ``accelerate config``) when it exists."""
    # lazy: optional dependency accelerate (the qwen extra)
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    return path if path.is_file() else None


class AccelerateLauncher(LocalLauncher):
    """Each run is an ``accelerate launch --config_file FILE -m twinflow_train.cli fit ...`` group; ``workers``
    groups at a time. accelerate starts the processes (torchrun underneath, with the ranks and rendezvous its
    config names); the trainer initialises the process group and shards the model itself, as under torchrun.
    ``nproc_per_node`` overrides the config's ``num_processes``. A config without ``main_process_port`` gets
    ``--main_process_port 0`` (a free port), so several groups share one machine without clashing.
    """

    kind: LauncherKind = "accelerate"

    def __init__(self, *, config_file: Path | None, workers: int = 1, nproc_per_node: int | None = None,
                 threads: int | None = None, python: str | None = None):
        try:
            import accelerate  # noqa: F401  # lazy: optional dependency accelerate, named when missing
        except ImportError:
            raise RuntimeError("the accelerate launcher needs the accelerate package "
                               "(pip install 'twinflow-lab[qwen]' or pip install accelerate)") from None
        if nproc_per_node is not None and nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1 (got {nproc_per_node})")
        if config_file is None:
            config_file = default_accelerate_config()
            if config_file is None:
                raise InputError(["--launcher accelerate needs an accelerate config: pass --accelerate-config PATH "
                                  "or write the default one with `accelerate config`"])
        self.config_file = Path(config_file).resolve()
        self.config = read_accelerate_config(self.config_file)
        self.nproc_per_node = nproc_per_node or int(self.config.get("num_processes") or 1)
        per_process = threads if threads is not None else max(1, available_cores() // (workers * self.nproc_per_node))
        super().__init__(workers=workers, threads=per_process, python=python)

    def command(self, job: LaunchJob) -> list[str]:
        if job.argv and job.argv[0] != "fit":
            return super().command(job)  # shared-asset preparation (teacher) is single-process work
        cmd = [self.python, "-m", "accelerate.commands.launch", "--config_file", str(self.config_file),
               "--num_processes", str(self.nproc_per_node)]
        if self.config.get("main_process_port") is None and int(self.config.get("num_machines") or 1) <= 1:
            cmd += ["--main_process_port", "0"]
        return [*cmd, "-m", self.module, *job.argv]

    def describe(self) -> str:
        return (f"accelerate launch ({self.config_file}): {self.slots} group(s) at once, {self.nproc_per_node} "
                f"process(es) each, {self.threads} thread(s) per process")


SLURM_SIGNAL_DELAY_S = 180
"""``--signal=USR2@<s>``: Slurm signals a job this long before its time limit, so the trainer stops at a checkpoint
(``run.preempt_grace_s``, 120 s by default, must fit in it) and submitit requeues the job."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class TrainerJob:
    """Body of a submitit job: run the trainer, its output appended to ``log_path``; returns the exit code.

    A signal to the job (Slurm's preemption SIGTERM, the ``--signal`` USR2 before the time limit, the local
    executor's cancel) is passed on to the trainer's process group as SIGTERM (SIGINT stays SIGINT), which
    stops at a checkpoint (``twinflow_train.run.preempt``); a torchrun agent passes it to its workers. When
    the trainer has stopped, the handler submitit had for that signal runs: for USR2 it calls ``checkpoint``
    and requeues the job (submitit's checkpointing), and the requeued job resumes the run from its checkpoint.
    """

    def __call__(self, command: Sequence[str], env: Mapping[str, str], log_path: str) -> int:
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env), start_new_session=True)
            received: list[int] = []

            def forward(signum: int, _frame: Any) -> None:
                received.append(signum)
                try:
                    os.killpg(proc.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
                except ProcessLookupError:
                    pass

            previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
            try:
                rc = proc.wait()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            if received and rc != 0:
                handler = previous.get(received[0])
                if callable(handler):  # submitit's own: on its preemption signal, checkpoint() and requeue
                    handler(received[0], None)
            return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpointing: the requeued job is the same call (the trainer resumes by itself)."""
        import submitit  # lazy: submitit, only in a slurm job

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


run_command = TrainerJob()


class SubmititHandle(Handle):
    def __init__(self, job: Any):
        self.job = job
        self.error: str | None = None
        """Why the job failed on the scheduler's side (None when the trainer's exit code came back)."""

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        try:
            return int(self.job.result())
        except Exception as e:  # noqa: BLE001 - any scheduler-side failure ends the attempt
            # the job died outside the trainer (node failure, timeout, cancel): the harness
            # reads status.json next and records this text as the reason if the trainer could not
            self.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            return -1

    def terminate(self) -> None:
        self.job.cancel(check=False)

    @property
    def pid(self) -> int | None:
        return None


class SlurmLauncher(Launcher):
    """One submitit job per run. ``cluster="local"`` runs the jobs through submitit's LocalExecutor.

    ``parameters`` go to ``AutoExecutor.update_parameters`` (e.g. ``slurm_partition``,
    ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``); ``nproc_per_node`` > 1 runs
    each job as a single-node torchrun group.
    """

    kind: LauncherKind = "slurm"

    def __init__(self, *, folder: Path, workers: int = 64, cluster: Literal["slurm", "local"] = "slurm",
                 nproc_per_node: int = 1, threads: int | None = None,
                 parameters: Mapping[str, Any] | None = None, python: str | None = None,
                 module: str = TRAINER_MODULE):
        try:
            import submitit  # lazy: submitit only for the slurm launcher, named when missing
        except ImportError:
            raise RuntimeError("the slurm launcher needs the submitit package (pip install submitit)") from None
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        self.slots = workers
        self.cluster = cluster
        self.nproc_per_node = nproc_per_node
        self.python = python or sys.executable
        self.module = module
        # on a cluster node every job owns its cpus; locally the jobs share this machine
        self.threads = threads if threads is not None else (
            max(1, available_cores() // (workers * nproc_per_node)) if cluster == "local" else None)
        self.folder = Path(folder)
        self.executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=cluster)
        root = str(project_root())
        params: dict[str, Any] = {"timeout_min": 24 * 60, "nodes": 1, "tasks_per_node": 1,
                                  "name": "twinflow-lab"}
        params[f"{cluster}_setup"] = [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"]
        if cluster == "slurm":
            params["slurm_signal_delay_s"] = SLURM_SIGNAL_DELAY_S
        params.update(parameters or {})
        self.executor.update_parameters(**params)

    def command(self, job: LaunchJob) -> list[str]:
        if self.nproc_per_node > 1 and job.argv and job.argv[0] == "fit":
            return [self.python, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.nproc_per_node}", "-m", self.module, *job.argv]
        return [self.python, "-m", self.module, *job.argv]

    def start(self, job: LaunchJob) -> Handle:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.executor.update_parameters(name=job.name.replace("/", "-"))
        sub = self.executor.submit(run_command, self.command(job), child_env(job.env, threads=self.threads),
                                   str(job.log_path))
        return SubmititHandle(sub)

    def describe(self) -> str:
        return f"submitit ({self.cluster}): up to {self.slots} job(s) at once"


def make_launcher(kind: LauncherKind, *, workers: int, grid_dir: Path, nproc_per_node: int | None = None,
                  slurm_cluster: Literal["slurm", "local"] = "slurm",
                  slurm_parameters: Mapping[str, Any] | None = None,
                  accelerate_config: Path | None = None) -> Launcher:
    """The launcher named by ``kind`` (``--launcher`` on the command line); an unknown kind is an error."""
    if accelerate_config is not None and kind != "accelerate":
        raise ValueError(f"--accelerate-config goes with --launcher accelerate (got --launcher {kind})")
    if kind == "accelerate":
        return AccelerateLauncher(config_file=accelerate_config, workers=workers, nproc_per_node=nproc_per_node)
    if kind == "local":
        return LocalLauncher(workers=workers)
    if kind == "torchrun":
        return TorchrunLauncher(workers=workers, nproc_per_node=nproc_per_node or 2)
    if kind == "slurm":
        return SlurmLauncher(folder=grid_dir / ".harness" / "submitit", workers=workers, cluster=slurm_cluster,
                             nproc_per_node=nproc_per_node or 1, parameters=slurm_parameters)
    raise ValueError(f"unknown launcher {kind!r}; valid: local, torchrun, accelerate, slurm")


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """``--launcher``, ``--nproc-per-node``, ``--accelerate-config``, ``--slurm-cluster``, ``--slurm-param``
    (``grid run`` and ``search``)."""
    p.add_argument("--launcher", choices=("local", "torchrun", "accelerate", "slurm"), default="local",
                   help="how runs start")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per run for torchrun (default 2), "
                   "accelerate (default: the config's num_processes) and slurm (default 1)")
    p.add_argument("--accelerate-config", type=Path, default=None, metavar="PATH",
                   help="accelerate config file for --launcher accelerate (default: accelerate's own default "
                   "config, written by `accelerate config`)")
    p.add_argument("--slurm-cluster", choices=("slurm", "local"), default="slurm",
                   help="submitit backend: a Slurm cluster, or submitit's local executor")
    p.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="submitit parameter, e.g. slurm_partition=gpu, timeout_min=240 (repeatable)")


def parse_launcher_params(args: argparse.Namespace) -> dict[str, Any]:
    """Check the arguments of ``add_launcher_arguments``; returns the ``--slurm-param`` items as a dict (values
    read as YAML). Raises ``InputError`` listing every problem."""
    out: dict[str, Any] = {}
    problems = []
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        problems.append(f"--nproc-per-node must be >= 1 (got {args.nproc_per_node})")
    if getattr(args, "accelerate_config", None) is not None and args.launcher != "accelerate":
        problems.append(f"--accelerate-config goes with --launcher accelerate (got --launcher {args.launcher})")
    for item in args.slurm_param:
        if "=" not in item or not item.split("=", 1)[0].strip():
            problems.append(f"--slurm-param {item!r} must look like key=value (e.g. slurm_partition=gpu)")
            continue
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = parse_value(v, where=f"--slurm-param {item!r}")
        except InputError as e:
            problems += e.problems
    if problems:
        raise InputError(problems)
    return out
