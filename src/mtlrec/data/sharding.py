"""How the replicas of a distributed run split rows (or row groups) between them.

Every split here is contiguous and as even as possible: with n items and W replicas, the first
n mod W replicas take one item more than the rest. The parts are disjoint, in rank order, and their
concatenation is the input, so anything computed per part and gathered in rank order comes back in
the original order. The functions know nothing about torch.distributed; they take `rank` and
`world_size` as plain numbers so that any reader (in-memory batches, Parquet row groups) can use
them.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from torch import Tensor

__all__ = ["check_rank", "shard", "shard_bounds"]

Rows = TypeVar("Rows", Tensor, np.ndarray, list[int], range)


def check_rank(rank: int, world_size: int) -> None:
    """Raise ValueError unless 0 <= rank < world_size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size {world_size}, got {rank}")


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of replica `rank`'s part of n items.

    Parts differ in size by at most one; a replica's part is empty only when n < world_size.
    """
    check_rank(rank, world_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(rows: Rows, rank: int, world_size: int) -> Rows:
    """Replica `rank`'s contiguous part of `rows` (a tensor, array, list or range; same type back)."""
    start, stop = shard_bounds(len(rows), rank, world_size)
    return rows[start:stop]
