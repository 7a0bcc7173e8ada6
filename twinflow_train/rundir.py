"""The run directory: ``docs/run-directory.md`` as code.

The trainer writes a run directory; the harness and the reports read it (the
harness also writes ``status.json`` before a run starts and after a trainer that
died without saying why). Every one of them goes through this module, so the
protocol lives in one place:

- file names and run states, ``write_status`` / ``read_status``; the paths of a run directory's files
  (``metrics_file``, ``latest_checkpoint``, ``best_weights``, ``samples_dir``, ...), which every reader and
  writer builds here;
- the trainer's exit codes;
- one atomic writer (text, bytes, or a temp path to fill) that fsyncs the file
  and then its directory, so a rename survives a power cut;
- metrics.jsonl: the non-finite value codec, the record kind, a writer that
  never leaves a torn record (a failed write, e.g. ENOSPC, is cut back off), the
  full reader with the torn-last-line rule, a tail reader that seeks from the end,
  and the truncation a resume does;
- checkpoint metadata: ``meta.json`` records the step, the format and the size and
  sha256 of every file of the checkpoint, and is written last; ``verify_checkpoint``
  checks it and ``checkpoint_candidates`` lists where a resume may come from;
- forks (docs/run-directory.md, "Forks"): ``checkpoints/fork-<k>/``, ``fork.json`` (``fork_origin``) and
  ``read_run_metrics``, a forked run's records from step 0 with its parent's shared prefix read from the
  parent's own file;
- the keys a run of a given config writes (``validation_keys``, ``metric_keys``): what a search objective
  and a claim may name.

Nothing here imports torch, so the harness and the reports stay light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from .config import Config

# --------------------------------------------------------------------------- names

CONFIG_FILE = "config.yaml"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
TEACHER_SAMPLES = "teacher"
"""``samples/teacher.npz`` / ``.png``: the base model's samples on the students' noise and prompts."""
LATEST = "latest"
LAST_GOOD = "last_good"
BEST = "best"
BEST_WEIGHTS = "weights.pt"
"""The best validation weights: ``checkpoints/best/weights.pt`` (``best_weights``)."""
KEPT_PREFIX = "step-"
"""Earlier checkpoints kept by ``checkpoint.keep_latest_k`` live in ``checkpoints/step-<k>/``."""
META_FILE = "meta.json"
STATE_FILE = "state.pt"
"""A checkpoint's tensors and trainer state (``full``), or its trainer state beside ``shards/`` (``dcp``)."""
SHARDS_DIR = "shards"
"""A ``dcp`` checkpoint's sharded tensors: ``checkpoints/latest/shards/``."""
EVAL_PREFIX = "eval-"
"""``twinflow-train eval``'s result: ``eval-<which>.json`` in the run directory (``eval_result``)."""
FORK_FILE = "fork.json"
"""A forked run's origin: ``{"parent", "step", "checkpoint_sha256", "parent_config_hash"}``, or ``{"fallback", ...}``
when the fork was asked for and the run trained from scratch instead (``fork_origin``)."""
FORK_PREFIX = "fork-"
"""The state after step k that a child run forks from: ``checkpoints/fork-<k>/`` (``twinflow-train fit --fork-at k``)."""
FORK_FROM = "fork/from"
"""Key ``read_run_metrics`` adds to a record it took from a parent's metrics.jsonl: that parent's run directory."""

STATES = ("queued", "running", "done", "failed", "diverged", "preempted")
TERMINAL = ("done", "failed", "diverged")
"""``preempted`` is not terminal: the run stopped on a signal at a checkpoint and resumes from it."""

EXIT_DONE, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_PREEMPTED, EXIT_PREEMPTED_NOW = 4, 5
"""Stopped on a signal (``twinflow_train.run.preempt``): at a checkpoint of the step in flight (4), or at once
on a second signal or when the grace ran out, leaving the last complete checkpoint (5)."""
EXIT_STATES = {EXIT_DONE: "done", EXIT_FAILED: "failed", EXIT_DIVERGED: "diverged", EXIT_PREEMPTED: "preempted",
               EXIT_PREEMPTED_NOW: "preempted"}
