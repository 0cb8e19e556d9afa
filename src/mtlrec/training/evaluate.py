"""Evaluation: predictions over a whole split, then every task's metrics (never averaged per batch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mtlrec.data.batch import Batch
from mtlrec.data.dataset import EncodedData
from mtlrec.data.spec import SOURCE_OF_KIND, InputSpec, TaskSpec
from mtlrec.metrics import PRIMARY_METRIC, higher_is_better, task_metrics
from mtlrec.models.model import RecModel
from mtlrec.outputs import to_probabilities

if TYPE_CHECKING:
    from mtlrec.data.stream import InteractionStream

RETRIEVAL_KS = (10, 100)
"""Cut-offs of the retrieval task's recall@K (`PRIMARY_METRIC['retrieval']` is one of them)."""


@dataclass
class TaskPredictions:
    """One task's outputs over a split, with its labels and mask (numpy, row-aligned)."""

    task: TaskSpec
    outputs: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    groups: np.ndarray | None


def sources_with_tasks(spec: InputSpec) -> list[str]:
    """The sources that carry labels, in a fixed order (interactions first)."""
    order = ["interactions", "users", "items", "item_pairs"]
    used = {SOURCE_OF_KIND[t.kind] for t in spec.tasks}
    return [s for s in order if s in used]


@torch.no_grad()
def predict_batches(model: nn.Module, spec: InputSpec, batches: Iterable[Batch],
                    device: torch.device) -> dict[str, TaskPredictions]:
    """Run the model over batches of one source and collect each task's probabilities."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    groups: list[np.ndarray] = []
    for batch in batches:
        if "user_key" in batch.user:
            groups.append(batch.user["user_key"].numpy())
        batch = batch.to(device)
        logits = model(batch)
        for name, value in logits.items():
            task = spec.task(name)
            chunks.setdefault(name, []).append(to_probabilities(task, value).float().cpu().numpy())
            labels.setdefault(name, []).append(batch.labels[name].cpu().numpy())
            masks.setdefault(name, []).append(batch.masks[name].cpu().numpy())
    model.train(was_training)
    return {name: TaskPredictions(spec.task(name), np.concatenate(chunks[name]), np.concatenate(labels[name]),
                                  np.concatenate(masks[name]), np.concatenate(groups) if groups else None)
            for name in chunks}


def predict_split(model: nn.Module, data: EncodedData, spec: InputSpec, rows: Mapping[str, np.ndarray],
                  batch_size: int, device: torch.device) -> dict[str, TaskPredictions]:
    """Run the model over the given rows of every source and collect each task's probabilities."""
    result: dict[str, TaskPredictions] = {}
    for source, source_rows in rows.items():
        if len(source_rows) == 0:
            continue
        result.update(predict_batches(model, spec, data.iter_batches(source, source_rows, batch_size), device))
    return result


def metrics_of(predictions: Mapping[str, TaskPredictions]) -> dict[str, dict[str, float]]:
    """Every task's metrics on its labelled rows."""
    out: dict[str, dict[str, float]] = {}
    for name, pred in predictions.items():
        keep = pred.mask.astype(bool)
        if not keep.any():
            continue
        groups = pred.groups[keep] if pred.groups is not None else None
        out[name] = task_metrics(pred.task.type, pred.labels[keep], pred.outputs[keep], groups)
    return out


