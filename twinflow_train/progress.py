"""Progress of long single-process work (the shared assets: codec, reward, evaluation and proxy networks, teacher).

``progress_range(n, desc=...)`` iterates like ``range`` and shows it: a tqdm bar when stderr is a terminal,
and otherwise (a log file, a pipe) plain lines: one when the work starts, one at every tenth of it with the
elapsed time and an estimate of what is left, and one when it ends. ``progress=False`` (``--no-progress``)
turns the bar off; the lines stay, because a log without them looks like a hang.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator, TextIO


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def progress_range(n: int, *, desc: str, progress: bool | None = None, start: int = 0,
                   stream: TextIO | None = None, lines: int = 10) -> Iterator[int]:
    """``range(start, start + n)``, with a bar on a terminal (unless ``progress`` is False) and ``lines`` + 2
    progress lines anywhere else."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    out = stream if stream is not None else sys.stderr
    if progress is not False and _is_terminal(out):
        from tqdm.auto import tqdm  # lazy: tqdm, only when a bar is shown on a terminal

        yield from tqdm(range(start, start + n), desc=desc, file=out, mininterval=1.0)
        return
    out.write(f"{desc}: {n} steps\n")
    out.flush()
    t0 = time.perf_counter()
    every = max(1, -(-n // max(1, lines)))  # ceil(n / lines)
    for i in range(n):
        yield start + i
        done = i + 1
        if done % every == 0 and done < n:
            elapsed = time.perf_counter() - t0
            out.write(f"{desc}: {done}/{n} ({100 * done / n:.0f}%), {_seconds(elapsed)}, "
                      f"~{_seconds(elapsed * (n - done) / done)} left\n")
            out.flush()
    out.write(f"{desc}: done, {n} steps in {_seconds(time.perf_counter() - t0)}\n")
    out.flush()
