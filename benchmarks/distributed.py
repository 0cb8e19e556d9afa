"""Data-parallel scaling: training samples/s of one process against N processes (DDP, gloo on CPU).

    python benchmarks/distributed.py                    # the synthetic world of `mtlrec demo`, 1 epoch
    python benchmarks/distributed.py --nproc 2 --users 1000 --json scaling.json
    python benchmarks/distributed.py --stream-rows 1000000 --no-threads   # streamed from Parquet

Writes the synthetic world to a temporary folder and trains its config (PLE, all four task kinds)
for one epoch with `mtlrec train`; with `--stream-rows N`, writes instead the speed benchmark's
CTR log of N rows to Parquet (row groups of N/8 rows) and trains its MMoE with `data.stream: true`,
each process reading its own row groups. Three ways:

    1 process x 1 thread      the baseline
    1 process x N threads     the same cores used by intra-op threads instead
    N processes x 1 thread    `mtlrec train --nproc N` (torchrun, DDP), same global batch

Training samples/s = interactions in the training split / the epoch's `train_seconds` from
log.jsonl: the training steps only (each also carries its users, items and pairs batches);
loading, encoding, validation, test and writing the run are excluded. Efficiency = samples/s with
N processes / (N x samples/s of one process with one thread). On a machine with N cores shared
with other work, every figure is bounded by those cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mtlrec.data.ctr import ctr_config, write_ctr_parquet
from mtlrec.data.synthetic import make_world


def train_once(config: Path, out: Path, processes: int, threads: int, extra: list[str]) -> dict[str, Any]:
    """One `mtlrec train` run of one epoch; its training samples/s."""
    command = [sys.executable, "-m", "mtlrec", "train", str(config), "--out", str(out), "--quiet",
               "train.epochs=1", f"train.threads={threads}", "train.diagnostics_every=0", *extra]
    if processes > 1:
        command += ["--nproc", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    epochs = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    seconds = [e["train_seconds"] for e in epochs if e.get("event") == "epoch"][0]
    rows = metrics["split_sizes"]["interactions"]["train"]
    return {"processes": processes, "threads": threads, "rows": rows, "train_seconds": seconds,
            "samples_per_s": rows / seconds}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (and threads) to compare with one")
    parser.add_argument("--users", type=int, default=2000, help="users of the synthetic world (60 rows each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-rows", type=int, default=0,
                        help="stream a CTR log of this many rows from Parquet instead of the synthetic world")
    parser.add_argument("--no-threads", action="store_true", help="skip the 1 process x N threads run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.batch_size=1024")
    args = parser.parse_args(argv)

    load = os.getloadavg()     # other work on the same cores bounds every figure: say how much there was
    with tempfile.TemporaryDirectory(prefix="mtlrec-dist-") as tmp:
        folder = Path(tmp)
        if args.stream_rows:
            log = write_ctr_parquet(folder / "ctr.parquet", args.stream_rows, seed=args.seed,
                                    row_group_rows=max(1, args.stream_rows // 8))
            raw = ctr_config(log, "mmoe")
            raw["data"]["stream"] = True
            config = folder / "ctr.yaml"
            config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        else:
            config = make_world(seed=args.seed, n_users=args.users).write(folder / "world")
        runs = [train_once(config, folder / "p1t1", 1, 1, args.overrides)]
        if not args.no_threads:
            runs.append(train_once(config, folder / f"p1t{args.nproc}", 1, args.nproc, args.overrides))
        runs.append(train_once(config, folder / f"p{args.nproc}t1", args.nproc, 1, args.overrides))
    base = runs[0]["samples_per_s"]
    for run in runs:
        workers = run["processes"] * run["threads"]
        run["speedup"] = run["samples_per_s"] / base
        run["efficiency"] = run["speedup"] / workers
    print(f"{'processes':>9} {'threads':>7} {'train rows':>10} {'train s':>8} {'samples/s':>10} "
          f"{'speed-up':>8} {'efficiency':>10}")
    for run in runs:
        print(f"{run['processes']:>9} {run['threads']:>7} {run['rows']:>10,} {run['train_seconds']:>8.2f} "
              f"{run['samples_per_s']:>10,.0f} {run['speedup']:>8.2f} {run['efficiency']:>10.0%}")
    after = os.getloadavg()
    print(f"cpu cores visible: {os.cpu_count()}; 1-minute load average before / after: "
          f"{load[0]:.2f} / {after[0]:.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"cores": os.cpu_count(), "load_before": load, "load_after": after,
                                         "runs": runs}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