def evaluate(model: RecModel, data: EncodedData, spec: InputSpec, rows: Mapping[str, np.ndarray],
             batch_size: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Metrics of every task on the given rows of each source."""
    metrics = metrics_of(predict_split(model, data, spec, rows, batch_size, device))
    metrics.update(retrieval_metrics(model, data, spec, rows.get("interactions"), batch_size, device))
    return metrics


@torch.no_grad()
def retrieval_metrics(model: RecModel, data: EncodedData, spec: InputSpec, rows: np.ndarray | None,
                      batch_size: int, device: torch.device, max_rows: int = 2000) -> dict[str, dict[str, float]]:
    """Recall@K (K in `RETRIEVAL_KS`) and MRR of the retrieval task over the whole catalogue.

    For each positive interaction among `rows` (the first `max_rows`), its item is ranked among
    every item entity by the retrieval score u_r . v_r of its user; an item scoring the same as
    the positive counts as ahead of it. The user's training items stay in the catalogue, so on
    held-out rows this is a lower bound of the recall that excluding seen items gives.

    Returns:
        {task name: {'recall@10', 'recall@100', 'mrr'}}, or {} without a retrieval task or
        positive rows.
    """
    tasks = spec.tasks_of("retrieval")
    if not tasks or rows is None or len(rows) == 0 or data.items is None:
        return {}
    task = tasks[0]
    positive = data.sources["interactions"].masks[task.name].numpy()
    chosen = np.asarray(rows, dtype=np.int64)
    chosen = chosen[positive[chosen]][:max_rows]
    if chosen.size == 0:
        return {}
    was_training = model.training
    model.eval()
    items = []
    for start in range(0, data.items.num_rows, batch_size):
        keys = np.arange(start, min(start + batch_size, data.items.num_rows))
        group = {k: v.to(device) for k, v in data.entity_group("item", keys).items()}
        items.append(model.retrieval_items(group))
    catalogue = torch.cat(items)  # [I, d_r]
    ranks = []
    for batch in data.iter_batches("interactions", chosen, min(batch_size, 256)):
        batch = batch.to(device)
        users = model.retrieval_users(batch.user)  # [Q, d_r]
        own = batch.item["item_key"]  # [Q]
        target = (users * catalogue.index_select(0, own)).sum(dim=1, keepdim=True)  # [Q, 1]
        ahead = torch.zeros(len(users), dtype=torch.int64, device=device)
        for start in range(0, len(catalogue), 16384):
            scores = users @ catalogue[start:start + 16384].T  # [Q, C]
            inside = (own >= start) & (own < start + scores.shape[1])
            # The positive is not ahead of itself (whatever the rounding of the two products).
            scores[inside, (own - start)[inside]] = -torch.inf
            ahead += (scores >= target).sum(dim=1)
        ranks.append(ahead.cpu())
    model.train(was_training)
    rank = torch.cat(ranks).numpy()
    out = {f"recall@{k}": float(np.mean(rank < k)) for k in RETRIEVAL_KS}
    out["mrr"] = float(np.mean(1.0 / (rank + 1.0)))
    return {task.name: out}


def stream_retrieval_metrics(model: RecModel, stream: InteractionStream, spec: InputSpec, part: str,
                             batch_size: int, device: torch.device,
                             max_rows: int = 2000) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` of streamed interactions (`data.stream`): over the first `max_rows`
    positive rows of `part` in file order, read row group by row group."""
    tasks = spec.tasks_of("retrieval")
    if not tasks:
        return {}
    data = stream.positives(part, tasks[0].name, max_rows)
    rows = np.arange(data.num_rows("interactions"))
    return retrieval_metrics(model, data, spec, rows, batch_size, device, max_rows)


def selection_score(metrics: Mapping[str, Mapping[str, float]], spec: InputSpec, metric: str) -> float:
    """The number early stopping maximises.

    `auto`: the mean over tasks of each task's primary metric, negated where lower is better.
    `<task>.<metric>`: that one value, oriented the same way.
    """
    if metric != "auto":
        task_name, _, name = metric.partition(".")
        value = metrics[task_name][name]
        return value if higher_is_better(name) else -value
    values = []
    for task in spec.tasks:
        if task.name not in metrics:
            continue
        name = PRIMARY_METRIC[task.type]
        value = metrics[task.name].get(name, float("nan"))
        if np.isfinite(value):
            values.append(value if higher_is_better(name) else -value)
    return float(np.mean(values)) if values else float("nan")
