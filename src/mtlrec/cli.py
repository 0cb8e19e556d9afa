"""The `mtlrec` command: thin wrappers over the library. User errors print one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mtlrec.display import frame_table
from mtlrec.errors import ConfigError, MtlrecError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Multi-task learning recommender systems: train, evaluate, predict, recommend.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in and public datasets.")
app.add_typer(data_app, name="data")

out_console = Console()
err_console = Console(stderr=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, the runs and report.json.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the synthetic world and of training.")] = 0,
    epochs: Annotated[int | None, typer.Option(help="Epochs per model (default: the demo's own).")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value config overrides for both models, e.g. model.embedding_init_std=0.25")] = None,
) -> None:
    """Generate the synthetic world, train multi-task (PLE) and single-task models, compare with the oracle."""
    from mtlrec.demo import run_demo

    run_demo(out, seed=seed, epochs=epochs, console=out_console, overrides=overrides or [])


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="The run's YAML config.")],
    out: Annotated[Path, typer.Option(help="Run directory to write.")] = Path("runs/latest"),
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.epochs=3")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints/last.safetensors.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Train with N data-parallel processes on this machine (launches torchrun; "
                    "train.batch_size stays the global batch). See docs/distributed.md.")] = None,
) -> None:
    """Train a multi-task model from CONFIG; writes OUT/metrics.json and the artifact.

    Runs unchanged under `torchrun --nproc_per_node=N -m mtlrec train ...` (DDP: gloo on CPU,
    nccl on GPU); rank 0 alone writes and prints.
    """
    from mtlrec.training.distributed import check_launch, is_main_process, launch
    from mtlrec.training.trainer import train as run_train

    if nproc is not None and nproc > 1:
        check_launch(config, overrides or [], nproc, out if resume else None)
        args = ["train", str(config), *(overrides or []), "--out", str(out)]
        args += ["--resume"] * resume + ["--quiet"] * quiet
        code = launch(nproc, args)
        if code != 0:
            err_console.print(f"error: training with {nproc} processes failed (exit code {code}); "
                              "see the processes' output above", markup=False, highlight=False)
            raise typer.Exit(code)
        return
    result = run_train(config, out, overrides or [], resume=resume, progress=False if quiet else None)
    if is_main_process():
        _print_task_metrics(result.metrics)
        out_console.print(f"run written to {result.run_dir}")


def _print_task_metrics(metrics: dict[str, Any]) -> None:
    table = Table(title="test metrics")
    table.add_column("task")
    table.add_column("kind")
    table.add_column("metrics")
    for name, entry in metrics["tasks"].items():
        shown = " ".join(f"{k}={v:.4f}" for k, v in entry["test"].items() if v is not None)
        table.add_row(name, f"{entry['kind']} {entry['type']}", shown)
    out_console.print(table)
    ranking = metrics.get("ranking") or {}
    if ranking.get("metrics"):
        out_console.print("ranking: " + " ".join(f"{k}={v:.4f}" for k, v in ranking["metrics"].items()))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run directory written by `mtlrec train`.")],
    data: Annotated[Path | None, typer.Option(help="Evaluate on the data of this config instead.")] = None,
    part: Annotated[str, typer.Option(help="Split part: train, valid or test.")] = "test",
) -> None:
    """Recompute every task's metrics of a trained run."""
    from mtlrec.predict import evaluate_run

    metrics = evaluate_run(run, data, part)
    out_console.print_json(json.dumps(metrics))


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    input: Annotated[Path, typer.Option("--input", help="Interactions to score (Parquet or CSV).")],
    output: Annotated[Path, typer.Option("--output", help="Where to write the scores (.parquet or .csv).")],
) -> None:
    """Score user-item rows: every interaction task's probability per row."""
    from mtlrec.data.tables import read_table
    from mtlrec.predict import Predictor, write_frame

    frame = Predictor.load(run).predict(read_table(input, "input"))
    write_frame(frame, output)
    out_console.print(f"wrote {len(frame)} rows to {output}")


@app.command()
def recommend(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    user: Annotated[str, typer.Option("--user", help="The user id.")],
    k: Annotated[int, typer.Option("-k", "--k", help="How many items.")] = 10,
) -> None:
    """Top-K items for a user with each interaction task's probability and the fused score."""
    from mtlrec.predict import Predictor

    frame = Predictor.load(run).recommend(user, k=k)
    out_console.print(frame_table(f"top {k} for user {user}", frame))


