"""Keep large freed buffers in the process instead of returning them to the OS.

glibc serves allocations above its mmap threshold (at most 32 MiB by default) with fresh mappings and
unmaps them on free, so every large tensor a merge allocates pays page faults on first touch, which
costs more than the arithmetic. Raising the mmap and trim thresholds lets freed tensors be reused.
Peak memory is unchanged; memory already freed is kept for reuse rather than handed back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False


def reuse_large_allocations(threshold: int = 1 << 30) -> bool:
    """Apply once per process (Linux/glibc only; elsewhere a no-op). Returns whether it applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # One arena: buffers freed by the compute thread are reused by the reader thread and vice versa.
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold) == 1
              and libc.mallopt(_M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