"""The state a trainer's exit code stands for (2, a bad config, is refused before a run exists)."""

RESTART_FLAG = "--restart-on-corrupt"
"""``twinflow-train fit`` (and ``twinflow-lab grid run``) flag: with no checkpoint that verifies, start from step 0."""

TEACHER_EULER_STEPS = (1, 2, 4)
"""The step counts of the teacher's own Euler samples its step-0 record scores (``teacher/fd_euler<n>``, ``_kid``)."""

KINDS = ("train", "val", "teacher", "event")
"""Record kinds of metrics.jsonl; ``event`` records (a checkpoint fallback, a restart) are not metrics."""


class RunDirError(ValueError):
    """A run-directory file that exists but cannot be read as the protocol says; the message names it."""


# --------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first, ``root`` last: a tree written in a
    temporary place is on disk before a rename publishes it (the caller fsyncs the rename's directory)."""
    root = Path(root)
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path`` to fill; on success its tree is fsynced and renamed onto
    ``path`` (absent, or an empty directory), and the parent fsynced. On an exception the temp directory is
    removed and ``path`` is as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write; on success it is fsynced, renamed onto ``path``,
    and the directory fsynced. On an exception the temp file is removed and ``path`` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"nothing was written to the temp file of {path}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename is durable only once the directory entry is on disk
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object written atomically, or None when the file does not exist."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- status.json


def write_status(run_dir: str | Path, state: str, *, step: int, reason: str | None = None,
                 config_hash: str | None = None, pid: int | None = None) -> None:
    """``status.json``: {state, reason, step, updated, pid, config_hash}; ``pid`` defaults to this process."""
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}; valid: {', '.join(STATES)}")
    payload = {"state": state, "reason": reason, "step": int(step), "updated": time.time(),
               "pid": os.getpid() if pid is None else pid, "config_hash": config_hash}
    atomic_write_json(Path(run_dir) / STATUS_FILE, payload)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """status.json, or None before one exists; ``RunDirError`` when it is unreadable or names no state."""
    status = read_json(Path(run_dir) / STATUS_FILE)
    if status is not None and status.get("state") not in STATES:
        raise RunDirError(f"{Path(run_dir) / STATUS_FILE}: state {status.get('state')!r} is not one of "
                          f"{', '.join(STATES)}")
    return status


# --------------------------------------------------------------------------- metrics records

NONFINITE_TEXT = {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "Infinity": math.inf, "-inf": -math.inf,
                  "-Infinity": -math.inf}
"""The spellings of non-finite values a metrics file may hold (ours first, then JSON5/JavaScript's)."""
_NONFINITE = {k.lower(): v for k, v in NONFINITE_TEXT.items()}


def encode_value(value: Any) -> Any:
    """JSON has no NaN/inf: they are written as the strings 'nan', 'inf', '-inf' (kept visible, never zeroed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def decode_value(value: Any) -> Any:
    """The inverse of ``encode_value``: 'nan'/'inf'/'-inf' (any case, or 'Infinity') back to floats."""
    if isinstance(value, str):
        v = _NONFINITE.get(value.lower())
        if v is not None:
            return v
    return value


def encode_record(record: Mapping[str, Any]) -> str:
    """One metrics line (with its newline)."""
    if "step" not in record:
        raise ValueError("a metrics record needs a 'step'")
    return json.dumps({k: encode_value(v) for k, v in record.items()}, separators=(",", ":")) + "\n"


def record_kind(record: Mapping[str, Any]) -> str:
    """``train | val | teacher | event``; an old record without ``kind`` is ``val`` when it has val/ keys."""
    kind = record.get("kind")
    if kind in KINDS:
        return kind
    if kind is not None:
        raise ValueError(f"unknown record kind {kind!r} (expected one of {', '.join(KINDS)})")
    return "val" if any(str(k).startswith("val/") for k in record) else "train"


def _decode_line(line: str) -> dict[str, Any] | str:
    """The record of a line, or why it is not one."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return "is not valid JSON"
    if not isinstance(rec, dict) or "step" not in rec:
        return "is not a metrics record with a 'step'"
    return {k: (_NONFINITE.get(v.lower(), v) if isinstance(v, str) else v) for k, v in rec.items()}


