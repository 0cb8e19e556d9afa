"""Retrieval: exact chunked top-N, and two-stage recommending with a trained retrieval task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtlrec
from mtlrec.data.synthetic import make_world
from mtlrec.retrieval import top_n_inner_product

FAST = ["train.epochs=6", "train.lr=0.005", "train.progress=false", "train.early_stopping=null",
        "model.embedding_dim=8", "model.encoder_dim=16", "model.expert_hidden=[16]", "model.tower_hidden=[8]",
        "model.head_hidden=[16]"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Chunked top-N


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 300), n=st.integers(1, 50), chunk=st.integers(1, 64), seed=st.integers(0, 1000),
       masked=st.booleans())
def test_chunked_top_n_equals_brute_force(n_items: int, n: int, chunk: int, seed: int, masked: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    queries, items = torch.randn(3, 8, generator=gen), torch.randn(n_items, 8, generator=gen)
    allowed = torch.rand(n_items, generator=gen) < 0.6 if masked else None
    rows, scores = top_n_inner_product(queries, items, n, allowed, chunk=chunk)
    full = queries @ items.T
    if allowed is not None:
        full[:, ~allowed] = -torch.inf
    n_valid = n_items if allowed is None else int(allowed.sum())
    expected_scores, _ = torch.topk(full, min(n, n_valid), dim=1)
    assert rows.shape == (3, min(n, n_valid))
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(torch.gather(full, 1, rows), expected_scores)  # recall 1: same scores, same items
    if allowed is not None:
        assert bool(allowed[rows].all())


@pytest.mark.parametrize("chunk", [1, 7, 100, 333, 1003, 4096])
def test_chunked_top_n_returns_the_brute_force_items(chunk: int) -> None:
    """Random vectors have no ties: the very same rows, in the same order, whatever the chunk."""
    gen = torch.Generator().manual_seed(chunk)
    queries, items = torch.randn(5, 16, generator=gen), torch.randn(1003, 16, generator=gen)
    rows, scores = top_n_inner_product(queries, items, 25, chunk=chunk)
    expected_scores, expected_rows = torch.topk(queries @ items.T, 25, dim=1)
    assert torch.equal(rows, expected_rows)
    torch.testing.assert_close(scores, expected_scores)
    allowed = torch.rand(1003, generator=gen) < 0.3
    rows, _ = top_n_inner_product(queries, items, 25, allowed, chunk=chunk)
    masked = (queries @ items.T).masked_fill(~allowed, -torch.inf)
    assert torch.equal(rows, torch.topk(masked, 25, dim=1).indices)


def test_top_n_errors() -> None:
    with pytest.raises(ValueError, match=r"expected queries \[Q, D\] and items \[I, D\]"):
        top_n_inner_product(torch.zeros(2, 3), torch.zeros(5, 4), 2)
    with pytest.raises(ValueError, match="n and chunk must be >= 1"):
        top_n_inner_product(torch.zeros(2, 3), torch.zeros(5, 3), 0)
    with pytest.raises(ValueError, match=r"allowed must be bool \[5\]"):
        top_n_inner_product(torch.zeros(2, 3), torch.zeros(5, 3), 2, torch.ones(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# A trained retrieval task


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> mtlrec.Predictor:
    root = tmp_path_factory.mktemp("retrieval")
    world = make_world(n_users=200, n_items=300, impressions_per_user=30, n_pairs=200, seed=0)
    mtlrec.train(world.write(root / "world", retrieval=True), root / "run", FAST)
    return mtlrec.Predictor.load(root / "run")


def test_retrieved_candidates_hold_the_exact_top_10(predictor: mtlrec.Predictor) -> None:
    """Recall of the heads' exact top-10 (whole catalogue, seen items excluded) within the 60
    items of largest retrieval score: a fifth of the catalogue, so chance would give about 0.2."""
    recommender = predictor.recommender
    recalls = []
    for row in range(100):
        user = recommender.user_fields(torch.tensor([row]))
        allowed = recommender.eligible(row, exclude_seen=True)
        exact = recommender.rank(user, 10, allowed, candidates=0)
        assert not exact.two_stage and exact.ranked == int(allowed.sum())
        retrieved = recommender.retrieve(user, 60, allowed)[0].numpy()
        assert allowed[retrieved].all()
        recalls.append(len(set(exact.rows) & set(retrieved)) / 10)
    assert np.mean(recalls) >= 0.5, np.mean(recalls)


def test_two_stage_is_the_default_of_a_run_with_retrieval(predictor: mtlrec.Predictor) -> None:
    recommender = predictor.recommender
    assert recommender.candidates == 500 and recommender.retrieval_vectors is not None
    assert recommender.retrieval_vectors.shape == (300, 32)
    user = predictor.schema.user_ids()[7]
    row = int(predictor.schema.user_rows([user])[0])
    whole = predictor.recommend(user, k=5)  # 500 candidates > the catalogue: every allowed item ranked
    assert whole.attrs == {"cold_start": False, "strategy": "model", "two_stage": False}
    recommender.candidates = 40
    try:
        frame = predictor.recommend(user, k=5)
    finally:
        recommender.candidates = 500
    assert frame.attrs["two_stage"] is True
    allowed = recommender.eligible(row, exclude_seen=True)
    retrieved = recommender.retrieve(recommender.user_fields(torch.tensor([row])), 40, allowed)[0].numpy()
    rows = predictor.schema.item_rows(frame["item_id"].to_numpy())
    assert set(rows) <= set(retrieved) and not set(rows) & set(predictor.state.seen(row))
    scores = frame["score"].to_numpy()
    assert (np.diff(scores) <= 0).all()
