"""The accuracy and MMoE-synthetic benchmarks end to end on a tiny budget, and their arithmetic."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from test_datasets import write_census, write_ml100k

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


accuracy = _module("accuracy")
mmoe_bench = _module("mmoe_synthetic")


def test_summary_diff_delta_m_and_negative_transfer_by_hand() -> None:
    tasks = {"click": {"type": "binary", "metric": "auc"}, "rating": {"type": "regression", "metric": "rmse"}}
    runs = [
        {"model": "single", "seed": 0, "scores": {"click": 0.70, "rating": 1.00}, "seconds": 1.0},
        {"model": "single", "seed": 1, "scores": {"click": 0.74, "rating": 1.00}, "seconds": 1.0},
        {"model": "mmoe", "seed": 0, "scores": {"click": 0.77, "rating": 1.10}, "seconds": 2.0},
        {"model": "mmoe", "seed": 1, "scores": {"click": 0.77, "rating": 1.10}, "seconds": 2.0},
    ]
    summary = accuracy.summarize(runs, tasks, ["single", "mmoe"])
    assert summary["single"]["tasks"]["click"]["mean"] == pytest.approx(0.72)
    assert summary["single"]["tasks"]["click"]["std"] == pytest.approx(math.sqrt(0.0008))  # ddof=1
    mmoe = summary["mmoe"]
    assert mmoe["diff"] == pytest.approx({"click": 0.05, "rating": 0.10})
    # click: +0.05 / 0.72; rating (lower is better): -(0.10 / 1.00); mean of the two, in percent.
    assert mmoe["delta_m"] == pytest.approx(100 * (0.05 / 0.72 - 0.10) / 2)
    assert mmoe["negative_transfer"] == ["rating"]
    table = accuracy.markdown({"dataset": "toy", "config": "config.yaml", "tasks": tasks, "summary": summary,
                               "seeds": [0, 1], "seeded_split": True, "budget": "tiny", "notes": ["A note."],
                               "bench_note": ""})
    assert "| `mmoe` | 0.7700 \u00b1 0.0000 (+0.0500) | 1.1000 \u00b1 0.0000 (+0.1000 **NT**) | \u22121.528% | " \
           "rating (2/2 seeds worse) |" in table
    assert mmoe["worse_seeds"] == {"click": [0, 2], "rating": [2, 2]}
    assert "rating rmse \u2193" in table and "A note." in table


def test_accuracy_benchmark_end_to_end_on_tiny_files(tmp_path: Path) -> None:
    census = write_census(tmp_path / "census", n_test=160)
    movielens = write_ml100k(tmp_path / "ml", n=500)
    out = tmp_path / "out"
    code = accuracy.main(["--datasets", "census_income", "movielens", "--seeds", "2", "--budget", "tiny",
                          "--path", f"census_income={census}", "--path", f"movielens={movielens}",
                          "--threads", "1", "--out", str(out), "--keep-runs", "--set", "model.embedding_init_std=0.05"])
    assert code == 0
    run_config = yaml.safe_load((out / "runs" / "census_income" / "run-mmoe-0" / "config.yaml").read_text())
    assert run_config["model"]["embedding_init_std"] == 0.05  # --set reaches every run
    text = (out / "accuracy.md").read_text()
    assert "**census_income**" in text and "**movielens**" in text
    assert "50/25/25" in text  # the caption says how Census-Income was split
    for model in accuracy.ALL_MODELS:
        assert f"| `{model}` |" in text
    doc = json.loads((out / "accuracy.json").read_text())
    census_result = doc["datasets"][0]
    assert len(census_result["runs"]) == 2 * len(accuracy.ALL_MODELS)
    assert set(census_result["summary"]["mmoe"]["diff"]) == {"income", "marital"}
    assert census_result["summary"]["single"]["delta_m"] is None
    assert isinstance(census_result["summary"]["ple"]["delta_m"], float)
    ml = doc["datasets"][1]
    assert set(ml["tasks"]) == {"like", "rating", "gender", "age", "occupation", "genres", "relation"}
    assert accuracy.main(["--render", str(out / "accuracy.json")]) == 0  # re-rendering a finished run


def test_accuracy_rejects_a_bad_path_option() -> None:
    with pytest.raises(SystemExit, match="--path must look like NAME=DIR"):
        accuracy.main(["--datasets", "census_income", "--path", "nonsense"])


def test_mmoe_synthetic_benchmark_end_to_end(tmp_path: Path) -> None:
    code = mmoe_bench.main(["--seeds", "2", "--rows", "300", "--epochs", "1", "--correlations", "0.5", "1.0",
                            "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "mmoe_synthetic.json").read_text())
    assert len(doc["records"]) == 2 * 2 * 3
    assert set(doc["summary"]["0.5"]) == {"shared_bottom", "omoe", "mmoe"}
    assert all(r["loss"] > 0 for r in doc["records"])
    assert "Paper's finding" in (tmp_path / "mmoe_synthetic.md").read_text()
    assert mmoe_bench.main(["--render", str(tmp_path / "mmoe_synthetic.json")]) == 0


def test_mmoe_verdict_needs_a_widening_gap() -> None:
    def summary(gaps: dict[float, float]) -> dict[str, dict[str, dict[str, float]]]:
        return {str(p): {"shared_bottom": {"mean": 1.0 + g}, "mmoe": {"mean": 1.0}} for p, g in gaps.items()}

    text, gaps = mmoe_bench.verdict(summary({0.5: 0.3, 0.9: 0.1, 1.0: 0.0}), [0.5, 0.9, 1.0])
    assert text.startswith("reproduces") and gaps == pytest.approx([0.3, 0.1, 0.0])
    assert mmoe_bench.verdict(summary({0.5: 0.0, 0.9: 0.1, 1.0: 0.2}), [0.5, 0.9, 1.0])[0].startswith("does not")
    assert mmoe_bench.verdict(summary({0.5: 0.1}), [0.5])[0].startswith("cannot")


speed = _module("speed")


def test_speed_benchmark_end_to_end_on_a_tiny_log(tmp_path: Path) -> None:
    """Every figure of the speed benchmark is produced (values are machine-dependent, not asserted)."""
    out = tmp_path / "speed.json"
    assert speed.main(["--rows", "3000", "--models", "mmoe", "--threads", "1", "--json", str(out),
                       "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    mmoe = result["models"]["mmoe"]
    for key in ("train_samples_per_second", "infer_samples_per_second", "train_peak_ratio", "infer_peak_ratio",
                "peak_rss_mb", "parameters", "cli_ratio", "train_matmul_gflops"):
        assert mmoe[key] > 0, key
    assert set(mmoe["auc"]) == {"click", "purchase"}
    assert set(mmoe["auc_vs_reference"]) == set(mmoe["auc_vs_reference_same_init"]) == {"click", "purchase"}
    for key in ("dynamo_import_mb", "rss_after_prepare_mb", "gradients_mb", "file_rss_growth_mb",
                "freed_resident_after_training_mb", "training_growth_mb", "infer_page_faults_per_batch"):
        assert key in mmoe, key
    reference = result["reference"]
    for key in ("training_growth_mb", "rss_before_training_mb", "parameters_mb", "optimizer_state_mb"):
        assert key in reference, key
    assert reference["seeds"] == 3 and all(len(v) == 3 for v in reference["auc_by_seed"].values())
    assert all(spread >= 0 for spread in reference["auc_spread"].values())
    assert set(result["peers"]) == {"torch-rechub", "DeepCTR-Torch"}
    for peer in result["peers"].values():  # run where the peer is installed, skipped where not (as in CI)
        assert peer == "skipped (not installed)" or set(peer["auc"]) == {"click", "purchase"}, peer


def test_speed_skips_peers_that_are_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(speed.importlib.util, "find_spec", lambda name: None)
    out = speed._benchmark_peers(None, tmp_path / "absent.parquet", tmp_path, 1)
    assert out == {"torch-rechub": "skipped (not installed)", "DeepCTR-Torch": "skipped (not installed)"}
    assert "torch-rechub: skipped (not installed)" in capsys.readouterr().out


def test_speed_compares_mmoe_with_a_peer_by_hand() -> None:
    mmoe = {"train_samples_per_second": 6000.0, "infer_samples_per_second": 30000.0,
            "auc": {"click": 0.75, "purchase": 0.70}}
    peer = {"train_samples_per_second": 2000.0, "infer_samples_per_second": 40000.0,
            "auc": {"click": 0.74, "purchase": 0.72}}
    ratios = speed.compare(mmoe, peer)
    assert ratios["mmoe_train_ratio"] == 3.0 and ratios["mmoe_infer_ratio"] == 0.75
    assert ratios["mmoe_auc_minus_peer"] == pytest.approx({"click": 0.01, "purchase": -0.02})


def test_speed_flop_accounting_by_hand() -> None:
    """The dense part of the benchmark's MMoE: 2 x multiply-adds of every matmul, per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtlrec.config import ModelConfig
    from mtlrec.models.backbones import MMoE

    config = ModelConfig(expert_hidden=[256, 128], num_experts=8, tower_hidden=[64])
    mmoe = MMoE(330, ["click", "purchase"], config)
    with FlopCounterMode(display=False) as counter:
        mmoe(torch.randn(4, 330))
    per_sample = counter.get_total_flops() / 4
    assert per_sample == 2 * (8 * (330 * 256 + 256 * 128) + 2 * 330 * 8)
    summary = speed.summarize({"flops_per_sample_forward": 1e6, "train_samples_per_second": 1000.0,
                               "infer_samples_per_second": 4000.0}, train_rate=10.0, infer_rate=8.0)
    assert summary["train_gflops"] == 3.0 and summary["train_peak_ratio"] == 0.3
    assert summary["infer_gflops"] == 4.0 and summary["infer_peak_ratio"] == 0.5


def test_matmul_shapes_are_recorded_forward_and_backward() -> None:
    import torch

    layer = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5, requires_grad=True)
    shapes = speed.record_matmuls(lambda: layer(x).sum().backward())
    assert ("addmm", (7, 5), (5, 3)) in shapes
    assert len(shapes) == 3  # forward, and the gradients of the input and of the weight
