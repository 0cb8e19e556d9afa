"""`mtlrec demo` end to end on a small world: the report's shape, the printed table, the quality bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from mtlrec.cli import main
from mtlrec.demo import run_demo

SMALL_WORLD = {"n_users": 150, "n_items": 60, "impressions_per_user": 20, "n_pairs": 400}
TINY_MODEL = ["train.epochs=1", "model.embedding_dim=8", "model.encoder_dim=16", "model.expert_hidden=[16]",
              "model.tower_hidden=[8]", "model.head_hidden=[8]", "train.progress=false"]


def test_demo_writes_report_and_prints_table(tmp_path: Path) -> None:
    console = Console(record=True, width=140)
    report = run_demo(tmp_path, seed=1, console=console, world=SMALL_WORLD, overrides=TINY_MODEL)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tasks"] == report["tasks"]
    assert set(report["tasks"]) == {"click", "like", "purchase", "segment", "category", "tags", "relation"}
    for name, row in report["tasks"].items():
        assert set(row) == {"metric", "multi_task", "single_task", "oracle"}, name
        assert row["multi_task"] is not None and row["single_task"] is not None and row["oracle"] is not None
    assert report["tasks"]["click"]["metric"] == "auc"
    assert report["tasks"]["segment"]["metric"] == "accuracy"
    text = console.export_text()
    assert "multi-task" in text and "oracle" in text
    assert "top 10 for user" in text
    assert "substitutes" in text and "complements" in text


def test_demo_command_rejects_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "many"])
    assert exit_info.value.code == 2


def test_demo_command_passes_config_overrides_to_both_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mtlrec.demo

    seen: dict[str, object] = {}
    monkeypatch.setattr(mtlrec.demo, "run_demo", lambda out, **kwargs: seen.update(kwargs, out=out))
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path), "--seed", "2", "model.embedding_init_std=0.25", "train.epochs=1"])
    assert exit_info.value.code == 0
    assert seen["overrides"] == ["model.embedding_init_std=0.25", "train.epochs=1"] and seen["seed"] == 2
