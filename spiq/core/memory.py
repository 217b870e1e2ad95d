"""The process heap, kept for PyTorch on CPU instead of handed back to the kernel after every pass.

glibc serves each allocation above its mmap threshold (32 MB at most) with a fresh mapping, and
each thread's arena with mapped heaps it trims on free. A forward pass whose activations are that
large then faults every page in again, zeroed by the kernel: on EfficientNet-Lite0 (2 threads)
evaluation at batch 25 ran 1.8-2.3x slower and Integrated Gradients 2-4x slower than with the
memory kept, half the time spent in the kernel. The price: the process holds its peak memory.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # glibc's mallopt() parameters
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: one arena, no per-allocation mappings, no trimming.

    Call it at process start, before worker threads allocate (each would own an arena otherwise).
    Returns False where there is no glibc mallopt (macOS, musl): nothing changes there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX)))
