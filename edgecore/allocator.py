"""glibc heap control: make freed activations go back to the OS, so a step's peak is its own.

The memory estimator (`edgecore.memory`) prices glibc's default heap, which keeps freed
activation memory and fragments it, as `allocator="glibc"`; once this process has called
`limit_heap_fragmentation`, `allocator_in_effect()` says "returning" and the estimate drops
that term. Nothing here imports torch or the rest of the project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_heap_limited = False

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h

# For a tuning job: freed activations (blocks over 1 MiB) go back to the OS, so a round's measured peak is its
# own (glibc otherwise keeps them, and the next round reuses them unseen) and the estimator's
# "returning" allocator applies. Measured for SmolLM2, full-depth LoRA at batch 4 x 128 against
# an estimate of 773 MB: glibc's default 1296 MB at 2.78 s a step; 1 MiB 854 MB at 3.66 s;
# 64 KiB 741 MB at 4.88 s.
HEAP_THRESHOLD_BYTES = 1 << 20
# Below it: a step whose activations are smaller than 1 MiB (a tiny model, a short batch) would
# keep every one of them on the heap, where they fragment. Measured on tiny-5m (batch 2 x 160, 320
# KiB activations, a one-layer window, 3 fresh processes each): job peak 41-43 MB at 1 MiB,
# climbing 30 -> 35 MB between steps; 13-34 MB at 64 KiB, flat between steps.
SMALL_HEAP_THRESHOLD_BYTES = 64 * 1024


def job_heap_threshold(tokens: int, hidden: int) -> int:
    """The mmap threshold for a tuning job whose batch holds `tokens` tokens of width `hidden`.

    HEAP_THRESHOLD_BYTES where one fp32 activation (tokens x hidden) reaches it, so that freed
    activations go back to the OS as the estimator's "returning" allocator assumes; the small
    threshold where they would all stay below it.
    """
    return HEAP_THRESHOLD_BYTES if 4 * tokens * hidden >= HEAP_THRESHOLD_BYTES else SMALL_HEAP_THRESHOLD_BYTES


def limit_heap_fragmentation(threshold_bytes: int = 64 * 1024) -> bool:
    """Serve every allocation above `threshold_bytes` from its own mapping (glibc only).

    glibc raises its mmap threshold each time a large block is freed, so after the first
    training step activations (MiB-sized) come from the heap, whose freed space is kept and
    fragments: a step's peak RSS then holds about twice its saved activations. Fixing the
    threshold returns every freed activation to the OS at once (measured: 1995 instead of
    3093-3448 MiB for SmolLM2 at batch 8 x 128). The price is a page fault per fresh page
    of every large allocation, so steps may run slower: time it before making it a default.
    Returns False where the C
    library has no mallopt (musl, macOS); the process is then left unchanged.
    """
    global _heap_limited
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError, TypeError):
        return False
    _heap_limited = _heap_limited or ok
    return ok


def allocator_in_effect() -> str:
    """"returning" when this process limited heap fragmentation (call or environment), else "glibc"."""
    return "returning" if _heap_limited or "MALLOC_MMAP_THRESHOLD_" in os.environ else "glibc"


