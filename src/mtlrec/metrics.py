"""Evaluation metrics per task type and for top-K ranking, computed in numpy over a whole set.

Every function takes the complete evaluation set (labels already restricted to rows whose label
exists) and returns a float: metrics are never averaged per batch, since AUC, F1 or mAP of the
union of batches is not the mean of their values. A metric that is undefined on the data (AUC
with one class, mAP without positives, anything on an empty set) is `nan`, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "PRIMARY_METRIC",
    "accuracy",
    "auc",
    "gauc",
    "higher_is_better",
    "logloss",
    "macro_f1",
    "macro_f1_multilabel",
    "mae",
    "mean_average_precision",
    "micro_f1",
    "multiclass_logloss",
    "ranking_metrics",
    "rmse",
    "task_metrics",
]

PRIMARY_METRIC: dict[str, str] = {
    "binary": "auc",
    "multiclass": "accuracy",
    "multilabel": "map",
    "regression": "rmse",
    "retrieval": "recall@100",
}
"""The metric that early stopping and reports use by default for each task type."""

_LOWER_IS_BETTER = frozenset({"rmse", "mae", "logloss", "loss"})
_EPS = 1e-15


def higher_is_better(metric_name: str) -> bool:
    """Whether a larger value of the metric is better (False for rmse, mae and any loss).

    Accepts a bare name ('auc', 'ndcg@10') or one qualified by a task ('click/logloss').
    """
    base = metric_name.rsplit("/", 1)[-1].split("@", 1)[0].lower()
    return not (base in _LOWER_IS_BETTER or base.endswith("loss"))


def _as_1d(x: Any, dtype: Any = np.float64) -> np.ndarray:
    return np.asarray(x, dtype=dtype).reshape(-1)


def _positive(y: Any) -> np.ndarray:
    return _as_1d(y) > 0.5


# ---------------------------------------------------------------- binary


def _tie_averaged_ranks(order: np.ndarray, starts_new: np.ndarray) -> np.ndarray:
    """1-based ranks of rows sorted by `order`; runs of ties (`starts_new` False) share their mean rank."""
    n = order.shape[0]
    run_start = np.flatnonzero(starts_new)                      # first sorted position of each run
    run_end = np.append(run_start[1:], n)                       # one past its last position
    run_of = np.cumsum(starts_new) - 1                          # run index of each sorted position
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ((run_start + run_end + 1) / 2.0)[run_of]    # mean of 1-based ranks in the run
    return ranks


def auc(y: Any, p: Any) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula; tied scores count half.

    Args:
        y: binary labels [N] (positive where > 0.5).
        p: scores [N]; any monotone transform of them gives the same AUC.

    Returns:
        AUC in [0, 1], or nan when `y` holds a single class.
    """
    pos = _positive(y)
    scores = _as_1d(p)
    n_pos = int(pos.sum())
    n_neg = pos.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts_new = np.empty(scores.shape[0], dtype=bool)
    starts_new[0] = True
    starts_new[1:] = sorted_scores[1:] != sorted_scores[:-1]
    ranks = _tie_averaged_ranks(order, starts_new)
    rank_sum = float(ranks[pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def gauc(y: Any, p: Any, groups: Any) -> float:
    """Group AUC: each group's AUC averaged, weighted by the group's number of impressions.

    Groups (usually users) whose rows hold a single class are skipped, and their rows do not count
    in the weights. Computed for all groups at once with one sort, not a loop over groups.

    Args:
        y: binary labels [N].
        p: scores [N].
        groups: group key of each row [N] (any sortable dtype).

    Returns:
        GAUC in [0, 1], or nan when no group holds both classes.
    """
    pos = _positive(y)
    scores = _as_1d(p)
    _, group = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    group = group.reshape(-1)
    n = pos.shape[0]
    if group.shape[0] != n or scores.shape[0] != n:
        raise ValueError(
            f"gauc needs y, p and groups of one length; got {n}, {scores.shape[0]}, {group.shape[0]}")
    if n == 0:
        return float("nan")
    order = np.lexsort((scores, group))                         # by group, then by score
    sorted_group, sorted_scores = group[order], scores[order]
    group_starts = np.empty(n, dtype=bool)
    group_starts[0] = True
    group_starts[1:] = sorted_group[1:] != sorted_group[:-1]
    starts_new = group_starts.copy()
    starts_new[1:] |= sorted_scores[1:] != sorted_scores[:-1]
    global_ranks = _tie_averaged_ranks(order, starts_new)
    # A group's rank of a row = its global rank minus the number of rows of earlier groups.
    first_position = np.flatnonzero(group_starts)               # [G] in group-index order
    local_ranks = global_ranks - first_position[group]
    n_groups = first_position.shape[0]
    size = np.bincount(group, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(group, weights=pos.astype(np.float64), minlength=n_groups)
    n_neg = size - n_pos
    rank_sum = np.bincount(group, weights=np.where(pos, local_ranks, 0.0), minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    group_auc = (rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (n_pos[valid] * n_neg[valid])
    return float(np.average(group_auc, weights=size[valid]))


def logloss(y: Any, p: Any) -> float:
    """Mean binary cross-entropy of probabilities `p` [N] (clipped 1e-15 from 0 and 1) for labels `y` [N]."""
    labels = _as_1d(y)
    prob = np.clip(_as_1d(p), _EPS, 1.0 - _EPS)
    if labels.shape[0] == 0:
        return float("nan")
    return float(-np.mean(labels * np.log(prob) + (1.0 - labels) * np.log1p(-prob)))


# ---------------------------------------------------------------- multiclass


def _classes(y_pred: Any) -> np.ndarray:
    pred = np.asarray(y_pred)
    if pred.ndim == 2:
        return pred.argmax(axis=1)
    return pred.reshape(-1).astype(np.int64)


def accuracy(y: Any, y_pred: Any) -> float:
    """Share of rows whose predicted class equals the label.

    Args:
        y: class indices [N].
        y_pred: predicted class indices [N], or class probabilities [N, C] (argmax taken).
    """
    labels = _as_1d(y, np.int64)
    if labels.shape[0] == 0:
        return float("nan")
    return float(np.mean(labels == _classes(y_pred)))


def macro_f1(y: Any, y_pred: Any) -> float:
    """F1 averaged over the classes that occur in the labels or the predictions (scikit-learn's default).

    Args:
        y: class indices [N].
        y_pred: predicted class indices [N], or class probabilities [N, C] (argmax taken).
    """
    labels = _as_1d(y, np.int64)
    pred = _classes(y_pred)
    if labels.shape[0] == 0:
        return float("nan")
    n_classes = int(max(labels.max(), pred.max())) + 1
    tp = np.bincount(labels[labels == pred], minlength=n_classes).astype(np.float64)
    support = np.bincount(labels, minlength=n_classes) + np.bincount(pred, minlength=n_classes)
    seen = support > 0
    return float(np.mean(2.0 * tp[seen] / support[seen]))


def multiclass_logloss(y: Any, probs: Any) -> float:
    """Mean cross-entropy of class probabilities `probs` [N, C] (rows renormalised) for labels `y` [N]."""
    labels = _as_1d(y, np.int64)
    prob = np.asarray(probs, dtype=np.float64)
    if labels.shape[0] == 0:
        return float("nan")
    prob = prob / prob.sum(axis=1, keepdims=True)
    picked = np.clip(prob[np.arange(labels.shape[0]), labels], _EPS, 1.0)
    return float(-np.mean(np.log(picked)))


# ---------------------------------------------------------------- multilabel


def _label_counts(y: Any, probs: Any, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = np.asarray(y, dtype=np.float64) > 0.5
    pred = np.asarray(probs, dtype=np.float64) >= threshold
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(
            f"multilabel metrics need y and probs of one shape [N, L]; got {truth.shape}, {pred.shape}")
    tp = (truth & pred).sum(axis=0).astype(np.float64)          # [L]
    fp = (~truth & pred).sum(axis=0).astype(np.float64)
    fn = (truth & ~pred).sum(axis=0).astype(np.float64)
    return tp, fp, fn


def micro_f1(y: Any, probs: Any, threshold: float = 0.5) -> float:
    """F1 of all (row, label) decisions pooled; a label is predicted where its probability >= `threshold`.

    Args:
        y: 0/1 labels [N, L].
        probs: probabilities [N, L].

    Returns:
        Micro-F1, or nan when there is neither a positive label nor a positive prediction.
    """
    tp, fp, fn = (c.sum() for c in _label_counts(y, probs, threshold))
    denom = 2.0 * tp + fp + fn
    return float(2.0 * tp / denom) if denom > 0 else float("nan")


def macro_f1_multilabel(y: Any, probs: Any, threshold: float = 0.5) -> float:
    """F1 of each label averaged over labels; a label is predicted where its probability >= `threshold`.

    Labels with no positive and no positive prediction (F1 = 0/0) are skipped rather than counted
    as 0, unlike scikit-learn's default, so a rare tag absent from the set does not lower the score.

    Args:
        y: 0/1 labels [N, L].
        probs: probabilities [N, L].
    """
    tp, fp, fn = _label_counts(y, probs, threshold)
    denom = 2.0 * tp + fp + fn
    defined = denom > 0
    if not defined.any():
        return float("nan")
    return float(np.mean(2.0 * tp[defined] / denom[defined]))


def mean_average_precision(y: Any, scores: Any) -> float:
    """Mean over labels of average precision (area under the step precision-recall curve).

    AP per label is scikit-learn's `average_precision_score`: sum over distinct score thresholds
    of (recall gain) x precision, tied scores taken together. Labels without a positive are skipped.

    Args:
        y: 0/1 labels [N, L] (or [N] for one label).
        scores: scores [N, L] (or [N]).

    Returns:
        mAP in [0, 1], or nan when no label has a positive.
    """
    truth = np.asarray(y, dtype=np.float64)
    score = np.asarray(scores, dtype=np.float64)
    if truth.ndim == 1:
        truth, score = truth[:, None], score[:, None]
    if truth.shape != score.shape:
        raise ValueError(
            f"mean_average_precision needs y and scores of one shape; got {truth.shape}, {score.shape}")
    n = truth.shape[0]
    n_pos = (truth > 0.5).sum(axis=0)
    if n == 0 or not (n_pos > 0).any():
        return float("nan")
    order = np.argsort(-score, axis=0, kind="stable")           # [N, L] descending per label
    sorted_truth = np.take_along_axis(truth > 0.5, order, axis=0).astype(np.float64)
    sorted_score = np.take_along_axis(score, order, axis=0)
    tp = np.cumsum(sorted_truth, axis=0)                        # [N, L]
    # Precision is read at the end of each run of tied scores: ties form one threshold.
    ends_run = np.ones_like(sorted_score, dtype=bool)
    ends_run[:-1] = sorted_score[:-1] != sorted_score[1:]
    positions = np.arange(n)[:, None]
    run_end = np.where(ends_run, positions, n)
    run_end = np.minimum.accumulate(run_end[::-1], axis=0)[::-1]  # next run end at or after each row
    precision_at_end = np.take_along_axis(tp, run_end, axis=0) / (run_end + 1.0)
    has_pos = n_pos > 0
    ap = (sorted_truth * precision_at_end).sum(axis=0)[has_pos] / n_pos[has_pos]
    return float(np.mean(ap))


# ---------------------------------------------------------------- regression


def rmse(y: Any, pred: Any) -> float:
    """Root mean squared error of predictions `pred` [N] for targets `y` [N]."""
    err = _as_1d(y) - _as_1d(pred)
    return float(np.sqrt(np.mean(err * err))) if err.shape[0] else float("nan")


def mae(y: Any, pred: Any) -> float:
    """Mean absolute error of predictions `pred` [N] for targets `y` [N]."""
    err = _as_1d(y) - _as_1d(pred)
    return float(np.mean(np.abs(err))) if err.shape[0] else float("nan")


# ---------------------------------------------------------------- per task


def task_metrics(task_type: str, y: np.ndarray, out: np.ndarray,
                 groups: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of a task type, over rows whose label exists.

    Args:
        task_type: 'binary', 'multiclass', 'multilabel' or 'regression'.
        y: labels: 0/1 [N] (binary), class indices [N] (multiclass), 0/1 [N, L] (multilabel),
            targets [N] (regression).
        out: probabilities [N] (binary), [N, C] (multiclass), [N, L] (multilabel), or predictions
            [N] (regression).
        groups: group of each row [N] (e.g. user ids); adds 'gauc' for binary tasks.

    Returns:
        binary: auc, gauc (with groups), logloss; multiclass: accuracy, macro_f1, logloss;
        multilabel: micro_f1, macro_f1, map; regression: rmse, mae.
    """
    if task_type == "binary":
        result = {"auc": auc(y, out)}
        if groups is not None:
            result["gauc"] = gauc(y, out, groups)
        result["logloss"] = logloss(y, out)
        return result
    if task_type == "multiclass":
        return {"accuracy": accuracy(y, out), "macro_f1": macro_f1(y, out),
                "logloss": multiclass_logloss(y, out)}
    if task_type == "multilabel":
        return {"micro_f1": micro_f1(y, out), "macro_f1": macro_f1_multilabel(y, out),
                "map": mean_average_precision(y, out)}
    if task_type == "regression":
        return {"rmse": rmse(y, out), "mae": mae(y, out)}
    raise ValueError(f"task_metrics got task_type '{task_type}'; expected one of {sorted(PRIMARY_METRIC)}")


# ---------------------------------------------------------------- ranking


ItemSets = Any
"""Items per user: a bool array [U, I], a CSR matrix (anything with `indptr` and `indices`), or a
sequence of U arrays (or lists) of item indices."""


def _rows_mask(items: ItemSets, start: int, stop: int, n_items: int) -> np.ndarray:
    """Bool [stop - start, n_items] marking the items of users start..stop-1."""
    if isinstance(items, np.ndarray):
        if items.shape[1] != n_items:
            raise ValueError(
                f"ranking_metrics got an item mask with {items.shape[1]} columns for {n_items} items")
        return items[start:stop].astype(bool, copy=False)
    mask = np.zeros((stop - start, n_items), dtype=bool)
    if hasattr(items, "indptr") and hasattr(items, "indices"):
        indptr = np.asarray(items.indptr)
        lo, hi = int(indptr[start]), int(indptr[stop])
        cols = np.asarray(items.indices[lo:hi], dtype=np.int64)
        rows = np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1]))
    else:
        per_user = [np.asarray(items[u], dtype=np.int64).reshape(-1) for u in range(start, stop)]
        lengths = np.fromiter((a.shape[0] for a in per_user), dtype=np.int64, count=len(per_user))
        cols = np.concatenate(per_user) if per_user else np.zeros(0, dtype=np.int64)
        rows = np.repeat(np.arange(stop - start), lengths)
    mask[rows, cols] = True
    return mask


def ranking_metrics(scores: np.ndarray, relevant: ItemSets, exclude: ItemSets | None = None,
                    ks: Sequence[int] = (10,), chunk_size: int | None = None) -> dict[str, float]:
    """HR@K, NDCG@K and Recall@K of each user's top-K items, seen items excluded.

    For users with at least one relevant item (the others are skipped): HR@K = 1 if any relevant
    item is in the top K; Recall@K = hits / number of relevant items; NDCG@K = DCG / ideal DCG with
    binary gains and discount 1 / log2(rank + 1). Excluded items get score -inf before ranking.
    Top-K is taken with `argpartition` per chunk of users, so the cost is O(U x I), not a sort.

    Args:
        scores: [U, I] score of every item for every user.
        relevant: held-out items per user (bool [U, I], CSR, or a sequence of index arrays).
        exclude: seen items per user, in the same forms, or None.
        ks: cut-offs.
        chunk_size: users per chunk (default: about 4M scores per chunk).

    Returns:
        {'hr@K', 'ndcg@K', 'recall@K'} for each K in `ks`; nan when no user has a relevant item.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"ranking_metrics needs scores [U, I]; got shape {scores.shape}")
    n_users, n_items = scores.shape
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"ranking_metrics needs every K >= 1; got {ks}")
    k_max = min(max(ks), n_items)
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))            # [k_max]
    ideal = np.concatenate(([0.0], np.cumsum(discount)))         # ideal DCG for 0..k_max relevant items
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("hr", "ndcg", "recall")}
    counted = 0
    step = chunk_size or max(1, (1 << 22) // max(n_items, 1))
    for start in range(0, n_users, step):
        stop = min(start + step, n_users)
        chunk = scores[start:stop].astype(np.float64)             # [u, I], a copy we may overwrite
        rel = _rows_mask(relevant, start, stop, n_items)          # [u, I]
        n_rel = rel.sum(axis=1)                                   # [u]
        if exclude is not None:
            seen = _rows_mask(exclude, start, stop, n_items)
            chunk[seen] = -np.inf
            rel = rel & ~seen                                     # a seen item is never a hit
        keep = n_rel > 0
        if not keep.any():
            continue
        chunk, rel, n_rel = chunk[keep], rel[keep], n_rel[keep]
        counted += int(keep.sum())
        if k_max < n_items:
            top = np.argpartition(-chunk, k_max - 1, axis=1)[:, :k_max]   # [u, k_max] unordered
        else:
            top = np.broadcast_to(np.arange(n_items), chunk.shape).copy()
        top_scores = np.take_along_axis(chunk, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_scores, axis=1, kind="stable"), axis=1)
        hits = np.take_along_axis(rel, top, axis=1).astype(np.float64)  # [u, k_max] by rank
        for k in ks:
            kk = min(k, n_items)
            hit_count = hits[:, :kk].sum(axis=1)
            dcg = hits[:, :kk] @ discount[:kk]
            sums[f"hr@{k}"] += float((hit_count > 0).sum())
            sums[f"recall@{k}"] += float((hit_count / n_rel).sum())
            sums[f"ndcg@{k}"] += float((dcg / ideal[np.minimum(n_rel, kk)]).sum())
    if counted == 0:
        return {name: float("nan") for name in sums}
    return {name: total / counted for name, total in sums.items()}
