"""Data-parallel training: sharding, loss normalisation, and 2-process runs under torchrun (gloo, CPU).

The multi-process tests start `python -m torch.distributed.run --standalone --nproc_per_node=2` as
a subprocess with a timeout, on the tiny hand-made world of conftest.py written to Parquet. The
config makes every awkward case happen: the last global batch of each epoch has 1 row (93 x 3 +
1 = 280 training rows), so one replica's part is empty; the users' batch has 1 row every step;
ratings are missing on a fifth of the rows and `buy` is conditional, so label masks split
unevenly across the replicas.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import Tensor

import mtlrec
from conftest import tiny_config_dict, tiny_tables
from mtlrec.config import config_from_dict
from mtlrec.data.batch import Batch
from mtlrec.data.ctr import CtrShape, ctr_config, write_ctr_parquet
from mtlrec.data.dataset import Sampler
from mtlrec.data.schema import Schema
from mtlrec.data.sharding import shard, shard_bounds
from mtlrec.data.split import split_tables
from mtlrec.errors import ConfigError
from mtlrec.predict import evaluate_run
from mtlrec.training.distributed import Replicas, average_, check_launch
from mtlrec.training.evaluate import TaskPredictions
from mtlrec.training.losses import task_losses
from mtlrec.training.trainer import train

SRC = Path(mtlrec.__file__).resolve().parents[1]
TIMEOUT = 150
OVERRIDES = ["train.epochs=2", "train.batch_size=93", "train.aux_passes=0.2", "train.eval_batch_size=16",
             "train.checkpoint_every=3", "train.diagnostics_every=2", "train.threads=1", "train.progress=false",
             "model.backbone=mmoe", "model.embedding_dim=8", "model.encoder_dim=16", "model.encoder_hidden=[16]",
             "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]


# ---------------------------------------------------------------------------------- sharding


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), world=st.integers(1, 9))
def test_shards_cover_every_item_once_in_order(n: int, world: int) -> None:
    parts = [shard(list(range(n)), rank, world) for rank in range(world)]
    assert [x for part in parts for x in part] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert [shard_bounds(n, r, world)[1] - shard_bounds(n, r, world)[0] for r in range(world)] == sizes


def test_shard_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        shard_bounds(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        Sampler(np.arange(5), 2, seed=0, rank=0, world_size=0)


def test_sampler_shards_cover_each_epoch_once_and_reshuffle() -> None:
    rows = np.arange(1000, 1103)
    world = 3
    samplers = [Sampler(rows, 10, seed=4, rank=r, world_size=world) for r in range(world)]
    single = Sampler(rows, 10, seed=4)
    orders = []
    for epoch in range(2):
        parts = [list(s.epoch(epoch)) for s in samplers]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(single) == 11   # same steps
        for step, whole in enumerate(single.epoch(epoch)):
            # each global batch is the single process's batch, split in rank order
            assert torch.equal(torch.cat([p[step] for p in parts]), whole)
        seen = torch.cat([b for p in parts for b in p]).sort().values
        assert torch.equal(seen, torch.as_tensor(rows))                   # every row exactly once
        orders.append(torch.cat([b for p in parts for b in p]))
    assert not torch.equal(orders[0], orders[1])                           # reshuffled by epoch
    assert all(s.state_dict() == single.state_dict() for s in samplers)    # one checkpoint for all


def test_sampler_state_resumes_a_replica_mid_epoch() -> None:
    rows = np.arange(57)
    a = Sampler(rows, 8, seed=1, rank=1, world_size=2)
    it = a.epoch(0)
    first = [next(it) for _ in range(3)]
    b = Sampler(rows, 8, seed=1, rank=1, world_size=2)
    b.load_state_dict(a.state_dict())
    rest_a, rest_b = list(it), list(b.epoch(0))
    assert len(first) + len(rest_b) == len(a)
    assert all(torch.equal(x, y) for x, y in zip(rest_a, rest_b, strict=True))


def test_empty_part_steps_on_the_batch_head() -> None:
    # A global batch of 2 rows over 3 replicas: replica 2's part is empty.
    sampler = Sampler(np.arange(10, 17), 2, seed=0, rank=2, world_size=3)
    whole = Sampler(np.arange(10, 17), 2, seed=0)
    part = sampler.next()
    assert part.numel() == 0
    assert torch.equal(sampler.head(), whole.next()[:1])


# ---------------------------------------------------------------------------------- loss normalisation


@pytest.fixture(scope="module")
def encoded() -> tuple[Any, Any, Any]:
    config = config_from_dict(tiny_config_dict())
    tables = tiny_tables()
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    return schema.spec_, schema.encode(tables, split), split


def _model(spec: Any) -> Any:
    from mtlrec.config import ModelConfig
    from mtlrec.models.model import build_model

    torch.manual_seed(0)
    return build_model(spec, ModelConfig(backbone="mmoe", embedding_dim=8, encoder_dim=16, encoder_hidden=[16],
                                         expert_hidden=[16], tower_hidden=[8], head_hidden=[8]))


def test_global_denominators_make_the_mean_of_replica_gradients_exact(encoded: Any) -> None:
    """Two halves of a batch, each normalised by the mean labelled count, average to the full
    batch's gradient, even where masks split unevenly (ratings missing, buy only after click)."""
    spec, data, split = encoded
    model = _model(spec)
    rows = torch.as_tensor(split.rows("interactions", "train")[:61])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batch: Batch, denominators: Any = None) -> tuple[dict[str, Tensor], list[Tensor]]:
        losses = task_losses(model(batch), batch, spec.tasks, model.entire_space, denominators)
        total = torch.stack(list(losses.values())).sum()
        got = torch.autograd.grad(total, params, allow_unused=True)
        return losses, [torch.zeros_like(p) if g is None else g for g, p in zip(got, params, strict=True)]

    full_losses, full = grads(data.batch("interactions", rows))
    halves = [data.batch("interactions", rows[:30]), data.batch("interactions", rows[30:])]
    counts: list[Tensor] = []                   # what an all-reduce would see from each replica
    for half in halves:
        task_losses(model(half), half, spec.tasks, model.entire_space, lambda c: counts.append(c) or c)
    assert not torch.equal(counts[0], counts[1])                             # labels split unevenly
    mean_count = (counts[0] + counts[1]) / 2
    parts = [grads(h, lambda c: mean_count) for h in halves]
    for name in full_losses:
        torch.testing.assert_close((parts[0][0][name] + parts[1][0][name]) / 2, full_losses[name])
    for g, g0, g1 in zip(full, parts[0][1], parts[1][1], strict=True):
        torch.testing.assert_close((g0 + g1) / 2, g, rtol=1e-5, atol=1e-7)


