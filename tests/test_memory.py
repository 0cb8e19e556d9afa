"""The process-memory helpers: what /proc and glibc report, on the platforms that have them."""

from __future__ import annotations

import math
import sys

from mtlrec.memory import (
    arrow_allocates_with_malloc,
    file_rss_mb,
    high_water_mb,
    rss_mb,
)


def test_rss_parts_are_consistent() -> None:
    rss, code = rss_mb(), file_rss_mb()
    if sys.platform.startswith("linux"):
        assert 0 < code < rss <= high_water_mb()
    else:  # no /proc
        assert math.isnan(rss) and math.isnan(code)


def test_arrow_allocates_with_malloc_inside_the_block_only() -> None:
    import pyarrow as pa

    before = pa.default_memory_pool().backend_name
    with arrow_allocates_with_malloc():
        assert pa.default_memory_pool().backend_name == "system"
        with arrow_allocates_with_malloc():
            held = pa.array(range(100_000))
        assert pa.default_memory_pool().backend_name == "system"
    assert pa.default_memory_pool().backend_name == before
    assert held.sum().as_py() == sum(range(100_000))  # made in the block, used and freed after it
    del held