@app.command()
def serve(
    run: Annotated[Path, typer.Argument(help="A run directory written by `mtlrec train`.")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (limits apply per worker).")] = 1,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM): serve HTTPS.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(
        help="File of API keys, one per line (also: MTLREC_API_KEYS, comma-separated).")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="Serve WITHOUT API keys; for local use only.")] = False,
) -> None:
    """Serve a run over HTTP: recommend, predict, classify, relate (settings: MTLREC_* variables)."""
    from mtlrec.serve import serve_command

    serve_command(run, host, port, workers, ssl_certfile, ssl_keyfile, api_keys_file,
                  insecure_no_auth=insecure_no_auth)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[Path, typer.Option("--out", help="File to write, e.g. ranking.onnx.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
) -> None:
    """Export the ranking model (every interaction task) for ONNX Runtime."""
    from mtlrec.export import export_run

    out_console.print(f"wrote {export_run(run, out, fmt)}")


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="A run directory written by `mtlrec train`.")],
    compare: Annotated[list[Path] | None, typer.Option(
        "--compare", help="Another run to lay beside it; repeat for more (--compare A --compare B).")] = None,
) -> None:
    """Write RUN/report.html (self-contained) and its PNGs: curves, deltas, conflict, experts, calibration."""
    from mtlrec.report import build_report

    out_console.print(f"report written to {build_report(run, compare or ())}")


@data_app.command("import")
def data_import(
    name: Annotated[str, typer.Argument(help="Loader: movielens, census_income, amazon_meta, aliexpress, ali_ccp.")],
    path: Annotated[Path, typer.Option("--path", help="Folder holding the publisher's files.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the Parquet tables and config.yaml into.")],
    seed: Annotated[int, typer.Option(help="Seed of the split written into the config (and of sampling).")] = 0,
) -> None:
    """Import a public dataset from a local folder (nothing downloads): Parquet tables and a ready config.yaml."""
    from mtlrec.datasets import load_dataset

    dataset = load_dataset(name, path, seed=seed)
    config_path = dataset.write(out)
    for table, frame in dataset.tables.items():
        out_console.print(f"{table}: {len(frame):,} rows")
    for note in dataset.notes:
        out_console.print(note, markup=False, highlight=False)
    out_console.print(f"wrote {out} ; train with: mtlrec train {config_path} --out runs/{name}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (the scripts under benchmarks/ of a source checkout).")
app.add_typer(bench_app, name="bench")
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _benchmark(name: str) -> ModuleType:
    """Load benchmarks/NAME.py of the source checkout this package is installed from."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise ConfigError(f"benchmark script '{path}' not found; `mtlrec bench` runs from a source checkout "
                          "installed with pip install -e .")
    spec = importlib.util.spec_from_file_location(f"mtlrec_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load benchmark script '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@bench_app.command("accuracy", add_help_option=False, context_settings=_PASS_THROUGH)
def bench_accuracy(ctx: typer.Context) -> None:
    """Multi-task beside single-task on public datasets: [--datasets ...] [--seeds N] [--budget tiny] [--out DIR]
    (benchmarks/accuracy.py; --help lists every option)."""
    raise typer.Exit(_benchmark("accuracy").main(list(ctx.args), prog="mtlrec bench accuracy"))


@bench_app.command("mmoe-synthetic", add_help_option=False, context_settings=_PASS_THROUGH)
def bench_mmoe_synthetic(ctx: typer.Context) -> None:
    """The MMoE paper's correlation study: [--seeds N] [--rows N] [--epochs N] [--out DIR]
    (benchmarks/mmoe_synthetic.py; --help lists every option)."""
    raise typer.Exit(_benchmark("mmoe_synthetic").main(list(ctx.args), prog="mtlrec bench mmoe-synthetic"))


@bench_app.command("speed", add_help_option=False, context_settings=_PASS_THROUGH)
def bench_speed(ctx: typer.Context) -> None:
    """Training and inference samples/s against this machine's matmul rate: [--rows N] [--models ...]
    [--json FILE] (benchmarks/speed.py; --help lists every option)."""
    raise typer.Exit(_benchmark("speed").main(list(ctx.args), prog="mtlrec bench speed"))


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the tables and config.yaml into.")],
    users: Annotated[int | None, typer.Option(help="Number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items.")] = None,
    impressions: Annotated[int | None, typer.Option(help="Impressions per user.")] = None,
    pairs: Annotated[int | None, typer.Option(help="Number of item pairs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Write the synthetic world (one Parquet file per table) and a ready config.yaml."""
    from mtlrec.data.synthetic import make_world

    sizes = {"n_users": users, "n_items": items, "impressions_per_user": impressions, "n_pairs": pairs}
    world = make_world(seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    config_path = world.write(out)
    for name, frame in world.tables.items():
        out_console.print(f"{name}: {len(frame):,} rows")
    out_console.print(f"wrote {out} ; train with: mtlrec train {config_path} --out runs/synth")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `mtlrec` console script and `python -m mtlrec`.

    Usage errors are click's (exit code 2 with usage help); a user error from the library is
    printed as one line, without a traceback, with exit code 2.
    """
    try:
        app(args=argv, prog_name="mtlrec")
    except MtlrecError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
