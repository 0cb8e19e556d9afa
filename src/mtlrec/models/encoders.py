"""Feature-group encoders: fields -> one vector per row, with behaviour-sequence pooling.

Also holds `MLP`, the building block that encoders, backbones and heads share.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlrec.config import ModelConfig
from mtlrec.data.spec import PAD, FieldSpec
from mtlrec.errors import ConfigError
from mtlrec.models.embedding import FeatureEmbedding


class MLP(nn.Sequential):
    """Linear -> ReLU (-> Dropout) per hidden size, then an optional output Linear (no activation).

    Args:
        in_dim: input width.
        hidden: hidden layer sizes (may be empty).
        out_dim: width of a final linear layer, or None to end on the last hidden activation.
        dropout: dropout after each hidden activation.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None,
                 dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]  # a Linear's backward needs no output
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        super().__init__(*layers)
        self.out_dim = width


def missing_features(fields: Sequence[FieldSpec], rows: int, device: torch.device | str = "cpu"
                     ) -> dict[str, Tensor]:
    """Field tensors that say "missing" for every row: PAD indices, numeric (0, missing=1)."""
    out: dict[str, Tensor] = {}
    for f in fields:
        if f.kind == "categorical":
            out[f.name] = torch.full((rows,), PAD, dtype=torch.long, device=device)
        elif f.kind == "numeric":
            out[f.name] = torch.tensor([0.0, 1.0], device=device).expand(rows, 2)
        else:
            out[f.name] = torch.full((rows, f.length), PAD, dtype=torch.long, device=device)
    return out


# ---------------------------------------------------------------------------------------------
# Sequence pooling: [B, L, D] item embeddings (+ optional target item [B, D]) -> [B, D]


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over valid positions; rows with no valid position get all-zero weights (no NaN)."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)


class MeanPooling(nn.Module):
    """Masked mean of the sequence's item embeddings; ignores the target."""

    def forward(self, h: Tensor, mask: Tensor, target: Tensor | None = None) -> Tensor:
        count = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(h.dtype)  # [B, 1]
        return (h * mask.unsqueeze(-1).to(h.dtype)).sum(dim=1) / count  # [B, D]


class TargetAttention(nn.Module):
    """Attention over the sequence with the candidate item as query. DIN: Zhou et al., KDD 2018.

    Scores come from an MLP over [h, t, h - t, h * t]. Unlike DIN's unnormalised sum, the scores
    are softmax-normalised over valid positions, so the output's scale does not grow with the
    history length. Without a target (rows of the users table, or a target-free user vector) a
    learned query stands in for t.
    """

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.score = MLP(4 * dim, [2 * dim], 1, dropout)
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, h: Tensor, mask: Tensor, target: Tensor | None = None) -> Tensor:
        B, L, D = h.shape
        t = self.query.expand(B, D) if target is None else target  # [B, D]
        t = t.unsqueeze(1).expand(B, L, D)  # [B, L, D]
        scores = self.score(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)  # [B, L]
        weights = _masked_softmax(scores, mask)  # [B, L]
        return torch.einsum("bl,bld->bd", weights, h)  # [B, D]


