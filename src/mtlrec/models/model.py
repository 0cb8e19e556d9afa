"""The multi-task model: shared embeddings and encoders, an interaction backbone, task heads.

    FeatureEmbedding (one fused table)
      user encoder     user fields (+ behaviour sequence, target-attended)  -> u [B, D]
      item encoder     item fields                                          -> v [B, D]
      context encoder  context fields                                       -> c [B, Dc]
    interactions   [u, v, c, u*v] -> backbone -> tower per interaction task -> logits
    users          u -> head per user task;  items  v -> head per item task
    item pairs     [v_a, v_b, v_a*v_b, |v_a - v_b|] -> head per pair task
    retrieval      u -> u_r, v -> v_r (unit vectors) -> in-batch logits u_r . v_r / temperature
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import cast

import torch
from torch import Tensor, nn

from mtlrec.config import ModelConfig
from mtlrec.data.batch import Batch
from mtlrec.data.spec import SOURCE_OF_KIND, FieldSpec, InputSpec, TaskSpec
from mtlrec.errors import ConfigError
from mtlrec.models.backbones import BACKBONES, Backbone
from mtlrec.models.embedding import FeatureEmbedding
from mtlrec.models.encoders import GroupEncoder, missing_features
from mtlrec.models.heads import PairHead, RetrievalHead, TaskHead

USER_ID = "user_id"
"""Key of the user's vocabulary index in `Batch.user`."""
ITEM_ID = "item_id"
"""Key of the item's vocabulary index in `Batch.item` / `Batch.item_b`: the attention target."""


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _rows(features: Mapping[str, Tensor], target: Tensor | None) -> int:
    for tensor in features.values():
        return int(tensor.shape[0])
    if target is not None:
        return int(target.shape[0])
    raise ValueError("cannot tell the batch size: no feature tensors and no target items were given")


def _check_source(source: str) -> None:
    if source not in SOURCE_OF_KIND.values():
        raise ValueError(f"unknown batch source '{source}'; "
                         f"expected one of {sorted(SOURCE_OF_KIND.values())}")


