"""Process memory: what the OS counts (RSS, its peak), and giving freed memory back to it.

The measurements read Linux's /proc and return NaN where it is missing; benchmarks use them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import resource
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pool_lock = threading.Lock()
_pool_depth = 0
_pool_saved: object = None


@contextmanager
def arrow_allocates_with_malloc() -> Iterator[None]:
    """Inside the block, pyarrow allocates from the C library's malloc instead of its default pool.

    pyarrow's default pool (mimalloc) keeps part of what a Parquet read freed resident even after
    `release_unused`, and reads through it peak higher; pages freed to malloc go back to the OS
    with `release_freed_memory`. (The speed benchmark's 200,000-row read: 10-15 MB less RSS once
    the tables are encoded and released, 50-75 MB lower peak while reading.) Buffers remember their
    pool, so those made inside the block are freed correctly after it. The default pool is process
    wide: other threads' arrow allocations meanwhile use malloc too. Blocks may nest, in any thread.
    """
    global _pool_depth, _pool_saved
    import pyarrow as pa

    with _pool_lock:
        if _pool_depth == 0:
            _pool_saved = pa.default_memory_pool()
            pa.set_memory_pool(pa.system_memory_pool())
        _pool_depth += 1
    try:
        yield
    finally:
        with _pool_lock:
            _pool_depth -= 1
            if _pool_depth == 0:
                pa.set_memory_pool(_pool_saved)
                _pool_saved = None


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (unless `collect` is False), then ask the allocators to return freed pages to the OS.

    Reading a table through pyarrow and pandas leaves a few hundred MB of freed heap behind (glibc
    keeps freed blocks for reuse); after encoding, the raw tables are gone and training should not
    carry their footprint. `malloc_trim` exists on glibc only; elsewhere this just collects.
    A thread beside training passes `collect=False`: a collection holds the GIL for its duration.
    """
    if collect:
        gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    if sys.platform.startswith("linux"):
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
            trim = getattr(libc, "malloc_trim", None)
            if trim is not None:
                trim(0)
        except OSError:
            pass


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process (VmRSS), in MiB; NaN without /proc."""
    return _status_mb(pid, "VmRSS:")


def file_rss_mb(pid: int | str = "self") -> float:
    """The file-backed part of the RSS (RssFile: code of the loaded libraries, mapped files), in MiB;
    NaN without /proc. It grows as a process first runs code it has loaded (kernels, readers)."""
    return _status_mb(pid, "RssFile:")


def high_water_mb(pid: int | str = "self") -> float:
    """Peak RSS of a process since it started or since `reset_peak_rss` (VmHWM), in MiB; NaN without /proc."""
    return _status_mb(pid, "VmHWM:")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS of this process over its whole life (getrusage; KiB on Linux, bytes on macOS), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def _status_mb(pid: int | str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan
