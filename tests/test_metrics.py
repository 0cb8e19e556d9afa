"""Metrics against hand-computed values, scikit-learn, naive loops and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from mtlrec import metrics as M


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- hand-computed values


def test_auc_by_hand() -> None:
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)                 # a tie counts half
    assert M.auc([0, 1, 1], [0.3, 0.3, 0.9]) == pytest.approx(0.75)
    assert M.auc([1, 0], [0.9, 0.1]) == 1.0
    assert math.isnan(M.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auc([], []))


def test_gauc_by_hand() -> None:
    y = [0, 1, 1, 0, 0, 1, 1]
    p = [0.2, 0.8, 0.3, 0.5, 0.1, 0.4, 0.6]
    groups = ["a", "a", "b", "b", "b", "c", "c"]
    # a: AUC 1 over 2 rows; b: positive 0.3 beats 0.1, loses to 0.5 -> 0.5 over 3 rows; c: one class.
    assert M.gauc(y, p, groups) == pytest.approx((2 * 1.0 + 3 * 0.5) / 5)
    assert math.isnan(M.gauc([1, 0], [0.1, 0.2], [1, 2]))


def test_logloss_and_regression_by_hand() -> None:
    assert M.logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert M.logloss([1], [0.0]) == pytest.approx(-math.log(1e-15))        # clipped, finite
    assert M.rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    assert M.mae([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx(1.0)


def test_multiclass_by_hand() -> None:
    y = [0, 1, 2, 2]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25]])
    assert M.accuracy(y, probs) == pytest.approx(0.5)
    # class 0: tp 1, pred 2, true 1 -> 2/3; class 1: 0; class 2: tp 1, pred 2, true 2 -> 1/2.
    assert M.macro_f1(y, probs) == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert M.multiclass_logloss(y, probs) == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.6, 0.25])))


def test_multilabel_by_hand() -> None:
    y = np.array([[1, 0], [0, 1], [1, 1]])
    probs = np.array([[0.9, 0.6], [0.2, 0.4], [0.3, 0.8]])
    # label 0: tp 1, fn 1 -> F1 2/3; label 1: tp 1, fp 1, fn 1 -> 1/2; pooled tp 2, fp 1, fn 2 -> 4/7.
    assert M.macro_f1_multilabel(y, probs) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert M.micro_f1(y, probs) == pytest.approx(4 / 7)
    # AP label 0: ranks 0.9(+), 0.3(+) -> (1 + 1) / 2 = 1; label 1: 0.8(+), 0.6(-), 0.4(+) -> (1 + 2/3) / 2.
    assert M.mean_average_precision(y, probs) == pytest.approx((1.0 + (1 + 2 / 3) / 2) / 2)


def test_map_skips_labels_without_positives() -> None:
    y = np.array([[1, 0], [0, 0]])
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert M.mean_average_precision(y, probs) == pytest.approx(1.0)
    assert math.isnan(M.mean_average_precision(np.zeros((2, 2)), probs))


def test_ranking_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    relevant = [[1, 3]]
    out = M.ranking_metrics(scores, relevant, ks=(3, 1))
    # top-3 = items 0, 1, 2: one hit at rank 2.
    assert out["hr@3"] == 1.0
    assert out["recall@3"] == pytest.approx(0.5)
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert out["hr@1"] == 0.0 and out["ndcg@1"] == 0.0 and out["recall@1"] == 0.0
    # Excluding item 0 (seen) moves items 1, 2, 3 up: hits at ranks 1 and 3.
    seen = np.array([[True, False, False, False, False]])
    out = M.ranking_metrics(scores, relevant, seen, ks=(3,))
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_ranking_skips_users_without_relevant_items_and_large_k() -> None:
    scores = np.array([[0.1, 0.9], [0.5, 0.2]])
    out = M.ranking_metrics(scores, [[0], []], ks=(10,))        # K larger than the catalogue
    assert out == {"hr@10": 1.0, "recall@10": 1.0, "ndcg@10": pytest.approx(1 / math.log2(3))}
    assert all(math.isnan(v) for v in M.ranking_metrics(scores, [[], []]).values())


# ---------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", range(3))
def test_binary_against_sklearn(seed: int) -> None:
    rng = _rng(seed)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500), 2)                             # rounding makes ties
    assert M.auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.logloss(y, p.clip(0.01, 0.99)) == pytest.approx(skm.log_loss(y, p.clip(0.01, 0.99)), rel=1e-10)
    groups = rng.integers(0, 30, 500)
    aucs, sizes = [], []
    for g in np.unique(groups):
        rows = groups == g
        if len(np.unique(y[rows])) == 2:
            aucs.append(skm.roc_auc_score(y[rows], p[rows]))
            sizes.append(rows.sum())
    assert M.gauc(y, p, groups) == pytest.approx(np.average(aucs, weights=sizes), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_against_sklearn(seed: int) -> None:
    rng = _rng(seed)
    y = rng.integers(0, 5, 400)
    logits = rng.normal(size=(400, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    assert M.accuracy(y, probs) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.macro_f1(y, probs) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert M.multiclass_logloss(y, probs) == pytest.approx(skm.log_loss(y, probs, labels=range(5)))
    # A class never predicted nor present is not averaged in, as in scikit-learn's default.
    y3, pred3 = np.array([0, 0, 3]), np.array([0, 3, 3])
    assert M.macro_f1(y3, pred3) == pytest.approx(skm.f1_score(y3, pred3, average="macro"))


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_against_sklearn(seed: int) -> None:
    rng = _rng(seed)
    y = rng.integers(0, 2, (300, 6))
    y[0] = 1                                                     # every label has a positive
    probs = np.round(rng.random((300, 6)), 2)
    pred = (probs >= 0.5).astype(int)
    assert M.micro_f1(y, probs) == pytest.approx(skm.f1_score(y, pred, average="micro"))
    assert M.macro_f1_multilabel(y, probs) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert M.mean_average_precision(y, probs) == pytest.approx(
        skm.average_precision_score(y, probs, average="macro"), abs=1e-12)


def test_regression_against_sklearn() -> None:
    rng = _rng(1)
    y, pred = rng.normal(size=200), rng.normal(size=200)
    assert M.rmse(y, pred) == pytest.approx(math.sqrt(skm.mean_squared_error(y, pred)))
    assert M.mae(y, pred) == pytest.approx(skm.mean_absolute_error(y, pred))


# ---------------------------------------------------------------- ranking against a naive loop


def _naive_ranking(scores: np.ndarray, relevant: list[list[int]], seen: list[list[int]],
                   k: int) -> dict[str, float]:
    hr, ndcg, recall = [], [], []
    for u in range(scores.shape[0]):
        if not relevant[u]:
            continue
        ranked = [i for i in np.argsort(-scores[u], kind="stable") if i not in set(seen[u])][:k]
        gains = [1.0 if i in relevant[u] else 0.0 for i in ranked]
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(relevant[u]), k)))
        hr.append(float(sum(gains) > 0))
        ndcg.append(dcg / idcg)
        recall.append(sum(gains) / len(relevant[u]))
    return {f"hr@{k}": float(np.mean(hr)), f"ndcg@{k}": float(np.mean(ndcg)),
            f"recall@{k}": float(np.mean(recall))}


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.array([i for r in rows for i in r], dtype=np.int64)
    return sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), n_items))


def test_ranking_against_naive_loop_in_every_input_form() -> None:
    rng = _rng(3)
    n_users, n_items = 37, 50
    scores = rng.random((n_users, n_items))                      # distinct scores: a unique top-K
    seen, relevant = [], []
    for _ in range(n_users):
        items = rng.permutation(n_items)
        n_seen, n_rel = rng.integers(0, 10), rng.integers(0, 5)
        seen.append(sorted(items[:n_seen].tolist()))
        relevant.append(sorted(items[n_seen:n_seen + n_rel].tolist()))
    expected = {**_naive_ranking(scores, relevant, seen, 5), **_naive_ranking(scores, relevant, seen, 20)}
    dense_rel = _csr(relevant, n_items).toarray() > 0
    dense_seen = _csr(seen, n_items).toarray() > 0
    for rel_form, seen_form in [(relevant, seen), (_csr(relevant, n_items), _csr(seen, n_items)),
                                (dense_rel, dense_seen)]:
        for chunk_size in (None, 4):
            got = M.ranking_metrics(scores, rel_form, seen_form, ks=(5, 20), chunk_size=chunk_size)
            assert got == pytest.approx(expected)


def test_ranking_excludes_seen_items() -> None:
    rng = _rng(4)
    scores = rng.random((10, 30))
    relevant = [[int(u)] for u in rng.integers(0, 30, 10)]
    seen = [[i for i in range(30) if i % 7 == 0 and i != rel[0]] for rel in relevant]
    boosted = scores.copy()
    for u, items in enumerate(seen):
        boosted[u, items] += 100.0                               # seen items would top every list
    assert M.ranking_metrics(boosted, relevant, seen, ks=(3,)) == pytest.approx(
        M.ranking_metrics(scores, relevant, seen, ks=(3,)))
    # A relevant item that is also seen can never be a hit.
    out = M.ranking_metrics(np.array([[0.9, 0.1, 0.2]]), [[0]], [[0]], ks=(3,))
    assert out["hr@3"] == 0.0 and out["ndcg@3"] == 0.0


# ---------------------------------------------------------------- per-task dispatch


def test_task_metrics_keys_and_primary_metric() -> None:
    rng = _rng(5)
    n = 50
    cases = {
        "binary": (rng.integers(0, 2, n), rng.random(n)),
        "multiclass": (rng.integers(0, 3, n), rng.dirichlet(np.ones(3), n)),
        "multilabel": (rng.integers(0, 2, (n, 4)), rng.random((n, 4))),
        "regression": (rng.normal(size=n), rng.normal(size=n)),
    }
    expected = {"binary": {"auc", "logloss"}, "multiclass": {"accuracy", "macro_f1", "logloss"},
                "multilabel": {"micro_f1", "macro_f1", "map"}, "regression": {"rmse", "mae"}}
    for task_type, (y, out) in cases.items():
        got = M.task_metrics(task_type, y, out)
        assert set(got) == expected[task_type]
        assert M.PRIMARY_METRIC[task_type] in got
        assert all(math.isfinite(v) for v in got.values())
    binary = M.task_metrics("binary", *cases["binary"], groups=rng.integers(0, 5, n))
    assert set(binary) == {"auc", "gauc", "logloss"}
    with pytest.raises(ValueError, match="ordinal"):
        M.task_metrics("ordinal", cases["regression"][0], cases["regression"][1])


def test_higher_is_better() -> None:
    assert M.higher_is_better("auc") and M.higher_is_better("map") and M.higher_is_better("ndcg@10")
    assert not M.higher_is_better("rmse")
    assert not M.higher_is_better("mae")
    assert not M.higher_is_better("logloss")
    assert not M.higher_is_better("click/logloss")


# ---------------------------------------------------------------- properties


_labels_scores = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.integers(0, 20), min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(_labels_scores)
def test_auc_in_unit_interval_and_invariant_to_monotone_transforms(data: tuple[list[int], list[int]]) -> None:
    y, levels = np.array(data[0]), np.array(data[1], dtype=np.float64) / 20
    value = M.auc(y, levels)
    if len(set(y.tolist())) < 2:
        assert math.isnan(value)
        return
    assert 0.0 <= value <= 1.0
    assert M.auc(y, 3.0 * np.exp(levels) - 7.0) == pytest.approx(value, abs=1e-12)
    assert M.auc(y, levels**3) == pytest.approx(value, abs=1e-12)
    assert M.auc(y, -levels) == pytest.approx(1.0 - value, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 15), st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_ranking_metrics_in_unit_interval(n_users: int, n_items: int, k: int, seed: int) -> None:
    rng = _rng(seed)
    scores = np.round(rng.random((n_users, n_items)), 1)         # many ties
    relevant = rng.random((n_users, n_items)) < 0.3
    seen = (rng.random((n_users, n_items)) < 0.3) & ~relevant
    out = M.ranking_metrics(scores, relevant, seen, ks=(k,))
    for value in out.values():
        assert math.isnan(value) or 0.0 <= value <= 1.0 + 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_map_in_unit_interval(seed: int) -> None:
    rng = _rng(seed)
    y = rng.integers(0, 2, (int(rng.integers(1, 20)), 3))
    value = M.mean_average_precision(y, np.round(rng.random(y.shape), 1))
    assert math.isnan(value) or 0.0 <= value <= 1.0 + 1e-12
