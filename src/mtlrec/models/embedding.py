"""One fused embedding table for every vocabulary, addressed by (vocabulary, index)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlrec.data.spec import PAD


class FeatureEmbedding(nn.Module):
    """All vocabularies' embeddings in one `nn.Embedding`, each vocabulary at its own row offset.

    Row `PAD` (0) of every vocabulary embeds to zeros: lookups multiply by a padding mask rather
    than using `padding_idx`, which would cover only the first vocabulary once rows are offset.
    The interface is deliberately small (`lookup`, `lookup_many`, `pooled`, `weight`) so that a sharded table
    (TorchRec) can stand in for it.

    Indices are not range-checked (that would cost a device sync per lookup): an index past the
    end of its vocabulary silently reads the next vocabulary's rows.

    Args:
        vocab_sizes: rows of each vocabulary (padding and OOV rows included).
        dim: embedding width D.
        sparse: produce sparse gradients (for `torch.optim.SparseAdam` on large tables).
        init_std: standard deviation of the rows' normal initialisation. Small (0.01): a value seen
            a few times in training stays near zero instead of adding a random vector to its
            example's input (1/sqrt(dim), a unit norm per row, cost 0.025 AUC on the long-tailed
            CTR log of benchmarks/speed.py).
    """

    def __init__(self, vocab_sizes: Mapping[str, int], dim: int, sparse: bool = False,
                 init_std: float = 0.01) -> None:
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
        nn.init.normal_(self.table.weight, std=init_std)

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

    def lookup_many(self, vocabs: Sequence[str], idx: Tensor) -> Tensor:
        """Embed several fields at once, field k from vocabulary `vocabs[k]`: one table call.

        One call instead of one per field matters for training speed: a dense table's backward
        allocates and fills a gradient the size of the whole table once per call.

        Args:
            vocabs: F vocabulary names.
            idx: int64 [..., F].
        Returns:
            [..., F, D], zeros at padding.
        """
        slots = [self._slot.get(v, -1) for v in vocabs]
        if -1 in slots:
            missing = [v for v, s in zip(vocabs, slots, strict=True) if s < 0]
            raise KeyError(f"FeatureEmbedding has no vocabularies {missing}; it has {sorted(self._slot)}")
        emb = self.table(idx + self.offsets[slots])  # [..., F, D]
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
