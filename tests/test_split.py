"""Splits: disjoint and covering, seeded, by time, leave-last-out, and by entity for users/items/pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlrec.config import config_from_dict
from mtlrec.data.split import PARTS, SplitIndex, split_tables
from mtlrec.data.tables import Tables
from mtlrec.errors import ConfigError

TASK_Y = [{"name": "y", "kind": "interaction", "label": "y", "type": "binary"}]


def assert_partition(split: SplitIndex, source: str, n: int) -> None:
    rows = [split.rows(source, part) for part in PARTS]
    for r in rows:
        assert r.dtype == np.int64
        assert np.all(np.diff(r) > 0)  # sorted, no repeats
    joined = np.concatenate(rows)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint and covering


def with_split(config_dict: dict[str, Any], **split: Any) -> dict[str, Any]:
    config_dict["data"]["split"].update(split)
    return config_dict


def test_random_split_is_a_seeded_partition(tables: Tables, config_dict: dict[str, Any]) -> None:
    config = config_from_dict(config_dict)
    split = split_tables(tables, config)
    for source in ("interactions", "users", "items", "item_pairs"):
        table = tables.get(source)
        assert table is not None
        assert_partition(split, source, len(table))
    sizes = split.sizes()["interactions"]
    assert sizes == {"train": 280, "valid": 60, "test": 60}  # 400 rows at 0.15 / 0.15
    again = split_tables(tables, config)
    other = split_tables(tables, config_from_dict(with_split(config_dict, seed=99)))
    for source in split.parts:
        for part in PARTS:
            assert np.array_equal(split.rows(source, part), again.rows(source, part))
    assert not np.array_equal(split.rows("interactions", "test"), other.rows("interactions", "test"))


def test_entity_splits_are_disjoint_by_entity(tables: Tables, config: Any) -> None:
    split = split_tables(tables, config)
    assert tables.users is not None and tables.items is not None
    for table, column, source in ((tables.users, "user_id", "users"), (tables.items, "item_id", "items")):
        ids = {part: set(table[column].to_numpy()[split.rows(source, part)]) for part in PARTS}
        assert not ids["train"] & ids["test"] and not ids["train"] & ids["valid"]
        assert not ids["valid"] & ids["test"]
        assert len(ids["test"]) > 0


def unordered_pairs(pairs: pd.DataFrame, rows: np.ndarray) -> set[frozenset[str]]:
    sub = pairs.iloc[rows]
    return {frozenset((str(a), str(b))) for a, b in zip(sub["item_a"], sub["item_b"], strict=True)}


@settings(max_examples=30, deadline=None)
@given(edges=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=40),
       seed=st.integers(0, 1000))
def test_item_pair_split_keeps_each_unordered_pair_in_one_part(edges: list[tuple[int, int]],
                                                               seed: int) -> None:
    pairs = pd.DataFrame(edges, columns=["item_a", "item_b"])
    pairs["item_b"] = pairs["item_b"].astype(str)  # ids compare as strings across columns
    tables = Tables(pd.DataFrame({"user_id": [1], "item_id": [1], "y": [1]}), item_pairs=pairs)
    config = config_from_dict({"data": {"interactions": "i.csv", "item_pairs": "p.csv",
                                        "split": {"valid": 0.2, "test": 0.2, "seed": seed}},
                               "tasks": TASK_Y})
    split = split_tables(tables, config)
    assert_partition(split, "item_pairs", len(pairs))
    groups = [unordered_pairs(pairs, split.rows("item_pairs", part)) for part in PARTS]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]


def test_time_split_puts_the_latest_rows_in_test(tables: Tables, config_dict: dict[str, Any]) -> None:
    split = split_tables(tables, config_from_dict(with_split(config_dict, method="time")))
    assert_partition(split, "interactions", len(tables.interactions))
    ts = tables.interactions["ts"].to_numpy()
    train, valid, test = (ts[split.rows("interactions", part)] for part in PARTS)
    assert train.max() < valid.min() and valid.max() < test.min()  # ties never straddle parts
    assert 0.05 < test.size / ts.size < 0.3


def test_time_split_needs_a_timestamp(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["data"]["timestamp"] = None
    config_dict["features"] = [f for f in config_dict["features"] if f["type"] != "sequence"]
    with pytest.raises(ConfigError, match=r"data.split.method is 'time'.*data.timestamp"):
        split_tables(tables, config_from_dict(with_split(config_dict, method="time")))
    with pytest.raises(ConfigError, match=r"leave_last_out.*data.timestamp"):
        split_tables(tables, config_from_dict(with_split(config_dict, method="leave_last_out")))


def test_leave_last_out_by_hand() -> None:
    inter = pd.DataFrame({
        #           u1: 4 rows            u2: 2 rows   u3: 3 rows (a tie at the end)
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u3", "u3", "u3"],
        "ts":      [40, 10, 30, 20, 5, 6, 1, 7, 7],
        "y":       [1, 0, 1, 0, 1, 0, 1, 1, 0],
    })
    config = config_from_dict({"data": {"interactions": "i.csv", "item_id": None, "timestamp": "ts",
                                        "split": {"method": "leave_last_out"}},
                               "tasks": TASK_Y})
    split = split_tables(Tables(inter), config)
    assert split.rows("interactions", "test").tolist() == [0, 8]  # u1's ts 40; u3's last row of the tie
    assert split.rows("interactions", "valid").tolist() == [2, 7]  # u1's ts 30; u3's earlier row of the tie
    assert split.rows("interactions", "train").tolist() == [1, 3, 4, 5, 6]  # u2 has < 3 rows: all train


def test_leave_last_out_every_user(make_tables: Any, config_dict: dict[str, Any]) -> None:
    tables = make_tables(seed=5)
    split = split_tables(tables, config_from_dict(with_split(config_dict, method="leave_last_out")))
    inter = tables.interactions.assign(row=np.arange(len(tables.interactions)))
    assert_partition(split, "interactions", len(inter))
    part_of = np.empty(len(inter), dtype=object)
    for part in PARTS:
        part_of[split.rows("interactions", part)] = part
    for _, rows in inter.sort_values(["user_id", "ts", "row"]).groupby("user_id"):
        parts = part_of[rows["row"].to_numpy()].tolist()
        if len(parts) < 3:
            assert parts == ["train"] * len(parts)
        else:
            assert parts == ["train"] * (len(parts) - 2) + ["valid", "test"]


def test_leave_last_out_without_valid_part() -> None:
    inter = pd.DataFrame({"user_id": [1, 1, 2, 2, 2], "ts": [1, 2, 1, 2, 3], "y": [0, 1, 0, 1, 1]})
    config = config_from_dict({"data": {"interactions": "i.csv", "item_id": None, "timestamp": "ts",
                                        "split": {"method": "leave_last_out", "valid": 0.0}},
                               "tasks": TASK_Y})
    split = split_tables(Tables(inter), config)
    assert split.rows("interactions", "test").tolist() == [1, 4]
    assert split.sizes()["interactions"]["valid"] == 0


def test_small_tables_keep_a_training_row() -> None:
    inter = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2], "y": [0, 1]})
    config = config_from_dict({"data": {"interactions": "i.csv", "split": {"valid": 0.4, "test": 0.4}},
                               "tasks": TASK_Y})
    sizes = split_tables(Tables(inter), config).sizes()["interactions"]
    assert sizes["train"] >= 1 and sum(sizes.values()) == 2
