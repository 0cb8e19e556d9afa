"""Masked per-task losses, including the entire-space loss of conditional tasks (ESMM).

Every loss is a mean over the rows whose label exists (`batch.masks[task]`). Masked rows are
removed with `torch.where` on the per-row loss, with their labels replaced by a harmless value
first, so that a NaN or out-of-range placeholder label can neither reach the loss nor its gradient,
and no boolean indexing forces a device synchronisation per task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlrec.data.batch import Batch
from mtlrec.data.spec import TaskSpec

__all__ = ["task_losses"]

_LOG_P_MAX = -1e-7
"""log p of a joint probability is clamped below 0, i.e. p <= 1 - 1e-7, so that log(1 - p) and its
gradient stay finite when every logit of a chain saturates (as BCE on probabilities clamps its log)."""


def _row_mask(batch: Batch, name: str, rows: int, device: torch.device) -> Tensor:
    mask = batch.masks.get(name)
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=device)
    return mask.reshape(rows).to(torch.bool)


def _per_row_loss(task: TaskSpec, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Loss of each row [B] by task type; rows outside `mask` get a finite placeholder value."""
    rows = mask.shape[0]
    if task.type == "multiclass":
        target = torch.where(mask, labels.reshape(rows).long(), 0)
        return F.cross_entropy(logits.reshape(rows, -1), target, reduction="none")
    if task.type == "multilabel":
        scores = logits.reshape(rows, -1)                                     # [B, L]
        target = torch.where(mask[:, None], labels.reshape(scores.shape).to(scores.dtype), 0.0)
        return F.binary_cross_entropy_with_logits(scores, target, reduction="none").mean(dim=1)
    scores = logits.reshape(rows)                                             # [B]
    target = torch.where(mask, labels.reshape(rows).to(scores.dtype), 0.0)
    if task.type == "binary":
        return F.binary_cross_entropy_with_logits(scores, target, reduction="none")
    if task.type == "regression":
        return (scores - target).square()
    raise ValueError(f"task '{task.name}' has type '{task.type}'; expected binary, multiclass, "
                     "multilabel or regression")


