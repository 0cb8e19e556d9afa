"""Synthetic CTR logs for the speed benchmark: many categorical fields, dense fields, click -> purchase.

Each of `n_categorical` fields c_f has a vocabulary of V_f values, V_f geometrically spaced from
`vocab_min` to `vocab_max`; values are drawn with a power law (value = floor(V_f * u^3), u ~ U(0, 1),
so low values are frequent and the tail is long). Every value has a hidden effect
a_f[value] ~ N(0, s^2) for the click and b_f[value] for the purchase (correlated with a_f, rho 0.5).
Dense fields x ~ N(0, I). With sigma the logistic function::

    click logit    = a0 + sum_f a_f[c_f] + w . x + 0.5 * tanh(x_0 * x_1) + a_0'[c_0] * x_2
    purchase logit = b0 + sum_f b_f[c_f] + w' . x           (a purchase needs a click)
    click ~ Bernoulli(sigma(click logit)),  purchase = click * Bernoulli(sigma(purchase logit))

Rows are independent given the hidden tables, so the log is generated in chunks of any size (each
chunk seeded from (seed, chunk index)) and written to Parquet one row group at a time: a 20M-row
file never has to fit in memory. The same (rows, seed) always gives the same data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class CtrShape:
    """The shape of a synthetic CTR log (the speed benchmark's defaults)."""

    n_categorical: int = 20
    n_dense: int = 10
    vocab_min: int = 100
    vocab_max: int = 100_000

    def vocab_sizes(self) -> list[int]:
        """V_f of every categorical field, geometrically spaced and rounded."""
        sizes = np.geomspace(self.vocab_min, self.vocab_max, self.n_categorical)
        return [int(round(v)) for v in sizes]

    def categorical(self) -> list[str]:
        return [f"c{k}" for k in range(self.n_categorical)]

    def dense(self) -> list[str]:
        return [f"d{k}" for k in range(self.n_dense)]


class _Hidden:
    """The hidden effect tables, drawn once per seed."""

    def __init__(self, shape: CtrShape, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        scale = 1.2 / np.sqrt(shape.n_categorical)
        self.click = [rng.normal(0.0, scale, v).astype(np.float32) for v in shape.vocab_sizes()]
        self.purchase = [(0.5 * a + np.sqrt(0.75) * rng.normal(0.0, scale, a.size)).astype(np.float32)
                         for a in self.click]
        self.slope = rng.normal(0.0, 0.5, shape.vocab_sizes()[0]).astype(np.float32)
        self.w_click = rng.normal(0.0, 0.3, shape.n_dense).astype(np.float32)
        self.w_purchase = rng.normal(0.0, 0.3, shape.n_dense).astype(np.float32)


def ctr_chunks(n_rows: int, seed: int = 0, chunk_rows: int = 1_000_000, shape: CtrShape = CtrShape()
               ) -> Iterator[pd.DataFrame]:
    """The log in chunks of at most `chunk_rows` rows: columns c*, d*, click, purchase.

    Categorical values are int64 in [0, V_f); dense values float32; labels int8.
    """
    if n_rows < 1 or chunk_rows < 1:
        raise ValueError(f"ctr_chunks: n_rows and chunk_rows must be >= 1, got {n_rows} and {chunk_rows}")
    if shape.n_categorical < 1 or shape.n_dense < 3:
        raise ValueError("ctr_chunks: need at least 1 categorical and 3 dense fields")
    hidden = _Hidden(shape, seed)
    sizes = shape.vocab_sizes()
    for chunk, start in enumerate(range(0, n_rows, chunk_rows)):
        rows = min(chunk_rows, n_rows - start)
        rng = np.random.default_rng([seed, 1, chunk])
        cols: dict[str, np.ndarray] = {}
        click = np.full(rows, -1.0, dtype=np.float32)
        purchase = np.full(rows, -2.5, dtype=np.float32)
        for f, (name, size) in enumerate(zip(shape.categorical(), sizes, strict=True)):
            values = np.minimum((size * rng.random(rows, dtype=np.float32) ** 3).astype(np.int64), size - 1)
            cols[name] = values
            click += hidden.click[f][values]
            purchase += hidden.purchase[f][values]
        x = rng.standard_normal((rows, shape.n_dense), dtype=np.float32)
        for k, name in enumerate(shape.dense()):
            cols[name] = x[:, k]
        click += x @ hidden.w_click + 0.5 * np.tanh(x[:, 0] * x[:, 1]) + hidden.slope[cols["c0"]] * x[:, 2]
        purchase += x @ hidden.w_purchase
        clicked = rng.random(rows) < 1.0 / (1.0 + np.exp(-click))
        bought = clicked & (rng.random(rows) < 1.0 / (1.0 + np.exp(-purchase)))
        cols["click"] = clicked.astype(np.int8)
        cols["purchase"] = bought.astype(np.int8)
        yield pd.DataFrame(cols)


def make_ctr(n_rows: int, seed: int = 0, shape: CtrShape = CtrShape()) -> pd.DataFrame:
    """The whole log in memory (see `ctr_chunks`)."""
    return pd.concat(list(ctr_chunks(n_rows, seed, shape=shape)), ignore_index=True)


def write_ctr_parquet(path: str | Path, n_rows: int, seed: int = 0, row_group_rows: int = 500_000,
                      shape: CtrShape = CtrShape()) -> Path:
    """Write the log to one Parquet file, one row group per chunk, never holding more than a chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer: pq.ParquetWriter | None = None
    try:
        for frame in ctr_chunks(n_rows, seed, row_group_rows, shape):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=row_group_rows)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)
    return path


def ctr_config(interactions: str | Path, backbone: str = "mmoe", shape: CtrShape = CtrShape(),
               test: float = 0.2, valid: float = 0.0) -> dict[str, Any]:
    """The speed benchmark's config for a CTR log at `interactions`.

    Embedding dim 16 for every categorical field, dense fields fed raw (20 x 16 + 10 = 330 inputs),
    experts / bottom [256, 128], towers [64], Adam lr 1e-3 (AdamW without decay), batch 1024,
    one epoch, inference batch 4096, 2 threads. `backbone` is mmoe (8 experts), shared_bottom or
    ple (2 levels, 2 experts per task + 2 shared).
    """
    model: dict[str, Any] = {
        "backbone": backbone, "embedding_dim": 16, "encoder_dim": None, "numeric_input": "raw",
        "expert_hidden": [256, 128], "tower_hidden": [64], "wide": False, "dropout": 0.0,
    }
    if backbone == "mmoe":
        model["num_experts"] = 8
    elif backbone == "ple":
        model.update(levels=2, task_experts=2, shared_experts=2)
    return {
        "data": {
            "interactions": str(interactions), "user_id": None, "item_id": None,
            "split": {"method": "random", "valid": valid, "test": test, "seed": 0},
        },
        "features": [{"name": c, "table": "interactions", "type": "categorical"} for c in shape.categorical()]
        + [{"name": d, "table": "interactions", "type": "numeric"} for d in shape.dense()],
        "tasks": [
            {"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
            {"name": "purchase", "kind": "interaction", "label": "purchase", "type": "binary", "after": "click"},
        ],
        "model": model,
        "train": {"epochs": 1, "batch_size": 1024, "lr": 1e-3, "weight_decay": 0.0, "clip_norm": None, "seed": 0,
                  "threads": 2,
                  "eval_batch_size": 4096, "progress": False},
    }