def test_unlabelled_batch_adds_no_loss_and_no_gradient(encoded: Any) -> None:
    spec, data, split = encoded
    model = _model(spec)
    batch = data.batch("interactions", split.rows("interactions", "train")[:3]).unlabelled()
    assert task_losses(model(batch), batch, spec.tasks) == {}
    # With denominators from other replicas' rows, the losses exist (so every replica runs the
    # same backward) but are zero, with zero gradients.
    losses = task_losses(model(batch), batch, spec.tasks, model.entire_space, lambda c: c + 7.0)
    assert losses and all(float(v.detach()) == 0.0 for v in losses.values())
    torch.stack(list(losses.values())).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ---------------------------------------------------------------------------------- single process


def test_one_replica_is_the_identity() -> None:
    replicas = Replicas()
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert replicas.gather_rows(x) is x
    assert replicas.gather_rows(None) is None
    t = torch.arange(3.0)
    assert replicas.mean(t) is t and average_([t, None])[0] is t
    preds = {"a": TaskPredictions(None, x, x, x, None)}  # type: ignore[arg-type]
    assert replicas.gather_predictions(preds, []) == preds
    replicas.barrier()
    replicas.close()


def test_launch_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict()))
    with pytest.raises(ConfigError, match="global batch.*must be >= 4, got 3"):
        check_launch(config, ["train.batch_size=3"], 4, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 GPUs .* this machine has 1"):
        check_launch(config, ["train.device=cuda"], 2, None)
    with pytest.raises(ConfigError, match="cannot resume"):
        check_launch(config, [], 2, tmp_path / "no-run")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="under torchrun, leave --nproc out"):
        check_launch(config, [], 2, None)


def test_environment_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 must lie in"):
        Replicas.from_env(torch.device("cpu"))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        Replicas.from_env(torch.device("cpu"))


# ---------------------------------------------------------------------------------- two processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(command), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:   # subprocess.run kills the launcher; torchrun takes its workers
        pytest.fail(f"timed out after {TIMEOUT} s: {command}\n{exc.stdout}\n{exc.stderr}")
    if check and done.returncode != 0:
        pytest.fail(f"exit code {done.returncode}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def _torchrun(target: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target],
                check)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world's tables as Parquet files and its config."""
    folder = tmp_path_factory.mktemp("dist_world")
    tables = tiny_tables()
    tables.interactions.to_parquet(folder / "interactions.parquet")
    assert tables.users is not None and tables.items is not None and tables.item_pairs is not None
    tables.users.to_parquet(folder / "users.parquet")
    tables.items.to_parquet(folder / "items.parquet")
    tables.item_pairs.to_parquet(folder / "pairs.parquet")
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict()))
    return folder / "config.yaml"


