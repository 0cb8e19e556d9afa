"""Streaming interactions from Parquet (`data.stream`): split, fit, epochs, resume, a whole run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import Crash, crash_after_checkpoints
from mtlrec.config import config_from_dict, load_config
from mtlrec.data.batch import Batch
from mtlrec.data.ctr import CtrShape, ctr_config, write_ctr_parquet
from mtlrec.data.dataset import EncodedData
from mtlrec.data.encoders import CategoricalEncoder, Moments, NumericEncoder, ValueCounts
from mtlrec.data.schema import Schema
from mtlrec.data.split import _time_split, hash_parts, split_tables
from mtlrec.data.stream import InteractionStream, ParquetLog, StreamSplit
from mtlrec.data.tables import Tables
from mtlrec.errors import ConfigError, DataError
from mtlrec.predict import Predictor, evaluate_run
from mtlrec.training.trainer import Trainer, train

SMALL_MODEL = {"backbone": "mmoe", "embedding_dim": 4, "encoder_dim": 8, "encoder_hidden": [8],
               "expert_hidden": [8], "num_experts": 2, "tower_hidden": [4], "head_hidden": [4]}


def write_parquet(frame: pd.DataFrame, path: Path, row_group_rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_rows)
    return path


def log_frame(n: int = 600, seed: int = 0, start: int = 0) -> pd.DataFrame:
    """A log whose `rid` column is the global row number (to see which rows a batch holds)."""
    rng = np.random.default_rng(seed)
    click = rng.random(n) < 0.4
    return pd.DataFrame({
        "rid": np.arange(start, start + n),
        "c0": rng.choice(list("abcdefg"), n),
        "d0": np.where(rng.random(n) < 0.1, np.nan, rng.normal(3.0, 2.0, n)),
        "ts": rng.integers(0, 40, n),
        "click": click.astype(int),
        "purchase": (click & (rng.random(n) < 0.3)).astype(int),
    })


def log_config(interactions: Path, **data: Any) -> dict[str, Any]:
    return {
        "data": {"interactions": str(interactions), "user_id": None, "item_id": None, "stream": True,
                 "stream_buffer_rows": 64, "split": {"method": "random", "valid": 0.1, "test": 0.2, "seed": 5},
                 **data},
        "features": [{"name": "rid", "type": "categorical"}, {"name": "c0", "type": "categorical"},
                     {"name": "d0", "type": "numeric"}],
        "tasks": [{"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
                  {"name": "purchase", "kind": "interaction", "label": "purchase", "type": "binary",
                   "after": "click"}],
        "model": SMALL_MODEL,
        "train": {"epochs": 1, "batch_size": 32, "progress": False, "threads": 1, "diagnostics_every": 0},
    }


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    """600 rows in two files of uneven row groups (37 and 50 rows)."""
    folder = tmp_path / "log"
    write_parquet(log_frame(300, seed=0, start=0), folder / "part-0.parquet", 37)
    write_parquet(log_frame(300, seed=1, start=300), folder / "part-1.parquet", 50)
    return folder


def prepared(raw: dict[str, Any] | Path, out: Path, overrides: list[str] | None = None) -> Trainer:
    cfg, base = load_config(raw, overrides or [])
    trainer = Trainer(cfg, base, out)
    trainer.prepare()
    return trainer


def rows_of(trainer: Trainer, batches: Any) -> list[int]:
    vocab = trainer.schema.features_["rid"]
    assert isinstance(vocab, CategoricalEncoder)
    out: list[int] = []
    for batch in batches:
        assert isinstance(batch, Batch)
        out += [int(vocab.vocab_[i - 2]) for i in batch.context["rid"].tolist()]
    return out


# ---------------------------------------------------------------------------------------------
# Split


def test_hash_split_is_deterministic_and_has_the_fractions() -> None:
    rows = np.arange(200_000)
    parts = hash_parts(rows, 0.1, 0.2, seed=3)
    assert np.array_equal(parts, hash_parts(rows, 0.1, 0.2, seed=3))
    # A row's part depends on the row alone, not on what else is read with it.
    pieces = np.concatenate([hash_parts(rows[i:i + 777], 0.1, 0.2, seed=3) for i in range(0, rows.size, 777)])
    assert np.array_equal(parts, pieces)
    fractions = np.bincount(parts, minlength=3) / rows.size
    assert np.allclose(fractions, [0.7, 0.1, 0.2], atol=0.005)  # ~5 standard deviations
    assert not np.array_equal(parts, hash_parts(rows, 0.1, 0.2, seed=4))
    assert not hash_parts(rows, 0.0, 0.0, seed=3).any()


def test_time_split_matches_the_in_memory_split(tmp_path: Path) -> None:
    frame = log_frame(500)
    frame["ts"] = np.random.default_rng(2).integers(0, 30, 500)  # heavy ties
    path = write_parquet(frame, tmp_path / "log.parquet", 45)
    cfg = config_from_dict(log_config(path, timestamp="ts",
                                      split={"method": "time", "valid": 0.15, "test": 0.2}))
    log = ParquetLog(path)
    split = StreamSplit(log, cfg)
    streamed = np.concatenate([split.parts(g, log.read(g, ["ts"])) for g in log.groups])
    assert np.array_equal(streamed, _time_split(frame["ts"].to_numpy(), 0.15, 0.2))
    assert split.sizes() == {"train": int((streamed == 0).sum()), "valid": int((streamed == 1).sum()),
                             "test": int((streamed == 2).sum())}


# ---------------------------------------------------------------------------------------------
# Fitting


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=200), st.integers(1, 50), st.integers(1, 3))
def test_accumulators_equal_fitting_the_whole_column(values: list[int], chunk: int, min_count: int) -> None:
    column = pd.Series(values)
    counts, moments = ValueCounts(), Moments()
    for start in range(0, len(values), chunk):
        counts.add(column.iloc[start:start + chunk])
        moments.add(column.iloc[start:start + chunk] * 0.37)
    assert CategoricalEncoder(min_count).fit_counts(counts).vocab_ == CategoricalEncoder(min_count).fit(column).vocab_
    whole = NumericEncoder().fit(column * 0.37)
    streamed = NumericEncoder().fit_moments(moments)
    assert streamed.mean_ == pytest.approx(whole.mean_, rel=1e-12, abs=1e-12)
    assert streamed.std_ == pytest.approx(whole.std_, rel=1e-12)


def test_streaming_fit_equals_the_in_memory_fit(tmp_path: Path, make_tables: Any, config_dict: dict[str, Any]
                                                ) -> None:
    tables: Tables = make_tables(n=700)
    tables.interactions["tags_i"] = [("a|b", "c", None, "b|c|d", "")[i % 5] for i in range(700)]
    for name, table in (("users", tables.users), ("items", tables.items), ("pairs", tables.item_pairs)):
        assert table is not None
        write_parquet(table, tmp_path / f"{name}.parquet", 1000)
    write_parquet(tables.interactions, tmp_path / "interactions.parquet", 37)
    config_dict["features"] = [f for f in config_dict["features"] if f["type"] != "sequence"] + [
        {"name": "tags_i", "type": "multi_categorical", "max_len": 2},
        {"name": "device_h", "column": "device", "type": "categorical", "hash_buckets": 5}]
    config_dict["data"] |= {"stream": True, "stream_buffer_rows": 100}
    (tmp_path / "config.yaml").write_text(json.dumps(config_dict))
    cfg, base = load_config(tmp_path / "config.yaml")
    trainer = Trainer(cfg, base, tmp_path / "run")
    trainer.prepare()
    assert trainer.stream is not None
    streamed = trainer.schema.to_dict()

    # The in-memory fit on the same training rows (the streamed split's parts).
    memory_cfg, _ = load_config(tmp_path / "config.yaml", ["data.stream=false"])
    split = split_tables(tables, memory_cfg)
    log = trainer.stream.log
    parts = np.concatenate([trainer.stream.split.parts(g, None) for g in log.groups])
    split.parts["interactions"] = {p: np.flatnonzero(parts == i) for i, p in enumerate(("train", "valid", "test"))}
    memory = Schema(memory_cfg).fit(tables, split).to_dict()

    numeric = {"price", "age"}
    for name in numeric:
        for key in ("mean", "std"):
            assert streamed["features"][name][key] == pytest.approx(memory["features"][name][key], rel=1e-12)
            streamed["features"][name][key] = memory["features"][name][key]
    assert streamed == memory  # ids, vocabularies, hashing, label classes: exactly equal

    # A streamed chunk encodes as the in-memory encoding of the same rows.
    encoded = Schema.from_dict(memory, memory_cfg).encode(tables, split)
    group = log.groups[3]
    chunk = trainer.stream.encoded(group, 0)
    rows = np.arange(group.start, group.start + group.rows)[trainer.stream.split.parts(group, None) == 0]
    whole = encoded.batch("interactions", rows)
    part = EncodedData(trainer.spec, trainer.data.users, trainer.data.items,
                       {"interactions": chunk}).batch("interactions", np.arange(chunk.num_rows))
    for name in whole.context:
        assert torch.equal(whole.context[name], part.context[name]), name
    for name in whole.labels:
        assert torch.equal(whole.labels[name], part.labels[name]) and torch.equal(whole.masks[name], part.masks[name])
    assert torch.equal(whole.user["user_id"], part.user["user_id"])
    assert torch.equal(whole.item["item_id"], part.item["item_id"])


# ---------------------------------------------------------------------------------------------
# Epochs


def test_an_epoch_reads_every_training_row_once_and_ranks_split_them(log_folder: Path, tmp_path: Path) -> None:
    trainer = prepared(log_config(log_folder), tmp_path / "run")
    stream = trainer.stream
    assert stream is not None and len(stream.log.groups) == 9 + 6
    expected = np.flatnonzero(hash_parts(np.arange(600), 0.1, 0.2, seed=5) == 0).tolist()

    batches = list(stream.epoch(0))
    assert all(len(b) == 32 for b in batches[:-1]) and len(batches) == stream.num_batches()
    seen = rows_of(trainer, batches)
    assert sorted(seen) == expected  # each training row exactly once
    assert seen != expected  # shuffled
    second = rows_of(trainer, stream.epoch(1))
    assert sorted(second) == expected and second != seen

    for world_size in (2, 3, 7):
        epochs = [list(stream.epoch(2, rank, world_size)) for rank in range(world_size)]
        shares = [rows_of(trainer, batches) for batches in epochs]
        union = [row for share in shares for row in share]
        assert sorted(union) == expected  # disjoint, and together every training row
        assert [len(s) for s in shares] == [stream.share(2, r, world_size).rows for r in range(world_size)]
        # Every rank steps num_batches times, on its part of each global batch.
        assert {len(batches) for batches in epochs} == {stream.num_batches()}
        for step in range(stream.num_batches() - 1):
            assert sum(len(batches[step]) for batches in epochs) == 32


def test_ranks_read_only_their_row_groups_and_pad_an_empty_last_part(log_folder: Path, tmp_path: Path) -> None:
    trainer = prepared(log_config(log_folder), tmp_path / "run")
    stream = trainer.stream
    assert stream is not None
    total = stream.num_rows("train")
    batch = total - 1  # the second global batch holds one row: one rank has no part of it
    odd = InteractionStream(stream.log, stream.split, stream.schema, stream.catalogue, batch, 64, stream.seed)
    shares = [odd.share(0, rank, 2) for rank in range(2)]
    assert [s.rows for s in shares] == [-(-batch // 2) + 1, batch // 2]
    groups = [{g for g, _, _ in s.segments} for s in shares]
    assert len(groups[0] & groups[1]) <= 1  # only a boundary row group is read by both ranks
    assert len(groups[0] | groups[1]) == int((stream.split.counts[:, 0] > 0).sum())
    second = list(odd.epoch(0, 1, 2))
    assert len(second) == 2 and len(second[1]) == 1
    assert not any(mask.any() for mask in second[1].masks.values())  # a padding step adds no loss
    with pytest.raises(DataError, match="fewer than the 1000 processes"):
        stream.share(0, 0, 1000)


def test_the_stream_resumes_mid_epoch_exactly(log_folder: Path, tmp_path: Path) -> None:
    trainer = prepared(log_config(log_folder), tmp_path / "run")
    stream = trainer.stream
    assert stream is not None
    def fresh(batch_size: int = 32) -> InteractionStream:
        return InteractionStream(stream.log, stream.split, stream.schema, stream.catalogue, batch_size, 64,
                                 stream.seed)

    for rank, world_size in ((0, 1), (1, 2)):
        straight = rows_of(trainer, fresh().epoch(0, rank, world_size))
        for drawn in (1, 2, 5):  # inside the first buffer, at a buffer boundary, inside a later one
            first = fresh()
            iterator = first.epoch(0, rank, world_size)
            head = rows_of(trainer, [next(iterator) for _ in range(drawn)])
            state = first.state_dict()  # every rank is at the same step: rank 0's state resumes them all
            iterator.close()  # a crash: the reading thread stops
            resumed = fresh()
            resumed.load_state_dict(state)
            assert head + rows_of(trainer, resumed.epoch(0, rank, world_size)) == straight
    with pytest.raises(DataError, match="mid-epoch for 2 processes, not 3"):
        again = fresh()
        again.load_state_dict(state)
        next(again.epoch(0, 0, 3))
    with pytest.raises(DataError, match="batch_size"):
        fresh(16).load_state_dict(state)


def test_evaluation_batches_hold_each_part_in_file_order(log_folder: Path, tmp_path: Path) -> None:
    trainer = prepared(log_config(log_folder), tmp_path / "run")
    stream = trainer.stream
    assert stream is not None
    parts = hash_parts(np.arange(600), 0.1, 0.2, seed=5)
    valid = [b for b in stream.batches("valid", 10)]
    assert sum(len(b) for b in valid) == int((parts == 1).sum())
    two = [len(b) for r in range(2) for b in stream.batches("test", 7, r, 2)]
    assert sum(two) == int((parts == 2).sum())


# ---------------------------------------------------------------------------------------------
# Whole runs


def ctr_run_config(path: Path) -> dict[str, Any]:
    shape = CtrShape(n_categorical=4, n_dense=3, vocab_min=5, vocab_max=60)
    raw = ctr_config(path, "mmoe", shape, test=0.2, valid=0.1)
    raw["data"] |= {"stream": True, "stream_buffer_rows": 200}
    raw["model"] |= {"expert_hidden": [16], "num_experts": 2, "tower_hidden": [8], "embedding_dim": 4}
    raw["train"] |= {"epochs": 2, "batch_size": 64, "lr": 0.01, "threads": 1, "early_stopping": None,
                     "diagnostics_every": 0}
    return raw


@pytest.fixture
def ctr_log(tmp_path: Path) -> Path:
    return write_ctr_parquet(tmp_path / "ctr.parquet", 3000, seed=0, row_group_rows=400,
                             shape=CtrShape(n_categorical=4, n_dense=3, vocab_min=5, vocab_max=60))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / "last.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim", "weighting."))}


def test_a_streamed_run_writes_a_valid_run_directory(ctr_log: Path, tmp_path: Path) -> None:
    result = train(ctr_run_config(ctr_log), tmp_path / "run")
    run = result.run_dir
    for name in ("config.yaml", "schema.json", "weights.safetensors", "metrics.json", "log.jsonl",
                 "serving.safetensors"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    sizes = metrics["split_sizes"]["interactions"]
    assert sum(sizes.values()) == 3000 and sizes["valid"] > 0
    assert 0.5 < metrics["tasks"]["click"]["test"]["auc"] <= 1.0
    assert metrics["ranking"] == {}  # no user or item ids: nothing to rank
    assert all(h["valid"] and h["train_samples_per_second"] > 0 for h in result.history)
    assert len(result.history) == 2
    # `mtlrec evaluate` streams too, and agrees with the run's own test metrics.
    again = evaluate_run(run)
    assert again["tasks"]["click"]["auc"] == pytest.approx(metrics["tasks"]["click"]["test"]["auc"], abs=1e-6)
    frame = pq.read_table(ctr_log).slice(0, 50).to_pandas()
    scores = Predictor.load(run).predict(frame)
    assert len(scores) == 50 and scores.filter(like="click").notna().all().all()


def test_a_streamed_run_resumes_mid_epoch_exactly(ctr_log: Path, tmp_path: Path) -> None:
    raw = ctr_run_config(ctr_log)
    raw["train"]["checkpoint_every"] = 4
    train(raw, tmp_path / "straight")
    cfg, base = load_config(raw)

    trainer = Trainer(cfg, base, tmp_path / "crashed")
    crash_after_checkpoints(trainer, 6)  # step 24: epoch 0 has 33 batches of 64, so inside its later buffers
    with pytest.raises(Crash):
        trainer.fit()
    train(raw, tmp_path / "crashed", resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def streamed_world(tmp_path: Path, make_tables: Any, config_dict: dict[str, Any], data: dict[str, Any],
                   tasks: list[dict[str, Any]]) -> Tables:
    """The tiny world written to Parquet (row groups of 70) and its config (`tmp_path/config.yaml`),
    streamed, with `data` keys and `tasks` added."""
    tables: Tables = make_tables(n=600)
    for name, table in (("users", tables.users), ("items", tables.items), ("pairs", tables.item_pairs),
                        ("interactions", tables.interactions)):
        assert table is not None
        write_parquet(table, tmp_path / f"{name}.parquet", 70)
    config_dict["features"] = [f for f in config_dict["features"] if f["type"] != "sequence"]
    config_dict["data"] |= {"stream": True, "stream_buffer_rows": 128, **data}
    config_dict["tasks"] += tasks
    config_dict["model"] = SMALL_MODEL
    config_dict["train"] = {"epochs": 1, "batch_size": 64, "progress": False, "threads": 1}
    (tmp_path / "config.yaml").write_text(json.dumps(config_dict))
    return tables


def test_a_streamed_run_with_users_items_and_pairs(tmp_path: Path, make_tables: Any,
                                                   config_dict: dict[str, Any]) -> None:
    split = {"method": "time", "valid": 0.15, "test": 0.2}
    tables = streamed_world(tmp_path, make_tables, config_dict, {"split": split}, [])
    result = train(tmp_path / "config.yaml", tmp_path / "run")
    metrics = result.metrics
    assert set(metrics["tasks"]) == {"click", "buy", "rating", "segment", "genre", "topics", "relation"}
    assert metrics["tasks"]["segment"]["test"] and metrics["tasks"]["rating"]["test"]
    assert metrics["ranking"]["users"] > 0
    predictor = Predictor.load(result.run_dir)
    top = predictor.recommend(int(tables.interactions["user_id"].iloc[0]), k=5)
    assert len(top) == 5


def retrieval_task(label: str | None) -> dict[str, Any]:
    return {"name": "retrieve", "kind": "retrieval", "label": label, "dim": 8}


@pytest.mark.parametrize("label", ["click", None])
def test_streamed_retrieval_labels_equal_the_in_memory_log_q(tmp_path: Path, make_tables: Any,
                                                             config_dict: dict[str, Any], label: str | None) -> None:
    # The log-Q correction needs each item's count among the positive training interactions before
    # the first step: the stream counts them in one pass, and every chunk carries log q per row.
    tables = streamed_world(tmp_path, make_tables, config_dict, {}, [retrieval_task(label)])
    trainer = prepared(tmp_path / "config.yaml", tmp_path / "run")
    stream = trainer.stream
    assert stream is not None and stream.catalogue.items is not None
    inter = tables.interactions
    parts = np.concatenate([stream.split.parts(g, None) for g in stream.log.groups])  # random split
    items = stream.catalogue.items.rows_of(inter["item_id"])
    positive = inter["click"].to_numpy() == 1 if label else np.ones(len(inter), dtype=bool)
    counts = np.bincount(items[positive & (parts == 0)], minlength=stream.catalogue.items.num_rows)
    expected = np.log(np.maximum(counts, 1.0) / counts.sum()).astype(np.float32)
    np.testing.assert_array_equal(stream.item_log_q["retrieve"], expected)
    start = 0
    for group in stream.log.groups:
        chunk = stream.encoded(group, 0)
        rows = start + np.flatnonzero(stream.split.parts(group, None) == 0)
        start += group.rows
        np.testing.assert_array_equal(chunk.masks["retrieve"].numpy(), positive[rows])
        np.testing.assert_array_equal(chunk.labels["retrieve"].numpy(), expected[items[rows]])


def test_a_streamed_run_with_a_retrieval_task(tmp_path: Path, make_tables: Any, config_dict: dict[str, Any]) -> None:
    streamed_world(tmp_path, make_tables, config_dict, {}, [retrieval_task("click")])
    result = train(tmp_path / "config.yaml", tmp_path / "run")
    test = result.metrics["tasks"]["retrieve"]["test"]
    assert set(test) == {"recall@10", "recall@100", "mrr"} and 0 < test["mrr"] <= 1
    assert set(result.history[0]["valid"]["retrieve"]) == {"recall@10", "recall@100", "mrr"}
    # `mtlrec evaluate` streams the same positives and ranks them the same way.
    again = evaluate_run(result.run_dir)["tasks"]["retrieve"]
    assert again == pytest.approx(test, abs=1e-9)
    predictor = Predictor.load(result.run_dir)
    assert predictor.recommender.retrieval_vectors is not None  # two-stage serving, as in memory


# ---------------------------------------------------------------------------------------------
# What cannot stream


def test_unstreamable_configs_fail_fast_naming_the_key(tmp_path: Path, config_dict: dict[str, Any]) -> None:
    config_dict["data"]["stream"] = True
    with pytest.raises(ConfigError, match=r"features\[2\] \('hist'\) is a sequence feature.*data.stream"):
        config_from_dict(config_dict)
    config_dict["features"] = [f for f in config_dict["features"] if f["type"] != "sequence"]
    config_dict["data"]["split"]["method"] = "leave_last_out"
    with pytest.raises(ConfigError, match="data.split.method is 'leave_last_out', which data.stream cannot do"):
        config_from_dict(config_dict)


def test_streamed_interactions_must_be_parquet(tmp_path: Path, log_folder: Path) -> None:
    csv = tmp_path / "log.csv"
    log_frame(50).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match="data.stream reads the interactions from Parquet.*log.csv"):
        train(log_config(csv), tmp_path / "a")
    with pytest.raises(ConfigError, match="given as a DataFrame"):
        train(log_config(log_folder), tmp_path / "b", tables={"interactions": log_frame(50)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        train(log_config(tmp_path / "empty"), tmp_path / "c")


def test_a_bad_row_group_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    write_parquet(log_frame(100), folder / "a.parquet", 30)
    bad = log_frame(100, start=100).astype({"d0": str})
    bad.loc[5, "d0"] = "n/a"
    write_parquet(bad, folder / "b.parquet", 30)
    with pytest.raises(DataError, match=r"feature 'd0' \(features\[2\]\).*expected numbers"):
        train(log_config(folder), tmp_path / "run")
    write_parquet(log_frame(100, start=100).drop(columns=["c0"]), folder / "b.parquet", 30)
    with pytest.raises(DataError, match=r"'b.parquet' lacks the columns \['c0'\]"):
        train(log_config(folder), tmp_path / "run")