def _retrieval_loss(task: TaskSpec, logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Per-row in-batch sampled softmax with log-Q correction. Yi et al., RecSys 2019.

    `logits` [B, B] holds s(u_i, v_j) / temperature; the task's labels hold log q_j, the log
    probability that a positive row drawn at random is of row j's item, and its mask marks the
    positive rows. Row i's target is column i among the corrected logits s_ij / T - log q_j. The
    negatives of row i are the items of the batch's other positive rows: a column outside the mask
    (an item nobody chose) is no sampled negative, and a column holding row i's own item (the same
    item twice in the batch, by `item_key`, else `item_id`) is no negative of row i either.

    Returns:
        (per-row loss [B], mask [B] of the positive rows)
    """
    rows = logits.shape[0]
    if logits.dim() != 2 or logits.shape[1] != rows:
        raise ValueError(f"retrieval task '{task.name}' expects in-batch logits [B, B], got {tuple(logits.shape)}")
    positive = _row_mask(batch, task.name, rows, logits.device)
    log_q = torch.where(positive, batch.labels[task.name].reshape(rows).to(logits.dtype), 0.0)  # [B]
    keep = positive[None, :].expand(rows, rows)  # [B, B] columns that are sampled items
    items = batch.item.get("item_key", batch.item.get("item_id"))
    if items is not None:
        same = items.reshape(rows, 1) == items.reshape(1, rows)  # [B, B]
        keep = keep & ~(same & ~torch.eye(rows, dtype=torch.bool, device=logits.device))
    # A finite fill (not -inf) keeps rows without any kept column (non-positive rows) finite.
    corrected = (logits - log_q[None, :]).masked_fill(~keep, torch.finfo(logits.dtype).min)  # [B, B]
    loss = torch.logsumexp(corrected, dim=1) - corrected.diagonal()  # [B]
    return loss, positive


def _chain(task: TaskSpec, by_name: Mapping[str, TaskSpec], outputs: Mapping[str, Tensor],
           batch: Batch) -> list[TaskSpec]:
    """The task and its ancestors, child first, as far up as logits and labels are available."""
    chain = [task]
    seen = {task.name}
    parent = task.parent
    while (parent is not None and parent in by_name and by_name[parent].type == "binary"
           and parent in outputs and parent in batch.labels):
        if parent in seen:
            raise ValueError(f"task '{task.name}' has a cycle of parents through '{parent}'")
        seen.add(parent)
        chain.append(by_name[parent])
        parent = by_name[parent].parent
    return chain


def _entire_space_loss(chain: list[TaskSpec], outputs: Mapping[str, Tensor], batch: Batch,
                       rows: int) -> tuple[Tensor, Tensor]:
    """Per-row BCE of p(root and ... and child) = prod of sigmoids against the joint label.

    The space is every row where the root's label exists. Walking down from the root, the joint
    label is 0 once an ancestor is negative (the child's label counts as 0 there, whatever the
    batch stores), and unknown (row dropped) where an ancestor is positive but the next label is
    missing. ESMM: Ma et al., SIGIR 2018.

    Returns:
        (per-row loss [B], mask [B] of the rows it is defined on)
    """
    device = outputs[chain[0].name].device
    root = chain[-1]
    valid = _row_mask(batch, root.name, rows, device)
    joint = valid & (batch.labels[root.name].reshape(rows) > 0.5)
    for task in reversed(chain[:-1]):
        mask = _row_mask(batch, task.name, rows, device)
        valid = valid & (~joint | mask)
        joint = joint & mask & (batch.labels[task.name].reshape(rows) > 0.5)
    log_sig = torch.stack([F.logsigmoid(outputs[t.name].reshape(rows)) for t in chain])  # [depth, B]
    log_p = log_sig.sum(dim=0).clamp(max=_LOG_P_MAX)                       # [B] log of the joint p
    log_not_p = torch.log(-torch.expm1(log_p))                              # log(1 - p), stable near p = 1
    target = joint.to(log_p.dtype)
    loss = -(target * log_p + (1.0 - target) * log_not_p)
    return loss, valid


def task_losses(outputs: Mapping[str, Tensor], batch: Batch, tasks: Sequence[TaskSpec],
                entire_space: bool = True,
                denominators: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """Masked mean loss of every task that has logits and at least one labelled row in the batch.

    Losses follow the type: BCE-with-logits (binary), cross-entropy (multiclass, int64 labels),
    BCE-with-logits averaged over the L outputs (multilabel), squared error (regression), in-batch
    sampled softmax with log-Q correction (retrieval; see `_retrieval_loss`).

    A binary task with a `parent` is learnt over the entire space when `entire_space` is True and
    its parent's logits and labels are present: the loss is BCE of p(parent and child) =
    sigmoid(parent) * sigmoid(child) (a product over the whole chain for several levels) against
    parent_label * child_label, over the rows where the root's label exists, computed in log space.
    Otherwise the child's loss is plain BCE on its own mask (rows where the parent is positive).

    Args:
        outputs: logits per task: [B] or [B, 1] (binary, regression), [B, C] (multiclass),
            [B, L] (multilabel), [B, B] in-batch logits (retrieval).
        batch: labels and masks of the source the outputs were computed on.
        tasks: specs of the tasks (tasks absent from `outputs` or `batch.labels` are ignored).
        entire_space: learn conditional tasks over the entire space (ESMM).
        denominators: maps the labelled-row counts of the tasks [T] (float) to what their summed
            losses are divided by; None divides by the counts. Data-parallel training passes the
            mean count over the replicas, so that averaging the replicas' gradients (what DDP does)
            gives the gradient of the loss over the global batch even where masks split unevenly.

    Returns:
        Scalar loss per task. A task with no labelled row in this batch is omitted, not zero, so
        that weighting strategies and epoch means see only real measurements.
    """
    by_name = {t.name: t for t in tasks}
    per_row: dict[str, tuple[Tensor, Tensor]] = {}
    for task in tasks:
        if task.name not in outputs or task.name not in batch.labels:
            continue
        logits = outputs[task.name]
        rows = int(logits.shape[0])
        chain = _chain(task, by_name, outputs, batch) if entire_space and task.type == "binary" else [task]
        if task.type == "retrieval":
            per_row[task.name] = _retrieval_loss(task, logits, batch)
        elif len(chain) > 1:
            per_row[task.name] = _entire_space_loss(chain, outputs, batch, rows)
        else:
            mask = _row_mask(batch, task.name, rows, logits.device)
            per_row[task.name] = (_per_row_loss(task, logits, batch.labels[task.name], mask), mask)
    if not per_row:
        return {}
    # One host synchronisation for all tasks' labelled-row counts, not one per task.
    counts = torch.stack([mask.sum() for _, mask in per_row.values()])
    if denominators is not None:
        counts = denominators(counts.to(torch.float64))
    losses: dict[str, Tensor] = {}
    for (name, (loss, mask)), count in zip(per_row.items(), counts.tolist(), strict=True):
        if count > 0:
            losses[name] = torch.where(mask, loss, 0.0).sum() / count
    return losses
