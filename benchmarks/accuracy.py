"""Multi-task beside single-task on public datasets: mean +/- std per task, differences, delta-m.

    python benchmarks/accuracy.py --datasets census_income movielens --seeds 3 --out runs/bench

For each dataset and seed, the dataset is imported with that seed (`mtlrec.datasets`) and the
`single` baseline and the multi-task backbones (`shared_bottom`, `omoe`, `mmoe`, `ple`) train
under the same budget (the imported config's epochs, early stopping on the validation part) with
`train.seed` = the seed. The seed therefore changes the initialisation and sampling always, and
the split where the dataset's split is seeded (Census-Income with one file, MovieLens, Amazon);
predefined splits (AliExpress, Ali-CCP, Census-Income with both files) keep their test part.

Every task is scored by its type's primary metric (AUC binary, accuracy multiclass, mAP
multilabel, RMSE regression) on the test part. The table shows mean +/- std over the seeds, the
difference of each multi-task model from `single`, and delta-m, the average relative
improvement over the tasks, sign-corrected so that positive is better for lower-is-better
metrics too (Maninis et al., CVPR 2019):

    delta_m = 100 / T * sum_t s_t (M_t - S_t) / S_t,   s_t = +1 if higher is better else -1

A task where a multi-task model's mean is worse than `single`'s is flagged "NT" (negative
transfer). `--budget tiny` trains one small epoch per run (for tests); `--out DIR` writes
accuracy.md and accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtlrec.config import load_config
from mtlrec.datasets import load_dataset
from mtlrec.metrics import PRIMARY_METRIC, higher_is_better
from mtlrec.report import build_report
from mtlrec.training.trainer import train

ALL_MODELS = ("single", "shared_bottom", "omoe", "mmoe", "ple")
DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""Default folder of the datasets: ../shared/data relative to the repository."""


@dataclass(frozen=True)
class BenchDataset:
    """A dataset of the benchmark: which loader, which folder under the data root, which config."""

    loader: str
    folder: str
    config: str = "config.yaml"
    models: tuple[str, ...] = ALL_MODELS
    note: str = ""


DATASETS: dict[str, BenchDataset] = {
    "census_income": BenchDataset("census_income", "census-income-kdd"),
    "census_income_group2": BenchDataset("census_income", "census-income-kdd", "config_group2.yaml"),
    "movielens": BenchDataset("movielens", "movielens-100k"),
    "amazon_meta": BenchDataset(
        "amazon_meta", "amazon2018-magazine-subscriptions-meta", models=("single", "mmoe"),
        note="No interaction tasks: the backbone only shapes interaction tasks, so every multi-task backbone "
             "is the same model here (shared item encoder for category and relation); 'mmoe' stands for all."),
    "aliexpress": BenchDataset("aliexpress", "aliexpress-sample"),
    "ali_ccp": BenchDataset("ali_ccp", "ali-ccp-sample"),
}

TINY = ["train.epochs=1", "train.batch_size=64", "model.embedding_dim=4", "model.encoder_dim=8",
        "model.encoder_hidden=[8]", "model.expert_hidden=[8]", "model.tower_hidden=[4]", "model.head_hidden=[4]",
        "model.num_experts=2", "train.early_stopping=null"]
"""Overrides of the `tiny` budget: one epoch of a very small model (tests only)."""


_TIE = 1e-9
"""Relative difference below which two scores are equal (summing in another order is not a difference)."""


def _primary(task_type: str) -> str:
    return PRIMARY_METRIC[task_type]


