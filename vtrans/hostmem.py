"""Host memory: this process's resident set size, and giving freed heap memory back to the OS.

glibc keeps freed memory in the process's heap: after a training step the activations, the layers ZeRO-3 gathered and
the optimizers' moments are free but still resident, and whatever comes next (materialising the pruned model) is
added on top of them. `trim()` hands those pages back (malloc_trim), so the next stage starts from what is live."""
from __future__ import annotations

import ctypes
import gc
import os


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def trim() -> int:
    """Collect garbage and return the heap's free pages to the OS (glibc's malloc_trim; a no-op without glibc).
    Returns the bytes of RSS given back."""
    gc.collect()
    before = rss_bytes()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return 0
    return max(before - rss_bytes(), 0)
