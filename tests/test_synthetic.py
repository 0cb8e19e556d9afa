"""The built-in synthetic data: the recommender world with its oracle, and the MMoE generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, average_precision_score, log_loss, roc_auc_score

from mtlrec.config import config_from_dict, load_config
from mtlrec.data.synthetic import (
    RELATIONS,
    WORLD_TASKS,
    SyntheticWorld,
    make_world,
    mmoe_synthetic,
    mmoe_synthetic_config,
    oracle_metrics,
)

SMALL = {"n_users": 150, "n_items": 70, "impressions_per_user": 25, "n_pairs": 400}


@pytest.fixture(scope="module")
def small() -> SyntheticWorld:
    return make_world(seed=3, **SMALL)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    """The default world, as `mtlrec demo` uses it."""
    return make_world(seed=0)


def _frames(w: SyntheticWorld) -> dict[str, pd.DataFrame]:
    return {**w.tables, **{f"oracle_{k}": v for k, v in w.oracle.items()}}


def _pair_set(frame: pd.DataFrame) -> list[frozenset[str]]:
    return [frozenset(p) for p in zip(frame["item_a"], frame["item_b"], strict=True)]


# ------------------------------------------------------------------------------------ world


def test_same_seed_gives_identical_frames(small: SyntheticWorld) -> None:
    again = make_world(seed=3, **SMALL)
    for name, frame in _frames(small).items():
        pd.testing.assert_frame_equal(frame, _frames(again)[name], check_exact=True, obj=name)


def test_different_seed_gives_different_frames(small: SyntheticWorld) -> None:
    other = make_world(seed=4, **SMALL)
    for name, frame in _frames(small).items():
        assert not frame.equals(_frames(other)[name]), name


def test_sizes_follow_parameters(small: SyntheticWorld) -> None:
    t = small.tables
    assert len(t["users"]) == 150 and len(t["items"]) == 70 and len(t["item_pairs"]) == 400
    assert len(t["interactions"]) == 150 * 25
    assert t["interactions"].groupby("user_id").size().eq(25).all()
    for name in t:
        assert len(small.oracle[name]) == len(t[name])
        assert small.oracle[name].index.equals(t[name].index)
    w = make_world(n_users=40, n_items=30, impressions_per_user=7, n_pairs=50, n_segments=3,
                   n_categories=4, n_brands=9, n_tags=14, latent_dim=3, seed=1)
    assert [len(w.tables[k]) for k in ("users", "items", "interactions", "item_pairs")] == [40, 30, 280, 50]
    assert len(w.classes["segment"]) == 3 and len(w.classes["category"]) == 4
    assert len(w.classes["tags"]) == 14 and w.classes["tags"][-1] == "tag13"
    assert w.tables["items"]["brand"].nunique() <= 9
    assert w.hidden["user_vectors"].shape == (40, 3)


def test_ids_are_unique_strings(small: SyntheticWorld) -> None:
    users, items, inter = (small.tables[k] for k in ("users", "items", "interactions"))
    assert users["user_id"].is_unique and items["item_id"].is_unique
    assert users["user_id"].str.fullmatch(r"u\d{4}").all()
    assert items["item_id"].str.fullmatch(r"i\d{4}").all()
    assert users["user_id"].iloc[42] == "u0042" and isinstance(inter["item_id"].iloc[0], str)
    assert set(inter["user_id"]) <= set(users["user_id"]) and set(inter["item_id"]) <= set(items["item_id"])
    assert not inter.duplicated(["user_id", "item_id"]).any()  # a user sees an item once
    pairs = small.tables["item_pairs"]
    assert set(pairs["item_a"]) | set(pairs["item_b"]) <= set(items["item_id"])


def test_pairs_are_unique_as_unordered_pairs(small: SyntheticWorld) -> None:
    pairs = small.tables["item_pairs"]
    assert (pairs["item_a"] != pairs["item_b"]).all()
    assert len(set(_pair_set(pairs))) == len(pairs)
    assert set(pairs["relation"]) == set(RELATIONS)
    # every pair of a tiny catalogue: the generator must still find them all
    full = make_world(n_users=5, n_items=6, impressions_per_user=3, n_pairs=15, n_brands=8, seed=2)
    assert len(set(_pair_set(full.tables["item_pairs"]))) == 15


def test_timestamps_increase_per_user_and_define_the_hour(small: SyntheticWorld) -> None:
    inter = small.tables["interactions"]
    assert inter.groupby("user_id")["timestamp"].diff().dropna().gt(0).all()
    assert inter["hour"].between(0, 23).all()
    assert (inter["timestamp"] // 3600 % 24 == inter["hour"]).all()
    assert set(inter["device"]) <= {"mobile", "desktop", "tablet"}


def test_funnel_is_consistent(world: SyntheticWorld) -> None:
    inter, p = world.tables["interactions"], world.oracle["interactions"]
    assert set(inter["click"].unique()) <= {0, 1}
    assert (inter["like"] <= inter["click"]).all() and (inter["purchase"] <= inter["click"]).all()
    assert 0.15 <= inter["click"].mean() <= 0.30
    clicked = inter["click"] == 1
    assert inter.loc[clicked, "like"].mean() == pytest.approx(0.35, abs=0.03)
    assert inter.loc[clicked, "purchase"].mean() == pytest.approx(0.30, abs=0.03)
    assert ((p > 0) & (p < 1)).all().all()
    # the oracle's like / purchase columns are P(. | click): calibrated on clicked rows
    assert p.loc[clicked, "like"].mean() == pytest.approx(inter.loc[clicked, "like"].mean(), abs=0.02)
    assert p["click"].mean() == pytest.approx(inter["click"].mean(), abs=0.01)


def test_labels_use_the_declared_classes(small: SyntheticWorld) -> None:
    users, items = small.tables["users"], small.tables["items"]
    assert set(users["segment"]) <= set(small.classes["segment"])
    assert set(items["category"]) <= set(small.classes["category"])
    tags = {t for s in items["tags"] for t in s.split("|") if t}
    assert tags <= set(small.classes["tags"])
    for task, (_, kind, _) in WORLD_TASKS.items():
        probs = small.oracle_probs(task)
        labels = small.labels(task)
        assert len(probs) == len(labels) == len(small.tables[WORLD_TASKS[task][0]])
        if kind == "multiclass":
            np.testing.assert_allclose(probs.sum(axis=1), 1.0)
            assert labels.min() >= 0 and labels.max() < probs.shape[1]
        if kind == "multilabel":
            assert labels.shape == probs.shape == (len(items), len(small.classes["tags"]))
    assert (small.labels("segment") == small.hidden["segment"]).mean() > 0.75


def test_segment_and_category_labels_are_noisy_copies_of_the_hidden_class(world: SyntheticWorld) -> None:
    assert (world.labels("segment") == world.hidden["segment"]).mean() == pytest.approx(0.92, abs=0.03)
    assert (world.labels("category") == world.hidden["category"]).mean() == pytest.approx(0.87, abs=0.05)


def test_config_validates_and_reveals_no_label(small: SyntheticWorld) -> None:
    raw = small.config_dict("data")
    config = config_from_dict(raw)
    assert config.model.backbone == "ple" and config.data.timestamp == "timestamp"
    assert config.data.interactions == "data/interactions.parquet"
    assert {t.name: t.after for t in config.tasks} == {
        "click": None, "like": "click", "purchase": "click", "segment": None, "category": None,
        "tags": None, "relation": None}
    assert dict(config.recommend.fusion) == {"click": 1.0, "like": 0.5, "purchase": 2.0}
    labels = {t.label for t in config.tasks}
    for feat in config.features:
        assert feat.source_column not in labels
        if feat.type != "sequence":
            assert feat.source_column in small.tables[feat.table].columns, feat.name
    history = next(f for f in config.features if f.name == "history")
    assert (history.type, history.max_len, history.filter) == ("sequence", 20, "click")
    for task in config.tasks:
        assert task.label in small.tables[task.table].columns
        assert task.classes is None or task.classes == small.classes[task.name]


def test_write_round_trips_through_parquet(small: SyntheticWorld, tmp_path: Path) -> None:
    config_path = small.write(tmp_path / "world")
    assert config_path == tmp_path / "world" / "config.yaml"
    for name in ("interactions", "users", "items", "item_pairs"):
        back = pd.read_parquet(tmp_path / "world" / f"{name}.parquet")
        pd.testing.assert_frame_equal(back, small.tables[name], check_dtype=False)
        assert back["item_a" if name == "item_pairs" else back.columns[0]].map(type).eq(str).all()
        oracle = pd.read_parquet(tmp_path / "world" / f"oracle_{name}.parquet")
        pd.testing.assert_frame_equal(oracle, small.oracle[name])
    config, base = load_config(config_path)
    assert base == (tmp_path / "world").resolve()
    assert all((base / path).is_file() for path in config.data.table_paths().values())


def test_oracle_metrics_are_sane(world: SyntheticWorld) -> None:
    inter = world.tables["interactions"]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(inter))
    test, train = perm[: len(inter) // 10], perm[len(inter) // 10:]
    click = oracle_metrics(world, "click", test)
    assert 0.75 <= click["auc"] <= 0.85  # the band the module docstring documents
    ctr = inter.iloc[train].groupby("item_id")["click"].mean()
    popularity = inter["item_id"].iloc[test].map(ctr).fillna(ctr.mean()).to_numpy()
    assert click["auc"] > roc_auc_score(inter["click"].iloc[test], popularity) + 0.08
    for task in ("like", "purchase"):
        assert oracle_metrics(world, task, test)["auc"] > 0.65
    k, c = len(world.classes["segment"]), len(world.classes["category"])
    users, items, pairs = (np.arange(len(world.tables[n])) for n in ("users", "items", "item_pairs"))
    assert oracle_metrics(world, "segment", users)["accuracy"] > 1 / k + 0.5
    assert oracle_metrics(world, "category", items)["accuracy"] > 1 / c + 0.5
    assert oracle_metrics(world, "relation", pairs)["accuracy"] > 1 / 3 + 0.3
    tags = oracle_metrics(world, "tags", items)
    assert tags["micro_f1"] > 0.5 and tags["map"] > 0.5


def test_oracle_metrics_match_scikit_learn(small: SyntheticWorld) -> None:
    inter = small.tables["interactions"]
    rows = np.arange(0, len(inter), 2)
    p = small.oracle["interactions"]
    got = oracle_metrics(small, "click", rows)
    assert got["auc"] == pytest.approx(roc_auc_score(inter["click"].iloc[rows], p["click"].iloc[rows]))
    assert got["logloss"] == pytest.approx(log_loss(inter["click"].iloc[rows], p["click"].iloc[rows]))
    # a conditional task is scored on the rows whose parent is positive, with P(. | click)
    cond = rows[inter["click"].to_numpy()[rows] == 1]
    got = oracle_metrics(small, "purchase", rows)
    assert got["auc"] == pytest.approx(roc_auc_score(inter["purchase"].iloc[cond], p["purchase"].iloc[cond]))
    users = np.arange(len(small.tables["users"]))
    probs, labels = small.oracle_probs("segment"), small.labels("segment")
    got = oracle_metrics(small, "segment", users)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(axis=1)))
    assert got["logloss"] == pytest.approx(log_loss(labels, probs, labels=range(probs.shape[1])))
    items = np.arange(len(small.tables["items"]))
    y, s = small.labels("tags"), small.oracle_probs("tags")
    ap = [average_precision_score(y[:, t], s[:, t]) for t in range(y.shape[1]) if y[:, t].any()]
    assert oracle_metrics(small, "tags", items)["map"] == pytest.approx(np.mean(ap))
    mask = np.zeros(len(inter), dtype=bool)
    mask[rows] = True
    assert oracle_metrics(small, "click", mask) == oracle_metrics(small, "click", rows)


def test_oracle_metrics_reject_bad_input(small: SyntheticWorld) -> None:
    with pytest.raises(ValueError, match="unknown synthetic-world task 'clik'"):
        oracle_metrics(small, "clik", np.arange(3))
    with pytest.raises(ValueError, match="rows must be positions"):
        oracle_metrics(small, "segment", np.array([0, 10_000]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_items": 10, "impressions_per_user": 11}, "impressions_per_user"),
    ({"n_items": 10, "n_pairs": 46}, "n_pairs"),
    ({"n_brands": 3}, "n_brands"),
    ({"click_rate": 1.5}, "click_rate"),
    ({"n_users": 0}, "n_users"),
])
def test_invalid_arguments_name_the_parameter(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_world(**{"n_users": 5, "n_items": 10, "impressions_per_user": 3, "n_pairs": 5, **kwargs})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_users=st.integers(1, 20), n_items=st.integers(2, 25), seed=st.integers(0, 2**16),
       data=st.data())
def test_invariants_hold_for_any_size(n_users: int, n_items: int, seed: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n_items))
    n_pairs = data.draw(st.integers(1, n_items * (n_items - 1) // 2))
    w = make_world(n_users=n_users, n_items=n_items, impressions_per_user=k, n_pairs=n_pairs,
                   n_segments=3, n_categories=3, n_brands=4, seed=seed)
    inter = w.tables["interactions"]
    assert len(inter) == n_users * k and len(w.tables["item_pairs"]) == n_pairs
    assert len(set(_pair_set(w.tables["item_pairs"]))) == n_pairs
    assert (inter["like"] <= inter["click"]).all() and (inter["purchase"] <= inter["click"]).all()
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert all(np.isfinite(frame.to_numpy()).all() for frame in w.oracle.values())
    config_from_dict(w.config_dict())


# ------------------------------------------------------------------------------------ MMoE


def test_mmoe_synthetic_columns_and_reproducibility() -> None:
    frame = mmoe_synthetic(500, 0.5, seed=7)
    assert list(frame.columns) == [f"x{k}" for k in range(100)] + ["y1", "y2"]
    assert len(frame) == 500 and frame.notna().all().all()
    assert frame["x0"].dtype == np.float32
    pd.testing.assert_frame_equal(frame, mmoe_synthetic(500, 0.5, seed=7))
    assert not frame.equals(mmoe_synthetic(500, 0.5, seed=8))
    assert mmoe_synthetic(10, 0.2, dim=5).shape == (10, 7)
    with pytest.raises(ValueError, match="correlation"):
        mmoe_synthetic(10, 1.5)


def test_mmoe_label_correlation_increases_with_p() -> None:
    corr = [mmoe_synthetic(20_000, p, seed=0)[["y1", "y2"]].corr().iloc[0, 1] for p in (0.0, 0.5, 0.9, 1.0)]
    assert all(a < b for a, b in zip(corr, corr[1:], strict=False)), corr
    assert abs(corr[0]) < 0.2 and corr[-1] > 0.99


def test_mmoe_noiseless_labels_are_identical_at_p_one() -> None:
    frame = mmoe_synthetic(1000, 1.0, noise_var=0.0, seed=1)
    np.testing.assert_array_equal(frame["y1"].to_numpy(), frame["y2"].to_numpy())
    noisy = mmoe_synthetic(1000, 1.0, seed=1)
    assert (noisy["y1"] - noisy["y2"]).std() == pytest.approx(np.sqrt(2 * 0.01), rel=0.15)


def test_mmoe_config_validates() -> None:
    config = config_from_dict(mmoe_synthetic_config("data", dim=12))
    assert config.data.user_id is None and config.data.item_id is None
    assert config.data.interactions == "data/mmoe_synthetic.parquet"
    assert [f.name for f in config.features] == [f"x{k}" for k in range(12)]
    assert all(f.type == "numeric" for f in config.features)
    assert [(t.name, t.type) for t in config.tasks] == [("y1", "regression"), ("y2", "regression")]
    assert config.model.backbone == "mmoe"
