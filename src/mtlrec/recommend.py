"""Top-K recommendation with a multi-objective score, related items, and the ranking report.

Two stages when the run has a retrieval task: the `recommend.candidates` items of largest
retrieval score u_r . v_r among those the filters allow (exact top-N by a chunked matrix product
over the catalogue's retrieval vectors, computed once), then the ranking stage below scores
them. Without a retrieval task, or with `candidates: 0`, every allowed item is ranked exactly.

Scores: every binary interaction task gives P(event | impression); a conditional task's
probability is taken over the entire space (p(click) * p(purchase | click)), so that every task's
number answers the same question for a candidate item. `recommend.fusion` weights them:

    log_sum   sum_t w_t * log p_t
    product   prod_t p_t ** w_t        (the same order as log_sum, on a probability scale)
    sum       sum_t w_t * p_t
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mtlrec.config import Config, RecommendConfig
from mtlrec.data.batch import Batch
from mtlrec.data.spec import InputSpec, TaskSpec
from mtlrec.errors import ArtifactError
from mtlrec.metrics import ranking_metrics
from mtlrec.models.model import RecModel
from mtlrec.retrieval import top_n_inner_product
from mtlrec.training.checkpoint import load_tensors, save_tensors

if TYPE_CHECKING:
    from mtlrec.data.dataset import EncodedData
    from mtlrec.data.schema import Schema
    from mtlrec.data.split import SplitIndex
    from mtlrec.data.stream import InteractionStream

SERVING_FILE = "serving.safetensors"
_EPS = 1e-7


@dataclass
class ServingState:
    """What recommending needs besides the model: entity features, seen items, popularity.

    `users` / `items` hold the user- and item-group fields of every entity row; `seen_indptr` /
    `seen_items` list the items of each user's training interactions (CSR); `popularity` counts
    each item's positive training interactions of the first binary interaction task.
    """

    users: dict[str, Tensor]
    items: dict[str, Tensor]
    seen_indptr: Tensor
    seen_items: Tensor
    popularity: Tensor

    def save(self, run_dir: Path) -> None:
        tensors = {f"user.{k}": v for k, v in self.users.items()}
        tensors.update({f"item.{k}": v for k, v in self.items.items()})
        tensors.update({"seen.indptr": self.seen_indptr, "seen.items": self.seen_items,
                        "popularity": self.popularity})
        save_tensors(run_dir / SERVING_FILE, tensors)

    @classmethod
    def load(cls, run_dir: Path) -> ServingState:
        tensors, _ = load_tensors(run_dir / SERVING_FILE)
        try:
            return cls({k[5:]: v for k, v in tensors.items() if k.startswith("user.")},
                       {k[5:]: v for k, v in tensors.items() if k.startswith("item.")},
                       tensors["seen.indptr"], tensors["seen.items"], tensors["popularity"])
        except KeyError as exc:
            raise ArtifactError(f"'{run_dir / SERVING_FILE}' lacks {exc}; re-run training") from None

    @property
    def num_items(self) -> int:
        return int(self.popularity.shape[0])

    def seen(self, user_row: int) -> np.ndarray:
        lo, hi = int(self.seen_indptr[user_row]), int(self.seen_indptr[user_row + 1])
        return self.seen_items[lo:hi].numpy()


def _root_binary_task(spec: InputSpec) -> TaskSpec | None:
    for task in spec.tasks_of("interaction"):
        if task.type == "binary" and task.parent is None:
            return task
    return None


def build_serving_state(data: EncodedData, split: SplitIndex, spec: InputSpec) -> ServingState:
    """Entity features, training interactions per user and item popularity, from the encoded data."""
    n_items = data.items.num_rows if data.items is not None else 0
    train_rows = split.rows("interactions", "train")
    if data.users is not None and data.items is not None:
        user_rows, item_rows = data.seen_items(train_rows)
    else:  # no user or item ids (Census, CTR logs, item-only catalogues): no seen items
        user_rows = item_rows = np.zeros(0, dtype=np.int64)
    popularity = np.zeros(n_items, dtype=np.float32)
    root = _root_binary_task(spec)
    if root is not None and n_items:
        for batch in data.iter_batches("interactions", train_rows, 65536):
            positive = (batch.labels[root.name] > 0.5) & batch.masks[root.name]
            np.add.at(popularity, batch.item["item_key"][positive].numpy(), 1.0)
    elif n_items:
        np.add.at(popularity, item_rows, 1.0)
    pairs = np.unique(np.stack([user_rows, item_rows], axis=1).reshape(-1, 2), axis=0)
    return serving_state_of(data, pairs, popularity)


def serving_state_of(data: EncodedData, seen: np.ndarray, popularity: np.ndarray) -> ServingState:
    """The serving state of encoded entity tables, seen (user row, item row) pairs int64 [M, 2]
    (unique, sorted) and each item's popularity float32 [I]."""
    users = data.users.fields if data.users is not None else {}
    items = data.items.fields if data.items is not None else {}
    n_users = data.users.num_rows if data.users is not None else 0
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.add.at(indptr, seen[:, 0] + 1, 1)
    return ServingState(dict(users), dict(items), torch.as_tensor(np.cumsum(indptr)),
                        torch.as_tensor(seen[:, 1].copy()), torch.as_tensor(popularity))


