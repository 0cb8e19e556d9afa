"""ONNX export of the ranking model: parity with the torch model under ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import mtlrec
from mtlrec.data.synthetic import make_world
from mtlrec.errors import ArtifactError, ConfigError
from mtlrec.export import RankingModule, example_inputs, export_onnx, export_run, input_name, ranking_fields

FAST = ["train.epochs=1", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    config = make_world(n_users=80, n_items=40, impressions_per_user=15, n_pairs=200, seed=3).write(root / "world")
    mtlrec.train(config, root / "run", FAST)
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(run_dir, tmp_path_factory.mktemp("onnx") / "ranking.onnx")


def _random_inputs(predictor: mtlrec.Predictor, rows: int, seed: int) -> list[torch.Tensor]:
    """Random entities, random context values (some missing) and random numeric values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for f, base in zip(ranking_fields(predictor.spec), example_inputs(predictor, rows), strict=True):
        if f.group in ("user", "item"):
            table = predictor.state.users if f.group == "user" else predictor.state.items
            out.append(table[f.name][torch.randint(0, table[f.name].shape[0], (rows,), generator=gen)])
        elif f.kind == "numeric":
            value = torch.randn(rows, generator=gen)
            missing = (torch.rand(rows, generator=gen) < 0.3).float()
            out.append(torch.stack([value * (1 - missing), missing], dim=1))
        else:
            size = predictor.spec.vocab_sizes[f.vocab]
            out.append(torch.randint(0, size, base.shape, generator=gen))
    return out


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_onnx_matches_torch(run_dir: Path, exported: Path, rows: int) -> None:
    predictor = mtlrec.Predictor.load(run_dir)
    fields = ranking_fields(predictor.spec)
    tasks = list(predictor.spec.tasks_of("interaction"))
    inputs = _random_inputs(predictor, rows, seed=rows)
    with torch.no_grad():
        expected = RankingModule(predictor.model, fields, tasks).eval()(*inputs)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run([t.name for t in tasks], {input_name(f): x.numpy() for f, x in zip(fields, inputs, strict=True)})
    assert len(got) == len(tasks) == 3
    for task, ref, out in zip(tasks, expected, got, strict=True):
        assert out.shape == tuple(ref.shape), task.name
        assert float(np.abs(out - ref.numpy()).max()) < 1e-5, task.name


def test_onnx_probabilities_equal_predictor(run_dir: Path, exported: Path) -> None:
    """The exported outputs are what `Predictor.predict` answers for the same user-item rows."""
    import pandas as pd

    predictor = mtlrec.Predictor.load(run_dir)
    users, items = predictor.schema.user_ids()[:5], predictor.schema.item_ids()[:5]
    frame = predictor.predict(pd.DataFrame({"user_id": users, "item_id": items, "hour": [None] * 5,
                                            "device": [None] * 5}))
    rows_u, rows_i = predictor.schema.user_rows(users), predictor.schema.item_rows(items)
    feeds = {}
    for f in ranking_fields(predictor.spec):
        if f.group == "user":
            feeds[input_name(f)] = predictor.state.users[f.name][torch.as_tensor(rows_u)].numpy()
        elif f.group == "item":
            feeds[input_name(f)] = predictor.state.items[f.name][torch.as_tensor(rows_i)].numpy()
        else:
            feeds[input_name(f)] = np.zeros(5, dtype=np.int64)  # categorical context, missing
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for task in ("click", "like", "purchase"):
        (out,) = session.run([task], feeds)
        assert np.abs(out - frame[task].to_numpy()).max() < 1e-5


def test_onnx_metadata_describes_inputs_and_outputs(exported: Path) -> None:
    model = onnx.load(str(exported))
    meta = {p.key: p.value for p in model.metadata_props}
    inputs = json.loads(meta["mtlrec.inputs"])
    outputs = json.loads(meta["mtlrec.outputs"])
    assert [i["name"] for i in inputs] == [i.name for i in model.graph.input]
    assert {"user.user_id", "item.item_id", "context.hour"} <= {i["name"] for i in inputs}
    assert [o["name"] for o in outputs] == ["click", "like", "purchase"]
    assert outputs[1]["condition"] == "click"


def test_export_run_rejects_unknown_format_and_damaged_run(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown export format 'pmml'"):
        export_run(run_dir, tmp_path / "m.pmml", "pmml")
    with pytest.raises(ArtifactError):
        export_onnx(tmp_path, tmp_path / "m.onnx")
