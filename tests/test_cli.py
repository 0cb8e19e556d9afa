"""The command line: every command end to end on a small synthetic world, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mtlrec.cli import main

FAST = ["train.epochs=1", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def ok(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small world written by `mtlrec data synth` and a run trained by `mtlrec train`."""
    root = tmp_path_factory.mktemp("cli")
    ok(["data", "synth", "--out", str(root / "world"), "--users", "80", "--items", "40",
          "--impressions", "15", "--pairs", "200", "--seed", "3"])
    ok(["train", str(root / "world" / "config.yaml"), "--out", str(root / "run"), "--quiet", *FAST])
    return root / "world", root / "run"


def test_data_synth_writes_tables_and_config(trained: tuple[Path, Path]) -> None:
    world, _ = trained
    for name in ("interactions", "users", "items", "item_pairs"):
        assert (world / f"{name}.parquet").is_file()
    assert (world / "config.yaml").is_file()


def test_train_writes_metrics(trained: tuple[Path, Path]) -> None:
    _, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task, entry in metrics["tasks"].items():
        assert "valid" in entry and "test" in entry, task
    assert "auc" in metrics["tasks"]["click"]["test"]


def test_evaluate_prints_metrics(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir = trained
    code, out, _ = run(["evaluate", str(run_dir)], capsys)
    assert code == 0
    assert json.loads(out)["tasks"]["click"]["auc"] > 0


def test_predict_writes_scores(trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world, run_dir = trained
    rows = pd.read_parquet(world / "interactions.parquet").head(20)
    rows.to_csv(tmp_path / "in.csv", index=False)
    code, _, err = run(["predict", str(run_dir), "--input", str(tmp_path / "in.csv"),
                        "--output", str(tmp_path / "out.parquet")], capsys)
    assert code == 0, err
    scores = pd.read_parquet(tmp_path / "out.parquet")
    assert len(scores) == 20
    assert {"click", "like", "purchase"} <= set(scores.columns)
    assert scores["click"].between(0, 1).all()


def test_recommend_prints_top_k(trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    world, run_dir = trained
    user = str(pd.read_parquet(world / "interactions.parquet")["user_id"].iloc[0])
    code, out, _ = run(["recommend", str(run_dir), "--user", user, "-k", "5"], capsys)
    assert code == 0
    assert "top 5" in out


def test_python_dash_m_works() -> None:
    result = subprocess.run([sys.executable, "-m", "mtlrec", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "demo" in result.stdout and "train" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "missing.yaml", "--out", "x"], "config file 'missing.yaml' does not exist"),
        (["evaluate", "no-such-run"], "is not a complete run directory"),
        (["recommend", "no-such-run", "--user", "u1"], "is not a complete run directory"),
        (["predict", "no-such-run", "--input", "a.csv", "--output", "b.csv"], "is not a complete run directory"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(args, capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_override_and_bad_input(trained: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    world, run_dir = trained
    code, _, err = run(["train", str(world / "config.yaml"), "--out", str(tmp_path / "r"), "train.epochs=zero"], capsys)
    assert code == 2 and "train.epochs" in err and "Traceback" not in err
    code, _, err = run(["predict", str(run_dir), "--input", str(tmp_path / "none.csv"),
                        "--output", str(tmp_path / "o.csv")], capsys)
    assert code == 2 and "none.csv" in err
    code, _, err = run(["recommend", str(run_dir), "--user", "u1", "-k", "0"], capsys)
    assert code == 2 and "k must be >= 1" in err


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["train"], capsys)
    assert code == 2
