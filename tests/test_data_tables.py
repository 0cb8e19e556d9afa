"""Reading tables and checking them against the config: one clear DataError per bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import config_from_dict
from mtlrec.data.tables import Tables, load_tables, read_table, validate_tables
from mtlrec.errors import DataError


def write_all(tables: Tables, folder: Path) -> None:
    tables.interactions.to_parquet(folder / "interactions.parquet")
    assert tables.users is not None and tables.items is not None and tables.item_pairs is not None
    tables.users.to_csv(folder / "users.csv", index=False)
    tables.items.to_parquet(folder / "items.parquet")
    tables.item_pairs.to_csv(folder / "pairs.tsv", sep="\t", index=False)


def file_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    config_dict["data"].update({"users": "users.csv", "item_pairs": "pairs.tsv"})
    return config_dict


def test_read_table_formats(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    df.to_parquet(tmp_path / "t.pq")
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    for name in ("t.pq", "t.csv", "t.tsv"):
        got = read_table(tmp_path / name, "users")
        assert got["a"].tolist() == [1, 2] and got["b"].tolist() == ["x", "y"], name
    assert read_table(df, "users") is df


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"table 'users'.*nope\.parquet.*does not exist"):
        read_table(tmp_path / "nope.parquet", "users")


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"table 'interactions'.*cannot read.*broken\.parquet"):
        read_table(bad, "interactions")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '\.xlsx'.*\.parquet"):
        read_table(path, "items")


def test_load_tables_reads_relative_paths_and_given_overrides(tmp_path: Path, tables: Tables,
                                                               config_dict: dict[str, Any]) -> None:
    write_all(tables, tmp_path)
    config = config_from_dict(file_config(config_dict))
    loaded = load_tables(config, tmp_path)
    assert loaded.present() == ["interactions", "users", "items", "item_pairs"]
    assert len(loaded.interactions) == len(tables.interactions)
    assert loaded.get("users") is not None and loaded.get("item_pairs") is not None
    smaller = tables.interactions.head(50)
    overridden = load_tables(config, tmp_path, {"interactions": smaller})
    assert overridden.interactions is smaller
    with pytest.raises(DataError, match="unknown table names"):
        load_tables(config, tmp_path, {"interaction": smaller})
    with pytest.raises(KeyError):
        tables.get("nope")


# ---------------------------------------------------------------------------------------------
# One test per bad input


def check(tables: Tables, config_dict: dict[str, Any], **labels: str) -> None:
    validate_tables(tables, config_from_dict(config_dict), labels or None)


def test_valid_tables_pass(tables: Tables, config_dict: dict[str, Any]) -> None:
    check(tables, config_dict)


def test_missing_label_column(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["tasks"][1]["label"] = "purchased"
    with pytest.raises(DataError) as info:
        check(tables, config_dict, interactions="interactions.parquet")
    msg = str(info.value)
    assert "task 'buy' (tasks[1].label) names label column 'purchased'" in msg
    assert "interactions.parquet does not have" in msg and "'click'" in msg  # lists the columns
    # prediction input may lack labels
    validate_tables(tables, config_from_dict(config_dict), require_labels=False)


def test_missing_feature_column(tables: Tables, config_dict: dict[str, Any]) -> None:
    assert tables.items is not None
    tables.items = tables.items.drop(columns=["category"])
    with pytest.raises(DataError, match=r"feature 'category' \(features\[5\]\).*'category'.*items"):
        check(tables, config_dict)


def test_missing_id_column(tables: Tables, config_dict: dict[str, Any]) -> None:
    tables.interactions = tables.interactions.rename(columns={"user_id": "uid"})
    with pytest.raises(DataError, match=r"data.user_id names column 'user_id'.*interactions.*'uid'"):
        check(tables, config_dict)


def test_missing_timestamp_column(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["data"]["timestamp"] = "time"
    with pytest.raises(DataError, match=r"data.timestamp names column 'time'"):
        check(tables, config_dict)


def test_nan_in_id_column(tables: Tables, config_dict: dict[str, Any]) -> None:
    inter = tables.interactions.copy()
    inter["item_id"] = inter["item_id"].astype(float)
    inter.loc[7, "item_id"] = np.nan
    tables.interactions = inter
    with pytest.raises(DataError, match=r"data.item_id: column 'item_id'.*1 missing ids.*rows \[7\]"):
        check(tables, config_dict)


def test_duplicate_user_ids(tables: Tables, config_dict: dict[str, Any]) -> None:
    assert tables.users is not None
    tables.users = pd.concat([tables.users, tables.users.iloc[[4]]], ignore_index=True)
    with pytest.raises(DataError, match=r"data.user_id: users.csv has duplicate ids.*'4'"):
        check(tables, config_dict, users="users.csv")


def test_duplicate_item_ids(tables: Tables, config_dict: dict[str, Any]) -> None:
    assert tables.items is not None
    tables.items = pd.concat([tables.items, tables.items.iloc[[2, 3]]], ignore_index=True)
    with pytest.raises(DataError, match=r"data.item_id:.*duplicate ids.*\['2', '3'\]"):
        check(tables, config_dict)


def test_item_pairs_naming_unknown_items(tables: Tables, config_dict: dict[str, Any]) -> None:
    assert tables.item_pairs is not None
    pairs = tables.item_pairs.copy()
    pairs.loc[0, "item_b"] = 999
    tables.item_pairs = pairs
    with pytest.raises(DataError, match=r"data.item_b: column 'item_b'.*names 1 items.*'999'"):
        check(tables, config_dict)


def test_non_numeric_numeric_feature(tables: Tables, config_dict: dict[str, Any]) -> None:
    inter = tables.interactions.copy()
    inter["price"] = inter["price"].astype(object)
    inter.loc[3, "price"] = "expensive"
    tables.interactions = inter
    with pytest.raises(DataError,
                       match=r"feature 'price' \(features\[1\]\) is numeric.*'expensive'.*categorical"):
        check(tables, config_dict)


def test_numbers_stored_as_text_are_accepted(tables: Tables, config_dict: dict[str, Any]) -> None:
    tables.interactions = tables.interactions.assign(price=tables.interactions["price"].astype(str))
    check(tables, config_dict)


def test_empty_table(tables: Tables, config_dict: dict[str, Any]) -> None:
    assert tables.items is not None
    tables.items = tables.items.iloc[:0]
    with pytest.raises(DataError, match=r"table 'items' \(items.parquet\) is empty"):
        check(tables, config_dict, items="items.parquet")


def test_feature_equal_to_label_is_refused(tables: Tables, config_dict: dict[str, Any]) -> None:
    tables.interactions = tables.interactions.assign(clicked_flag=tables.interactions["click"])
    config_dict["features"].append({"name": "clicked_flag", "type": "categorical"})
    with pytest.raises(DataError, match=r"feature 'clicked_flag'.*same values as the label column 'click'.*"
                                        r"task 'click'"):
        check(tables, config_dict)


def test_feature_mapping_one_to_one_onto_label_is_refused(tables: Tables,
                                                          config_dict: dict[str, Any]) -> None:
    assert tables.users is not None
    tables.users = tables.users.assign(tier=tables.users["segment"].map({"casual": 1, "power": 2, "new": 3}))
    config_dict["features"].append({"name": "tier", "type": "categorical", "table": "users"})
    with pytest.raises(DataError, match=r"feature 'tier'.*one-to-one.*'segment'.*leak"):
        check(tables, config_dict)


def test_feature_reading_the_label_column_is_refused(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["features"].append({"name": "genre_in", "type": "categorical", "table": "items",
                                    "column": "genre"})
    with pytest.raises(DataError, match=r"feature 'genre_in'.*reads column 'genre'.*label of task 'genre'"):
        check(tables, config_dict)


def test_correlated_but_not_revealing_feature_is_kept(tables: Tables, config_dict: dict[str, Any]) -> None:
    noisy = tables.interactions["click"].to_numpy().copy()
    noisy[::10] = 1 - noisy[::10]
    tables.interactions = tables.interactions.assign(noisy=noisy)
    config_dict["features"].append({"name": "noisy", "type": "categorical"})
    check(tables, config_dict)
