"""Exact top-N retrieval by inner product, in chunks: no full score matrix is ever held.

The first stage of two-stage recommendation: the users' retrieval vectors [Q, D] against the
catalogue's [I, D] (`RecModel.retrieval_users` / `retrieval_items`), keeping the N best per query
while walking the catalogue `chunk` items at a time (memory O(Q * (chunk + N)), never [Q, I]).
Exact: the result equals `topk(u @ v.T, N)` up to ties.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def top_n_inner_product(queries: Tensor, items: Tensor, n: int, allowed: Tensor | None = None,
                        chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """The N items of largest u.v for each query.

    Args:
        queries: u [Q, D].
        items: v [I, D].
        n: how many per query (fewer when fewer items are allowed).
        allowed: bool [I], items that may be returned (None: all).
        chunk: items scored at a time.

    Returns:
        (item rows int64 [Q, n'], scores [Q, n']) best first; n' = min(n, allowed items).
    """
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"expected queries [Q, D] and items [I, D], got {tuple(queries.shape)} and "
                         f"{tuple(items.shape)}")
    if n < 1 or chunk < 1:
        raise ValueError(f"n and chunk must be >= 1, got n={n} and chunk={chunk}")
    if allowed is not None and allowed.shape != (items.shape[0],):
        raise ValueError(f"allowed must be bool [{items.shape[0]}], got {tuple(allowed.shape)}")
    n_queries = queries.shape[0]
    best_scores = torch.empty(n_queries, 0, dtype=queries.dtype, device=queries.device)
    best_rows = torch.empty(n_queries, 0, dtype=torch.int64, device=items.device)
    for start in range(0, items.shape[0], chunk):
        stop = min(start + chunk, items.shape[0])
        scores = queries @ items[start:stop].T  # [Q, C]
        rows = torch.arange(start, stop, device=items.device)
        if allowed is not None:
            keep = allowed[start:stop]
            scores, rows = scores[:, keep], rows[keep]
        if rows.numel() == 0:
            continue
        take = min(n, rows.numel())
        top_scores, top_idx = torch.topk(scores, take, dim=1)  # [Q, take]
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_rows = torch.cat([best_rows, rows[top_idx]], dim=1)
        keep_n = min(n, merged_scores.shape[1])
        best_scores, order = torch.topk(merged_scores, keep_n, dim=1)
        best_rows = torch.gather(merged_rows, 1, order)
    return best_rows, best_scores
