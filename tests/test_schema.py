"""Schema: the spec it derives, fitting on training rows only, labels, entities, save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from mtlrec.config import Config, config_from_dict
from mtlrec.data.schema import Schema
from mtlrec.data.spec import OOV, FieldSpec
from mtlrec.data.split import SplitIndex, split_tables
from mtlrec.data.tables import Tables
from mtlrec.errors import ArtifactError, ConfigError, DataError


def fitted(tables: Tables, config: Config) -> tuple[Schema, SplitIndex]:
    split = split_tables(tables, config)
    return Schema(config).fit(tables, split), split


def test_spec_fields_vocabularies_and_tasks(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    spec = schema.spec_
    assert spec.group("user") == (
        FieldSpec("user_id", "user", "categorical", "user_id"),
        FieldSpec("age", "user", "numeric"),
        FieldSpec("region", "user", "categorical", "region"),
        FieldSpec("hist", "user", "sequence", "item_id", 4),
    )
    assert spec.group("item") == (
        FieldSpec("item_id", "item", "categorical", "item_id"),
        FieldSpec("category", "item", "categorical", "category"),
        FieldSpec("tags", "item", "multi_categorical", "tags", 3),
    )
    assert spec.group("context") == (FieldSpec("device", "context", "categorical", "device"),
                                      FieldSpec("price", "context", "numeric"))
    assert set(spec.vocab_sizes) == {"user_id", "item_id", "device", "region", "category", "tags"}
    assert spec.vocab_sizes["device"] == 3 + 2 and spec.vocab_sizes["region"] == 3 + 2
    assert spec.vocab_sizes["tags"] == 5 + 2  # a b c d e
    buy = spec.task("buy")
    assert (buy.kind, buy.type, buy.num_outputs, buy.parent) == ("interaction", "binary", 1, "click")
    assert spec.task("segment").classes == ("casual", "new", "power")
    assert spec.task("topics").num_outputs == 3 and spec.task("topics").classes == ("p", "q", "r")
    assert spec.task("relation").kind == "item_pair" and spec.task("rating").num_outputs == 1


def test_encoders_never_see_valid_or_test_rows(tables: Tables, config: Config) -> None:
    split = split_tables(tables, config)
    test_rows = split.rows("interactions", "test")
    train_rows = split.rows("interactions", "train")
    inter = tables.interactions.copy()
    inter.loc[test_rows, "device"] = "tv"  # a category only test rows have
    inter.loc[test_rows[:3], "item_id"] = 777  # an item only test rows have
    inter.loc[test_rows, "price"] = 1e6  # would drag the mean if test rows were used
    tables.interactions = inter
    schema = Schema(config).fit(tables, split)
    assert "tv" not in schema.features_["device"].to_dict()["vocab"]
    train_mean = inter["price"].iloc[train_rows].mean()
    assert schema.features_["price"].to_dict()["mean"] == pytest.approx(train_mean)
    data = schema.encode(tables, split)
    batch = data.batch("interactions", torch.as_tensor(test_rows))
    assert (batch.context["device"] == OOV).all()
    assert (batch.item["item_id"][:3] == OOV).all()
    assert schema.item_rows([777])[0] >= 0  # the item is a known entity, with the OOV id embedding
    # user-task labels: the classes come from training users only
    users = split.rows("users", "train")
    assert tables.users is not None
    seen = set(tables.users["segment"].iloc[users])
    assert set(schema.spec_.task("segment").classes) == seen


def test_user_labels_train_on_training_users_only(tables: Tables, config: Config) -> None:
    split = split_tables(tables, config)
    assert tables.users is not None
    users = tables.users.copy()
    users.loc[split.rows("users", "test"), "segment"] = "vip"  # a class only test users have
    tables.users = users
    schema = Schema(config).fit(tables, split)
    assert "vip" not in schema.spec_.task("segment").classes
    with pytest.warns(UserWarning, match=r"task 'segment'.*'vip'.*masked"):
        data = schema.encode(tables, split)
    batch = data.batch("users", torch.as_tensor(split.rows("users", "test")))
    assert not batch.masks["segment"].any()


def test_labels_outside_declared_classes(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["tasks"][4]["classes"] = ["x", "y"]  # the data also has 'z'
    config = config_from_dict(config_dict)
    with pytest.raises(DataError, match=r"task 'genre' \(tasks\[4\]\.label\) has labels \['z'\] outside"):
        fitted(tables, config)


def test_conditional_masks_compose_along_chains(tables: Tables, config_dict: dict[str, Any]) -> None:
    inter = tables.interactions
    rng = np.random.default_rng(1)
    rebuy = np.where(inter["buy"] == 1, rng.random(len(inter)) < 0.5, 0).astype(int)
    tables.interactions = inter.assign(rebuy=rebuy)
    config_dict["tasks"].append({"name": "rebuy", "kind": "interaction", "label": "rebuy", "type": "binary",
                                 "after": "buy"})
    config = config_from_dict(config_dict)
    schema, split = fitted(tables, config)
    batch = schema.encode(tables, split).batch("interactions", torch.arange(len(inter)))
    click = inter["click"].to_numpy() == 1
    buy = inter["buy"].to_numpy() == 1
    assert np.array_equal(batch.masks["click"].numpy(), np.ones(len(inter), bool))
    assert np.array_equal(batch.masks["buy"].numpy(), click)
    assert np.array_equal(batch.masks["rebuy"].numpy(), click & buy)
    assert (batch.labels["rebuy"][~batch.masks["rebuy"]] == 0).all()


def test_encode_tolerates_missing_label_columns(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    tables.interactions = tables.interactions.drop(columns=["buy", "rating"])
    assert tables.items is not None
    tables.items = tables.items.drop(columns=["genre"])
    data = schema.encode(tables)
    batch = data.batch("interactions", torch.arange(10))
    assert not batch.masks["buy"].any() and not batch.masks["rating"].any() and batch.masks["click"].all()
    items = data.batch("items", torch.arange(5))
    assert not items.masks["genre"].any() and items.labels["genre"].dtype == torch.int64


def test_missing_sequence_filter_column_is_an_error(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    tables.interactions = tables.interactions.drop(columns=["click"])
    with pytest.raises(DataError, match=r"feature 'hist' \(features\[2\]\.filter\) names column 'click'"):
        schema.encode(tables)


def test_missing_feature_column_at_encode(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    tables.interactions = tables.interactions.drop(columns=["device"])
    with pytest.raises(DataError, match=r"feature 'device' \(features\[0\]\).*'device'"):
        schema.encode(tables)


def test_entity_rows_and_ids(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    assert tables.users is not None
    user_ids = schema.user_ids()
    assert user_ids.dtype == np.int64
    # users-table ids first, in table order, then ids only the interactions have
    n_users = len(tables.users)
    assert user_ids[:n_users].tolist() == tables.users["user_id"].tolist()
    extra = [u for u in pd.unique(tables.interactions["user_id"]) if u >= n_users]
    assert user_ids[n_users:].tolist() == extra
    assert schema.user_rows([3, "3", 10_000]).tolist() == [3, 3, -1]
    assert schema.user_rows("5").tolist() == [5]
    assert schema.item_rows(np.array([0, 39], dtype=object)).tolist() == [0, 39]
    assert len(schema.item_ids()) == 40


def test_id_min_count(tables: Tables, config_dict: dict[str, Any]) -> None:
    config_dict["data"]["id_min_count"] = 1000
    schema, split = fitted(tables, config_from_dict(config_dict))
    assert schema.spec_.vocab_sizes["user_id"] == 2 and schema.spec_.vocab_sizes["item_id"] == 2
    batch = schema.encode(tables, split).batch("interactions", torch.arange(20))
    assert (batch.user["user_id"] == OOV).all() and (batch.item["item_id"] == OOV).all()


def test_save_load_roundtrip(tmp_path: Path, tables: Tables, config: Config) -> None:
    schema, split = fitted(tables, config)
    path = schema.save(tmp_path / "run")
    assert path.name == "schema.json"
    json.loads(path.read_text())  # plain JSON, nothing pickled
    loaded = Schema.load(tmp_path / "run", config)
    assert loaded.to_dict() == schema.to_dict()
    assert loaded.spec_ == schema.spec_
    a = schema.encode(tables, split).batch("interactions", torch.arange(50))
    b = loaded.encode(tables, split).batch("interactions", torch.arange(50))
    for group in ("user", "item", "context", "labels", "masks"):
        left, right = getattr(a, group), getattr(b, group)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), (group, key)


def test_load_errors(tmp_path: Path, tables: Tables, config: Config, config_dict: dict[str, Any]) -> None:
    with pytest.raises(ArtifactError, match="schema.json.*does not exist"):
        Schema.load(tmp_path, config)
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        Schema.load(tmp_path, config)
    schema, _ = fitted(tables, config)
    schema.save(tmp_path)
    config_dict["features"] = config_dict["features"][1:]
    with pytest.raises(ArtifactError, match="fitted for"):
        Schema.load(tmp_path, config_from_dict(config_dict))


def test_reserved_feature_names(tables: Tables, config_dict: dict[str, Any]) -> None:
    tables.interactions = tables.interactions.assign(user_key=1)
    config_dict["features"].append({"name": "user_key", "type": "categorical"})
    with pytest.raises(ConfigError, match=r"features\[7\].name 'user_key' is reserved"):
        fitted(tables, config_from_dict(config_dict))


def test_split_must_match_the_tables(tables: Tables, config: Config, make_tables: Any) -> None:
    split = split_tables(make_tables(n=300), config)
    with pytest.raises(DataError, match="covers 300 rows, but the table has 400"):
        Schema(config).fit(tables, split)


def test_encode_context(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    frame = pd.DataFrame({"device": ["ios", "fridge", None], "price": [10.0, None, 3.0]})
    context = schema.encode_context(frame)
    assert context["device"].dtype == torch.int64 and context["device"][1:].tolist() == [OOV, 0]
    assert context["price"].shape == (3, 2) and context["price"][1].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match="'price'"):
        schema.encode_context(frame.drop(columns=["price"]))


def test_release_lookups_drops_the_tables_and_encodes_the_same(tables: Tables, config: Config) -> None:
    schema, split = fitted(tables, config)
    before = schema.encode(tables, split)
    lookups = [e for e in [*schema.features_.values(), schema.user_vocab_, schema.item_vocab_]
               if e is not None and hasattr(e, "_index")]
    assert lookups and any(e._index is not None for e in lookups)
    schema.release_lookups()
    assert all(e._index is None for e in lookups)
    after = schema.encode(tables, split)
    for name, tensor in before.sources["interactions"].context.items():
        assert torch.equal(tensor, after.sources["interactions"].context[name]), name


@pytest.mark.parametrize("label", ["buy", None])
def test_retrieval_targets_are_log_q_of_training_positives(tables: Tables, config_dict: dict[str, Any],
                                                          label: str | None) -> None:
    config_dict["tasks"].append({"name": "retrieval", "kind": "retrieval", "label": label, "dim": 8})
    config = config_from_dict(config_dict)
    schema, split = fitted(tables, config)
    task = schema.spec_.task("retrieval")
    assert (task.kind, task.type, task.num_outputs, task.temperature) == ("retrieval", "retrieval", 8, 0.05)
    data = schema.encode(tables, split)
    inter = tables.interactions
    positive = (inter["buy"] == 1).to_numpy() if label else np.ones(len(inter), dtype=bool)
    source = data.sources["interactions"]
    assert source.masks["retrieval"].numpy().tolist() == positive.tolist()
    # q: each item's share of the positive training rows (count 1 for an item without any).
    train = np.zeros(len(inter), dtype=bool)
    train[split.rows("interactions", "train")] = True
    items = inter["item_id"].to_numpy()
    counts = pd.Series(items[positive & train]).value_counts()
    for row in (0, 5, 17, 123, 399):
        want = np.log(max(counts.get(items[row], 0), 1) / counts.sum())
        assert source.labels["retrieval"][row].item() == pytest.approx(want, rel=1e-5)
    # Prediction input without the label column: no positives.
    if label:
        data = schema.encode(Tables(inter.drop(columns=["buy"]), users=tables.users, items=tables.items,
                                    item_pairs=tables.item_pairs))
        assert not data.sources["interactions"].masks["retrieval"].any()


def test_new_user_fields(tables: Tables, config: Config) -> None:
    schema, _ = fitted(tables, config)
    fields = schema.new_user_fields({"age": 30, "region": "south"})
    assert fields["user_id"].tolist() == [OOV] and fields["hist"].tolist() == [[0, 0, 0, 0]]
    assert fields["region"].dtype == torch.int64 and fields["region"].item() > OOV
    assert fields["age"].shape == (1, 2) and fields["age"][0, 1].item() == 0.0
    blank = schema.new_user_fields({})
    assert blank["region"].item() == 0 and blank["age"][0].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match=r"\['colour'\] are not user features of this run; .*\['age', 'region'\]"):
        schema.new_user_fields({"colour": "red"})
    with pytest.raises(DataError, match="feature 'age'"):
        schema.new_user_fields({"age": "old"})


def test_tables_without_entities() -> None:
    inter = pd.DataFrame({"age": [20, 30, 40, 50] * 5, "edu": ["a", "b", "c", "d"] * 5, "y": [0, 1] * 10})
    config = config_from_dict({
        "data": {"interactions": "census.csv", "user_id": None, "item_id": None},
        "features": [{"name": "age", "type": "numeric"}, {"name": "edu", "type": "categorical"}],
        "tasks": [{"name": "y", "kind": "interaction", "label": "y", "type": "binary"}]})
    schema, split = fitted(Tables(inter), config)
    assert schema.spec_.group("user") == () and schema.spec_.group("item") == ()
    data = schema.encode(Tables(inter), split)
    assert data.users is None and data.items is None
    batch = data.batch("interactions", torch.arange(4))
    assert batch.user == {} and batch.item == {} and set(batch.context) == {"age", "edu"}
    with pytest.raises(DataError, match="data.user_id is null"):
        schema.user_rows([1])


def test_row_labels_of_the_dataframes_do_not_matter(tables: Tables, config: Config) -> None:
    schema, split = fitted(tables, config)
    plain = schema.encode(tables, split).batch("interactions", torch.arange(100))
    assert tables.users is not None
    relabelled = Tables(tables.interactions.set_axis(np.arange(len(tables.interactions))[::-1] * 3),
                        users=tables.users.set_axis([f"u{i}" for i in range(len(tables.users))]),
                        items=tables.items, item_pairs=tables.item_pairs)
    refitted = Schema(config).fit(relabelled, split)
    other = refitted.encode(relabelled, split).batch("interactions", torch.arange(100))
    for group in ("user", "item", "context", "labels", "masks"):
        for key, value in getattr(plain, group).items():
            assert torch.equal(value, getattr(other, group)[key]), (group, key)
