"""Training diagnostics: gradient conflict, expert utilisation and calibration on constructed cases,
then what a real run writes to diagnostics.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mtlrec
from mtlrec.config import ModelConfig
from mtlrec.data.schema import Schema
from mtlrec.data.spec import TaskSpec
from mtlrec.data.split import split_tables
from mtlrec.data.synthetic import make_world
from mtlrec.data.tables import Tables
from mtlrec.models.backbones import BACKBONES, Backbone
from mtlrec.models.model import build_model
from mtlrec.training import diagnostics as diagnostics_module
from mtlrec.training.diagnostics import (
    DIAGNOSTICS_FILE,
    Diagnostics,
    gradient_conflict,
    reliability,
    task_calibration,
)
from mtlrec.training.evaluate import TaskPredictions
from mtlrec.training.trainer import train_step
from mtlrec.training.weighting import EqualWeighting

TINY = ["train.epochs=2", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]", "train.batch_size=64"]


# ---------------------------------------------------------------------- gradient conflict


def _cos(result: dict[str, Any], a: str, b: str) -> float:
    tasks = result["tasks"]
    return float(result["cosine"][tasks.index(a)][tasks.index(b)])


def test_identical_gradients_give_cosine_one_and_opposite_minus_one() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    x = torch.randn(5, 3)
    x[0, 1] = 0.0                                   # so that a gradient along w[0, 1] is orthogonal
    losses = {"a": (w * x).sum(), "same": 3.0 * (w * x).sum(), "opposite": -(w * x).sum(),
              "orthogonal": 2.0 * w[0, 1]}
    result = gradient_conflict(losses, [w])
    assert result is not None
    assert _cos(result, "a", "same") == pytest.approx(1.0, abs=1e-6)
    assert _cos(result, "a", "opposite") == pytest.approx(-1.0, abs=1e-6)
    assert _cos(result, "a", "orthogonal") == pytest.approx(0.0, abs=1e-6)
    assert _cos(result, "a", "a") == pytest.approx(1.0, abs=1e-6)
    norm = dict(zip(result["tasks"], result["norm"], strict=True))
    assert norm["same"] == pytest.approx(3 * norm["a"], rel=1e-5)
    assert w.grad is None, "diagnostics must not write into .grad"
    sum(losses.values()).backward()                 # the graph is kept for the real backward
    assert w.grad is not None


def test_gradients_are_compared_across_parameters_and_groups() -> None:
    shared_a, shared_b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(2))
    losses = {
        "t1": shared_a.sum() + shared_b.sum(),          # [1,1,1,1 | 1,1]
        "t2": shared_a.sum() - shared_b.sum(),          # [1,1,1,1 | -1,-1]
        "only_b": shared_b.sum(),                       # [0,0,0,0 | 1,1]
        "no_grad": torch.tensor(1.0),                   # a constant: skipped
    }
    result = gradient_conflict(losses, [shared_a, shared_b], groups=["A", "B"])
    assert result is not None
    assert result["tasks"] == ["t1", "t2", "only_b"]
    assert _cos(result, "t1", "t2") == pytest.approx(2 / 6)
    assert _cos(result, "t1", "only_b") == pytest.approx(2 / np.sqrt(6 * 2))
    group_b = result["groups"]["B"]
    assert group_b[0][1] == pytest.approx(-1.0)            # t1 vs t2 on B: opposite
    assert result["groups"]["A"][0][2] is None               # only_b never reaches A
    assert result["groups"]["A"][0][1] == pytest.approx(1.0)


def test_sparse_embedding_gradients_match_the_dense_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    sparse = nn.Embedding(12, 3, sparse=True)
    dense = copy.deepcopy(sparse)
    dense.sparse = False
    rows_a, rows_b = torch.tensor([1, 2, 2, 7]), torch.tensor([2, 7, 9])
    target = torch.randn(3)

    def losses(emb: nn.Embedding) -> dict[str, Tensor]:
        return {"a": (emb(rows_a) * target).sum(), "b": (emb(rows_b) ** 2).sum(), "c": -(emb(rows_a) * target).sum()}

    got = gradient_conflict(losses(sparse), [sparse.weight])
    want = gradient_conflict(losses(dense), [dense.weight])
    assert got is not None and want is not None
    np.testing.assert_allclose(np.array(got["cosine"], dtype=float), np.array(want["cosine"], dtype=float),
                               atol=1e-6)
    assert _cos(got, "a", "c") == pytest.approx(-1.0, abs=1e-6)
    # Large dense tables keep only their non-zero rows: same numbers.
    monkeypatch.setattr(diagnostics_module, "COMPACT_ROWS", 4)
    compact = gradient_conflict(losses(dense), [dense.weight])
    assert compact is not None
    np.testing.assert_allclose(np.array(compact["cosine"], dtype=float), np.array(want["cosine"], dtype=float),
                               atol=1e-6)
    np.testing.assert_allclose(compact["norm"], want["norm"], rtol=1e-6)


def test_no_shared_parameters_or_no_gradient_gives_nothing() -> None:
    w = nn.Parameter(torch.ones(3))
    assert gradient_conflict({"a": w.sum()}, []) is None
    assert gradient_conflict({"a": torch.tensor(2.0)}, [w]) is None


# ---------------------------------------------------------------------- expert utilisation


class _GatedModel(nn.Module):
    """A real MMoE backbone with a tower per task, exposing what `Diagnostics` reads."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        config = ModelConfig(backbone="mmoe", num_experts=4, expert_hidden=[8])
        self.backbone: Backbone = BACKBONES.get("mmoe")(6, tasks, config)
        self.towers = nn.ModuleDict({t: nn.Linear(self.backbone.out_dim, 1) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        reps = self.backbone(x)
        return {t: tower(reps[t]).squeeze(-1) for t, tower in self.towers.items()}

    @property
    def gate_weights(self) -> dict[str, Tensor]:
        return self.backbone.gate_weights

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.backbone.shared_parameters()


def test_a_gate_forced_to_one_expert_shows_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _GatedModel(["forced", "free"])
    gate = model.backbone.gates["forced"]
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([-50.0, -50.0, 50.0, -50.0]))  # softmax -> expert 3 only
    diagnostics = Diagnostics(tmp_path, every=2)
    for step in range(5):
        outputs = model(torch.randn(16, 6))
        losses = {t: out.square().mean() for t, out in outputs.items()}
        diagnostics.before_backward(step, losses, model)  # type: ignore[arg-type]
        diagnostics.on_step(step, losses, {t: 1.0 for t in losses}, model)  # type: ignore[arg-type]
    diagnostics.on_epoch_end(1, 5)
    saved = json.loads((tmp_path / DIAGNOSTICS_FILE).read_text())
    (epoch,) = saved["experts"]
    assert epoch["epoch"] == 1 and epoch["step"] == 5
    np.testing.assert_allclose(epoch["gates"]["forced"], [0.0, 0.0, 1.0, 0.0], atol=1e-6)
    free = np.array(epoch["gates"]["free"])
    assert free.sum() == pytest.approx(1.0, abs=1e-5) and free.max() < 0.9
    assert [s["step"] for s in saved["samples"]] == [0, 2, 4]
    assert [s["step"] for s in saved["conflict"]] == [0, 2, 4]
    assert saved["conflict"][0]["groups"].keys() == {"backbone"}
    # The next epoch starts from zero again.
    diagnostics.on_epoch_end(2, 5)
    assert len(json.loads((tmp_path / DIAGNOSTICS_FILE).read_text())["experts"]) == 1


def test_every_zero_turns_diagnostics_off(tmp_path: Path) -> None:
    model = _GatedModel(["a", "b"])
    diagnostics = Diagnostics(tmp_path, every=0)
    outputs = model(torch.randn(4, 6))
    losses = {t: out.sum() for t, out in outputs.items()}
    diagnostics.before_backward(0, losses, model)  # type: ignore[arg-type]
    diagnostics.on_step(0, losses, {"a": 1.0, "b": 1.0}, model)  # type: ignore[arg-type]
    diagnostics.on_epoch_end(1, 1)
    diagnostics.on_fit_end({})
    assert not (tmp_path / DIAGNOSTICS_FILE).exists()
    with pytest.raises(ValueError, match="every"):
        Diagnostics(tmp_path, every=-1)


# ---------------------------------------------------------------------- calibration


def test_reliability_by_hand() -> None:
    result = reliability(np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1]), bins=2)
    assert result["count"] == [2, 2]
    assert result["confidence"] == pytest.approx([0.1, 0.9])
    assert result["frequency"] == pytest.approx([0.5, 1.0])
    assert result["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert result["n"] == 4
    # Edges: 0 falls in the first bin, 1 in the last; an empty bin has no point.
    edge = reliability(np.array([0.0, 1.0]), np.array([0, 1]), bins=4)
    assert edge["count"] == [1, 0, 0, 1] and edge["confidence"][1] is None
    assert edge["ece"] == pytest.approx(0.0)


def test_calibrated_probabilities_have_small_ece() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(float)
    assert reliability(p, y, bins=10)["ece"] < 0.01
    assert reliability(np.clip(p + 0.2, 0, 1), y, bins=10)["ece"] > 0.15


def test_task_calibration_by_type() -> None:
    def pred(task_type: str, outputs: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> TaskPredictions:
        task = TaskSpec(name="t", kind="interaction", type=task_type, num_outputs=outputs.shape[-1]
                        if outputs.ndim > 1 else 1)
        return TaskPredictions(task, outputs, labels, mask, None)

    binary = task_calibration(pred("binary", np.array([0.2, 0.8, 0.5]), np.array([0, 1, 1]),
                                   np.array([True, True, False])), bins=2)
    assert binary is not None and binary["n"] == 2 and binary["kind"] == "binary"
    multiclass = task_calibration(pred("multiclass", np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]),
                                       np.array([True, True])), bins=2)
    assert multiclass is not None and multiclass["kind"] == "top label"          # confidences 0.7 and 0.6
    assert multiclass["confidence"][1] == pytest.approx(0.65) and multiclass["frequency"][1] == pytest.approx(0.5)
    multilabel = task_calibration(pred("multilabel", np.array([[0.9, 0.1]]), np.array([[1, 0]]),
                                       np.array([True])), bins=2)
    assert multilabel is not None and multilabel["n"] == 2 and multilabel["ece"] == pytest.approx(0.1)
    assert task_calibration(pred("regression", np.array([1.0]), np.array([2.0]), np.array([True]))) is None
    assert task_calibration(pred("binary", np.array([0.5]), np.array([1]), np.array([False]))) is None


