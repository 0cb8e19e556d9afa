"""What a run learned beyond its metrics, recorded while it trains, as plain data in diagnostics.json.

Cheap enough to stay on by default (the trainer calls the hooks of `Diagnostics`):

- **task weights** of the weighting strategy (and the unweighted task losses), every `every` steps;
- **gradient conflict**: cosine similarity of the tasks' gradients on the model's shared parameters,
  every `every` steps, over all of them and per top-level module (embedding, encoders, backbone).
  A negative cosine means two tasks pull the shared parameters in opposite directions (the
  conflict PCGrad projects away: Yu et al., NeurIPS 2020). Skipped when nothing is shared;
- **expert utilisation**: mean gate weight per task x expert over each epoch (MMoE, OMoE, PLE);
- **calibration** on the test split at the end: reliability bins and expected calibration error
  (equal-width bins; Guo et al., ICML 2017) of binary tasks, of multilabel tasks (every label's
  probability pooled) and of multiclass tasks (top-label confidence).

Per-task train loss and validation metrics per epoch are in log.jsonl already; the report reads both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mtlrec.training.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from mtlrec.models.model import RecModel
    from mtlrec.training.evaluate import TaskPredictions

__all__ = ["DIAGNOSTICS_FILE", "Diagnostics", "gradient_conflict", "load_diagnostics", "reliability"]

DIAGNOSTICS_FILE = "diagnostics.json"
VERSION = 1


# ---------------------------------------------------------------------- gradient conflict


def _flat_index(indices: Tensor, shape: Sequence[int]) -> Tensor:
    """Row-major linear index [nnz] of sparse indices [sparse_dim, nnz] into `shape`."""
    linear = torch.zeros(indices.shape[1], dtype=torch.long, device=indices.device)
    for d, size in enumerate(shape):
        linear = linear * int(size) + indices[d]
    return linear


def _stack_sparse(grads: Sequence[Tensor]) -> Tensor:
    """Gradients of one parameter, some sparse (embedding rows), as rows [n, U * dense] over the
    union of the U touched entries: the dot products of the full gradients, without densifying."""
    coalesced = [g.coalesce() if g.is_sparse else _compact_rows(g) for g in grads]
    sparse_dim = coalesced[0].sparse_dim()
    shape = coalesced[0].shape[:sparse_dim]
    linear = [_flat_index(g.indices(), shape) for g in coalesced]
    union, inverse = torch.unique(torch.cat(linear), return_inverse=True)
    values = coalesced[0].values()
    rows = torch.zeros(len(grads), len(union), *values.shape[1:], dtype=values.dtype, device=values.device)
    start = 0
    for i, (g, ids) in enumerate(zip(coalesced, linear, strict=True)):
        rows[i].index_add_(0, inverse[start:start + len(ids)], g.values())
        start += len(ids)
    return rows.reshape(len(grads), -1)


COMPACT_ROWS = 4096
"""Dense gradients of tables with at least this many rows (embeddings) are kept as their non-zero
rows only, so K tasks' gradients of a large table do not take K times its memory."""


def _compact_rows(grad: Tensor) -> Tensor:
    """A dense gradient [N, ...] as a coalesced sparse tensor of its non-zero rows."""
    rows = (grad != 0).reshape(grad.shape[0], -1).any(dim=1).nonzero().squeeze(1)  # [R], sorted and unique
    return torch.sparse_coo_tensor(rows.unsqueeze(0), grad.index_select(0, rows), grad.shape,
                                   is_coalesced=True, check_invariants=False)


def _compact(grad: Tensor | None) -> Tensor | None:
    if grad is None or grad.is_sparse or grad.dim() != 2 or grad.shape[0] < COMPACT_ROWS:
        return grad
    # By hand: Tensor.to_sparse(sparse_dim=1) runs a per-row unique (~0.6 s on a 300k-row table).
    return _compact_rows(grad)


def _gram(grads: Sequence[Tensor | None], n: int, device: torch.device) -> Tensor:
    """[n, n] dot products (float64) of n gradients of one parameter; None counts as zero."""
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return gram
    used = [g for g in grads if g is not None]
    sparse = any(g.is_sparse for g in used)
    rows = _stack_sparse(used) if sparse else torch.stack([g.reshape(-1) for g in used])   # [m, P]
    sub = (rows @ rows.T).to(torch.float64)                           # [m, m]
    index = torch.tensor(present, device=device)
    gram[index[:, None], index[None, :]] = sub
    return gram


def _cosine(gram: Tensor) -> list[list[float | None]]:
    """Cosine matrix of a Gram matrix; None where a task has no gradient there."""
    norm = gram.diagonal().clamp_min(0.0).sqrt()
    cos = gram / (norm[:, None] * norm[None, :])
    return [[round(float(v), 6) if math.isfinite(v) else None for v in row] for row in cos.tolist()]


