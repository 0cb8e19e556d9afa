"""Shared fixtures: a tiny hand-rolled world of the four tables (no synthetic generator)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import Config, config_from_dict
from mtlrec.data.tables import Tables


def tiny_tables(seed: int = 0, n: int = 400, n_users: int = 30, n_items: int = 40) -> Tables:
    """All four tables with every feature and label type; timestamps collide on purpose (ties)."""
    rng = np.random.default_rng(seed)
    click = rng.random(n) < 0.5
    rating = np.where(rng.random(n) < 0.2, np.nan, rng.integers(1, 6, n).astype(float))
    interactions = pd.DataFrame({
        "user_id": rng.integers(0, n_users + 5, n),  # a few users are absent from the users table
        "item_id": rng.integers(0, n_items, n),
        "ts": rng.integers(0, 60, n),
        "device": rng.choice(["ios", "android", "web"], n),
        "price": np.where(rng.random(n) < 0.1, np.nan, rng.normal(10.0, 3.0, n)),
        "click": click.astype(int),
        "buy": np.where(click, rng.random(n) < 0.4, False).astype(int),
        "rating": rating,
    })
    users = pd.DataFrame({
        "user_id": np.arange(n_users),
        "age": rng.integers(18, 70, n_users).astype(float),
        "region": rng.choice(["north", "south", "east"], n_users),
        "segment": rng.choice(["casual", "power", "new"], n_users),
    })
    items = pd.DataFrame({
        "item_id": np.arange(n_items),
        "category": rng.choice(["books", "music", "games", "toys"], n_items),
        "tags": [("a|b", "b", "", None, "c|a|d|e")[i % 5] for i in range(n_items)],
        "genre": rng.choice(["x", "y", "z"], n_items),
        "topics": [("p|q", "q", "", "r|p")[i % 4] for i in range(n_items)],
    })
    pairs = pd.DataFrame({
        "item_a": rng.integers(0, n_items, 60),
        "item_b": rng.integers(0, n_items, 60),
        "relation": rng.choice(["none", "substitute", "complement"], 60),
    })
    return Tables(interactions, users=users, items=items, item_pairs=pairs)


def tiny_config_dict() -> dict[str, Any]:
    return {
        "data": {"interactions": "interactions.parquet", "users": "users.parquet", "items": "items.parquet",
                 "item_pairs": "pairs.parquet", "timestamp": "ts",
                 "split": {"method": "random", "valid": 0.15, "test": 0.15, "seed": 3}},
        "features": [
            {"name": "device", "type": "categorical"},
            {"name": "price", "type": "numeric"},
            {"name": "hist", "type": "sequence", "max_len": 4, "filter": "click"},
            {"name": "age", "type": "numeric", "table": "users"},
            {"name": "region", "type": "categorical", "table": "users"},
            {"name": "category", "type": "categorical", "table": "items"},
            {"name": "tags", "type": "multi_categorical", "table": "items", "max_len": 3},
        ],
        "tasks": [
            {"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
            {"name": "buy", "kind": "interaction", "label": "buy", "type": "binary", "after": "click"},
            {"name": "rating", "kind": "interaction", "label": "rating", "type": "regression"},
            {"name": "segment", "kind": "user", "label": "segment", "type": "multiclass"},
            {"name": "genre", "kind": "item", "label": "genre", "type": "multiclass"},
            {"name": "topics", "kind": "item", "label": "topics", "type": "multilabel"},
            {"name": "relation", "kind": "item_pair", "label": "relation", "type": "multiclass"},
        ],
    }


@pytest.fixture
def tables() -> Tables:
    return tiny_tables()


@pytest.fixture
def config() -> Config:
    return config_from_dict(tiny_config_dict())


@pytest.fixture
def config_dict() -> dict[str, Any]:
    """A fresh, mutable copy of the tiny config, for tests that vary it."""
    return tiny_config_dict()


@pytest.fixture
def make_tables() -> Any:
    """The tiny-world factory: make_tables(seed=0, n=400, n_users=30, n_items=40) -> Tables."""
    return tiny_tables


class Crash(Exception):
    """Raised by `crash_after_checkpoints` to stand for a process dying."""


def crash_after_checkpoints(trainer: Any, n: int) -> None:
    """Make `trainer` die (raise `Crash`) right after writing its n-th checkpoint."""
    original = trainer._save_checkpoint
    calls = {"n": 0}

    def save_then_crash(name: str = "last") -> None:
        original(name)
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash

    trainer._save_checkpoint = save_then_crash


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and CI machines are shared (use per module)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
