"""Masked task losses and the entire-space (ESMM) loss of conditional tasks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrec.data.batch import Batch
from mtlrec.data.spec import TaskSpec
from mtlrec.training.losses import task_losses

CLICK = TaskSpec("click", "interaction", "binary", 1)
LIKE = TaskSpec("like", "interaction", "binary", 1, parent="click")
BUY = TaskSpec("buy", "interaction", "binary", 1, parent="like")
CATEGORY = TaskSpec("category", "item", "multiclass", 4)
TAGS = TaskSpec("tags", "item", "multilabel", 3)
RATING = TaskSpec("rating", "interaction", "regression", 1)
B = 12


def _plain_batch(gen: torch.Generator) -> tuple[dict[str, Tensor], Batch]:
    outputs = {
        "click": torch.randn(B, 1, generator=gen),
        "category": torch.randn(B, 4, generator=gen),
        "tags": torch.randn(B, 3, generator=gen),
        "rating": torch.randn(B, generator=gen),
    }
    labels = {
        "click": torch.randint(0, 2, (B,), generator=gen).float(),
        "category": torch.randint(0, 4, (B,), generator=gen),
        "tags": torch.randint(0, 2, (B, 3), generator=gen).float(),
        "rating": torch.randn(B, generator=gen),
    }
    masks = {name: torch.rand(B, generator=gen) < 0.6 for name in labels}
    for mask in masks.values():
        mask[0] = True
    return outputs, Batch("interactions", labels=labels, masks=masks)


def _with_grad(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone().requires_grad_(True) for k, v in outputs.items()}


def test_plain_losses_are_masked_means() -> None:
    outputs, batch = _plain_batch(torch.Generator().manual_seed(0))
    losses = task_losses(outputs, batch, [CLICK, CATEGORY, TAGS, RATING])
    m = batch.masks
    expected = {
        "click": F.binary_cross_entropy_with_logits(outputs["click"][:, 0][m["click"]],
                                                    batch.labels["click"][m["click"]]),
        "category": F.cross_entropy(outputs["category"][m["category"]],
                                    batch.labels["category"][m["category"]]),
        "tags": F.binary_cross_entropy_with_logits(outputs["tags"][m["tags"]],
                                                   batch.labels["tags"][m["tags"]]),
        "rating": F.mse_loss(outputs["rating"][m["rating"]], batch.labels["rating"][m["rating"]]),
    }
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)


def test_masked_rows_affect_neither_loss_nor_gradient() -> None:
    outputs, batch = _plain_batch(torch.Generator().manual_seed(1))
    tasks = [CLICK, CATEGORY, TAGS, RATING]
    first = _with_grad(outputs)
    losses = task_losses(first, batch, tasks)
    torch.stack(list(losses.values())).sum().backward()

    # Garbage on masked rows: NaN labels, an out-of-range class, huge logits.
    garbage_labels = {k: v.clone() for k, v in batch.labels.items()}
    second = _with_grad(outputs)
    with torch.no_grad():
        for name, mask in batch.masks.items():
            if name == "category":
                garbage_labels[name][~mask] = 99
            else:
                garbage_labels[name][~mask] = math.nan
            second[name][~mask] = 1e4
    garbage = Batch("interactions", labels=garbage_labels, masks=batch.masks)
    losses2 = task_losses(second, garbage, tasks)
    torch.stack(list(losses2.values())).sum().backward()
    for name in losses:
        torch.testing.assert_close(losses2[name], losses[name])
        mask = batch.masks[name]
        grad1, grad2 = first[name].grad, second[name].grad
        assert grad1 is not None and grad2 is not None
        torch.testing.assert_close(grad2[mask], grad1[mask])
        assert torch.all(grad2[~mask] == 0)


def test_tasks_without_labelled_rows_or_logits_are_omitted() -> None:
    outputs, batch = _plain_batch(torch.Generator().manual_seed(2))
    batch.masks["rating"][:] = False
    del batch.labels["tags"]                                     # tags come from another source
    losses = task_losses({k: v for k, v in outputs.items() if k != "category"}, batch,
                         [CLICK, CATEGORY, TAGS, RATING])
    assert set(losses) == {"click"}
    assert task_losses({}, batch, [CLICK]) == {}


# ---------------------------------------------------------------- ESMM


def _funnel_batch(gen: torch.Generator, rows: int = 64) -> tuple[dict[str, Tensor], Batch]:
    click = (torch.rand(rows, generator=gen) < 0.5).float()
    like = (torch.rand(rows, generator=gen) < 0.5).float() * click
    buy = (torch.rand(rows, generator=gen) < 0.5).float() * like
    click_mask = torch.rand(rows, generator=gen) < 0.9           # some rows have no click label
    like_mask = click_mask & (click > 0)
    like_mask &= torch.rand(rows, generator=gen) < 0.9           # a few positives miss the child label
    buy_mask = like_mask & (like > 0)
    labels = {"click": click.clone(), "like": like.clone(), "buy": buy.clone()}
    labels["like"][~like_mask] = math.nan                         # the batch stores anything there
    labels["buy"][~buy_mask] = math.nan
    masks = {"click": click_mask, "like": like_mask, "buy": buy_mask}
    outputs = {name: torch.randn(rows, 1, generator=gen) * 2 for name in labels}
    return outputs, Batch("interactions", labels=labels, masks=masks)


def _naive_joint_bce(probs: Tensor, target: Tensor, rows: Tensor) -> Tensor:
    return F.binary_cross_entropy(probs[rows], target[rows])


def test_esmm_loss_equals_probability_space_computation() -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(3))
    first = _with_grad(outputs)
    losses = task_losses(first, batch, [CLICK, LIKE], entire_space=True)
    p = {k: torch.sigmoid(v[:, 0]) for k, v in outputs.items()}
    click, like = batch.labels["click"], torch.nan_to_num(batch.labels["like"])
    # Space: rows with a click label, minus clicked rows whose like label is missing.
    rows = batch.masks["click"] & ((click == 0) | batch.masks["like"])
    expected = _naive_joint_bce(p["click"] * p["like"], click * like, rows)
    torch.testing.assert_close(losses["like"], expected)
    torch.testing.assert_close(losses["click"], F.binary_cross_entropy(p["click"][batch.masks["click"]],
                                                                       click[batch.masks["click"]]))
    # The gradient also matches, and reaches the parent's logits through the joint probability.
    second = _with_grad(outputs)
    naive = _naive_joint_bce(torch.sigmoid(second["click"][:, 0]) * torch.sigmoid(second["like"][:, 0]),
                             click * like, rows)
    naive.backward()
    losses["like"].backward()
    for name in ("click", "like"):
        grad1, grad2 = first[name].grad, second[name].grad
        assert grad1 is not None and grad2 is not None
        torch.testing.assert_close(grad1, grad2)


def test_esmm_chain_of_three_levels() -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(4))
    losses = task_losses(outputs, batch, [CLICK, LIKE, BUY])
    p = {k: torch.sigmoid(v[:, 0]) for k, v in outputs.items()}
    click = batch.labels["click"]
    like = torch.nan_to_num(batch.labels["like"])
    buy = torch.nan_to_num(batch.labels["buy"])
    m = batch.masks
    rows = m["click"] & ((click == 0) | m["like"]) & ((click * like == 0) | m["buy"])
    expected = _naive_joint_bce(p["click"] * p["like"] * p["buy"], click * like * buy, rows)
    torch.testing.assert_close(losses["buy"], expected)


def test_esmm_chain_stops_where_an_ancestor_is_absent() -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(5))
    del outputs["click"]
    losses = task_losses(outputs, batch, [CLICK, LIKE, BUY])
    p = {k: torch.sigmoid(v[:, 0]) for k, v in outputs.items()}
    like, buy = torch.nan_to_num(batch.labels["like"]), torch.nan_to_num(batch.labels["buy"])
    m = batch.masks
    rows = m["like"] & ((like == 0) | m["buy"])
    torch.testing.assert_close(losses["buy"], _naive_joint_bce(p["like"] * p["buy"], like * buy, rows))
    assert "click" not in losses


def test_conditional_task_without_entire_space_is_plain_masked_bce() -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(6))
    losses = task_losses(outputs, batch, [CLICK, LIKE], entire_space=False)
    m = batch.masks["like"]
    torch.testing.assert_close(losses["like"], F.binary_cross_entropy_with_logits(
        outputs["like"][:, 0][m], batch.labels["like"][m]))


def test_esmm_child_has_a_loss_even_without_a_positive_parent() -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(7))
    batch.labels["click"][:] = 0.0
    batch.masks["like"][:] = False
    assert set(task_losses(outputs, batch, [CLICK, LIKE])) == {"click", "like"}
    assert set(task_losses(outputs, batch, [CLICK, LIKE], entire_space=False)) == {"click"}


@pytest.mark.parametrize("scale", [30.0, 1e3])
def test_esmm_is_finite_for_saturated_logits(scale: float) -> None:
    outputs, batch = _funnel_batch(torch.Generator().manual_seed(8))
    big = {k: (torch.sign(v) * scale).requires_grad_(True) for k, v in outputs.items()}
    losses = task_losses(big, batch, [CLICK, LIKE, BUY])
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    assert torch.isfinite(total)
    for tensor in big.values():
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


# ---------------------------------------------------------------------------------------------
# Retrieval: in-batch sampled softmax with log-Q correction

RETRIEVAL = TaskSpec("retrieval", "retrieval", "retrieval", 4, temperature=0.05)


def _retrieval(logits: list[list[float]], q: list[float], positive: list[bool],
               items: list[int] | None = None) -> tuple[dict[str, Tensor], Batch]:
    n = len(q)
    batch = Batch("interactions", item={"item_key": torch.tensor(items if items is not None else list(range(n)))},
                  labels={"retrieval": torch.log(torch.tensor(q))}, masks={"retrieval": torch.tensor(positive)})
    return {"retrieval": torch.tensor(logits, requires_grad=True)}, batch


def _softmax_nll(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(x) for x in row))


def test_retrieval_loss_subtracts_log_q_from_every_logit() -> None:
    s = [[2.0, 1.0, 0.0], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]
    q = [0.5, 0.25, 0.25]
    outputs, batch = _retrieval(s, q, [True, True, True])
    loss = task_losses(outputs, batch, [RETRIEVAL])["retrieval"]
    corrected = [[s[i][j] - math.log(q[j]) for j in range(3)] for i in range(3)]
    expected = sum(_softmax_nll(corrected[i], i) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # With uniform q the correction is a constant per row: plain in-batch softmax.
    outputs, batch = _retrieval(s, [1 / 3] * 3, [True, True, True])
    plain = F.cross_entropy(torch.tensor(s), torch.arange(3))
    assert task_losses(outputs, batch, [RETRIEVAL])["retrieval"].item() == pytest.approx(plain.item(), rel=1e-6)


def test_retrieval_loss_ignores_rows_that_are_not_positive() -> None:
    """A non-positive row neither has a loss nor lends its item as a negative."""
    s = [[2.0, 9.0, 0.0], [5.0, -3.0, 7.0], [1.0, 8.0, 1.0]]
    q = [0.5, 0.25, 0.25]
    outputs, batch = _retrieval(s, q, [True, False, True])
    loss = task_losses(outputs, batch, [RETRIEVAL])["retrieval"]
    corrected = [[s[i][j] - math.log(q[j]) for j in (0, 2)] for i in (0, 2)]
    expected = (_softmax_nll(corrected[0], 0) + _softmax_nll(corrected[1], 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad = outputs["retrieval"].grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[1] == 0).all() and (grad[:, 1] == 0).all()


def test_retrieval_loss_does_not_count_a_duplicate_positive_as_a_negative() -> None:
    s = [[2.0, 1.0, 3.0], [0.0, 1.0, 0.5], [4.0, 1.0, 1.0]]
    q = [0.4, 0.2, 0.4]
    outputs, batch = _retrieval(s, q, [True, True, True], items=[7, 3, 7])
    loss = task_losses(outputs, batch, [RETRIEVAL])["retrieval"]
    c = [[s[i][j] - math.log(q[j]) for j in range(3)] for i in range(3)]
    expected = (_softmax_nll([c[0][0], c[0][1]], 0) + _softmax_nll(c[1], 1)
                + _softmax_nll([c[2][1], c[2][2]], 1)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_retrieval_loss_with_one_or_no_positive_rows() -> None:
    outputs, batch = _retrieval([[1.0, 2.0], [3.0, 4.0]], [0.5, 0.5], [False, True])
    loss = task_losses(outputs, batch, [RETRIEVAL])["retrieval"]
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # only its own item: nothing to tell apart
    outputs, batch = _retrieval([[1.0, 2.0], [3.0, 4.0]], [0.5, 0.5], [False, False])
    assert task_losses(outputs, batch, [RETRIEVAL]) == {}


def test_retrieval_loss_needs_square_logits() -> None:
    outputs, batch = _retrieval([[1.0, 2.0], [3.0, 4.0]], [0.5, 0.5], [True, True])
    with pytest.raises(ValueError, match=r"in-batch logits \[B, B\]"):
        task_losses({"retrieval": torch.zeros(2, 3)}, batch, [RETRIEVAL])
