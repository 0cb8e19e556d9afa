"""The quality bar of the multi-task model on the demo's synthetic world, against the oracle.

On the world `mtlrec demo` trains on (default sizes, seed 0), the multi-task model (PLE, every
task kind, the world's own config) must reach, on the test split: every binary task's AUC at
least the oracle's minus 0.03, and every multiclass task's accuracy at least the oracle's minus
0.05. The oracle scores the true probabilities the world was generated from on exactly the same
test rows. (Checked here on the demo's world itself rather than a smaller one: smaller worlds
have too few clicked test rows for the conditional tasks' AUC to be held to 0.03 reliably.)
"""

from __future__ import annotations

import pytest

import mtlrec
from mtlrec.config import load_config
from mtlrec.data.split import split_tables
from mtlrec.data.synthetic import make_world, oracle_metrics
from mtlrec.data.tables import load_tables

WORLD = {"seed": 0}
BARS = {"binary": ("auc", 0.03), "multiclass": ("accuracy", 0.05)}


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, float, float, float]]:
    root = tmp_path_factory.mktemp("quality")
    world = make_world(**WORLD)
    config_path = world.write(root / "data")
    overrides = ["model.backbone=ple", "train.progress=false", "train.diagnostics_every=0"]
    result = mtlrec.train(config_path, root / "run", overrides)
    config, base_dir = load_config(config_path)
    split = split_tables(load_tables(config, base_dir), config)
    rows = []
    for task in config.tasks:
        if task.type not in BARS:
            continue
        metric, margin = BARS[task.type]
        oracle = oracle_metrics(world, task.name, split.rows(task.table, "test"))[metric]
        rows.append((task.name, metric, result.test_metric(task.name, metric), oracle, margin))
    return rows


def test_every_binary_and_multiclass_task_is_near_the_oracle(outcome) -> None:  # type: ignore[no-untyped-def]
    short = [f"{name}: {metric} {model:.4f} < oracle {oracle:.4f} - {margin}"
             for name, metric, model, oracle, margin in outcome if model < oracle - margin]
    assert {name for name, *_ in outcome} >= {"click", "like", "purchase", "segment", "category", "relation"}
    assert not short, "; ".join(short)