class TransformerPooling(nn.Module):
    """Self-attention over the sequence, then target attention. BST: Chen et al., 2019.

    Learned positional embeddings (position 0 = most recent item) are added before an
    `nn.TransformerEncoder` with a key padding mask. A row that is all padding would make every
    attention row fully masked (NaN); such rows attend to their first slot instead and are zeroed
    by the pooling mask afterwards.
    """

    def __init__(self, dim: int, max_len: int, heads: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ConfigError(f"model.transformer_heads ({heads}) must divide model.embedding_dim ({dim})")
        self.max_len = max_len
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.attend = TargetAttention(dim, dropout)

    def forward(self, h: Tensor, mask: Tensor, target: Tensor | None = None) -> Tensor:
        length = h.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of length {length} is longer than the field's length {self.max_len}")
        x = h + self.position[:length]  # [B, L, D]
        empty = ~mask.any(dim=1, keepdim=True)  # [B, 1]
        attend_mask = mask.clone()
        attend_mask[:, :1] |= empty
        x = self.encoder(x, src_key_padding_mask=~attend_mask)  # [B, L, D]
        return self.attend(x, mask, target)  # [B, D]


def make_pooling(config: ModelConfig, max_len: int) -> nn.Module:
    """The sequence pooling named by `config.sequence_pooling`."""
    dim = config.embedding_dim
    if config.sequence_pooling == "mean":
        return MeanPooling()
    if config.sequence_pooling == "din":
        return TargetAttention(dim, config.dropout)
    if config.sequence_pooling == "transformer":
        return TransformerPooling(dim, max_len, config.transformer_heads, config.transformer_layers,
                                  config.dropout)
    raise ConfigError(f"unknown model.sequence_pooling '{config.sequence_pooling}'; "
                      "choose from ['din', 'mean', 'transformer']")


# ---------------------------------------------------------------------------------------------


class GroupEncoder(nn.Module):
    """Encodes one feature group (user, item or context) into one vector per row.

    Each field becomes one D-wide slot: categorical -> its embedding, multi_categorical -> masked
    mean, numeric [B, 2] -> its own linear map to D, sequence -> pooled item embeddings (mean,
    DIN target attention or BST Transformer, per `config.sequence_pooling`). The slots are
    concatenated (categorical fields first, embedded by one `lookup_many` call) and an
    MLP(`config.encoder_hidden`) maps them to `config.encoder_dim`; with `encoder_dim` None the
    concatenated slots are the output (the classic "embeddings + dense features" input of a CTR
    model). With `config.numeric_input` "raw" a numeric field is one column (its standardised
    value; a missing value enters as 0, the training mean) instead of a learned D-wide slot.

    The embedding table is passed to `forward`, not held, so that one table shared by several
    encoders is stored once in the state dict.

    Args:
        fields: the group's fields (at least one).
        config: model sizes.
        target_vocab: vocabulary of the candidate item id; sequence fields over this vocabulary
            use the candidate as attention target (din/transformer pooling).
    """

    def __init__(self, fields: Sequence[FieldSpec], config: ModelConfig, target_vocab: str | None = None
                 ) -> None:
        super().__init__()
        if not fields:
            raise ValueError("GroupEncoder needs at least one field")
        D = config.embedding_dim
        self.fields = tuple(fields)
        self.categoricals = tuple(f for f in self.fields if f.kind == "categorical")
        self.multis = tuple(f for f in self.fields if f.kind == "multi_categorical")
        self.numerics = tuple(f for f in self.fields if f.kind == "numeric")
        self.sequences = tuple(f for f in self.fields if f.kind == "sequence")
        self.target_vocab = target_vocab
        n = len(self.numerics)
        self.raw_numeric = config.numeric_input == "raw"
        # One Linear(2, D) per numeric field, applied together as one einsum (none when raw).
        width = 0 if self.raw_numeric else n
        self.numeric_weight = nn.Parameter(torch.empty(width, 2, D).uniform_(-(2**-0.5), 2**-0.5))
        self.numeric_bias = nn.Parameter(torch.empty(width, D).uniform_(-(2**-0.5), 2**-0.5))
        self.poolings = nn.ModuleList(make_pooling(config, f.length) for f in self.sequences)
        slots = D * (len(self.fields) - n) + (n if self.raw_numeric else D * n)
        self.mlp = MLP(slots, config.encoder_hidden, config.encoder_dim, config.dropout) \
            if config.encoder_dim is not None else nn.Identity()
        self.out_dim = config.encoder_dim if config.encoder_dim is not None else slots

    @property
    def target_aware(self) -> bool:
        """True when the output depends on the candidate item (target-attention pooling)."""
        return any(f.vocab == self.target_vocab and not isinstance(p, MeanPooling)
                   for f, p in zip(self.sequences, self.poolings, strict=True))

    def forward(self, features: Mapping[str, Tensor], embedding: FeatureEmbedding,
                target: Tensor | None = None, detach: Collection[str] = ()) -> Tensor:
        """Encode a group.

        Args:
            features: field name -> tensor (shapes as in `FieldSpec`).
            embedding: the shared table.
            target: int64 [B] candidate item indices in `target_vocab`, or None.
            detach: categorical fields whose embeddings pass no gradient back (see
                `ModelConfig.entity_id_gradients`).
        Returns:
            [B, out_dim]
        """
        missing = [f.name for f in self.fields if f.name not in features]
        if missing:
            group = self.fields[0].group
            raise KeyError(f"{group} features {missing} are missing from the batch; "
                           f"it has {sorted(features)}")
        slots: list[Tensor] = []
        if self.categoricals:
            idx = torch.stack([features[f.name] for f in self.categoricals], dim=-1)  # [B, F]
            vecs = embedding.lookup_many([f.vocab for f in self.categoricals], idx)  # [B, F, D]
            frozen = [f.name in detach for f in self.categoricals]
            if any(frozen):
                train = torch.tensor([not x for x in frozen], dtype=vecs.dtype, device=vecs.device)[:, None]
                vecs = vecs * train + vecs.detach() * (1 - train)  # no gradient into the frozen fields
            slots.append(vecs.flatten(-2))  # [B, F*D]
        for f in self.multis:
            vec = embedding.pooled(f.vocab, features[f.name])  # [B, D]
            slots.append(vec.detach() if f.name in detach else vec)
        if self.numerics and self.raw_numeric:
            slots.append(torch.stack([features[f.name][:, 0] for f in self.numerics], dim=1))  # [B, N]
        elif self.numerics:
            x = torch.stack([features[f.name] for f in self.numerics], dim=1)  # [B, N, 2]
            num = torch.einsum("bnk,nkd->bnd", x, self.numeric_weight) + self.numeric_bias  # [B, N, D]
            slots.append(num.flatten(1))  # [B, N*D]
        for f, pool in zip(self.sequences, self.poolings, strict=True):
            idx = features[f.name]  # [B, L]
            h = embedding.lookup(f.vocab, idx)  # [B, L, D]
            t = embedding.lookup(f.vocab, target) if target is not None and f.vocab == self.target_vocab \
                else None  # [B, D]
            slots.append(pool(h, idx != PAD, t))  # [B, D]
        return self.mlp(torch.cat(slots, dim=-1))  # [B, out_dim]

