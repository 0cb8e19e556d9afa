"""The model, the losses and the weighting strategies working together, and the trainer around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import Crash, crash_after_checkpoints
from mtlrec.config import ModelConfig, config_from_dict
from mtlrec.data.dataset import EncodedData
from mtlrec.data.schema import Schema
from mtlrec.data.spec import SOURCE_OF_KIND, InputSpec
from mtlrec.data.split import split_tables
from mtlrec.data.synthetic import make_world
from mtlrec.data.tables import Tables
from mtlrec.errors import ArtifactError
from mtlrec.models.backbones import BACKBONES
from mtlrec.models.model import build_model
from mtlrec.training.losses import task_losses
from mtlrec.training.trainer import train, train_step
from mtlrec.training.weighting import WEIGHTINGS

SMALL = {"n_users": 120, "n_items": 60, "impressions_per_user": 20, "n_pairs": 300}
FAST = ["train.epochs=2", "train.batch_size=256", "train.progress=false",
        "model.embedding_dim=8", "model.encoder_dim=16", "model.encoder_hidden=[16]",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]


@pytest.fixture(scope="module")
def world_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = make_world(seed=1, **SMALL)
    return world.write(tmp_path_factory.mktemp("world"), retrieval=True)


@pytest.fixture(scope="module")
def prepared() -> tuple[InputSpec, EncodedData, dict[str, torch.Tensor]]:
    """Spec, encoded data and fixed row sets of every source, with regression and retrieval tasks added."""
    world = make_world(seed=2, **SMALL)
    raw = world.config_dict()
    tables = {name: frame.copy() for name, frame in world.tables.items()}
    rng = np.random.default_rng(0)
    inter = tables["interactions"]
    inter["dwell"] = inter["click"] * 2.0 + rng.normal(0, 0.1, len(inter))
    raw["tasks"].append({"name": "dwell", "kind": "interaction", "label": "dwell", "type": "regression"})
    raw["tasks"].append({"name": "retrieval", "kind": "retrieval", "label": "click", "dim": 8})
    config = config_from_dict(raw)
    data_tables = Tables(**tables)
    split = split_tables(data_tables, config)
    schema = Schema(config).fit(data_tables, split)
    data = schema.encode(data_tables)
    rows = {source: torch.as_tensor(split.rows(source, "train")[:128]) for source in
            ("interactions", "users", "items", "item_pairs")}
    return schema.spec_, data, rows


@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_backbone_with_every_weighting(prepared, backbone: str, weighting: str) -> None:  # type: ignore[no-untyped-def]
    spec, data, rows = prepared
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(backbone=backbone, embedding_dim=8, encoder_dim=16, encoder_hidden=[16],
                                          expert_hidden=[16], tower_hidden=[8], head_hidden=[8]))
    strategy = WEIGHTINGS.get(weighting)([t.name for t in spec.tasks], {t.name: 1.0 for t in spec.tasks})
    batches = [data.batch(source, r) for source, r in rows.items()]

    # Output keys and shapes: every task of the batch's source, by type.
    for batch in batches:
        out = model(batch)
        expected = {t.name for t in spec.tasks if SOURCE_OF_KIND[t.kind] == batch.source}
        assert set(out) == expected
        for name, logits in out.items():
            task = spec.task(name)
            one = task.type in ("binary", "regression")
            shape = (len(batch),) if one else (len(batch), task.num_outputs)
            if task.type == "retrieval":
                shape = (len(batch), len(batch))  # in-batch logits
            assert tuple(logits.shape) == shape, (name, logits.shape)

    def total_loss() -> float:
        with torch.no_grad():
            losses = {}
            for batch in batches:
                losses.update(task_losses(model(batch), batch, spec.tasks, model.entire_space))
            return float(sum(losses.values()))

    opt = torch.optim.Adam(list(model.parameters()) + list(strategy.parameters()), lr=1e-2)
    before = total_loss()
    train_step(model, batches, spec.tasks, strategy, [opt], list(model.parameters()), 5.0)
    # Gradients reach the shared parameters (the fused embedding table among them).
    shared = model.shared_parameters()
    if BACKBONES.get(backbone).isolates_tasks:
        assert shared == [], "the single-task baseline shares nothing"
        shared = list(model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)
    for _ in range(25):
        train_step(model, batches, spec.tasks, strategy, [opt], list(model.parameters()), 5.0)
    after = total_loss()
    assert np.isfinite(after)
    assert after < before, (before, after)


def _last_model(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "checkpoints" / "last.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim", "weighting."))}


def test_resume_is_bitwise_equal_to_straight_training(world_config: Path, tmp_path: Path) -> None:
    common = [*FAST, "train.early_stopping=null", "model.dropout=0.1", "train.weighting=uncertainty"]
    train(world_config, tmp_path / "straight", [*common, "train.epochs=2"])
    train(world_config, tmp_path / "resumed", [*common, "train.epochs=1"])
    train(world_config, tmp_path / "resumed", [*common, "train.epochs=2"], resume=True)
    a, b = _last_model(tmp_path / "straight"), _last_model(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_mid_epoch_checkpoint(world_config: Path, tmp_path: Path) -> None:
    common = [*FAST, "train.early_stopping=null", "train.checkpoint_every=3"]
    train(world_config, tmp_path / "straight", [*common, "train.epochs=1"])
    # Simulate a crash: keep only the mid-epoch checkpoint written after step 3.
    from mtlrec.config import load_config
    from mtlrec.training.trainer import Trainer

    cfg, base = load_config(world_config, [*common, "train.epochs=1"])

    trainer = Trainer(cfg, base, tmp_path / "crashed")
    crash_after_checkpoints(trainer, 1)
    with pytest.raises(Crash):
        trainer.fit()
    train(world_config, tmp_path / "crashed", [*common, "train.epochs=1"], resume=True)
    a, b = _last_model(tmp_path / "straight"), _last_model(tmp_path / "crashed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_same_model(world_config: Path, tmp_path: Path) -> None:
    train(world_config, tmp_path / "a", [*FAST, "train.epochs=1"])
    train(world_config, tmp_path / "b", [*FAST, "train.epochs=1"])
    a = load_file(str(tmp_path / "a" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(world_config, tmp_path / "c", [*FAST, "train.epochs=1", "train.seed=5"])
    c = load_file(str(tmp_path / "c" / "weights.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_run_directory_and_metrics(world_config: Path, tmp_path: Path) -> None:
    result = train(world_config, tmp_path / "run", FAST)
    run = result.run_dir
    for name in ("config.yaml", "schema.json", "weights.safetensors", "metrics.json", "log.jsonl"):
        assert (run / name).is_file(), name
    tasks = result.metrics["tasks"]
    assert set(tasks) == {"click", "like", "purchase", "segment", "category", "tags", "relation", "retrieval"}
    assert 0.0 <= tasks["click"]["test"]["auc"] <= 1.0
    for part in ("valid", "test"):
        retrieval = tasks["retrieval"][part]
        assert set(retrieval) == {"recall@10", "recall@100", "mrr"}
        assert 0.0 <= retrieval["recall@10"] <= retrieval["recall@100"] <= 1.0 and 0.0 < retrieval["mrr"] <= 1.0
    # The retrieval loss is one more task loss: in every epoch's record of the log.
    assert all("retrieval" in record["train_loss"] for record in result.history)
    assert "accuracy" in tasks["segment"]["test"]
    assert "map" in tasks["tags"]["test"]
    assert "valid" in tasks["click"] and tasks["click"]["valid"]
    assert result.metrics["ranking"]["metrics"]


def test_resume_without_checkpoint_is_a_clear_error(world_config: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot resume"):
        train(world_config, tmp_path / "none", FAST, resume=True)


def test_best_and_last_checkpoints_are_complete(world_config: Path, tmp_path: Path) -> None:
    train(world_config, tmp_path / "run", FAST)
    for name in ("last", "best"):
        tensors = load_file(str(tmp_path / "run" / "checkpoints" / f"{name}.safetensors"))
        assert any(k.startswith("model.") for k in tensors)
        assert any(k.startswith("optim0.") for k in tensors)
        assert "rng" in tensors