@dataclass
class MetricsRead:
    """The records of a metrics.jsonl and the lines that could not be read (with why)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def problem(self) -> str | None:
        """One line for a status table: the first bad line and how many there are."""
        if not self.problems:
            return None
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return self.problems[0] + more


def parse_metrics_lines(text: str, *, where: str, complete: bool, strict: bool = True,
                        first_line: int = 1) -> MetricsRead:
    """Records of (part of) a metrics.jsonl.

    ``complete``: the text runs to the end of the file, so its last line may be a torn
    write and is skipped (the contract: readers skip a final line that does not parse).
    Any other line that does not parse is corruption: ``strict`` raises ``RunDirError``
    naming it, else the line is listed in ``problems`` and the reading goes on.
    """
    out = MetricsRead()
    lines = text.split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        rec = _decode_line(line)
        if isinstance(rec, dict):
            out.records.append(rec)
            continue
        if complete and i == last:
            break
        problem = f"{where}: line {i + first_line} {rec}"
        if strict:
            raise RunDirError(problem + " (only a torn last line is tolerated)")
        out.problems.append(problem)
    return out


def read_metrics(path: str | Path, *, strict: bool = True) -> MetricsRead:
    """Every record of a metrics.jsonl (none when the file does not exist); see ``parse_metrics_lines``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return MetricsRead()
    return parse_metrics_lines(data.decode("utf-8", errors="replace"), where=str(p), complete=True, strict=strict)


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a metrics.jsonl, strictly (a bad line that is not the last raises)."""
    yield from read_metrics(path).records


TAIL_BLOCK = 1 << 16
TAIL_SCAN_BYTES = 1 << 20
"""How far back ``tail_metrics`` looks for a kind it has not met yet (a validation record far behind)."""


@dataclass
class TailRead:
    """The end of a metrics.jsonl, read backwards: the last record of each kind asked for.

    ``offset``: where the complete lines end (a follower continues from there);
    ``problems``: lines in the part read that do not parse (a torn last line is not one).
    """

    last: dict[str, dict[str, Any]] = field(default_factory=dict)
    offset: int = 0
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0


def tail_metrics(path: str | Path, *, kinds: tuple[str, ...] = ("train", "val"),
                 scan_bytes: int = TAIL_SCAN_BYTES) -> TailRead:
    """The last record of each of ``kinds``, seeking from the end of the file.

    Reads blocks backwards until every kind was found, the file start, or ``scan_bytes``
    past the first record found (a run without validation does not cost a whole-file read).
    A final piece without a newline is a line being written (or torn) and is left out.
    Lines are decoded until every kind was found; the other lines of the blocks read
    are checked for their shape only (one JSON object per line), which catches a torn
    or zero-filled line without the cost of parsing it.
    """
    p = Path(path)
    out = TailRead()
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        return out
    with f:
        size = os.fstat(f.fileno()).st_size
        pos, carry, end_known, found_at = size, b"", False, None
        while pos > 0:
            start = max(0, pos - TAIL_BLOCK)
            f.seek(start)
            data = f.read(pos - start) + carry
            out.bytes_read += pos - start
            pos = start
            if not end_known:
                nl = data.rfind(b"\n")
                if nl < 0 and pos > 0:
                    carry = data  # the last line is longer than a block: keep reading back
                    continue
                out.offset = size - (len(data) - nl - 1)
                data, end_known = data[: nl + 1], True
            lines = data.split(b"\n")
            carry = lines.pop(0) if pos > 0 else b""  # a line that starts before this block
            starts, at = [], pos + (len(carry) + 1 if pos > 0 else 0)
            for raw in lines:
                starts.append(at)
                at += len(raw) + 1
            for raw, begin in zip(reversed(lines), reversed(starts)):
                if not raw.strip():
                    continue
                if all(k in out.last for k in kinds):
                    # not needed: only its shape is checked (a torn or zero-filled line fails it), not its JSON
                    if not (raw.lstrip().startswith(b"{") and raw.rstrip().endswith(b"}")):
                        out.problems.append(f"{p}: the line at byte {begin} is not a JSON object")
                    continue
                rec = _decode_line(raw.decode("utf-8", errors="replace"))
                if isinstance(rec, str):
                    out.problems.append(f"{p}: the line at byte {begin} {rec}")
                    continue
                kind = rec.get("kind") if rec.get("kind") not in (None, *KINDS) else record_kind(rec)
                if kind in kinds and kind not in out.last:
                    out.last[kind] = rec
                    found_at = pos if found_at is None else found_at
            if all(k in out.last for k in kinds) or (found_at is not None and found_at - pos >= scan_bytes):
                break
    out.problems.reverse()  # in file order
    return out


class MetricsTail:
    """Follows a growing metrics.jsonl: each ``poll`` returns the complete records appended since the last.

    ``from_end``: the first poll does not read the file from its start but seeds
    ``last`` from ``tail_metrics`` (a status table needs the end, not the history).
    When the file shrinks or is replaced (a resume truncates it) it starts over.
    Never raises on a bad line: it is listed in ``problems`` (the first one stays).
    """

    def __init__(self, path: str | Path, *, from_end: bool = False):
        self.path = Path(path)
        self.from_end = from_end
        self._offset = 0
        self._ino: int | None = None
        self.last: dict[str, Any] = {}
        """Latest value of every key seen (val/ keys from val records, others from train records)."""
        self.problems: list[str] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._ino or st.st_size < self._offset:
            self._offset, self._ino, self.last, self.problems = 0, st.st_ino, {}, []
            if self.from_end:
                tail = tail_metrics(self.path)
                for kind in ("val", "train"):  # the train record's step (the newer) wins
                    self.last.update(tail.last.get(kind, {}))
                self._offset, self.problems = tail.offset, tail.problems
                return []
        if st.st_size <= self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []  # a line still being written
        read = parse_metrics_lines(chunk[: end + 1].decode("utf-8", errors="replace"), where=str(self.path),
                                   complete=False, strict=False)
        self._offset += end + 1
        self.problems.extend(read.problems)
        for rec in read.records:
            self.last.update(rec)
        return read.records


# --------------------------------------------------------------------------- metrics writer


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a write may be short); the one call a disk-full test fails."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class MetricsWriter:
    """Appends records to metrics.jsonl, one ``write`` per line.

    A write that fails (ENOSPC, EIO) is cut back off the file before the error is
    raised, so the file never holds a torn record the run itself wrote.
    ``mirror``: an object with ``log(record)`` and ``finish()`` (the W&B mirror).
    """

    def __init__(self, path: str | Path, *, mirror: Any = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.mirror = mirror

    def write(self, record: Mapping[str, Any]) -> None:
        data = encode_record(record).encode()
        assert self._fd is not None, "write after close"
        before = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, data)
        except OSError as e:
            os.ftruncate(self._fd, before)  # shrinking needs no space: the file ends on a whole record again
            raise OSError(e.errno, f"{os.strerror(e.errno) if e.errno else e}: metrics record of step "
                          f"{record['step']} not written to {self.path}") from e
        if self.mirror is not None:
            self.mirror.log(record)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        if self.mirror is not None:
            self.mirror.finish()
            self.mirror = None


def truncate_metrics(path: str | Path, *, last_step: int) -> int:
    """Keep the records with step <= ``last_step`` (a resume point), drop a torn tail. Returns records kept."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept = [r for r in read_metrics(p).records if int(r["step"]) <= last_step]
    atomic_write_text(p, "".join(encode_record(r) for r in kept))
    return len(kept)


