"""The process-memory helpers: what /proc and glibc report, on the platforms that have them."""

from __future__ import annotations

import math
import sys

from mtlrec.memory import file_rss_mb, heap_free_mb, high_water_mb, release_freed_memory, rss_mb


def test_rss_parts_are_consistent() -> None:
    rss, code = rss_mb(), file_rss_mb()
    if sys.platform.startswith("linux"):
        assert 0 < code < rss <= high_water_mb()
    else:  # no /proc
        assert math.isnan(rss) and math.isnan(code)


def test_heap_free_is_a_size_or_unknown() -> None:
    free = heap_free_mb()
    assert math.isnan(free) or free >= 0
    release_freed_memory(collect=False)
    after = heap_free_mb()
    assert math.isnan(after) or after >= 0