class RecModel(nn.Module):
    """The interface every model built by `build_model` offers to trainers and recommenders.

    `forward(batch)` returns the logits of the tasks whose labels `batch.source` carries.

    Scoring many items per user: encode the catalogue once with `encode_items`, encode users
    with `encode_users`, and call `score_interactions(u, v, context)` on row-aligned u and v
    (repeat each user's row once per candidate). When `target_aware` is True (din/transformer
    pooling of a behaviour sequence), u depends on the candidate item: for exact scores, encode
    the repeated user rows with `target_items` set to the candidates; u encoded without targets
    uses the learned query (the vector user tasks see), a target-independent approximation that
    suits a cheap first pass over the whole catalogue before exact re-scoring of the top items.

    Retrieval: a model with a retrieval task has dedicated vectors, `retrieval_users` and
    `retrieval_items` (unit length, `retrieval_dim` wide; their inner product is the retrieval
    score). Its forward pass on interactions returns the task's in-batch logits [B, B] only in
    training mode: they exist to train the vectors, and [B, B] is no answer for a prediction batch.
    """

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode_users(self, user: Mapping[str, Tensor], target_items: Tensor | None = None) -> Tensor:
        """User fields (+ candidate item ids [B] for target attention) -> u [B, user_dim]."""
        raise NotImplementedError

    def encode_items(self, item: Mapping[str, Tensor]) -> Tensor:
        """Item fields -> v [B, item_dim]."""
        raise NotImplementedError

    def score_interactions(self, u: Tensor, v: Tensor, context: Mapping[str, Tensor] | None = None,
                           target_items: Tensor | None = None) -> dict[str, Tensor]:
        """Interaction tasks' logits for row-aligned u [B, user_dim] and v [B, item_dim].

        `context=None` scores with every context field missing. `target_items` [B] matters only
        when a sequence field sits in the context group and is target-attended.
        """
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that more than one task's output depends on (for PCGrad, GradNorm)."""
        raise NotImplementedError

    @property
    def user_dim(self) -> int:
        """Width of `encode_users`' output (0 when there are no user fields)."""
        raise NotImplementedError

    @property
    def item_dim(self) -> int:
        """Width of `encode_items`' output (0 when there are no item fields)."""
        raise NotImplementedError

    @property
    def target_aware(self) -> bool:
        """True when the user vector of an interaction depends on the candidate item."""
        raise NotImplementedError

    @property
    def entire_space(self) -> bool:
        """True: a conditional task trains over the entire space (ESMM: p(parent) * p(task |
        parent) from both tasks' logits, on every row); False: on its masked rows only."""
        raise NotImplementedError

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        """Task -> gate weights [B, E] of the last interaction forward; empty without gates."""
        return {}

    @property
    def retrieval_dim(self) -> int:
        """Width of the retrieval vectors (0 when the model has no retrieval task)."""
        return 0

    def retrieval_users(self, user: Mapping[str, Tensor]) -> Tensor:
        """User fields -> unit retrieval vectors [B, retrieval_dim] (independent of any candidate)."""
        raise ValueError("this model has no retrieval task, so no retrieval vectors")

    def retrieval_items(self, item: Mapping[str, Tensor]) -> Tensor:
        """Item fields -> unit retrieval vectors [B, retrieval_dim]."""
        raise ValueError("this model has no retrieval task, so no retrieval vectors")

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Every embedding table (they train with their own learning rate)."""
        return _unique(cast(nn.Parameter, m.weight) for m in self.modules() if isinstance(m, FeatureEmbedding))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables built with sparse gradients (for a sparse optimiser)."""
        return [p for p, m in zip(self.embedding_parameters(), self._embeddings(), strict=True) if m.sparse]

    def _embeddings(self) -> list[FeatureEmbedding]:
        seen: set[int] = set()
        out = []
        for m in self.modules():
            if isinstance(m, FeatureEmbedding) and id(m.weight) not in seen:
                seen.add(id(m.weight))
                out.append(m)
        return out

    def dense_parameters(self) -> list[nn.Parameter]:
        """Every parameter not in `sparse_parameters()`."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]


class MultiTaskModel(RecModel):
    """All tasks of all four kinds over one set of embeddings and encoders.

    Args:
        spec: fields, vocabulary sizes and tasks.
        config: model sizes and the backbone name (`BACKBONES`).
        sparse: sparse gradients for the embedding table.
    """

    def __init__(self, spec: InputSpec, config: ModelConfig, sparse: bool = False) -> None:
        super().__init__()
        backbone_cls = BACKBONES.get(config.backbone)
        for t in spec.tasks:
            if "." in t.name:
                raise ConfigError(f"task name '{t.name}' must not contain '.'")
        self.spec = spec
        self.config = config
        interaction = spec.tasks_of("interaction")
        user_fields, item_fields = spec.group("user"), spec.group("item")
        context_fields = spec.group("context")
        retrieval = spec.tasks_of("retrieval")
        if len(retrieval) > 1:
            raise ConfigError(f"tasks {[t.name for t in retrieval]} are all retrieval tasks; a model has at most one")
        self._check_fields(spec.tasks_of("user") + retrieval, user_fields, "user")
        item_tasks = spec.tasks_of("item") + spec.tasks_of("item_pair")
        self._check_fields(item_tasks + retrieval, item_fields, "item")
        item_id = [f for f in item_fields if f.name == ITEM_ID and f.kind == "categorical"]
        target_vocab = item_id[0].vocab if item_id else None

        # Build only what some task reads: no encoder sits idle, and each model of the isolated
        # baseline carries only the tables its own task needs.
        use_user = bool(user_fields) and bool(interaction or spec.tasks_of("user") or retrieval)
        use_item = bool(item_fields) and bool(interaction or item_tasks or retrieval)
        use_context = bool(context_fields) and bool(interaction)
        used = (user_fields if use_user else ()) + (item_fields if use_item else ()) + \
            (context_fields if use_context else ())
        vocabs = {f.vocab for f in used if f.kind != "numeric"}
        unknown = sorted(vocabs - set(spec.vocab_sizes))
        if unknown:
            raise ConfigError(f"fields use vocabularies {unknown} that spec.vocab_sizes does not size; "
                              f"it has {sorted(spec.vocab_sizes)}")

        self.embedding = FeatureEmbedding({v: n for v, n in spec.vocab_sizes.items() if v in vocabs},
                                          config.embedding_dim, sparse, config.embedding_init_std)
        self.user_encoder = GroupEncoder(user_fields, config, target_vocab) if use_user else None
        self.item_encoder = GroupEncoder(item_fields, config) if use_item else None
        self.context_encoder = GroupEncoder(context_fields, config, target_vocab) if use_context else None
        self.context_fields: tuple[FieldSpec, ...] = context_fields if use_context else ()
        self.user_fields: tuple[FieldSpec, ...] = user_fields if use_user else ()
        self.item_fields: tuple[FieldSpec, ...] = item_fields if use_item else ()
        if self.user_encoder is not None and self.item_encoder is not None and \
                self.user_encoder.out_dim != self.item_encoder.out_dim:
            raise ConfigError(f"the user and item encoders give vectors of widths {self.user_encoder.out_dim} and "
                              f"{self.item_encoder.out_dim}; set model.encoder_dim (null is only for models "
                              "without both user and item features)")

        # The wide (first-order) part, as in Wide & Deep (Cheng et al., DLRS 2016): a learned bias
        # per categorical value and interaction-task output, added to the deep logits. Per-item
        # and per-user effects (popularity, quality) then need no detour through the encoders,
        # which on sparse ids learn them slowly and overfit instead.
        self.wide_slices: dict[str, slice] = {}
        if interaction and config.wide:
            start = 0
            for t in interaction:
                self.wide_slices[t.name] = slice(start, start + t.num_outputs)
                start += t.num_outputs
        self.wide_dim = sum(s.stop - s.start for s in self.wide_slices.values())
        wide_vocabs = {f.vocab for f in used if f.kind in ("categorical", "multi_categorical")}
        self.wide: FeatureEmbedding | None = None
        if self.wide_dim and wide_vocabs:
            self.wide = FeatureEmbedding({v: spec.vocab_sizes[v] for v in sorted(wide_vocabs)}, self.wide_dim, sparse)
            nn.init.zeros_(self.wide.weight)

        self.backbone: Backbone | None = None
        self.towers = nn.ModuleDict()
        if interaction:
            deep_u = self.user_encoder.out_dim if self.user_encoder is not None else 0
            deep_v = self.item_encoder.out_dim if self.item_encoder is not None else 0
            deep_c = self.context_encoder.out_dim if self.context_encoder is not None else 0
            in_dim = deep_u + deep_v + deep_c + (deep_u if use_user and use_item else 0)
            if in_dim == 0:
                raise ConfigError("interaction tasks need at least one user, item or context field; "
                                  "the input spec has none")
            self.backbone = backbone_cls(in_dim, [t.name for t in interaction], config)
            H = self.backbone.out_dim
            self.towers.update({t.name: TaskHead(H, config.tower_hidden, t, config.dropout)
                                for t in interaction})
        Du = self.user_encoder.out_dim if self.user_encoder is not None else 0
        Dv = self.item_encoder.out_dim if self.item_encoder is not None else 0
        self.user_heads = nn.ModuleDict({t.name: TaskHead(Du, config.head_hidden, t, config.dropout)
                                         for t in spec.tasks_of("user")})
        self.item_heads = nn.ModuleDict({t.name: TaskHead(Dv, config.head_hidden, t, config.dropout)
                                         for t in spec.tasks_of("item")})
        self.pair_heads = nn.ModuleDict({t.name: PairHead(Dv, config.head_hidden, t, config.dropout)
                                         for t in spec.tasks_of("item_pair")})
        # Dedicated retrieval vectors: the encoders' outputs serve every task (and carry the wide
        # logits at the end of encode_users / encode_items), so retrieval gets its own projections.
        self.retrieval_task = retrieval[0].name if retrieval else None
        self.retrieval = RetrievalHead(Du, Dv, config.head_hidden, retrieval[0], config.dropout) if retrieval else None

    @staticmethod
    def _check_fields(tasks: tuple[TaskSpec, ...], fields: tuple[FieldSpec, ...], group: str) -> None:
        if tasks and not fields:
            raise ConfigError(f"task '{tasks[0].name}' is a {tasks[0].kind} task, but the input spec has no "
                              f"{group} fields")

    # -- properties -----------------------------------------------------------------------------

    @property
    def user_dim(self) -> int:
        return self.user_encoder.out_dim + self._wide_width if self.user_encoder is not None else 0

    @property
    def item_dim(self) -> int:
        return self.item_encoder.out_dim + self._wide_width if self.item_encoder is not None else 0

    @property
    def _wide_width(self) -> int:
        """Width of the wide logits carried at the end of the user and item vectors."""
        return self.wide_dim if self.wide is not None else 0

    def _wide_logits(self, features: Mapping[str, Tensor], fields: tuple[FieldSpec, ...], rows: int) -> Tensor:
        """Sum of the wide biases of a group's categorical values: [B, wide_dim]."""
        assert self.wide is not None
        out = torch.zeros(rows, self.wide_dim, device=self.wide.weight.device)
        categoricals = [f for f in fields if f.kind == "categorical"]
        if categoricals:
            idx = torch.stack([features[f.name] for f in categoricals], dim=-1)  # [B, F]
            out = out + self.wide.lookup_many([f.vocab for f in categoricals], idx).sum(dim=-2)
        for f in fields:
            if f.kind == "multi_categorical":
                out = out + self.wide.pooled(f.vocab, features[f.name])
        return out

    @property
    def target_aware(self) -> bool:
        return any(enc is not None and enc.target_aware for enc in (self.user_encoder, self.context_encoder))

    @property
    def entire_space(self) -> bool:
        return True

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        return self.backbone.gate_weights if self.backbone is not None else {}

    @property
    def retrieval_dim(self) -> int:
        return int(self.spec.task(self.retrieval_task).num_outputs) if self.retrieval_task is not None else 0

    def _retrieval_head(self) -> RetrievalHead:
        if self.retrieval is None:
            raise ValueError("this model has no retrieval task, so no retrieval vectors")
        return self.retrieval

    def retrieval_users(self, user: Mapping[str, Tensor]) -> Tensor:
        return self._retrieval_head().users(self._encode_users(user))  # [B, d_r]

    def retrieval_items(self, item: Mapping[str, Tensor]) -> Tensor:
        return self._retrieval_head().items(self._encode_items(item))  # [B, d_r]

    # -- forward --------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Logits of the tasks whose labels `batch.source` carries: task -> [B] or [B, C]."""
        _check_source(batch.source)
        if batch.source == "interactions":
            return self._interactions(batch)
        if batch.source == "users":
            if not self.user_heads:
                return {}
            u = self._encode_users(batch.user, detach=self._entity_detach(USER_ID))  # [B, D]
            return {name: head(u) for name, head in self.user_heads.items()}
        if batch.source == "items":
            if not self.item_heads:
                return {}
            v = self._encode_items(batch.item, self._entity_detach(ITEM_ID))  # [B, D]
            return {name: head(v) for name, head in self.item_heads.items()}
        if not self.pair_heads:
            return {}
        va, vb = self._encode_items(batch.item), self._encode_items(batch.item_b)  # [B, D] each
        return {name: head(va, vb) for name, head in self.pair_heads.items()}

    def _interactions(self, batch: Batch) -> dict[str, Tensor]:
        """Interaction tasks' logits, and the retrieval task's in-batch logits when training."""
        out: dict[str, Tensor] = {}
        target = batch.item.get(ITEM_ID)  # [B] candidate items, for target attention
        u_deep = v_deep = None
        if self.backbone is not None:
            none = torch.zeros(len(batch), 0, device=self.embedding.weight.device)  # a group without fields
            if self.user_encoder is not None:
                u_deep = self._encode_users(batch.user, target)  # [B, D]
            if self.item_encoder is not None:
                v_deep = self._encode_items(batch.item)  # [B, D]
            u = self._with_wide(u_deep, batch.user, self.user_fields) if u_deep is not None else none
            v = self._with_wide(v_deep, batch.item, self.item_fields) if v_deep is not None else none
            out = self.score_interactions(u, v, batch.context, target)
        if self.retrieval is not None and self.retrieval_task is not None and self.training:
            # The retrieval query must not depend on the candidate: with target attention, the user
            # is encoded again without a target (the learned query), as serving will encode it.
            assert self.user_encoder is not None
            if u_deep is None or self.user_encoder.target_aware:
                u_deep = self._encode_users(batch.user)  # [B, D]
            if v_deep is None:
                v_deep = self._encode_items(batch.item)  # [B, D]
            out[self.retrieval_task] = self.retrieval(u_deep, v_deep)  # [B, B]
        return out

    def _with_wide(self, x: Tensor, features: Mapping[str, Tensor], fields: tuple[FieldSpec, ...]) -> Tensor:
        """An encoder's output [B, D] followed by the group's wide logits [B, W] (when wide)."""
        if self.wide is None:
            return x
        return torch.cat([x, self._wide_logits(features, fields, x.shape[0])], dim=-1)  # [B, D + W]

    def _encode_users(self, user: Mapping[str, Tensor], target_items: Tensor | None = None,
                      detach: Collection[str] = ()) -> Tensor:
        """The user encoder's output alone (what user heads see): [B, encoder_dim]."""
        assert self.user_encoder is not None
        return self.user_encoder(user, self.embedding, target_items, detach)  # [B, D]

    def _encode_items(self, item: Mapping[str, Tensor], detach: Collection[str] = ()) -> Tensor:
        assert self.item_encoder is not None
        return self.item_encoder(item, self.embedding, None, detach)  # [B, D]

    def _entity_detach(self, id_field: str) -> tuple[str, ...]:
        """The id field that user (or item) heads read without training it.

        User and item tasks are split by entity: a test user's id embedding is shaped by
        interactions only. Letting label gradients into training users' id embeddings would make
        them encode the labels directly, a representation test users never get (train/test
        mismatch). Pair tasks are split by pair, so an item's id is shared by training and test
        pairs and pair heads do train it.
        """
        return () if self.config.entity_id_gradients else (id_field,)

    def encode_users(self, user: Mapping[str, Tensor], target_items: Tensor | None = None) -> Tensor:
        """u [B, user_dim]: the encoder's output, then the user's wide logits (when wide)."""
        if self.user_encoder is None:
            return torch.zeros(_rows(user, target_items), 0, device=self.embedding.weight.device)
        return self._with_wide(self._encode_users(user, target_items), user, self.user_fields)  # [B, D (+ W)]

    def encode_items(self, item: Mapping[str, Tensor]) -> Tensor:
        """v [B, item_dim]: the encoder's output, then the item's wide logits (when wide)."""
        if self.item_encoder is None:
            return torch.zeros(_rows(item, None), 0, device=self.embedding.weight.device)
        return self._with_wide(self._encode_items(item), item, self.item_fields)  # [B, D (+ W)]

    def score_interactions(self, u: Tensor, v: Tensor, context: Mapping[str, Tensor] | None = None,
                           target_items: Tensor | None = None) -> dict[str, Tensor]:
        if self.backbone is None:
            return {}
        if u.shape[-1] != self.user_dim or v.shape[-1] != self.item_dim or u.shape[0] != v.shape[0]:
            raise ValueError(f"score_interactions expects row-aligned u [B, {self.user_dim}] and "
                             f"v [B, {self.item_dim}], got {tuple(u.shape)} and {tuple(v.shape)}")
        W = self._wide_width
        rows = u.shape[0]
        wide = torch.zeros(rows, W, device=u.device)  # [B, W]
        if W and self.user_encoder is not None:
            u, wide = u[:, :-W], wide + u[:, -W:]
        if W and self.item_encoder is not None:
            v, wide = v[:, :-W], wide + v[:, -W:]
        parts = [u, v]
        if self.context_encoder is not None:
            if context is None:
                context = missing_features(self.context_fields, rows, u.device)
            parts.append(self.context_encoder(context, self.embedding, target_items))  # [B, Dc]
            if W:
                wide = wide + self._wide_logits(context, self.context_fields, rows)
        if self.user_encoder is not None and self.item_encoder is not None:
            parts.append(u * v)  # [B, D]
        x = torch.cat(parts, dim=-1)  # [B, Din]
        reps = self.backbone(x)  # task -> [B, H]
        out = {}
        for name, tower in self.towers.items():
            logits = tower(reps[name])  # [B] or [B, C]
            if W:
                logits = logits + wide[:, self.wide_slices[name]].reshape(logits.shape)
            out[name] = logits
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        modules = [self.embedding, self.user_encoder, self.item_encoder, self.context_encoder]
        params = [p for m in modules if m is not None for p in m.parameters()]
        if self.backbone is not None:
            params += self.backbone.shared_parameters()
        return _unique(params)


