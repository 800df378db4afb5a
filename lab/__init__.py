"""lab: an LLM-unlearning lab (methods, metrics, gradient-geometry diagnostics)."""
import ctypes
import os
import sys

# OpenMP threads that spin while waiting make torch 10-100x slower on CPU whenever the cores are
# shared (pytest -n 2, notebooks beside a dashboard, CI runners): a 1.3M-parameter forward went from
# 0.12 s to 2.2 s on 2 cores. PASSIVE waiting costs nothing measurable when the machine is idle.
# Effective only if set before torch loads OpenMP: import lab first, or export it (Makefile, CI do).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _keep_freed_memory():
    """glibc hands big freed blocks back to the OS (munmap, heap trim), so every gradient-size list an
    engine step allocates page-faults afresh: on SmolLM2 BLUR's direction took 265 ms instead of 131 ms
    (python bench/geometry_ops.py). Keep freed memory for reuse instead, as
    jemalloc/tcmalloc do: the process's resident memory stays at its peak. Linux/glibc only; skipped
    when the user set MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_MAX_ or LAB_KEEP_FREED_MEMORY=0."""
    if (not sys.platform.startswith("linux") or os.environ.get("LAB_KEEP_FREED_MEMORY") == "0"
            or {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"} & set(os.environ)):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)   # never trim the heap top
    mallopt(M_MMAP_MAX, 0)                 # no per-block mmap: big tensors come from the (reused) heap


_keep_freed_memory()

__version__ = "0.1.0"
