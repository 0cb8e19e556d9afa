"""Throughput of the data layer: split, fit and encode N synthetic interactions through `Schema`.

    python benchmarks/encode_throughput.py --rows 10000000
    python benchmarks/encode_throughput.py --world      # the built-in synthetic world (demo data)

Prints rows/s for each stage and the peak resident memory of the process. The data has five
categorical features (context, user and item tables), two numeric ones, a behaviour sequence of
the last 20 clicked items and two binary labels (click, purchase after click).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pandas as pd
import torch

from mtlrec.config import Config, config_from_dict
from mtlrec.data.schema import Schema
from mtlrec.data.split import split_tables
from mtlrec.data.tables import Tables, validate_tables
from mtlrec.memory import peak_rss_mb

T = TypeVar("T")


def make_tables(rows: int, seed: int) -> Tables:
    """N interactions of N/10 users over N/100 items (at least 1000), with users and items tables."""
    rng = np.random.default_rng(seed)
    n_users = max(rows // 10, 100)
    n_items = max(rows // 100, 1000)
    item_pop = rng.zipf(1.3, size=rows) % n_items
    click = rng.random(rows) < 0.2
    interactions = pd.DataFrame({
        "user_id": rng.integers(0, n_users, rows),
        "item_id": item_pop.astype(np.int64),
        "ts": rng.integers(0, 30 * 86_400, rows),
        "device": pd.Series(rng.choice(np.array(["ios", "android", "web", "tv", "other"]), rows),
                            dtype="str"),
        "hour": rng.integers(0, 24, rows),
        "dwell": np.where(rng.random(rows) < 0.05, np.nan, rng.exponential(30.0, rows)),
        "click": click.astype(np.int8),
        "purchase": np.where(click, rng.random(rows) < 0.1, False).astype(np.int8),
    })
    users = pd.DataFrame({"user_id": np.arange(n_users),
                          "country": rng.integers(0, 50, n_users)})
    items = pd.DataFrame({"item_id": np.arange(n_items),
                          "category": rng.integers(0, 200, n_items),
                          "brand": rng.integers(0, 5000, n_items),
                          "price": rng.lognormal(3.0, 1.0, n_items)})
    return Tables(interactions, users=users, items=items)


def make_config() -> Config:
    return config_from_dict({
        "data": {"interactions": "interactions.parquet", "users": "users.parquet", "items": "items.parquet",
                 "timestamp": "ts", "split": {"method": "random", "valid": 0.1, "test": 0.1}},
        "features": [
            {"name": "device", "type": "categorical"},
            {"name": "hour", "type": "categorical"},
            {"name": "dwell", "type": "numeric"},
            {"name": "country", "type": "categorical", "table": "users"},
            {"name": "category", "type": "categorical", "table": "items"},
            {"name": "brand", "type": "categorical", "table": "items"},
            {"name": "price", "type": "numeric", "table": "items"},
            {"name": "clicked", "type": "sequence", "max_len": 20, "filter": "click"},
        ],
        "tasks": [
            {"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
            {"name": "purchase", "kind": "interaction", "label": "purchase", "type": "binary",
             "after": "click"},
        ],
    })


def timed(label: str, rows: int, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"{label:<10} {seconds:8.2f} s  {rows / seconds:14,.0f} rows/s  peak RSS {peak_rss_mb() / 1024:6.2f} GiB",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="interactions to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate", action="store_true", help="also time validate_tables (leak checks)")
    parser.add_argument("--world", action="store_true", help="encode the default synthetic world instead")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.world:
        from mtlrec.data.synthetic import make_world

        world = make_world(seed=args.seed)
        config = config_from_dict(world.config_dict())
        tables = Tables(**world.tables)
        args.rows = len(tables.interactions)
    else:
        config = make_config()
        tables = timed("generate", args.rows, lambda: make_tables(args.rows, args.seed))
    if args.validate:
        timed("validate", args.rows, lambda: validate_tables(tables, config))
    split = timed("split", args.rows, lambda: split_tables(tables, config))
    schema = timed("fit", args.rows, lambda: Schema(config).fit(tables, split))
    data = timed("encode", args.rows, lambda: schema.encode(tables, split))
    rows = torch.as_tensor(split.rows("interactions", "train")[:4096])
    timed("batch4096", 4096, lambda: data.batch("interactions", rows))
    nbytes = sum(t.numel() * t.element_size() for src in data.sources.values()
                 for group in (src.keys, src.context, src.sequences, src.labels, src.masks)
                 for t in group.values())
    print(f"rows {args.rows:,}; encoded interaction tensors {nbytes / 2**30:.2f} GiB; "
          f"users {data.num_rows('users'):,}, items {data.num_rows('items'):,}; "
          f"peak RSS {peak_rss_mb() / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
