"""Training on a CPU: freed tensors stay in the process's heap for the next step to reuse.

glibc's malloc serves each request above its mmap threshold (32 MB at most, by default) with a fresh
mmap and unmaps it on free, and gives the heap's free top back to the system above its trim threshold.
A training step frees and requests the same large tensors every step (at configs/default.toml's shape
each fp32 logits buffer is 2,048 tokens x 4,096 = exactly 32 MB), so every step the kernel maps and
zero-fills them again, page by page. Raising both thresholds keeps that memory in the heap: at that
shape, one thread, ~35,000 page faults and ~20% of a step's CPU time go (docs/LOG.md). PyTorch's CPU
tuning guide gets the same by preloading jemalloc or tcmalloc; this needs nothing installed. The
cost: the process keeps its peak memory instead of returning it between steps.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
MMAP_THRESHOLD = 2 ** 30  # requests below 1 GiB come from the heap, and return to it when freed
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: the heap top is given back only past ~2 GiB free


def keep_freed_memory():
    """Set glibc's thresholds for this process; True where that was done (Linux with glibc), False
    elsewhere (macOS, musl, Windows: their allocators keep their own behaviour)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