def gradient_conflict(losses: Mapping[str, Tensor], params: Sequence[nn.Parameter],
                      groups: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Cosine similarity of the tasks' gradients on `params`, overall and per group of parameters.

    The gradients are taken with `torch.autograd.grad(..., retain_graph=True)`, so the caller can
    still back-propagate the losses afterwards; `.grad` of the parameters is left untouched.

    Args:
        losses: scalar loss per task (tasks from different batches and sources may share parameters).
        params: the shared parameters.
        groups: a group name per parameter (e.g. the module it belongs to), or None for none.

    Returns:
        {"tasks": [K names], "cosine": [K, K], "norm": [K], "groups": {group: [K, K]}} with None
        where a task has no gradient on those parameters, or None when no task has a gradient.
    """
    if groups is not None and len(groups) != len(params):
        raise ValueError(f"gradient_conflict got {len(groups)} group names for {len(params)} parameters")
    keep = [i for i, p in enumerate(params) if p.requires_grad]
    trainable = [params[i] for i in keep]
    names = [n for n, loss in losses.items() if loss.requires_grad]
    if not trainable or not names:
        return None
    per_task = [tuple(_compact(g) for g in torch.autograd.grad(losses[n], trainable, retain_graph=True,
                                                               allow_unused=True)) for n in names]
    device = trainable[0].device
    group_of = [groups[i] for i in keep] if groups is not None else ["all"] * len(trainable)
    grams: dict[str, Tensor] = {}
    for j, group in enumerate(group_of):
        gram = _gram([grads[j] for grads in per_task], len(names), device)
        grams[group] = grams[group] + gram if group in grams else gram
    total = torch.stack(list(grams.values())).sum(dim=0)
    norm = total.diagonal().clamp_min(0.0).sqrt().tolist()
    if not any(v > 0.0 for v in norm):
        return None
    return {"tasks": names, "cosine": _cosine(total), "norm": [round(v, 8) for v in norm],
            "groups": {g: _cosine(m) for g, m in grams.items()} if groups is not None else {}}


# ---------------------------------------------------------------------- calibration


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability curve and expected calibration error of probabilities of binary outcomes.

    Equal-width bins over [0, 1]; ECE = sum_b (n_b / N) |frequency_b - confidence_b|.

    Args:
        probabilities: [N] predicted P(outcome).
        labels: [N] observed outcomes (0/1).
        bins: number of bins.

    Returns:
        {"edges": [bins + 1], "count": [bins], "confidence": [bins] (mean probability),
        "frequency": [bins] (observed rate), None in empty bins, "ece", "n"}.
    """
    if bins < 1:
        raise ValueError(f"reliability needs bins >= 1; got {bins}")
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"reliability got {p.shape[0]} probabilities and {y.shape[0]} labels")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1) if p.size else p.astype(int)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(which, weights=p, minlength=bins)
    freq_sum = np.bincount(which, weights=y, minlength=bins)
    filled = count > 0
    confidence = np.where(filled, conf_sum / np.maximum(count, 1.0), np.nan)
    frequency = np.where(filled, freq_sum / np.maximum(count, 1.0), np.nan)
    n = int(p.size)
    ece = float(np.sum(count[filled] * np.abs(frequency[filled] - confidence[filled])) / n) if n else math.nan
    return {"edges": [round(float(e), 6) for e in edges], "count": [int(c) for c in count],
            "confidence": _floats(confidence), "frequency": _floats(frequency),
            "ece": round(ece, 6) if math.isfinite(ece) else None, "n": n}


def _number(value: float | Tensor) -> float | None:
    """A finite float, or None (a diverged loss must not stop the run when the file is written)."""
    v = float(value)
    return v if math.isfinite(v) else None


def _floats(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 6) if math.isfinite(v) else None for v in values]


def task_calibration(pred: TaskPredictions, bins: int = 10) -> dict[str, Any] | None:
    """Reliability of one task's test predictions on its labelled rows; None for regression."""
    task_type = pred.task.type
    keep = np.all(np.asarray(pred.mask, dtype=bool).reshape(len(pred.mask), -1), axis=1)   # [N]
    if not keep.any():
        return None
    outputs, labels = pred.outputs[keep], pred.labels[keep]
    if task_type == "binary":
        probs, hits, kind = outputs.reshape(-1), labels.reshape(-1), "binary"
    elif task_type == "multilabel":
        probs, hits, kind = outputs.reshape(-1), labels.reshape(outputs.shape).reshape(-1), "every label"
    elif task_type == "multiclass":
        scores = outputs.reshape(len(outputs), -1)                       # [N, C]
        probs = scores.max(axis=1)
        hits = scores.argmax(axis=1) == labels.reshape(-1).astype(np.int64)
        kind = "top label"
    else:
        return None
    return {"type": task_type, "kind": kind, **reliability(probs, hits.astype(np.float64), bins)}