_RUNS: dict[tuple[str, ...], Path] = {}


def _two_process_run(world: Path, out: Path, extra: Sequence[str], base: Sequence[str] = OVERRIDES) -> Path:
    key = (str(world), *base, *extra)
    if key not in _RUNS:
        _torchrun(["-m", "mtlrec", "train", str(world), *base, *extra, "--out", str(out), "--quiet"])
        _RUNS[key] = out
    return _RUNS[key]


def _tensors(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in load_file(run / "checkpoints" / "last.safetensors").items()
            if k.startswith(prefix)}


@pytest.mark.parametrize(("weighting", "sparse"), [("equal", "off"), ("pcgrad", "off"),
                                                     ("gradnorm", "on"), ("uncertainty", "on")])
def test_two_processes_train_like_one(world: Path, tmp_path_factory: pytest.TempPathFactory,
                                      weighting: str, sparse: str) -> None:
    """2 replicas on the global batches end with the parameters (and weighting state) of one process.

    `sparse=on` puts the fused embedding table on sparse gradients, which DDP reduces over gloo
    and SparseAdam applies; PCGrad and GradNorm take per-task gradients with autograd.grad,
    which the strategies average over the replicas themselves.
    """
    extra = [f"train.weighting={weighting}", f"train.sparse_embeddings='{sparse}'"]
    two = _two_process_run(world, tmp_path_factory.mktemp(f"two_{weighting}"), extra)
    one = tmp_path_factory.mktemp(f"one_{weighting}")
    train(world, one, [*OVERRIDES, *extra], progress=False)
    for prefix in ("model.", "weighting."):
        a, b = _tensors(two, prefix), _tensors(one, prefix)
        assert a.keys() == b.keys() and (a or prefix == "weighting.")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{prefix}{name}")
    # Rank 0 alone wrote the run: one log line per epoch, and the other replica's random state.
    epochs = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]
    assert "rng.1" in load_file(two / "checkpoints" / "last.safetensors")
    assert (two / "diagnostics.json").is_file() and (two / "manifest.json").is_file()


def _same_metrics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] is None and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_gathered_metrics_equal_one_process_metrics(world: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each replica predicts its share of valid/test and the shares are gathered: the metrics
    equal, exactly, those one process computes with the same model on the same data."""
    run = _two_process_run(world, tmp_path_factory.mktemp("two_equal"), ["train.weighting=equal",
                                                                        "train.sparse_embeddings='off'"])
    metrics = json.loads((run / "metrics.json").read_text())
    single = {part: evaluate_run(run, None, part)["tasks"] for part in ("valid", "test")}
    assert set(single["test"]) == set(metrics["tasks"])
    for task, entry in metrics["tasks"].items():
        assert _same_metrics(entry["test"], single["test"][task]), task
        assert _same_metrics(entry["valid"], single["valid"][task]), task   # best epoch's = final weights'


CRASH = """\
import os, sys
from mtlrec.training import trainer

calls = 0
step = trainer.train_step

def dying_step(*args, **kwargs):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == int(sys.argv[1]):
        os._exit(17)
    return step(*args, **kwargs)

trainer.train_step = dying_step
from mtlrec.cli import main
main(sys.argv[2:])
"""


def test_rank_killed_mid_epoch_then_resumed_loses_nothing(world: Path, tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rank 1 dies at its 4th step (epoch 1 has 4 steps; a checkpoint was written after step 3);
    `mtlrec train --nproc 2 --resume` then finishes the run, which ends bit for bit where an
    uninterrupted run ends."""
    extra = ["train.weighting=equal", "train.sparse_embeddings='off'"]
    reference = _two_process_run(world, tmp_path_factory.mktemp("two_equal"), extra)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "run"
    crashed = _torchrun([str(script), "4", "train", str(world), *OVERRIDES, *extra, "--out", str(out), "--quiet"],
                        check=False)
    assert crashed.returncode != 0
    assert not (out / "metrics.json").exists()
    meta = json.loads(_checkpoint_meta(out))
    assert (meta["epoch"], meta["step"]) == (0, 3)                          # mid-epoch checkpoint
    _run([sys.executable, "-m", "mtlrec", "train", str(world), *OVERRIDES, *extra, "--out", str(out),
          "--quiet", "--resume", "--nproc", "2"])
    a, b = _tensors(out, "model."), _tensors(reference, "model.")
    assert all(torch.equal(a[k], b[k]) for k in b)
    history = json.loads((out / "metrics.json").read_text())
    assert history["epochs_run"] == 2


def _checkpoint_meta(run: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "last.safetensors"), framework="pt") as fh:
        return (fh.metadata() or {})["mtlrec"]