# --------------------------------------------------------------------------- paths


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def samples_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SAMPLES_DIR


def sample_stem(folder: str | Path, tag: str, nfe: int | None = None) -> Path:
    """A sample file's path without its suffix (``.npz``, ``.png``): ``<folder>/<tag>-nfe<n>`` (a student's:
    tag ``final`` or ``best``), or ``<folder>/<tag>`` without ``nfe`` (``TEACHER_SAMPLES``)."""
    return Path(folder) / (tag if nfe is None else f"{tag}-nfe{nfe}")


def eval_result(run_dir: str | Path, which: str) -> Path:
    return Path(run_dir) / f"{EVAL_PREFIX}{which}.json"


# --------------------------------------------------------------------------- checkpoints


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def latest_checkpoint(run_dir: str | Path) -> Path:
    return checkpoints_dir(run_dir) / LATEST


def last_good_checkpoint(run_dir: str | Path) -> Path:
    return checkpoints_dir(run_dir) / LAST_GOOD


def best_weights(run_dir: str | Path) -> Path:
    return checkpoints_dir(run_dir) / BEST / BEST_WEIGHTS


def kept_name(step: int) -> str:
    return f"{KEPT_PREFIX}{int(step):09d}"


def kept_checkpoints(run_dir: str | Path) -> list[Path]:
    """The earlier checkpoints kept by ``checkpoint.keep_latest_k``, newest first."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith(KEPT_PREFIX) and p.name[len(KEPT_PREFIX):].isdigit():
            found.append((int(p.name[len(KEPT_PREFIX):]), p))
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Where a resume may come from, in the order tried: latest, last_good, then the kept ones, newest first."""
    return [latest_checkpoint(run_dir), last_good_checkpoint(run_dir), *kept_checkpoints(run_dir)]


