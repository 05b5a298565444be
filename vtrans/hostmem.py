"""Host memory: this process's resident set size, and keeping glibc's heap close to what is live.

glibc serves an allocation below its mmap threshold from the process's heap, and that threshold grows (up to 32 MiB)
each time a larger block is freed. A DeepSpeed rank frees gathered layers and activations of many sizes every step,
so soon almost everything comes from the heap, and freed heap memory stays resident (fragmented, or below a live
block): measured on a ~1B LLaMA under 2-rank ZeRO-3 (bench/memory.py), a rank's peak was 0.64-0.66x one process's
that way, against 0.55-0.56x with a fixed 1 MiB threshold. `cap_heap()` fixes the threshold (the ranks of a
DeepSpeed job call it first); `trim()` hands free heap pages back before a stage that adds memory (materialise)."""
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


def anon_bytes() -> int:
    """This process's anonymous resident memory in bytes (RssAnon: what it allocated, without the file-backed pages of
    memory-mapped checkpoints, which are page cache the kernel may drop and read back at will); `rss_bytes()` where
    the kernel does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def cap_heap(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, returned to the OS when freed (glibc's
    mallopt(M_MMAP_THRESHOLD), which also stops the threshold from growing). Applies to this process from now on;
    false where there is no glibc. Costs a page-fault pass over each large block; a GPU job makes few host ones."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


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
