"""One fused embedding table for every vocabulary, addressed by (vocabulary, index)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mtlrec.data.spec import PAD


class FeatureEmbedding(nn.Module):
    """All vocabularies' embeddings in one `nn.Embedding`, each vocabulary at its own row offset.

    Row `PAD` (0) of every vocabulary embeds to zeros: lookups multiply by a padding mask rather
    than using `padding_idx`, which would cover only the first vocabulary once rows are offset.
    The interface is deliberately small (`lookup`, `pooled`, `weight`) so that a sharded table
    (TorchRec) can stand in for it.

    Indices are not range-checked (that would cost a device sync per lookup): an index past the
    end of its vocabulary silently reads the next vocabulary's rows.

    Args:
        vocab_sizes: rows of each vocabulary (padding and OOV rows included).
        dim: embedding width D.
        sparse: produce sparse gradients (for `torch.optim.SparseAdam` on large tables).
    """

    def __init__(self, vocab_sizes: Mapping[str, int], dim: int, sparse: bool = False) -> None:
        super().__init__()
        for name, size in vocab_sizes.items():
            if size < 1:
                raise ValueError(f"vocabulary '{name}' has {size} rows; every vocabulary needs at least 1")
        self.vocab_sizes = dict(vocab_sizes)
        self.dim = dim
        self.sparse = sparse
        self._slot = {name: i for i, name in enumerate(self.vocab_sizes)}
        starts = [0]
        for size in self.vocab_sizes.values():
            starts.append(starts[-1] + size)
        # Derived from vocab_sizes, so not saved with the weights.
        self.offsets: Tensor
        self.register_buffer("offsets", torch.tensor(starts[:-1], dtype=torch.long), persistent=False)
        self.table = nn.Embedding(max(starts[-1], 1), dim, sparse=sparse)
        # Unit expected norm per row: u*v and pooled means start on the scale of one embedding.
        nn.init.normal_(self.table.weight, std=dim**-0.5)

    @property
    def weight(self) -> Tensor:
        """The fused table [sum of vocab sizes, D] (an `nn.Parameter`)."""
        return self.table.weight

    def lookup(self, vocab: str, idx: Tensor) -> Tensor:
        """Embed indices of one vocabulary; padding indices give zero vectors.

        Args:
            vocab: vocabulary name (a key of `vocab_sizes`).
            idx: int64 indices of any shape [...].
        Returns:
            [..., D]
        """
        slot = self._slot.get(vocab)
        if slot is None:
            raise KeyError(f"FeatureEmbedding has no vocabulary '{vocab}'; it has {sorted(self._slot)}")
        emb = self.table(idx + self.offsets[slot])  # [..., D]
        return emb * (idx != PAD).unsqueeze(-1).to(emb.dtype)

    def pooled(self, vocab: str, idx: Tensor) -> Tensor:
        """Masked mean of a multi-valued field's embeddings; an all-padding row gives zeros.

        Args:
            idx: int64 [B, L], padded with `PAD`.
        Returns:
            [B, D]
        """
        emb = self.lookup(vocab, idx)  # [B, L, D], zeros at padding
        count = (idx != PAD).sum(dim=-1, keepdim=True).clamp(min=1).to(emb.dtype)  # [B, 1]
        return emb.sum(dim=-2) / count