def checkpoint_step(ckpt_dir: str | Path) -> int | None:
    """The step in a checkpoint's meta.json; None when there is none or it cannot be read."""
    try:
        meta = read_json(Path(ckpt_dir) / META_FILE)
        return None if meta is None else int(meta["step"])
    except (RunDirError, KeyError, TypeError, ValueError):
        return None


def resume_step(run_dir: str | Path) -> int:
    """The newest step among a run's checkpoints whose meta.json reads (0: none).

    A quick look for the harness (no checksums); the trainer verifies before it loads.
    """
    steps = [s for s in (checkpoint_step(p) for p in checkpoint_candidates(run_dir)) if s is not None]
    return max(steps, default=0)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checkpoint_meta(ckpt_dir: str | Path, *, step: int, fmt: str, extra: Mapping[str, Any] | None = None) -> None:
    """Record the size and sha256 of every file of a finished checkpoint directory in its meta.json.

    Called last, when every file is written and fsynced: a checkpoint without a
    meta.json is incomplete, and one whose files differ from it is corrupt.
    """
    d = Path(ckpt_dir)
    files = {}
    for p in sorted(x for x in d.rglob("*") if x.is_file() and x.name != META_FILE):
        files[p.relative_to(d).as_posix()] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    atomic_write_json(d / META_FILE, {"step": int(step), "format": fmt, "files": files, **dict(extra or {})})


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None when the checkpoint is complete and every file matches its meta.json; else what is wrong."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return "missing"
    try:
        meta = read_json(d / META_FILE)
    except RunDirError as e:
        return f"meta.json unreadable ({e})"
    if meta is None:
        return "no meta.json (incomplete)"
    if not isinstance(meta.get("step"), int) or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return "meta.json lacks 'step' or the file checksums"
    for rel, want in meta["files"].items():
        p = d / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want.get("bytes"):
            return f"{rel} has {size} bytes, meta.json says {want.get('bytes')}"
        if file_digest(p) != want.get("sha256"):
            return f"{rel} does not match its sha256 in meta.json"
    return None



