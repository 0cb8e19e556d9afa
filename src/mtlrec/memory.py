"""Give memory that Python has freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


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
