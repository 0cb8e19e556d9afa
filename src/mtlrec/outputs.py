"""From logits to what a person asks for: probabilities, classes and predictions."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlrec.data.spec import TaskSpec


def to_probabilities(task: TaskSpec, logits: Tensor) -> Tensor:
    """Probabilities of a task's logits (regression: the prediction itself).

    Args:
        task: the task the logits belong to.
        logits: [B] for binary/regression, [B, C] for multiclass, [B, L] for multilabel.

    Returns:
        [B] P(label = 1) for binary, [B, C] class probabilities, [B, L] per-label probabilities,
        [B] predictions for regression.
    """
    if task.type == "binary" or task.type == "multilabel":
        return torch.sigmoid(logits)
    if task.type == "multiclass":
        return torch.softmax(logits, dim=-1)
    return logits
