"""What the model needs to know about its inputs and tasks, derived from fitted encoders.

The model is built from an `InputSpec` alone: it never sees a DataFrame, a vocabulary or a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Group = Literal["user", "item", "context"]
FieldKind = Literal["categorical", "numeric", "multi_categorical", "sequence"]

PAD = 0
"""Index 0 of every vocabulary is padding (empty slots of sequences and multi-valued features)."""
OOV = 1
"""Index 1 of every vocabulary is the out-of-vocabulary bucket (unseen or rare values)."""


@dataclass(frozen=True)
class FieldSpec:
    """One encoded input field as the model sees it.

    Tensor shapes in a batch, for B rows:
      categorical        int64 [B]      (0 = missing/pad, 1 = OOV)
      numeric            float32 [B, 2] (standardised value, missing indicator)
      multi_categorical  int64 [B, L]   (padded with 0)
      sequence           int64 [B, L]   (item indices, most recent first, padded with 0)
    """

    name: str
    group: Group
    kind: FieldKind
    vocab: str = ""
    length: int = 1


@dataclass(frozen=True)
class TaskSpec:
    """One task as the model and the losses see it.

    `num_outputs` is 1 for binary and regression, C for multiclass, L for multilabel, and the
    width of the retrieval vectors for a retrieval task.
    `parent` names the binary task this one is conditional on (ESMM), or None.
    `temperature` divides the cosine similarities of a retrieval task's in-batch logits.
    """

    name: str
    kind: Literal["interaction", "user", "item", "item_pair", "retrieval"]
    type: Literal["binary", "multiclass", "multilabel", "regression", "retrieval"]
    num_outputs: int
    parent: str | None = None
    directed: bool = False
    classes: tuple[str, ...] = ()
    temperature: float = 1.0


@dataclass(frozen=True)
class InputSpec:
    """Every field, every vocabulary's size (rows of its embedding table) and every task."""

    fields: tuple[FieldSpec, ...]
    vocab_sizes: dict[str, int]
    tasks: tuple[TaskSpec, ...]

    def group(self, name: Group) -> tuple[FieldSpec, ...]:
        return tuple(f for f in self.fields if f.group == name)

    def tasks_of(self, kind: str) -> tuple[TaskSpec, ...]:
        return tuple(t for t in self.tasks if t.kind == kind)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


SOURCE_OF_KIND: dict[str, str] = {
    "interaction": "interactions",
    "user": "users",
    "item": "items",
    "item_pair": "item_pairs",
    "retrieval": "interactions",
}
"""The source (table) whose batches carry the labels of each task kind."""