# ---------------------------------------------------------------------- in the trainer


def test_diagnostics_do_not_change_training() -> None:
    world = make_world(n_users=60, n_items=30, impressions_per_user=10, n_pairs=100, seed=5)
    config = mtlrec.load_config(world.config_dict())[0]
    tables = Tables(**world.tables)
    split = split_tables(tables, config)
    schema = Schema(config).fit(tables, split)
    spec, data = schema.spec_, schema.encode(tables)
    rows = {s: torch.as_tensor(split.rows(s, "train")[:64]) for s in ("interactions", "users", "items", "item_pairs")}
    batches = [data.batch(s, r) for s, r in rows.items()]
    torch.manual_seed(0)
    base = build_model(spec, ModelConfig(backbone="ple", embedding_dim=8, encoder_dim=16, expert_hidden=[16],
                                         tower_hidden=[8], head_hidden=[8]))
    results = []
    for diagnostics in (None, Diagnostics(Path("unused"), every=1)):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        for step in range(3):
            train_step(model, batches, spec.tasks, EqualWeighting([t.name for t in spec.tasks]), [opt],
                       list(model.parameters()), 5.0, diagnostics, step)
        results.append(model.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(n_users=80, n_items=40, impressions_per_user=15, n_pairs=200, seed=3).write(
        tmp_path_factory.mktemp("world"))


def test_a_run_writes_diagnostics_json(world: Path, tmp_path: Path) -> None:
    result = mtlrec.train(world, tmp_path / "mmoe", [*TINY, "model.backbone=mmoe"])
    saved = json.loads((result.run_dir / DIAGNOSTICS_FILE).read_text())
    tasks = list(result.metrics["tasks"])
    assert saved["every"] == 50 and saved["version"] == 1
    assert saved["samples"][0]["step"] == 0 and set(saved["samples"][0]["weights"]) == set(tasks)
    conflict = saved["conflict"][0]
    assert conflict["tasks"] == tasks
    cos = np.array(conflict["cosine"], dtype=float)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-5)
    np.testing.assert_allclose(cos, cos.T, atol=1e-6)
    assert {"embedding", "backbone"} <= set(conflict["groups"])
    assert [e["epoch"] for e in saved["experts"]] == [1, 2]
    for weights in saved["experts"][-1]["gates"].values():
        assert len(weights) == 4 and sum(weights) == pytest.approx(1.0, abs=1e-4)
    assert set(saved["experts"][-1]["gates"]) == {"click", "like", "purchase"}
    calibration = saved["calibration"]
    assert set(calibration) == set(tasks)
    click = calibration["click"]
    assert click["kind"] == "binary" and sum(click["count"]) == click["n"] > 0 and 0.0 <= click["ece"] <= 1.0


def test_single_backbone_records_no_conflict_and_no_experts(world: Path, tmp_path: Path) -> None:
    result = mtlrec.train(world, tmp_path / "single", [*TINY, "model.backbone=single", "train.epochs=1"])
    saved = json.loads((result.run_dir / DIAGNOSTICS_FILE).read_text())
    assert saved["conflict"] == [] and saved["experts"] == []
    assert saved["samples"] and saved["calibration"]


def test_resume_keeps_the_diagnostics_of_the_first_part(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    overrides = [*TINY, "model.backbone=ple"]
    mtlrec.train(world, out, [*overrides, "train.epochs=1"])
    first = json.loads((out / DIAGNOSTICS_FILE).read_text())
    mtlrec.train(world, out, [*overrides, "train.epochs=2"], resume=True)
    saved = json.loads((out / DIAGNOSTICS_FILE).read_text())
    assert [e["epoch"] for e in saved["experts"]] == [1, 2]
    assert saved["experts"][0] == first["experts"][0]
    steps = [s["step"] for s in saved["samples"]]
    assert steps == sorted(set(steps)) and steps[0] == 0
