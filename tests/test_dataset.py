"""EncodedData against a slow per-row reference, history leakage, and resumable samplers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.config import Config, config_from_dict
from mtlrec.data.batch import Batch
from mtlrec.data.dataset import EncodedData, HistoryIndex, Sampler
from mtlrec.data.schema import Schema
from mtlrec.data.split import SplitIndex, split_tables
from mtlrec.data.tables import Tables
from mtlrec.errors import DataError

# ---------------------------------------------------------------------------------------------
# A slow, obviously-correct reference: one Python loop per row, from the raw tables and the
# schema's saved vocabularies.


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class Reference:
    def __init__(self, tables: Tables, config: Config, schema: Schema, split: SplitIndex | None) -> None:
        self.t, self.cfg, self.split = tables, config, split
        d = schema.to_dict()
        self.vocab = {name: {v: i + 2 for i, v in enumerate(enc["vocab"])}
                      for name, enc in [("user_id", d["user_vocab"]), ("item_id", d["item_vocab"])]}
        self.features = d["features"]
        self.classes = {t.name: list(t.classes) for t in schema.spec_.tasks}
        users, items, inter = tables.users, tables.items, tables.interactions
        assert users is not None and items is not None and tables.item_pairs is not None
        pairs = tables.item_pairs
        as_str = lambda column: [str(v) for v in column]  # noqa: E731
        self.user_ids = list(dict.fromkeys(as_str(users["user_id"]) + as_str(inter["user_id"])))
        self.item_ids = list(dict.fromkeys(as_str(items["item_id"]) + as_str(inter["item_id"])
                                           + as_str(pairs["item_a"]) + as_str(pairs["item_b"])))
        self.user_row = {str(u): r for r, u in enumerate(users["user_id"])}
        self.item_row = {str(i): r for r, i in enumerate(items["item_id"])}
        self.train = (set(range(len(inter))) if split is None
                      else set(split.rows("interactions", "train").tolist()))

    def categorical(self, name: str, value: Any) -> int:
        if _missing(value):
            return 0
        vocab = self.features[name]["vocab"]["vocab"] if name == "tags" else self.features[name]["vocab"]
        return {v: i + 2 for i, v in enumerate(vocab)}.get(str(value), 1)

    def numeric(self, name: str, value: Any) -> list[float]:
        if _missing(value):
            return [0.0, 1.0]
        enc = self.features[name]
        return [(float(value) - enc["mean"]) / enc["std"], 0.0]

    def tags(self, value: Any) -> list[int]:
        tokens = [] if _missing(value) else [t for t in str(value).split("|") if t]
        codes = [self.categorical("tags", t) for t in tokens][:3]
        return codes + [0] * (3 - len(codes))

    def history(self, user: str, before: float | None, train_only: bool) -> list[int]:
        inter = self.t.interactions
        picked = []
        for j in range(len(inter)):
            row = inter.iloc[j]
            if str(row["user_id"]) != user or row["click"] != 1:
                continue
            if before is not None and not row["ts"] < before:
                continue
            if train_only and j not in self.train:
                continue
            picked.append((row["ts"], j, self.vocab["item_id"].get(str(row["item_id"]), 1)))
        picked.sort(reverse=True)
        codes = [c for _, _, c in picked][:4]
        return codes + [0] * (4 - len(codes))

    def user_group(self, user: str, history: list[int]) -> dict[str, Any]:
        assert self.t.users is not None
        r = self.user_row.get(user)
        age = None if r is None else self.t.users["age"].iloc[r]
        region = None if r is None else self.t.users["region"].iloc[r]
        return {"user_id": self.vocab["user_id"].get(user, 1), "age": self.numeric("age", age),
                "region": self.categorical("region", region), "hist": history,
                "user_key": self.user_ids.index(user)}

    def item_group(self, item: str) -> dict[str, Any]:
        assert self.t.items is not None
        r = self.item_row.get(item)
        category = None if r is None else self.t.items["category"].iloc[r]
        tags = None if r is None else self.t.items["tags"].iloc[r]
        return {"item_id": self.vocab["item_id"].get(item, 1),
                "category": self.categorical("category", category),
                "tags": self.tags(tags), "item_key": self.item_ids.index(item)}

    def interaction(self, r: int) -> dict[str, Any]:
        row = self.t.interactions.iloc[r]
        user = str(row["user_id"])
        sees_all = self.split is not None and r not in self.train
        history = self.history(user, row["ts"], train_only=self.split is not None and not sees_all)
        click = float(row["click"])
        return {
            "user": self.user_group(user, history),
            "item": self.item_group(str(row["item_id"])),
            "context": {"device": self.categorical("device", row["device"]),
                        "price": self.numeric("price", row["price"])},
            "labels": {"click": click, "buy": float(row["buy"]) if click == 1 else 0.0,
                       "rating": 0.0 if _missing(row["rating"]) else float(row["rating"])},
            "masks": {"click": True, "buy": click == 1, "rating": not _missing(row["rating"])},
        }

    def user(self, r: int) -> dict[str, Any]:
        assert self.t.users is not None
        row = self.t.users.iloc[r]
        user = str(row["user_id"])
        history = self.history(user, None, train_only=self.split is not None)
        return {"user": self.user_group(user, history),
                "labels": {"segment": self.classes["segment"].index(row["segment"])},
                "masks": {"segment": True}}

    def item(self, r: int) -> dict[str, Any]:
        assert self.t.items is not None
        row = self.t.items.iloc[r]
        topics = [] if _missing(row["topics"]) else [t for t in row["topics"].split("|") if t]
        return {"item": self.item_group(str(row["item_id"])),
                "labels": {"genre": self.classes["genre"].index(row["genre"]),
                           "topics": [float(c in topics) for c in self.classes["topics"]]},
                "masks": {"genre": True, "topics": not _missing(row["topics"])}}

    def pair(self, r: int) -> dict[str, Any]:
        assert self.t.item_pairs is not None
        row = self.t.item_pairs.iloc[r]
        return {"item": self.item_group(str(row["item_a"])), "item_b": self.item_group(str(row["item_b"])),
                "labels": {"relation": self.classes["relation"].index(row["relation"])},
                "masks": {"relation": True}}


def assert_matches(batch: Batch, expected: list[dict[str, Any]]) -> None:
    for group in ("user", "item", "item_b", "context", "labels", "masks"):
        got = getattr(batch, group)
        want_keys = set(expected[0].get(group, {}))
        assert set(got) == want_keys, group
        for key in want_keys:
            want = torch.tensor([e[group][key] for e in expected])
            tensor = got[key]
            assert tensor.shape == want.shape, (group, key)
            assert torch.allclose(tensor.double(), want.double(), atol=1e-5), (group, key, tensor, want)
            if tensor.dtype not in (torch.float32, torch.bool):
                assert tensor.dtype == torch.int64, (group, key)


@pytest.fixture
def encoded(tables: Tables, config: Config) -> tuple[EncodedData, Reference, SplitIndex]:
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    return schema.encode(tables, split), Reference(tables, config, schema, split), split


def test_interaction_batches_match_the_reference(encoded: tuple[EncodedData, Reference, SplitIndex]) -> None:
    data, ref, split = encoded
    rows = np.r_[split.rows("interactions", "train")[:60], split.rows("interactions", "test")[:40]]
    rows = np.random.default_rng(0).permutation(rows)  # any order
    assert_matches(data.batch("interactions", torch.as_tensor(rows)), [ref.interaction(int(r)) for r in rows])


def test_entity_and_pair_batches_match_the_reference(encoded: tuple[EncodedData, Reference, SplitIndex],
                                                     tables: Tables) -> None:
    data, ref, _ = encoded
    assert tables.users is not None and tables.items is not None and tables.item_pairs is not None
    users = np.arange(len(tables.users))[::-1].copy()
    assert_matches(data.batch("users", torch.as_tensor(users)), [ref.user(int(r)) for r in users])
    items = np.arange(len(tables.items))
    assert_matches(data.batch("items", items), [ref.item(int(r)) for r in items])
    pairs = np.arange(len(tables.item_pairs))
    assert_matches(data.batch("item_pairs", pairs), [ref.pair(int(r)) for r in pairs])


def test_without_a_split_histories_use_every_earlier_row(tables: Tables, config: Config) -> None:
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    data, ref = schema.encode(tables), Reference(tables, config, schema, None)
    rows = np.arange(0, len(tables.interactions), 7)
    assert_matches(data.batch("interactions", rows), [ref.interaction(int(r)) for r in rows])


def test_sequences_never_see_the_future_nor_ties_nor_unfiltered_rows() -> None:
    inter = pd.DataFrame({
        "user_id": [1, 1, 1, 1, 1, 2, 1],
        "item_id": [10, 11, 12, 13, 14, 15, 16],
        "ts":      [5, 1, 3, 3, 9, 2, 7],
        "click":   [1, 1, 1, 1, 1, 1, 0],
    })
    config = config_from_dict({
        "data": {"interactions": "i.csv", "timestamp": "ts", "split": {"valid": 0.0, "test": 0.0}},
        "features": [{"name": "hist", "type": "sequence", "max_len": 3, "filter": "click"}],
        "tasks": [{"name": "click", "kind": "interaction", "label": "click", "type": "binary"}]})
    tables = Tables(inter)
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    item = {v: i + 2 for i, v in enumerate(schema.to_dict()["item_vocab"]["vocab"])}
    data = schema.encode(tables, split)
    hist = data.batch("interactions", torch.arange(7)).user["hist"].tolist()
    code = lambda *ids: [item[str(i)] for i in ids] + [0] * (3 - len(ids))  # noqa: E731
    assert hist[1] == code()                  # ts 1: the user's first event
    assert hist[2] == code(11)                # ts 3: not row 3, which has the same timestamp
    assert hist[3] == code(11)                # ... and symmetrically
    assert hist[0] == code(13, 12, 11)        # ts 5: most recent first (tie kept in row order)
    assert hist[6] == code(10, 13, 12)        # ts 7: truncated to max_len
    assert hist[4] == code(10, 13, 12)        # ts 9: row 6 (ts 7) is not clicked, so not in the history
    assert hist[5] == code()                  # another user's rows never leak in
    latest = data.entity_group("user", torch.as_tensor(schema.user_rows([1, 2])))["hist"].tolist()
    assert latest == [code(14, 10, 13), code(15)]


def test_training_rows_see_only_training_rows(tables: Tables, config: Config) -> None:
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    data = schema.encode(tables, split)
    inter = tables.interactions
    held = np.r_[split.rows("interactions", "valid"), split.rows("interactions", "test")]
    item = {v: i + 2 for i, v in enumerate(schema.to_dict()["item_vocab"]["vocab"])}
    # an item only held-out rows have would show up in a training row's history on leakage
    train = split.rows("interactions", "train")
    batch = data.batch("interactions", torch.as_tensor(train))
    for row, hist in zip(train, batch.user["hist"].tolist(), strict=True):
        user, ts = inter["user_id"].iloc[row], inter["ts"].iloc[row]
        allowed = inter.iloc[np.setdiff1d(np.arange(len(inter)), held)]
        allowed = allowed[(allowed["user_id"] == user) & (allowed["ts"] < ts) & (allowed["click"] == 1)]
        assert set(h for h in hist if h) <= {item.get(str(i), 1) for i in allowed["item_id"]}


def test_history_index_float_timestamps_match_integer_ones() -> None:
    rng = np.random.default_rng(4)
    n, k = 3000, 50
    users = rng.integers(0, k, n)
    ts = rng.integers(0, 100, n)
    items = rng.integers(2, 500, n)
    eligible = rng.random(n) < 0.6
    outs = []
    for stamps in (ts, ts.astype(np.float64) / 7.0):
        index = HistoryIndex(users, stamps, k + 3)  # users without rows too
        out = np.zeros((n, 6), dtype=np.int32)
        index.fill_before(items, eligible, None, out)
        outs.append((out, index.latest(items, eligible, 6)))
    assert np.array_equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert (outs[0][1][k:] == 0).all()
    # spot-check against a direct computation
    for r in rng.choice(n, 50, replace=False):
        mine = np.flatnonzero((users == users[r]) & (ts < ts[r]) & eligible)
        mine = mine[np.lexsort((mine, ts[mine]))][::-1][:6]
        assert outs[0][0][r].tolist() == items[mine].tolist() + [0] * (6 - mine.size)


def test_iter_batches_num_rows_seen_items(encoded: tuple[EncodedData, Reference, SplitIndex],
                                          tables: Tables) -> None:
    data, ref, split = encoded
    rows = split.rows("interactions", "valid")
    batches = list(data.iter_batches("interactions", rows, 16))
    assert [len(b) for b in batches] == [16, 16, 16, 12]
    keys = torch.cat([b.user["user_key"] for b in batches]).numpy()
    users, items = data.seen_items(rows)
    assert np.array_equal(keys, users)
    assert users.tolist() == [ref.user_ids.index(str(u)) for u in tables.interactions["user_id"].iloc[rows]]
    assert items.tolist() == [ref.item_ids.index(str(i)) for i in tables.interactions["item_id"].iloc[rows]]
    assert len(data.seen_items()[0]) == data.num_rows("interactions") == len(tables.interactions)
    assert data.users is not None and data.users.num_rows == len(ref.user_ids)
    assert data.items is not None and data.items.raw_ids().tolist() == [int(i) for i in ref.item_ids]
    with pytest.raises(DataError, match="no 'nope' rows"):
        data.num_rows("nope")


# ---------------------------------------------------------------------------------------------
# Samplers


def drain(sampler: Sampler, epoch: int) -> list[list[int]]:
    return [b.tolist() for b in sampler.epoch(epoch)]


def test_sampler_is_a_seeded_shuffle_of_the_rows() -> None:
    rows = np.arange(100, 150)
    sampler = Sampler(rows, batch_size=8, seed=3)
    assert len(sampler) == 7 and len(Sampler(rows, 8, 3, drop_last=True)) == 6
    first = drain(sampler, 0)
    assert sorted(sum(first, [])) == rows.tolist() and [len(b) for b in first] == [8] * 6 + [2]
    assert first == drain(Sampler(rows, 8, 3), 0)  # same seed, same epoch: same order
    assert first != drain(Sampler(rows, 8, 3), 1)  # a new permutation per epoch
    assert first != drain(Sampler(rows, 8, 4), 0)
    assert all(len(b) == 8 for b in drain(Sampler(rows, 8, 3, drop_last=True), 0))


def test_sampler_resumes_mid_epoch_exactly() -> None:
    rows = np.arange(37)
    full = Sampler(rows, 5, seed=11)
    expected = drain(full, 2)
    interrupted = Sampler(rows, 5, seed=11)
    it = interrupted.epoch(2)
    seen = [next(it).tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3
    resumed = Sampler(rows, 5, seed=11)
    resumed.load_state_dict(state)
    assert seen + drain(resumed, 2) == expected
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0
    assert drain(resumed, 3) == drain(Sampler(rows, 5, seed=11), 3)


def test_sampler_next_cycles_and_resumes() -> None:
    rows = np.arange(10)
    sampler = Sampler(rows, 4, seed=0)
    drawn = [sampler.next().tolist() for _ in range(7)]  # passes of 3 batches: 4 + 4 + 2
    assert sorted(sum(drawn[:3], [])) == list(range(10)) and sorted(sum(drawn[3:6], [])) == list(range(10))
    assert drawn[:3] == drain(Sampler(rows, 4, seed=0), 0)
    assert drawn[3:6] == drain(Sampler(rows, 4, seed=0), 1)
    state = sampler.state_dict()
    more = [sampler.next().tolist() for _ in range(5)]
    other = Sampler(rows, 4, seed=0)
    other.load_state_dict(state)
    assert [other.next().tolist() for _ in range(5)] == more


def test_sampler_state_must_match() -> None:
    state = Sampler(np.arange(10), 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_rows"):
        Sampler(np.arange(12), 4, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="no batches"):
        Sampler(np.arange(0), 4, seed=0).next()