# ---------------------------------------------------------------------------------- streamed, two processes

STREAM_OVERRIDES = ["train.epochs=2", "train.batch_size=64", "train.lr=0.01", "train.threads=1",
                    "train.checkpoint_every=3", "train.diagnostics_every=0", "train.progress=false",
                    "train.eval_batch_size=50", "train.early_stopping=null", "data.stream=true",
                    "data.stream_buffer_rows=200", "model.expert_hidden=[16]", "model.num_experts=2",
                    "model.tower_hidden=[8]", "model.embedding_dim=4", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def stream_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CTR log of 3,000 rows in 8 row groups, streamed, and its config."""
    folder = tmp_path_factory.mktemp("stream_world")
    shape = CtrShape(n_categorical=4, n_dense=3, vocab_min=5, vocab_max=60)
    log = write_ctr_parquet(folder / "ctr.parquet", 3000, seed=0, row_group_rows=400, shape=shape)
    (folder / "config.yaml").write_text(yaml.safe_dump(ctr_config(log, "mmoe", shape, test=0.2, valid=0.1)))
    return folder / "config.yaml"


def test_streamed_two_process_run_gathers_the_metrics_of_one(stream_world: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each replica streams its own rows; the run's metrics, gathered over the replicas' row groups,
    equal those one process computes with the same model on the same data."""
    run = _two_process_run(stream_world, tmp_path_factory.mktemp("stream_two"), [], STREAM_OVERRIDES)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["split_sizes"]["interactions"]["train"] > 2000
    single = evaluate_run(run, None, "test")["tasks"]
    for task, entry in metrics["tasks"].items():
        assert _same_metrics(entry["test"], single[task]), task
    epochs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]


def test_streamed_rank_killed_mid_epoch_then_resumed_loses_nothing(stream_world: Path, tmp_path: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """Rank 1 dies at its 11th step of a streamed run (a checkpoint was written after step 9);
    `--resume --nproc 2` finishes it bit for bit where the uninterrupted run ends."""
    reference = _two_process_run(stream_world, tmp_path_factory.mktemp("stream_two"), [], STREAM_OVERRIDES)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "run"
    crashed = _torchrun([str(script), "11", "train", str(stream_world), *STREAM_OVERRIDES, "--out", str(out),
                         "--quiet"], check=False)
    assert crashed.returncode != 0 and not (out / "metrics.json").exists()
    meta = json.loads(_checkpoint_meta(out))
    assert (meta["epoch"], meta["step"], meta["stream"]["position"]) == (0, 9, 9)
    _run([sys.executable, "-m", "mtlrec", "train", str(stream_world), *STREAM_OVERRIDES, "--out", str(out),
          "--quiet", "--resume", "--nproc", "2"])
    a, b = _tensors(out, "model."), _tensors(reference, "model.")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((out / "metrics.json").read_text())["tasks"] == \
        json.loads((reference / "metrics.json").read_text())["tasks"]


def test_streamed_retrieval_on_two_processes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A retrieval task on streamed interactions: both replicas count the same log q, train on
    their own rows, and the run's retrieval metrics equal one process's."""
    folder = tmp_path_factory.mktemp("stream_retrieval")
    tables = tiny_tables()
    assert tables.users is not None and tables.items is not None and tables.item_pairs is not None
    tables.interactions.to_parquet(folder / "interactions.parquet", row_group_size=90)
    tables.users.to_parquet(folder / "users.parquet")
    tables.items.to_parquet(folder / "items.parquet")
    tables.item_pairs.to_parquet(folder / "pairs.parquet")
    raw = tiny_config_dict()
    raw["features"] = [f for f in raw["features"] if f["type"] != "sequence"]
    raw["tasks"].append({"name": "retrieve", "kind": "retrieval", "label": "click", "dim": 8})
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    overrides = [o for o in OVERRIDES if not o.startswith("train.diagnostics_every")] + \
        ["data.stream=true", "data.stream_buffer_rows=93", "train.diagnostics_every=0"]
    run = _two_process_run(folder / "config.yaml", folder / "run", [], overrides)
    metrics = json.loads((run / "metrics.json").read_text())["tasks"]
    assert set(metrics["retrieve"]["test"]) == {"recall@10", "recall@100", "mrr"}
    single = evaluate_run(run, None, "test")["tasks"]
    for task, entry in metrics.items():
        assert _same_metrics(entry["test"], single[task]), task