# ---------------------------------------------------------------------- the recorder


class Diagnostics:
    """Records diagnostics during one `Trainer.fit` and writes them to RUN/diagnostics.json.

    The trainer calls `before_backward` and `on_step` from each training step, `on_epoch_end`
    after each epoch (which writes the file, so an interrupted run keeps what it had) and
    `on_fit_end` with the test split's predictions. Nothing here changes training: gradients are
    taken with `torch.autograd.grad` (not into `.grad`) and gate weights are read, detached.

    Args:
        run_dir: the run directory.
        every: sample task weights, losses and gradient conflict every `every` steps (from step 0);
            0 turns every diagnostic off (no file is written).
        bins: bins of the reliability curves.
    """

    def __init__(self, run_dir: Path, every: int = 50, bins: int = 10) -> None:
        if every < 0:
            raise ValueError(f"Diagnostics every must be >= 0 (0 = off); got {every}")
        self.run_dir = Path(run_dir)
        self.every = int(every)
        self.bins = int(bins)
        self.samples: list[dict[str, Any]] = []
        self.conflict: list[dict[str, Any]] = []
        self.experts: list[dict[str, Any]] = []
        self.calibration: dict[str, Any] = {}
        self._gate_sum: dict[str, Tensor] = {}
        self._gate_steps: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def path(self) -> Path:
        return self.run_dir / DIAGNOSTICS_FILE

    def _sampled(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    # -- hooks -----------------------------------------------------------------------------------

    def restore(self, epoch: int, step: int) -> None:
        """On resume: keep what the file holds from before the checkpoint (epoch, step)."""
        if not self.enabled or not self.path.is_file():
            return
        saved = load_diagnostics(self.path.parent) or {}
        self.samples = [s for s in saved.get("samples", []) if s["step"] < step]
        self.conflict = [s for s in saved.get("conflict", []) if s["step"] < step]
        self.experts = [e for e in saved.get("experts", []) if e["epoch"] <= epoch]

    def before_backward(self, step: int, losses: Mapping[str, Tensor], model: RecModel) -> None:
        """On sampled steps, the gradient conflict of the step's losses (their graph is kept)."""
        if not self._sampled(step):
            return
        params = model.shared_parameters()
        if not params:
            return
        result = gradient_conflict(losses, params, self._group_names(model, params))
        if result is not None:
            self.conflict.append({"step": step, **result})

    def on_step(self, step: int, losses: Mapping[str, Tensor], weights: Mapping[str, float],
                model: RecModel) -> None:
        """Every step: accumulate the gates; on sampled steps, record task weights and losses."""
        if not self.enabled:
            return
        for task, gate in model.gate_weights.items():                   # [B, E], detached
            mean = gate.float().mean(dim=0)                              # [E]; stays on the device
            self._gate_sum[task] = self._gate_sum[task] + mean if task in self._gate_sum else mean
            self._gate_steps[task] = self._gate_steps.get(task, 0) + 1
        if self._sampled(step):
            self.samples.append({"step": step,
                                 "weights": {t: _number(w) for t, w in weights.items()},
                                 "losses": {t: _number(loss.detach()) for t, loss in losses.items()}})

    def on_epoch_end(self, epoch: int, step: int) -> None:
        """Close the epoch's expert utilisation (1-based `epoch`, steps so far) and write the file."""
        if not self.enabled:
            return
        if self._gate_sum:
            gates = {t: [round(float(v), 6) for v in (s / self._gate_steps[t]).tolist()]
                     for t, s in self._gate_sum.items()}
            self.experts = [e for e in self.experts if e["epoch"] != epoch]
            self.experts.append({"epoch": epoch, "step": step, "gates": gates})
        self._gate_sum, self._gate_steps = {}, {}
        self.write()

    def on_fit_end(self, predictions: Mapping[str, TaskPredictions]) -> None:
        """Calibration of every classification task on the test predictions; write the file."""
        if not self.enabled:
            return
        self.calibration = {}
        for name, pred in predictions.items():
            result = task_calibration(pred, self.bins)
            if result is not None:
                self.calibration[name] = result
        self.write()

    # -- output ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "every": self.every, "samples": self.samples, "conflict": self.conflict,
                "experts": self.experts, "calibration": self.calibration}

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.to_dict(), allow_nan=False))

    @staticmethod
    def _group_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
        """The top-level module of each parameter (`embedding`, `user_encoder`, `backbone`, ...)."""
        owner = {id(p): name.split(".", 1)[0] for name, p in model.named_parameters()}
        return [owner.get(id(p), "other") for p in params]


def load_diagnostics(run_dir: Path) -> dict[str, Any] | None:
    """The diagnostics.json of a run directory, or None when it has none."""
    path = Path(run_dir) / DIAGNOSTICS_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
