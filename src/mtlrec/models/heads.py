"""Task heads: a representation -> one task's logits, shaped by the task's type."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.data.spec import TaskSpec
from mtlrec.errors import ConfigError
from mtlrec.models.encoders import MLP


class TaskHead(nn.Module):
    """MLP(hidden) -> logits: [B] for binary and regression, [B, C] multiclass, [B, L] multilabel.

    Serves as the tower of an interaction task (hidden = `tower_hidden`) and as the head of a
    user or item task (hidden = `head_hidden`).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], task: TaskSpec, dropout: float = 0.0) -> None:
        super().__init__()
        scalar = task.type in ("binary", "regression")
        if scalar and task.num_outputs != 1:
            raise ConfigError(f"task '{task.name}' is {task.type} and must have 1 output, "
                              f"got num_outputs={task.num_outputs}")
        if not scalar and task.num_outputs < 1:
            raise ConfigError(f"task '{task.name}' is {task.type} and needs at least 1 class, "
                              f"got num_outputs={task.num_outputs}")
        self.mlp = MLP(in_dim, hidden, task.num_outputs, dropout)
        self.scalar = scalar

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)  # [B, C]
        return out.squeeze(-1) if self.scalar else out  # [B] or [B, C]


def pair_features(a: Tensor, b: Tensor) -> Tensor:
    """[a, b, a*b, |a-b|]: [B, D], [B, D] -> [B, 4D]."""
    return torch.cat([a, b, a * b, (a - b).abs()], dim=-1)


class PairHead(nn.Module):
    """Logits of an item-pair task from [v_a, v_b, v_a*v_b, |v_a - v_b|].

    Symmetric by default, f(a, b) = (g(a, b) + g(b, a)) / 2, so relation(a, b) == relation(b, a);
    directed (just g(a, b)) when `task.directed`.
    """

    def __init__(self, dim: int, hidden: Sequence[int], task: TaskSpec, dropout: float = 0.0) -> None:
        super().__init__()
        self.head = TaskHead(4 * dim, hidden, task, dropout)
        self.directed = task.directed

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.directed:
            return self.head(pair_features(a, b))  # [B] or [B, C]
        B = a.shape[0]
        both = self.head(torch.cat([pair_features(a, b), pair_features(b, a)]))  # [2B] or [2B, C]
        return 0.5 * (both[:B] + both[B:])


class RetrievalHead(nn.Module):
    """Dedicated retrieval vectors on top of the shared user and item encoders.

    u_r = normalise(MLP_u(u)), v_r = normalise(MLP_v(v)), both [B, d_r] with d_r =
    `task.num_outputs`; their inner product is the cosine similarity that retrieval ranks the
    catalogue by. `forward` gives the in-batch logits u_r(i) . v_r(j) / temperature that the
    sampled-softmax loss trains (two towers with in-batch negatives: Yi et al., RecSys 2019).
    """

    def __init__(self, user_dim: int, item_dim: int, hidden: Sequence[int], task: TaskSpec,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if task.type != "retrieval" or task.num_outputs < 1 or task.temperature <= 0:
            raise ConfigError(f"task '{task.name}' must be a retrieval task with num_outputs >= 1 and a positive "
                              f"temperature, got type {task.type}, num_outputs={task.num_outputs}, "
                              f"temperature={task.temperature}")
        self.user = MLP(user_dim, hidden, task.num_outputs, dropout)
        self.item = MLP(item_dim, hidden, task.num_outputs, dropout)
        self.temperature = task.temperature

    def users(self, u: Tensor) -> Tensor:
        """[B, D] user encoder outputs -> [B, d_r] unit vectors."""
        return F.normalize(self.user(u), dim=-1)

    def items(self, v: Tensor) -> Tensor:
        """[B, D] item encoder outputs -> [B, d_r] unit vectors."""
        return F.normalize(self.item(v), dim=-1)

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        """In-batch logits [B, B]: row i's user against every row's item, over the temperature."""
        return self.users(u) @ self.items(v).T / self.temperature  # [B, B]