class TaskIsolatedModel(RecModel):
    """One independent `MultiTaskModel` per task (own embeddings, encoders, network and head).

    The single-task baseline: N single-task models trained side by side in one pass. Nothing is
    shared, so `shared_parameters()` is empty; conditional tasks train on their masked rows
    (`entire_space` is False) since no parent's logits live in their model. The user and item
    vectors of `encode_users` / `encode_items` concatenate those of the interaction tasks'
    models, in task order; `score_interactions` splits them again. A retrieval task is one more
    isolated two-tower model: its own embeddings and encoders, read by `retrieval_users` /
    `retrieval_items`.
    """

    def __init__(self, spec: InputSpec, config: ModelConfig, sparse: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.config = config
        self.models = nn.ModuleDict({
            t.name: MultiTaskModel(dataclasses.replace(spec, tasks=(dataclasses.replace(t, parent=None),)),
                                   config, sparse)
            for t in spec.tasks})
        self.interaction_tasks = tuple(t.name for t in spec.tasks_of("interaction"))

    def _scorers(self) -> list[MultiTaskModel]:
        return [self._model(name) for name in self.interaction_tasks]

    def _model(self, name: str) -> MultiTaskModel:
        return cast(MultiTaskModel, self.models[name])

    @property
    def user_dim(self) -> int:
        return sum(m.user_dim for m in self._scorers())

    @property
    def item_dim(self) -> int:
        return sum(m.item_dim for m in self._scorers())

    @property
    def target_aware(self) -> bool:
        return any(m.target_aware for m in self._scorers())

    @property
    def entire_space(self) -> bool:
        return False

    def _retrieval_model(self) -> MultiTaskModel | None:
        names = [t.name for t in self.spec.tasks_of("retrieval")]
        return self._model(names[0]) if names else None

    @property
    def retrieval_dim(self) -> int:
        model = self._retrieval_model()
        return model.retrieval_dim if model is not None else 0

    def retrieval_users(self, user: Mapping[str, Tensor]) -> Tensor:
        model = self._retrieval_model()
        return model.retrieval_users(user) if model is not None else super().retrieval_users(user)

    def retrieval_items(self, item: Mapping[str, Tensor]) -> Tensor:
        model = self._retrieval_model()
        return model.retrieval_items(item) if model is not None else super().retrieval_items(item)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Logits of the tasks whose labels `batch.source` carries, each from its own model."""
        _check_source(batch.source)
        out: dict[str, Tensor] = {}
        for t in self.spec.tasks:
            if SOURCE_OF_KIND[t.kind] == batch.source:
                out.update(self.models[t.name](batch))
        return out

    def encode_users(self, user: Mapping[str, Tensor], target_items: Tensor | None = None) -> Tensor:
        parts = [m.encode_users(user, target_items) for m in self._scorers()]  # [B, D] each
        return torch.cat(parts, dim=-1) if parts else self._none(_rows(user, target_items))

    def encode_items(self, item: Mapping[str, Tensor]) -> Tensor:
        parts = [m.encode_items(item) for m in self._scorers()]  # [B, D] each
        return torch.cat(parts, dim=-1) if parts else self._none(_rows(item, None))

    def _none(self, rows: int) -> Tensor:
        return torch.zeros(rows, 0, device=next(self.parameters()).device)

    def score_interactions(self, u: Tensor, v: Tensor, context: Mapping[str, Tensor] | None = None,
                           target_items: Tensor | None = None) -> dict[str, Tensor]:
        models = self._scorers()
        if u.shape[-1] != self.user_dim or v.shape[-1] != self.item_dim:
            raise ValueError(f"score_interactions expects u [B, {self.user_dim}] and v [B, {self.item_dim}] "
                             f"from this model's encode_users / encode_items, got {tuple(u.shape)} and "
                             f"{tuple(v.shape)}")
        us = u.split([m.user_dim for m in models], dim=-1)
        vs = v.split([m.item_dim for m in models], dim=-1)
        out: dict[str, Tensor] = {}
        for m, ui, vi in zip(models, us, vs, strict=True):
            out.update(m.score_interactions(ui, vi, context, target_items))
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return []


def build_model(spec: InputSpec, config: ModelConfig, sparse: bool = False) -> RecModel:
    """The model `config.backbone` asks for: a `TaskIsolatedModel` for backbones that isolate
    tasks (`single`), else one `MultiTaskModel`."""
    if BACKBONES.get(config.backbone).isolates_tasks:
        return TaskIsolatedModel(spec, config, sparse)
    return MultiTaskModel(spec, config, sparse)
