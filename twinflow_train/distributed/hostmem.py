"""Host memory of a CPU training process: freed heap blocks stay in the process.

A training step on the CPU allocates and frees the same few megabytes every step (activations,
gradients, roll-out buffers). glibc's malloc hands large freed blocks back to the kernel (``munmap``,
and trimming the top of the heap), so the next step faults the same pages in again, zero-filled by
the kernel: on the digits model that was ~1,000 page faults and 1-2 ms of kernel time per step.
Fixed thresholds keep those blocks in the heap for reuse; the process then holds on to its peak
working set (tens of megabytes here) instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap, not from mmap (glibc's own ceiling for the setting: 32 MiB)
MMAP_THRESHOLD = 32 << 20
#: free memory at the top of the heap kept before trimming it back to the kernel
TRIM_THRESHOLD = 512 << 20

_done = False


def retain_freed_heap() -> bool:
    """Set the thresholds once per process; False where the C library is not glibc (nothing to set)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt: their defaults stand
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a refusal leaves glibc's dynamic defaults in place, which are correct, only slower
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