@dataclass
class ResumePoint:
    """Where a resume comes from: the newest checkpoint that verifies, and those passed over (with why)."""

    path: Path | None
    step: int
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def rejected_text(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.rejected)


def find_resume_point(run_dir: str | Path, *,
                      check: Callable[[Path], str | None] | None = None) -> ResumePoint:
    """Try latest, last_good, then the kept checkpoints (newest first); the first that verifies wins.

    A candidate that does not exist is not a problem (a run may have no last_good);
    one that exists and does not verify is listed in ``rejected``. ``check``: a further test of a
    candidate whose checksums match (the trainer's: its files are plain data), None or what is wrong.
    """
    rejected: list[tuple[str, str]] = []
    for c in checkpoint_candidates(run_dir):
        if not c.exists():
            continue
        why = verify_checkpoint(c)
        if why is None and check is not None:
            why = check(c)
        if why is None:
            return ResumePoint(path=c, step=int(checkpoint_step(c) or 0), rejected=rejected)
        rejected.append((f"{CHECKPOINTS_DIR}/{c.name}", why))
    return ResumePoint(path=None, step=0, rejected=rejected)


# --------------------------------------------------------------------------- forks


def fork_checkpoint(run_dir: str | Path, step: int) -> Path:
    """``checkpoints/fork-<step>/``: the full training state after ``step``, outside the ``latest`` rotation."""
    return checkpoints_dir(run_dir) / f"{FORK_PREFIX}{int(step)}"


