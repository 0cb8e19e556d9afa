"""`mtlrec demo`: the whole library on the built-in synthetic world, in about two minutes.

It generates the world, trains the multi-task model (PLE, all four task kinds) and the `single`
baseline (one independent model per task) on the same split, and puts every task's test metric
beside the oracle's: the best any model could reach, computed from the true probabilities.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mtlrec.config import load_config
from mtlrec.data.split import split_tables
from mtlrec.data.synthetic import make_world, oracle_metrics
from mtlrec.data.tables import load_tables
from mtlrec.display import frame_table
from mtlrec.metrics import PRIMARY_METRIC, higher_is_better
from mtlrec.training.checkpoint import atomic_write_text
from mtlrec.training.trainer import TrainResult, train

DEMO_OVERRIDES = ["train.ranking_k=[1,5,10,20,50]"]


def compare(multi: TrainResult, single: TrainResult, oracle: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per task: its primary metric for multi-task, single-task and the oracle."""
    tasks: dict[str, Any] = {}
    for name, entry in multi.metrics["tasks"].items():
        metric = PRIMARY_METRIC[entry["type"]]
        tasks[name] = {
            "metric": metric,
            "multi_task": entry["test"].get(metric),
            "single_task": single.metrics["tasks"][name]["test"].get(metric),
            "oracle": oracle.get(name, {}).get(metric),
        }
    return {"tasks": tasks}


def _oracle(world: Any, config_path: Path) -> dict[str, dict[str, float]]:
    """The oracle's metrics on exactly the test rows the models are scored on."""
    config, base_dir = load_config(config_path)
    split = split_tables(load_tables(config, base_dir), config)
    out = {}
    for task in config.tasks:
        rows = split.rows(task.table, "test")
        out[task.name] = oracle_metrics(world, task.name, rows)
    return out


def _report_table(report: dict[str, Any]) -> Table:
    table = Table(title="test metrics: multi-task (PLE) vs single-task vs oracle")
    for column in ("task", "metric", "multi-task", "single-task", "oracle", "multi - single"):
        table.add_column(column, justify="right" if column != "task" else "left")
    for name, row in report["tasks"].items():
        multi, single, oracle = row["multi_task"], row["single_task"], row["oracle"]
        delta = ""
        if multi is not None and single is not None:
            diff = multi - single if higher_is_better(row["metric"]) else single - multi
            delta = f"[{'green' if diff >= 0 else 'red'}]{multi - single:+.4f}[/]"
        table.add_row(name, row["metric"], *(f"{v:.4f}" if v is not None else "-" for v in (multi, single, oracle)),
                      delta)
    return table


def run_demo(out: Path, seed: int = 0, epochs: int | None = None, console: Console | None = None,
             world: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the demo end to end and write `out/report.json`; returns the report.

    Args:
        out: folder for the data, both runs and report.json.
        seed: seed of the world and of training.
        epochs: epochs per model (default: the demo's own).
        console: where to print (default: stdout).
        world: `make_world` arguments (sizes) instead of the defaults.
        overrides: extra `key=value` config overrides for both models.
    """
    from mtlrec.predict import Predictor

    console = console or Console()
    started = time.perf_counter()
    synthetic = make_world(seed=seed, **dict(world or {}))
    config_path = synthetic.write(out / "data")
    sizes = ", ".join(f"{name} {len(frame):,}" for name, frame in synthetic.tables.items())
    console.print(f"[bold]synthetic world[/bold] (seed {seed}): {sizes}")
    overrides = [*DEMO_OVERRIDES, f"train.seed={seed}", *overrides] + ([f"train.epochs={epochs}"] if epochs else [])
    console.print("[bold]training the multi-task model[/bold] (PLE, every task kind)")
    multi = train(config_path, out / "multi_task", [*overrides, "model.backbone=ple"])
    console.print("[bold]training the single-task baseline[/bold] (one independent model per task)")
    single = train(config_path, out / "single_task", [*overrides, "model.backbone=single"])
    report = compare(multi, single, _oracle(synthetic, config_path))
    report["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    console.print(_report_table(report))

    predictor = Predictor.load(multi.run_dir)
    user = str(synthetic.tables["interactions"]["user_id"].iloc[0])
    recs = predictor.recommend(user, k=10)
    console.print(frame_table(f"top 10 for user {user}", recs))
    item = str(synthetic.tables["items"]["item_id"].iloc[0])
    for relation in ("substitute", "complement"):
        related = predictor.related_items(item, relation, k=5)
        console.print(frame_table(f"top {relation}s of item {item}", related))
    from mtlrec.report import build_report

    page = build_report(multi.run_dir, compare=[single.run_dir])
    console.print(f"run report written to {page}")
    console.print(f"report written to {out / 'report.json'} ({report['seconds']} s)")
    return report