def run_dataset(name: str, path: Path, seeds: Sequence[int], budget: str, work: Path, threads: int | None,
                models: Sequence[str] | None = None, log: Any = sys.stderr,
                reports: Path | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train every model of dataset `name` over `seeds` (config overrides `extra` on every run);
    returns the runs and the summary."""
    bench = DATASETS[name]
    chosen = tuple(m for m in bench.models if models is None or m in models)
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    task_info: dict[str, dict[str, str]] = {}
    seeded = True
    for seed in seeds:
        dataset = load_dataset(bench.loader, path, seed=seed)
        notes, seeded = dataset.notes, dataset.seeded_split
        data_dir = work / name / f"seed{seed}"
        dataset.write(data_dir)
        config_path = data_dir / bench.config
        config, _ = load_config(config_path)
        task_info = {t.name: {"type": t.type, "metric": _primary(t.type)} for t in config.tasks}
        for model in chosen:
            overrides = [f"model.backbone={model}", f"train.seed={seed}", "train.progress=false"]
            if threads is not None:
                overrides.append(f"train.threads={threads}")
            if budget == "tiny":
                overrides += TINY
            overrides += extra
            started = time.perf_counter()
            result = train(config_path, work / name / f"run-{model}-{seed}", overrides, progress=False)
            seconds = time.perf_counter() - started
            scores = {task: result.metrics["tasks"][task]["test"].get(info["metric"], math.nan)
                      for task, info in task_info.items()}
            scores = {k: (math.nan if v is None else float(v)) for k, v in scores.items()}
            runs.append({"model": model, "seed": seed, "scores": scores, "seconds": round(seconds, 2),
                         "epochs_run": result.metrics["epochs_run"], "best_epoch": result.metrics["best_epoch"]})
            shown = " ".join(f"{t}.{task_info[t]['metric']}={v:.4f}" for t, v in scores.items())
            print(f"[{name}] seed {seed} {model:<13} {shown} ({seconds:.1f} s, {result.metrics['epochs_run']} "
                  f"epochs)", file=log, flush=True)
        # One run report per seed: the lead multi-task model beside the others.
        lead = next((m for m in ("ple", "mmoe", *chosen) if m in chosen and m != "single"), chosen[0])
        page = build_report(work / name / f"run-{lead}-{seed}",
                            compare=[work / name / f"run-{m}-{seed}" for m in chosen if m != lead])
        if reports is not None:  # the page is self-contained: it outlives the run directories
            reports.mkdir(parents=True, exist_ok=True)
            page = Path(shutil.copy(page, reports / f"{name}-seed{seed}.html"))
        print(f"[{name}] seed {seed} report: {page}", file=log, flush=True)
    summary = summarize(runs, task_info, chosen)
    return {"dataset": name, "loader": bench.loader, "config": bench.config, "path": str(path),
            "notes": notes, "bench_note": bench.note, "seeded_split": seeded, "seeds": list(seeds),
            "budget": budget, "tasks": task_info, "runs": runs, "summary": summary}


def summarize(runs: Sequence[dict[str, Any]], tasks: dict[str, dict[str, str]],
              models: Sequence[str]) -> dict[str, Any]:
    """Mean and std per model and task, differences from `single`, delta-m and negative transfer."""
    out: dict[str, Any] = {}
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        stats = {}
        for task in tasks:
            values = np.array([r["scores"][task] for r in mine], dtype=np.float64)
            finite = values[np.isfinite(values)]
            stats[task] = {"mean": float(finite.mean()) if finite.size else math.nan,
                           "std": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if finite.size else math.nan),
                           "n": int(finite.size)}
        out[model] = {"tasks": stats, "seconds": float(np.mean([r["seconds"] for r in mine])) if mine else math.nan}
    base = out.get("single")
    for model in models:
        entry = out[model]
        if base is None or model == "single":
            entry.update(diff={}, delta_m=None, negative_transfer=[])
            continue
        diff: dict[str, float] = {}
        relative: list[float] = []
        negative: list[str] = []
        worse_seeds: dict[str, list[int]] = {}
        for task, info in tasks.items():
            m, s = entry["tasks"][task]["mean"], base["tasks"][task]["mean"]
            if not (math.isfinite(m) and math.isfinite(s)):
                continue
            diff[task] = 0.0 if abs(m - s) <= _TIE * max(abs(s), 1.0) else m - s  # float noise is a tie
            sign = 1.0 if higher_is_better(info["metric"]) else -1.0
            if s != 0:
                relative.append(sign * diff[task] / abs(s))
            if sign * diff[task] < 0:
                negative.append(task)
            # Paired by seed (same split and data): in how many seeds the model is worse.
            single_of = {r["seed"]: r["scores"][task] for r in runs if r["model"] == "single"}
            paired = [(r["scores"][task], single_of[r["seed"]]) for r in runs
                      if r["model"] == model and r["seed"] in single_of]
            worse_seeds[task] = [sum(sign * (a - b) < -_TIE * max(abs(b), 1.0) for a, b in paired), len(paired)]
        entry.update(diff=diff, delta_m=100.0 * float(np.mean(relative)) if relative else None,
                     negative_transfer=negative, worse_seeds=worse_seeds)
    return out


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    text = f"{value:+.{digits}f}"
    if value != 0 and float(text) == 0:  # a difference smaller than the last digit shown
        text = f"{value:+.0e}"
    return text[0].replace("-", "\u2212") + text[1:]


def markdown(result: dict[str, Any]) -> str:
    """The dataset's table: one row per model, one column per task, then delta-m and negative transfer."""
    tasks = result["tasks"]
    summary = result["summary"]
    seeds = result["seeds"]
    what_seed = ("split and initialisation" if result["seeded_split"]
                 else "initialisation (and sampling) only; the split is predefined")
    metrics = ", ".join(f"{t} {i['metric'].upper()}" for t, i in tasks.items())
    caption = [f"**{result['dataset']}** ({result['config']}): test {metrics}; "
               f"mean \u00b1 std over {len(seeds)} seeds ({', '.join(map(str, seeds))}; the seed changes the "
               f"{what_seed}); budget `{result['budget']}`. In brackets: difference from `single`; "
               "**NT** = negative transfer (mean worse than `single`); the negative-transfer column counts the "
               "seeds in which the model is worse than `single` on the same split."]
    caption += result["notes"]
    if result["bench_note"]:
        caption.append(result["bench_note"])
    arrows = {t: "\u2191" if higher_is_better(i["metric"]) else "\u2193" for t, i in tasks.items()}
    header = ["model", *(f"{t} {i['metric']} {arrows[t]}" for t, i in tasks.items()), "\u0394m vs single",
              "negative transfer", "s/run"]
    lines = [" ".join(caption), "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for model, entry in summary.items():
        cells = [f"`{model}`"]
        for task in tasks:
            stat = entry["tasks"][task]
            cell = f"{_fmt(stat['mean'])} \u00b1 {_fmt(stat['std'])}"
            if task in entry["diff"]:
                flag = " **NT**" if task in entry["negative_transfer"] else ""
                cell += f" ({_signed(entry['diff'][task])}{flag})"
            cells.append(cell)
        delta = entry["delta_m"]
        cells.append("\u2014" if model == "single" else ("n/a" if delta is None else f"{_signed(delta, 3)}%"))
        flagged = [f"{t} ({entry['worse_seeds'][t][0]}/{entry['worse_seeds'][t][1]} seeds worse)"
                   for t in entry["negative_transfer"]]
        cells.append("\u2014" if model == "single" else (", ".join(flagged) or "none"))
        cells.append(f"{entry['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model and core count (lscpu's model name where available)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch threads {_torch_threads()}"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--datasets", nargs="+", default=["census_income", "movielens"], choices=sorted(DATASETS),
                        help="datasets to run")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    parser.add_argument("--budget", choices=("full", "tiny"), default="full",
                        help="full: the imported config's settings; tiny: one small epoch (tests)")
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None, help="subset of the models")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT,
                        help="folder holding the datasets' folders (default ../shared/data)")
    parser.add_argument("--path", action="append", default=[], metavar="NAME=DIR",
                        help="folder of one dataset, overriding the data root (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (train.threads)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run, e.g. model.embedding_init_std=0.25 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write accuracy.md and accuracy.json here")
    parser.add_argument("--keep-runs", action="store_true",
                        help="keep the run directories under OUT/runs (each seed's report.html is kept anyway)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only print the tables of a previous run's accuracy.json (recomputed from its runs)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def render(doc: dict[str, Any]) -> str:
    """The markdown of a benchmark document (as written to accuracy.json), summaries recomputed from its runs."""
    parts = []
    for result in doc["datasets"]:
        models = list(dict.fromkeys(r["model"] for r in result["runs"]))
        result["summary"] = summarize(result["runs"], result["tasks"], models)
        parts.append(f"{markdown(result)}\nWall time: {result['wall_seconds']:.0f} s.\n")
    text = "\n".join(parts)
    return text + (f"\nMachine: {doc['machine']}. Total wall time {doc['wall_seconds']:.0f} s.\n"
                   f"Command: `{doc['command']}`\n")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark (or re-render a previous one with --render); returns the exit code (0)."""
    args = parse_args(argv, prog)
    if args.render is not None:
        print(render(json.loads(args.render.read_text(encoding="utf-8"))))
        return 0
    paths: dict[str, Path] = {}
    for item in args.path:
        key, sep, value = item.partition("=")
        if not sep or key not in DATASETS:
            raise SystemExit(f"--path must look like NAME=DIR with NAME in {sorted(DATASETS)}, got {item!r}")
        paths[key] = Path(value)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="mtlrec-bench-") as tmp:
        work = args.out / "runs" if args.keep_runs and args.out is not None else Path(tmp)
        for name in args.datasets:
            path = paths.get(name, args.data_root / DATASETS[name].folder)
            t0 = time.perf_counter()
            result = run_dataset(name, path, range(args.seeds), args.budget, work, args.threads, args.models,
                                 reports=args.out / "reports" if args.out is not None else None, extra=args.set)
            result["wall_seconds"] = round(time.perf_counter() - t0, 1)
            results.append(result)
    wall = time.perf_counter() - started
    given = argv if argv is not None else sys.argv[1:]
    command = (prog or "python benchmarks/accuracy.py") + " " + " ".join(shlex.quote(a) for a in given)
    doc = {"command": command, "machine": machine(), "wall_seconds": round(wall, 1), "datasets": results}
    text = render(doc)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.md").write_text(text, encoding="utf-8")
        (args.out / "accuracy.json").write_text(json.dumps(_jsonable(doc), indent=2), encoding="utf-8")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