def fork_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The fork checkpoints a run wrote, by step (complete or not: ``verify_checkpoint`` tells)."""
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return {}
    found = {}
    for p in d.iterdir():
        tail = p.name[len(FORK_PREFIX):]
        if p.is_dir() and p.name.startswith(FORK_PREFIX) and tail.isdigit():
            found[int(tail)] = p
    return dict(sorted(found.items()))


def read_fork_file(run_dir: str | Path) -> dict[str, Any] | None:
    """``fork.json`` as written (a fork or a fallback), or None when the run was not asked to fork."""
    return read_json(Path(run_dir) / FORK_FILE)


def fork_origin(run_dir: str | Path) -> dict[str, Any] | None:
    """Where a forked run's first steps come from: ``{"parent", "step", "checkpoint_sha256",
    "parent_config_hash"}`` (``parent`` relative to ``run_dir``), plus ``parent_dir``, the parent's path as
    seen from here. None for a run that did not start from a fork (never asked to, or it fell back)."""
    fork = read_fork_file(run_dir)
    if fork is None or "fallback" in fork:
        return None
    if not isinstance(fork.get("parent"), str) or not isinstance(fork.get("step"), int):
        raise RunDirError(f"{Path(run_dir) / FORK_FILE}: expected 'parent' (a path) and 'step' (an integer), "
                          f"got {fork}")
    return {**fork, "parent_dir": Path(os.path.normpath(Path(run_dir) / fork["parent"]))}


def read_run_metrics(run_dir: str | Path, *, strict: bool = True) -> MetricsRead:
    """A run's records from its first step: for a forked run, its parent's records with step <= the fork
    step (the parent's own view, so recursively its parents' too), each marked ``fork/from`` = the run
    directory whose metrics.jsonl holds it, then the run's own records (unmarked). Nothing is copied, so
    the shared prefix cannot drift. A parent that is missing or whose config changed since the fork
    (status.json's ``config_hash`` against fork.json's ``parent_config_hash``) is a problem: ``strict``
    raises ``RunDirError``, else it is listed in ``problems`` and the records that can be read are returned.
    """
    return _run_metrics(Path(run_dir), strict=strict, seen=())


def _run_metrics(run_dir: Path, *, strict: bool, seen: tuple[Path, ...]) -> MetricsRead:
    own = read_metrics(run_dir / METRICS_FILE, strict=strict)
    try:
        origin = fork_origin(run_dir)
    except RunDirError as e:
        if strict:
            raise
        return MetricsRead(records=own.records, problems=[str(e), *own.problems])
    if origin is None:
        return own
    parent: Path = origin["parent_dir"]
    key = parent.resolve()
    problems: list[str] = []
    if key in seen or key == run_dir.resolve():
        problems.append(f"{run_dir / FORK_FILE}: forks form a cycle through {parent}")
        prefix = MetricsRead()
    elif not (parent / METRICS_FILE).is_file():
        problems.append(f"{run_dir / FORK_FILE}: the parent {parent} has no {METRICS_FILE} (steps 1-{origin['step']} "
                        "of this run are missing)")
        prefix = MetricsRead()
    else:
        try:
            status = read_status(parent)
        except RunDirError as e:
            status = None
            problems.append(str(e))
        want = origin.get("parent_config_hash")
        if status is not None and want is not None and status.get("config_hash") not in (None, want):
            problems.append(f"{run_dir / FORK_FILE}: the parent {parent} now holds config {status.get('config_hash')}, "
                            f"not the {want} this run forked from at step {origin['step']}")
        prefix = _run_metrics(parent, strict=strict, seen=(*seen, run_dir.resolve()))
    if problems and strict:
        raise RunDirError("; ".join(problems))
    records = [r if FORK_FROM in r else {**r, FORK_FROM: str(parent)}
               for r in prefix.records if int(r["step"]) <= origin["step"]]
    return MetricsRead(records=records + own.records, problems=[*problems, *prefix.problems, *own.problems])


# --------------------------------------------------------------------------- what a run writes


def validation_keys(cfg: "Config") -> list[str]:
    """The validation keys a run of ``cfg`` writes: what a search objective may name."""
    out = ["val/loss", "val/best_loss"]
    if cfg.data.dataset == "digits":  # sample metrics need the evaluation network, which only digits has
        for n in cfg.eval.nfe:
            out += [f"val/{what}_nfe{n}" for what in ("fd", "kid", "reward", "accuracy", "gold", "proxy")]
    return out


def metric_keys(cfg: "Config") -> set[str]:
    """Every metrics.jsonl key a run of ``cfg`` writes: what a claim may name (checked against the records of short
    runs, ``tests/twinflow_train/run/test_metric_keys.py``)."""

    keys = {"loss/total", "loss/main", "loss/rect", "grad_norm/total", "grad_norm/max", "lr", "event/spike",
            "event/decay", "event/skipped", "event/nonfinite", "count/nonfinite", "count/spikes", "time/step_s",
            "time/wall_s", "time/train_s",
            "event/plateau_decay",  # every validation record (the plateau policy's decay; 0 under other policies)
            "event/diverged"}  # the record of the step that ended a diverged run
    keys.update(validation_keys(cfg))
    if cfg.renoise.schedule != "off":
        keys.add("renoise/bias")
    if cfg.rl.enabled:
        # every clip mode: the RL term's stats (rl/grad_rms once its weight is non-zero) and, on the log steps
        # (which split the terms), the per-term gradient statistics with the RL clip's (coefficient 1 unclipped)
        keys.update({"loss/rl", "rl/weight", "rl/reward", "rl/grad_rms", "grad_norm/twinflow", "grad_norm/rl",
                     "grad_norm/rl_clipped", "grad_cos/twinflow_rl", "rl/clip_coef", "rl/share"})
        if cfg.rl.clip == "output":
            keys.update({"rl/clip_frac", "rl/clip_scale"})
    if cfg.data.dataset == "digits":  # the teacher line needs the evaluation network, which only digits has
        keys.update({"teacher/fd", "teacher/kid", "teacher/reward", "teacher/accuracy", "teacher/gold", "teacher/proxy",
                     "teacher/steps", "teacher/cfg_scale"})
        keys.update(f"teacher/{what}_euler{n}" for n in TEACHER_EULER_STEPS for what in ("fd", "kid"))
    return keys