def stream_serving_state(stream: InteractionStream, spec: InputSpec, collect_seen: bool = True) -> ServingState:
    """`build_serving_state` from streamed interactions: one pass over the training rows' ids and
    root label. Memory: the distinct (user, item) training pairs (8 bytes each; none without
    `collect_seen`) and one count per item, never the log."""
    data = stream.catalogue
    n_items = data.items.num_rows if data.items is not None else 0
    popularity = np.zeros(n_items, dtype=np.float32)
    root = _root_binary_task(spec)
    seen = _UniqueKeys()
    for user_rows, item_rows, positive in stream.keys_and_labels("train", root.name if root else None):
        np.add.at(popularity, item_rows[positive] if root is not None else item_rows, 1.0)
        if collect_seen:
            seen.add(user_rows * np.int64(max(n_items, 1)) + item_rows)
    keys = seen.values()
    pairs = np.stack([keys // max(n_items, 1), keys % max(n_items, 1)], axis=1).astype(np.int64)
    return serving_state_of(data, pairs.reshape(-1, 2), popularity)


class _UniqueKeys:
    """Distinct int64 keys added in chunks; memory ~ the distinct keys (merged when pending outgrows them)."""

    def __init__(self) -> None:
        self._done = np.zeros(0, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._size = 0

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(np.unique(keys))
        self._size += self._pending[-1].size
        if self._size > max(self._done.size, 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            self._done = np.unique(np.concatenate([self._done, *self._pending]))
            self._pending, self._size = [], 0

    def values(self) -> np.ndarray:
        """The distinct keys, sorted."""
        self._merge()
        return self._done


def save_serving_state(run_dir: Path, schema: Schema, data: EncodedData, split: SplitIndex) -> None:
    """Write what a Predictor needs to recommend without the training data."""
    build_serving_state(data, split, schema.spec_).save(run_dir)


def _take(fields: Mapping[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    return {k: v.index_select(0, rows) for k, v in fields.items()}


@dataclass
class Ranking:
    """One user's top-K: item rows, fused scores and each binary interaction task's probability
    (all [K], best first), how many items the heads scored, and whether retrieval chose them."""

    rows: np.ndarray
    scores: np.ndarray
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    ranked: int = 0
    two_stage: bool = False


class Recommender:
    """Retrieves and ranks candidate items for users, fusing the interaction tasks into one score.

    Args:
        model: a trained model.
        spec: its input spec.
        state: entity features, seen items and popularity.
        settings: fusion weights, rule, K, whether to exclude seen items, retrieval candidates.
    """

    def __init__(self, model: RecModel, spec: InputSpec, state: ServingState, settings: RecommendConfig) -> None:
        self.model = model.eval()
        self.spec = spec
        self.state = state
        self.settings = settings
        binary = [t for t in spec.tasks_of("interaction") if t.type == "binary"]
        self.fusion = dict(settings.fusion) or {t.name: 1.0 for t in binary}
        self.scored_tasks = [t.name for t in binary]
        self._item_vectors: Tensor | None = None
        self.retrieval_vectors = self._retrieval_vectors()
        self.candidates = settings.candidates if self.retrieval_vectors is not None else 0
        """Items retrieval hands to the ranking stage (0: rank every allowed item)."""

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _retrieval_vectors(self, chunk: int = 65536) -> Tensor | None:
        """v_r of every item entity [I, d_r], or None without a retrieval task."""
        if not self.model.retrieval_dim or self.state.num_items == 0:
            return None
        n = self.state.num_items
        parts = []
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(start + chunk, n))
            parts.append(self.model.retrieval_items(_take(self.state.items, rows)))
        return torch.cat(parts)  # [I, d_r]

    @torch.no_grad()
    def item_vectors(self) -> Tensor:
        """v of every item entity [I, D], computed once."""
        if self._item_vectors is None:
            self._item_vectors = self.model.encode_items(self.state.items)
        return self._item_vectors

    def user_fields(self, user_rows: Tensor) -> dict[str, Tensor]:
        """The user-group fields of known user entity rows [U]."""
        return _take(self.state.users, user_rows)

    def joint_probabilities(self, logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """P(task's event | impression) of every binary interaction task (conditionals chained)."""
        log_p = {name: torch.nn.functional.logsigmoid(value) for name, value in logits.items()}
        out: dict[str, Tensor] = {}
        for name in self.scored_tasks:
            total = log_p[name]
            parent = self.spec.task(name).parent
            while parent is not None:
                total = total + log_p[parent]
                parent = self.spec.task(parent).parent
            out[name] = total.exp()
        return out

    def fuse(self, probs: Mapping[str, Tensor]) -> Tensor:
        rule = self.settings.fusion_rule
        if rule == "sum":
            return sum((w * probs[t] for t, w in self.fusion.items()), torch.zeros(()))
        log_sum = sum((w * probs[t].clamp_min(_EPS).log() for t, w in self.fusion.items()), torch.zeros(()))
        return log_sum.exp() if rule == "product" else log_sum

    @torch.no_grad()
    def score(self, user_rows: Tensor, item_rows: Tensor | None = None,
              chunk_pairs: int = 1 << 16) -> tuple[Tensor, dict[str, Tensor]]:
        """Fused scores [U, I] and per-task impression probabilities [U, I] for user entity rows
        against item entity rows (default: the whole catalogue), in chunks of user-item pairs."""
        return self.score_users(self.user_fields(user_rows), item_rows, chunk_pairs)

    @torch.no_grad()
    def score_users(self, users: Mapping[str, Tensor], item_rows: Tensor | None = None,
                    chunk_pairs: int = 1 << 16) -> tuple[Tensor, dict[str, Tensor]]:
        """`score` for users given by their fields (U rows each), known or not."""
        items = item_rows if item_rows is not None else torch.arange(self.state.num_items)
        v_all = self.item_vectors().index_select(0, items)  # [I, D]
        n_items = len(items)
        n_users = _rows(users)
        item_ids = self.state.items["item_id"].index_select(0, items) if "item_id" in self.state.items else None
        target_aware = self.model.target_aware
        u_all = None if target_aware else self.model.encode_users(users)  # [U, D]
        per_chunk = max(1, chunk_pairs // max(n_items, 1))
        fused_parts, prob_parts = [], []
        for start in range(0, n_users, per_chunk):
            n = min(per_chunk, n_users - start)
            rep = torch.arange(start, start + n).repeat_interleave(n_items)  # [n*I]
            v = v_all.repeat(n, 1)  # [n*I, D]
            targets = item_ids.repeat(n) if item_ids is not None else None
            # A target-aware user vector (DIN, BST) is encoded per candidate; else once per user.
            u = self.model.encode_users(_take(users, rep), targets) if u_all is None else u_all.index_select(0, rep)
            logits = self.model.score_interactions(u, v, None, targets)
            probs = self.joint_probabilities(logits)
            fused_parts.append(self.fuse(probs).reshape(n, n_items))
            prob_parts.append({t: p.reshape(n, n_items) for t, p in probs.items()})
        fused = torch.cat(fused_parts) if fused_parts else torch.zeros(0, n_items)
        probs = {t: torch.cat([p[t] for p in prob_parts]) for t in self.scored_tasks} if prob_parts else {}
        return fused, probs

    def eligible(self, user_row: int | None, exclude_seen: bool,
                 candidates: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """bool [I] of the items that may be recommended (None: every item).

        Args:
            user_row: a known user's entity row (whose seen items `exclude_seen` drops), or None.
            exclude_seen: drop the user's training items.
            candidates: item rows to restrict to (None: the whole catalogue).
        """
        allowed: np.ndarray | None = None
        if candidates is not None:
            allowed = np.zeros(self.state.num_items, dtype=bool)
            allowed[np.asarray(candidates, dtype=np.int64)] = True
        if exclude_seen and user_row is not None:
            allowed = np.ones(self.state.num_items, dtype=bool) if allowed is None else allowed
            allowed[self.state.seen(user_row)] = False
        return allowed

    @torch.no_grad()
    def retrieve(self, users: Mapping[str, Tensor], n: int, allowed: np.ndarray | None = None) -> Tensor:
        """Item rows [U, n'] of the n largest retrieval scores u_r . v_r among the allowed items.

        Raises:
            ValueError: the model has no retrieval task.
        """
        if self.retrieval_vectors is None:
            raise ValueError("this run has no retrieval task, so nothing to retrieve with; rank the catalogue")
        u = self.model.retrieval_users(users)  # [U, d_r]
        mask = None if allowed is None else torch.from_numpy(allowed)
        rows, _ = top_n_inner_product(u, self.retrieval_vectors, n, mask)
        return rows

    @torch.no_grad()
    def rank(self, user: Mapping[str, Tensor], k: int, allowed: np.ndarray | None = None,
             candidates: int | None = None) -> Ranking:
        """The K best allowed items for one user given by its fields (one row each).

        Two-stage when the run has retrieval vectors and more than `candidates` items (default
        `self.candidates`; 0 turns retrieval off) are allowed: the heads rank the retrieved ones.
        Otherwise the heads rank every allowed item.
        """
        n = self.candidates if candidates is None else candidates
        rows = np.arange(self.state.num_items) if allowed is None else np.flatnonzero(allowed)
        two_stage = bool(n) and self.retrieval_vectors is not None and len(rows) > n
        if two_stage:
            rows = self.retrieve(user, n, allowed)[0].numpy()
        if len(rows) == 0:
            return Ranking(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), two_stage=two_stage)
        fused, probs = self.score_users(user, torch.as_tensor(rows))
        best = torch.topk(fused[0], min(k, len(rows))).indices
        return Ranking(rows[best.numpy()], fused[0, best].numpy(), {t: p[0, best].numpy() for t, p in probs.items()},
                       ranked=len(rows), two_stage=two_stage)

    def top_k(self, user_row: int, k: int, exclude_seen: bool | None = None,
              candidates: Sequence[int] | np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The K best item rows for one known user: (item rows, fused scores, task probabilities)."""
        exclude = self.settings.exclude_seen if exclude_seen is None else exclude_seen
        ranking = self.rank(self.user_fields(torch.tensor([user_row])), k,
                            self.eligible(user_row, exclude, candidates))
        return ranking.rows, ranking.scores, ranking.probabilities

    def popular(self, k: int, candidates: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cold start without user features: the most popular items (item rows, counts)."""
        pop = self.state.popularity
        rows = np.arange(len(pop)) if candidates is None else np.asarray(candidates, dtype=np.int64)
        values = pop[torch.as_tensor(rows)]
        best = torch.topk(values, min(k, len(rows))).indices.numpy()
        return rows[best], values[best].numpy()

    @torch.no_grad()
    def related(self, item_row: int, task: TaskSpec, relation: str, k: int,
                candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Items most likely in `relation` with an item, by the item-pair head.

        The head scores every other item, or, when the run has retrieval vectors and the catalogue
        holds more than `candidates` (default `self.candidates`) other items, the `candidates`
        items nearest to this one by v_r . v_r.
        """
        cls = list(task.classes).index(relation)
        n_items = self.state.num_items
        n = self.candidates if candidates is None else candidates
        if n and self.retrieval_vectors is not None and n_items - 1 > n:
            others = torch.ones(n_items, dtype=torch.bool)
            others[item_row] = False
            query = self.retrieval_vectors[item_row:item_row + 1]  # [1, d_r]
            rows = top_n_inner_product(query, self.retrieval_vectors, n, others)[0][0]
        else:
            rows = torch.cat([torch.arange(item_row), torch.arange(item_row + 1, n_items)])  # all but itself
        anchor = _take(self.state.items, torch.full((len(rows),), item_row, dtype=torch.int64))
        batch = Batch("item_pairs", item=anchor, item_b=_take(self.state.items, rows))
        logits = self.model(batch)[task.name]
        probs = torch.softmax(logits, -1)[:, cls] if task.type == "multiclass" else torch.sigmoid(logits)[:, cls]
        best = torch.topk(probs, min(k, len(rows))).indices
        return rows[best].numpy(), probs[best].numpy()


def _rows(fields: Mapping[str, Tensor]) -> int:
    for tensor in fields.values():
        return int(tensor.shape[0])
    raise ValueError("cannot tell how many users: no user fields were given")


def ranking_report(model: RecModel, data: EncodedData, spec: InputSpec, split: SplitIndex, config: Config,
                   device: torch.device, max_users: int = 2000) -> dict[str, Any]:
    """HR@K, NDCG@K, Recall@K of held-out positive interactions, training items excluded.

    Users: those with a positive test interaction of the first binary interaction task (at most
    `max_users`, sampled with the training seed); candidates: the whole catalogue.
    """
    root = _root_binary_task(spec)
    if root is None or data.items is None or data.users is None:
        return {}
    state = build_serving_state(data, split, spec)
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for batch in data.iter_batches("interactions", split.rows("interactions", "test"), 65536):
        positive = ((batch.labels[root.name] > 0.5) & batch.masks[root.name]).numpy()
        users.append(batch.user["user_key"].numpy()[positive])
        items.append(batch.item["item_key"].numpy()[positive])
    if not users or not np.concatenate(users).size:
        return {}
    user_keys, item_keys = np.concatenate(users), np.concatenate(items)
    return _rank_held_out(model, spec, state, user_keys, item_keys, config, device, max_users)


def stream_ranking_report(model: RecModel, stream: InteractionStream, state: ServingState, spec: InputSpec,
                          config: Config, device: torch.device, max_users: int = 2000) -> dict[str, Any]:
    """`ranking_report` on streamed interactions, with the serving state built already.

    Two passes over the test rows' ids and root label: the users with a positive test
    interaction (memory ~ users), then the positives of the (at most `max_users`) sampled users.
    """
    root = _root_binary_task(spec)
    if root is None or stream.catalogue.items is None or stream.catalogue.users is None:
        return {}
    users = _UniqueKeys()
    for user_rows, _, positive in stream.keys_and_labels("test", root.name):
        users.add(user_rows[positive])
    test_users = _sample_users(users.values(), max_users, config.train.seed)
    if not test_users.size:
        return {}
    kept_users: list[np.ndarray] = []
    kept_items: list[np.ndarray] = []
    for user_rows, item_rows, positive in stream.keys_and_labels("test", root.name):
        keep = positive & np.isin(user_rows, test_users)
        kept_users.append(user_rows[keep])
        kept_items.append(item_rows[keep])
    return _rank_held_out(model, spec, state, np.concatenate(kept_users), np.concatenate(kept_items), config,
                          device, max_users)


def _sample_users(test_users: np.ndarray, max_users: int, seed: int) -> np.ndarray:
    """At most `max_users` of the distinct, sorted `test_users`, sampled with `seed`."""
    if len(test_users) > max_users:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(test_users, max_users, replace=False))
    return test_users


def _rank_held_out(model: RecModel, spec: InputSpec, state: ServingState, user_keys: np.ndarray,
                   item_keys: np.ndarray, config: Config, device: torch.device, max_users: int) -> dict[str, Any]:
    """Ranking metrics of the positive (user row, item row) test pairs [M] over the whole catalogue."""
    root = _root_binary_task(spec)
    assert root is not None
    test_users = _sample_users(np.unique(user_keys), max_users, config.train.seed)
    keep = np.isin(user_keys, test_users)
    position = np.searchsorted(test_users, user_keys[keep])
    relevant = [item_keys[keep][position == i] for i in range(len(test_users))]
    exclude = [state.seen(int(u)) for u in test_users]
    recommender = Recommender(model.to(device), spec, state, config.recommend)
    fused, _ = recommender.score(torch.as_tensor(test_users))
    metrics = ranking_metrics(fused.cpu().numpy(), relevant, exclude, ks=config.train.ranking_k)
    return {"task": root.name, "users": int(len(test_users)), "candidates": state.num_items, "metrics": metrics}
