"""Encoded tables as contiguous tensors, batches cut from them by index, and seeded samplers.

`Schema.encode` builds an `EncodedData`: one `EntityTable` per entity kind (every known user or
item, one row each) and one `SourceData` per table (its rows' keys into the entity tables,
context fields, behaviour sequences, labels and masks). A batch is a handful of `index_select`
calls on those tensors; no Python runs per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mtlrec.data.batch import Batch
from mtlrec.data.encoders import ArrayLike, IdIndex
from mtlrec.data.sharding import check_rank, shard
from mtlrec.data.spec import InputSpec
from mtlrec.errors import DataError

SOURCES = ("interactions", "users", "items", "item_pairs")


def _take(tensor: Tensor, rows: Tensor) -> Tensor:
    """Rows of a stored column; compact int32 storage comes back as int64."""
    out = tensor.index_select(0, rows)
    return out.long() if out.dtype == torch.int32 else out


def as_rows(rows: Tensor | np.ndarray | list[int]) -> Tensor:
    """Row positions as a 1-d int64 tensor."""
    out = torch.as_tensor(rows, dtype=torch.int64)
    if out.dim() != 1:
        raise ValueError(f"rows must be 1-d, got shape {tuple(out.shape)}")
    return out


@dataclass
class EntityTable:
    """Every known user (or item): one row per entity, holding that group's fields.

    Entity rows are the ids of the users (items) table in table order, then ids seen only in
    interactions (and item pairs), in order of first appearance; ids the schema was fitted on keep
    their rows. `fields` follow the spec's order for the group: 'user_id' / 'item_id' is the
    vocabulary index of the id (OOV = 1 when it was not in training), entity-table features
    (missing for entities without a table row) and, for users, each sequence feature's latest
    history (the last `max_len` items of the user's training interactions, most recent first).

    Shapes: categorical int64 [K], numeric float32 [K, 2], multi-categorical and sequence int64 [K, L].
    """

    kind: str
    ids: IdIndex
    fields: dict[str, Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_rows(self) -> int:
        """K, the number of entity rows."""
        return len(self.ids)

    def gather(self, rows: Tensor) -> dict[str, Tensor]:
        """Every field at entity `rows` [B] -> dict of [B, ...] tensors."""
        return {name: _take(t, rows) for name, t in self.fields.items()}

    def rows_of(self, raw_ids: ArrayLike) -> np.ndarray:
        """Entity row of each raw id -> int64 [N], -1 when unknown."""
        return self.ids.rows(raw_ids)

    def raw_ids(self) -> np.ndarray:
        """Raw id of every entity row [K]."""
        return self.ids.raw()


@dataclass
class SourceData:
    """The encoded rows of one table.

    `keys` hold entity rows (int64 [N]): 'user_key' / 'item_key' for interactions, 'user_key'
    for users, 'item_key' for items, 'item_key' / 'item_b_key' for item pairs. `context` holds the
    interactions' own fields, `sequences` the per-row behaviour sequences (history strictly
    before each row's timestamp). Index columns may be stored as int32 to halve memory; batches
    always carry int64.
    """

    num_rows: int
    keys: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Tensor] = field(default_factory=dict)
    sequences: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)


class EncodedData:
    """All rows of every source, encoded; batches are cut by row index.

    Args:
        spec: the fitted schema's input spec.
        users: the user entity table, or None when the config has no user ids.
        items: the item entity table, or None when the config has no item ids.
        sources: encoded rows of each table given to `Schema.encode`.
    """

    def __init__(self, spec: InputSpec, users: EntityTable | None, items: EntityTable | None,
                 sources: dict[str, SourceData]) -> None:
        self.spec = spec
        self.users = users
        self.items = items
        self.sources = sources

    def _source(self, source: str) -> SourceData:
        data = self.sources.get(source)
        if data is None:
            raise DataError(f"no '{source}' rows were encoded; encoded sources are {sorted(self.sources)}")
        return data

    def num_rows(self, source: str) -> int:
        """Rows of table `source` ('interactions', 'users', 'items', 'item_pairs')."""
        return self._source(source).num_rows

    def _user_group(self, keys: Tensor, data: SourceData | None, rows: Tensor | None) -> dict[str, Tensor]:
        users = self.users
        if users is None:
            return {}
        out: dict[str, Tensor] = {}
        for spec in self.spec.group("user"):
            if spec.kind == "sequence" and data is not None and rows is not None:
                out[spec.name] = _take(data.sequences[spec.name], rows)
            else:
                out[spec.name] = _take(users.fields[spec.name], keys)
        out["user_key"] = keys
        return out

    def _item_group(self, keys: Tensor) -> dict[str, Tensor]:
        if self.items is None:
            return {}
        out = self.items.gather(keys)
        out["item_key"] = keys
        return out

    def batch(self, source: str, rows: Tensor | np.ndarray) -> Batch:
        """The batch of rows `rows` [B] of table `source`.

        interactions: user group at each row's user (with the row's own history sequences),
        item group at its item, context fields, every interaction task's labels and masks.
        users / items: that entity group and the user / item tasks' labels. item_pairs: `item`
        is item_a, `item_b` is item_b, with the pair tasks' labels. Groups carry 'user_key' /
        'item_key' (entity rows, int64 [B]) besides the spec's fields.
        """
        data = self._source(source)
        index = as_rows(rows)
        out = Batch(source)
        if source == "interactions":
            if self.users is not None:
                out.user = self._user_group(_take(data.keys["user_key"], index), data, index)
            if self.items is not None:
                out.item = self._item_group(_take(data.keys["item_key"], index))
            out.context = {name: _take(t, index) for name, t in data.context.items()}
        elif source == "users":
            out.user = self._user_group(_take(data.keys["user_key"], index), None, None)
        elif source == "items":
            out.item = self._item_group(_take(data.keys["item_key"], index))
        else:
            out.item = self._item_group(_take(data.keys["item_key"], index))
            out.item_b = self._item_group(_take(data.keys["item_b_key"], index))
        out.labels = {name: _take(t, index) for name, t in data.labels.items()}
        out.masks = {name: _take(t, index) for name, t in data.masks.items()}
        return out

    def entity_group(self, kind: str, entity_rows: Tensor | np.ndarray) -> dict[str, Tensor]:
        """The 'user' or 'item' group of entity rows [B] (serving: score any user or item)."""
        keys = as_rows(entity_rows)
        if kind == "user":
            if self.users is None:
                raise DataError("there are no user entities: data.user_id is null")
            return self._user_group(keys, None, None)
        if kind == "item":
            if self.items is None:
                raise DataError("there are no item entities: data.item_id is null")
            return self._item_group(keys)
        raise ValueError(f"kind must be 'user' or 'item', got {kind!r}")

    def iter_batches(self, source: str, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        """Batches of `rows` in order (evaluation, prediction)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        index = as_rows(rows)
        for start in range(0, index.numel(), batch_size):
            yield self.batch(source, index[start:start + batch_size])

    def seen_items(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(user entity row, item entity row) of interaction `rows` (default all) -> two int64 [M]."""
        data = self._source("interactions")
        if "user_key" not in data.keys or "item_key" not in data.keys:
            raise DataError("seen items need data.user_id and data.item_id")
        users = data.keys["user_key"].numpy()
        items = data.keys["item_key"].numpy()
        if rows is None:
            return users.copy(), items.copy()
        index = np.asarray(rows, dtype=np.int64)
        return users[index], items[index]


# ---------------------------------------------------------------------------------------------
# Behaviour sequences


class HistoryIndex:
    """Each user's interactions in time order, for building "items strictly before" sequences.

    Rows are sorted once by (user, timestamp, row). A sequence feature then costs one cumulative
    count of its eligible rows and, per row, one read of a contiguous block of the eligible items
    in sorted order. Rows with equal timestamps do not see each other.

    Args:
        users: int64 [N] user entity row of each interaction.
        timestamps: [N] sortable timestamps (integers or floats).
        num_users: K, the number of user entity rows.
    """

    chunk = 1 << 17
    """Rows gathered at a time: bounds the [chunk, L] temporaries."""

    def __init__(self, users: np.ndarray, timestamps: np.ndarray, num_users: int) -> None:
        n = users.size
        self.order = self._sort(users, timestamps, num_users)
        u_sorted = users[self.order]
        t_sorted = timestamps[self.order]
        positions = np.arange(n, dtype=np.int64)
        new_user = np.ones(n, dtype=bool)
        new_tie = np.ones(n, dtype=bool)
        if n > 1:
            np.not_equal(u_sorted[1:], u_sorted[:-1], out=new_user[1:])
            np.not_equal(t_sorted[1:], t_sorted[:-1], out=new_tie[1:])
            new_tie |= new_user
        del t_sorted
        # By original row: sorted position of the first row of its user, and of its
        # (user, timestamp) tie group.
        self.user_start = np.empty(n, dtype=np.int64)
        self.user_start[self.order] = np.maximum.accumulate(np.where(new_user, positions, 0))
        self.tie_start = np.empty(n, dtype=np.int64)
        self.tie_start[self.order] = np.maximum.accumulate(np.where(new_tie, positions, 0))
        # Per user entity: sorted positions [begin, end) of its rows (empty for users without rows).
        self.user_begin = np.zeros(num_users, dtype=np.int64)
        self.user_end = np.zeros(num_users, dtype=np.int64)
        starts = np.flatnonzero(new_user)
        self.user_begin[u_sorted[starts]] = starts
        self.user_end[u_sorted[starts]] = np.r_[starts[1:], n]

    @staticmethod
    def _sort(users: np.ndarray, timestamps: np.ndarray, num_users: int) -> np.ndarray:
        """Stable order by (user, timestamp): one int64 key sort when it fits, else a lexsort."""
        if timestamps.dtype.kind in "iu" and timestamps.size:
            low, high = int(timestamps.min()), int(timestamps.max())
            span = high - low + 1
            if num_users * span < 2**62:
                key = users.astype(np.int64) * np.int64(span) + (timestamps.astype(np.int64) - np.int64(low))
                return np.argsort(key, kind="stable")
        return np.lexsort((timestamps, users))

    def _eligible(self, items: np.ndarray, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cum int64 [N+1]: eligible rows among the first p sorted; their items int32, sorted)."""
        e_sorted = eligible[self.order]
        cum = np.zeros(e_sorted.size + 1, dtype=np.int64)
        np.cumsum(e_sorted, out=cum[1:])
        return cum, items[self.order[e_sorted]].astype(np.int32)

    def _write(self, out: np.ndarray, rows: np.ndarray | None, e_items: np.ndarray, count: np.ndarray,
               avail: np.ndarray) -> None:
        """out[rows[m]] = the `avail[m]` (at most L) eligible items before the `count[m]`-th, newest first."""
        length = out.shape[1]
        m = count.size
        if e_items.size == 0:
            return
        back = np.arange(1, length + 1, dtype=np.int64)
        for start in range(0, m, self.chunk):
            stop = min(start + self.chunk, m)
            idx = count[start:stop, None] - back  # [c, L]
            np.maximum(idx, 0, out=idx)
            values = e_items[idx]
            values[back > avail[start:stop, None]] = 0
            if rows is None:
                out[start:stop] = values
            else:
                out[rows[start:stop]] = values

    def fill_before(self, items: np.ndarray, eligible: np.ndarray, targets: np.ndarray | None,
                    out: np.ndarray) -> None:
        """Write each target row's user's eligible items with a strictly earlier timestamp.

        Args:
            items: int [N] item vocabulary index of every row.
            eligible: bool [N] rows allowed into histories.
            targets: bool [N] rows whose sequences to write, or None for every row.
            out: int32 [N, L], written at the target rows: most recent first, padded with 0.
        """
        cum, e_items = self._eligible(items, eligible)
        rows = None if targets is None else np.flatnonzero(targets)
        tie = self.tie_start if rows is None else self.tie_start[rows]
        first = self.user_start if rows is None else self.user_start[rows]
        count = cum[tie]
        self._write(out, rows, e_items, count, count - cum[first])

    def latest(self, items: np.ndarray, eligible: np.ndarray, max_len: int) -> np.ndarray:
        """Per user entity, the last `max_len` eligible items -> int32 [K, L], most recent first."""
        cum, e_items = self._eligible(items, eligible)
        out = np.zeros((self.user_end.size, max_len), dtype=np.int32)
        count = cum[self.user_end]
        self._write(out, None, e_items, count, count - cum[self.user_begin])
        return out


# ---------------------------------------------------------------------------------------------
# Samplers


def _generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return gen


class Sampler:
    """Shuffled batches of one source's training rows, deterministic and resumable.

    Each pass (epoch) is a fresh permutation from a `torch.Generator` seeded with (seed, epoch).
    `epoch(e)` iterates pass e; `next()` cycles passes endlessly (auxiliary sources drawn every
    step). `state_dict()` records the pass and the batches already drawn from it, so a restored
    sampler continues with exactly the batch that would have come next.

    Distributed training: every replica builds the same sampler with its own `rank`. The
    permutation and the global batches depend only on (seed, pass), so they are the same on every
    replica; each replica takes its contiguous part of each global batch (`sharding.shard`). A pass
    thus covers every row exactly once across the replicas, every replica takes `len(self)` steps,
    and the state (pass, global batches drawn) is the same everywhere, so one checkpoint resumes
    them all, at any world size. A part is empty when a global batch has fewer rows than
    `world_size` (the last batch of a pass, or a small auxiliary batch).

    Args:
        rows: int64 [N] the row positions to sample from.
        batch_size: rows per global batch (across all replicas).
        seed: the run's seed.
        drop_last: drop the final short batch of each pass.
        rank: this replica's rank, in [0, world_size).
        world_size: number of replicas sharing each batch.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, seed: int, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_rank(rank, world_size)
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        self._position = 0
        self._cached: tuple[int, Tensor] | None = None
        self._head = self.rows[:1]

    def __len__(self) -> int:
        """Batches per pass."""
        n = int(self.rows.numel())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _permuted(self, epoch: int) -> Tensor:
        if self._cached is None or self._cached[0] != epoch:
            perm = torch.randperm(int(self.rows.numel()), generator=_generator(self.seed, epoch))
            self._cached = (epoch, self.rows[perm])
        return self._cached[1]

    def _slice(self, epoch: int, position: int) -> Tensor:
        start = position * self.batch_size
        rows = self._permuted(epoch)[start:start + self.batch_size]
        self._head = rows[:1]
        return shard(rows, self.rank, self.world_size)

    def head(self) -> Tensor:
        """The first row (int64 [1]) of the global batch drawn last.

        A replica whose part of that batch was empty steps on this row with its labels masked out
        (`Batch.unlabelled`): the row is in the global batch, so the embedding rows it touches are
        touched by the step anyway and the update equals a single process's.
        """
        return self._head

    def epoch(self, epoch: int) -> Iterator[Tensor]:
        """Batches of pass `epoch`, each int64 [batch_size] (the last may be shorter; with
        `world_size` > 1, this replica's part of each batch).

        If the sampler's state is inside this pass (after `load_state_dict`, or an interrupted
        loop), iteration resumes there; the state moves on as batches are drawn.
        """
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0
        while self._position < len(self):
            batch = self._slice(epoch, self._position)
            self._position += 1
            yield batch
        self._epoch, self._position = epoch + 1, 0

    def next(self) -> Tensor:
        """The next batch, moving to the next pass (a new permutation) at the end of each."""
        if len(self) == 0:
            raise DataError("the sampler has no batches: its rows are empty (or fewer than one batch "
                            "with drop_last)")
        if self._position >= len(self):
            self._epoch, self._position = self._epoch + 1, 0
        batch = self._slice(self._epoch, self._position)
        self._position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """{'epoch', 'position', 'num_rows', 'batch_size', 'seed'}: where sampling stands."""
        return {"epoch": self._epoch, "position": self._position, "num_rows": int(self.rows.numel()),
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`; the rows, batch size and seed must be the same."""
        for key in ("num_rows", "batch_size", "seed"):
            current = self.state_dict()[key]
            if key in state and int(state[key]) != current:
                raise ValueError(f"sampler state has {key}={state[key]}, but this sampler has {current}; "
                                 "resume with the same data and settings")
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
