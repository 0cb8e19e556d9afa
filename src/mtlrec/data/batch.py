"""The unit of work of training and prediction: a batch of one source's rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


def _move(tensors: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


@dataclass
class Batch:
    """Rows of one source with their features, labels and per-task label masks.

    `source` is 'interactions', 'users', 'items' or 'item_pairs'. Feature groups hold one tensor
    per field (see `FieldSpec` for shapes): `user` and `item` describe the entities of each row,
    `item_b` the second item of an item pair, `context` the interaction's own columns. A group
    that does not apply to the source is empty. The key 'user_id' of `user` (and 'item_id' of
    `item`, `item_b`) holds the entity's vocabulary index.

    `labels[task]` is float32 [B] (binary, regression), int64 [B] (multiclass) or float32 [B, L]
    (multilabel); `masks[task]` is bool [B], True where the label exists. Labels of a conditional
    task are masked where its parent is negative.
    """

    source: str
    user: dict[str, Tensor] = field(default_factory=dict)
    item: dict[str, Tensor] = field(default_factory=dict)
    item_b: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.source, _move(self.user, device), _move(self.item, device),
                     _move(self.item_b, device), _move(self.context, device),
                     _move(self.labels, device), _move(self.masks, device))

    def __len__(self) -> int:
        for group in (self.user, self.item, self.context, self.item_b, self.labels):
            for tensor in group.values():
                return int(tensor.shape[0])
        return 0

    def unlabelled(self) -> Batch:
        """The same rows with every label masked out: they pass through the model but add nothing
        to any loss, nor to any gradient. A replica whose part of a global batch is empty steps on
        such a row, so that every replica runs the same forward and backward."""
        masks = {name: torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
                 for name, labels in self.labels.items()}
        return Batch(self.source, self.user, self.item, self.item_b, self.context, self.labels, masks)
