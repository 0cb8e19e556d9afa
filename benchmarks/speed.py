"""Training and inference speed against this machine's own matmul rate.

    python benchmarks/speed.py [--rows 200000] [--models mmoe,shared_bottom,ple] [--json FILE]
                               [--stream-rows 5000000,20000000]
    mtlrec bench speed [same options]

Data: `mtlrec.data.ctr` with seed 0 (20 categorical fields, vocabularies 100..100,000, 10 dense
fields, click and purchase-after-click), written to Parquet; split 80/20 by mtlrec's seeded random
split. Model: `ctr_config` (embedding dim 16, 330 inputs, MMoE 8 experts [256, 128] with linear
softmax gates, towers [64]; shared_bottom [256, 128]; ple 2 levels, 2 experts per task + 2 shared),
Adam lr 1e-3, batch 1024, one epoch, inference batch 4096, `--threads` (2) threads.

Every measurement runs in a fresh subprocess, so that its peak RSS is its own:

- `library`: the library's path. `Trainer.prepare` reads and encodes the data; the epoch is a bare
  loop of `train_step` (the trainer's real step) over the training sampler, timed; inference is
  `predict_split` over the test rows (batch 4096), timed; AUC per task from it. RSS after imports,
  peak RSS, encoded-data, parameter and optimizer-state bytes.
- `cli`: `mtlrec train CONFIG --out DIR` as a user runs it; its metrics.json records the epoch's
  training throughput (validation excluded). The ratio cli / library shows what the trainer adds.
- `stream` (with `--stream-rows N,M,...`): for each N, a CTR log of N rows (same generator, seed 0,
  row groups of 500,000 rows) trains one epoch through `Trainer.fit` with `data.stream: true`
  (buffer 1,000,000 rows; diagnostics off, as they cost the same in memory and are no part of
  streaming), in a fresh subprocess: training samples/s from the run's history (validation
  excluded), peak RSS, and the ratio to the in-memory `library` throughput of the same run.
- `reference`: a straightforward PyTorch implementation of the same MMoE (one `nn.Embedding` per
  field, eight expert `nn.Sequential`s, `nn.Linear` gates, ESMM loss, `torch.optim.Adam`) on the
  same inputs (mtlrec's encoded ids, a value unseen in training mapped to its field's OOV row, and
  its standardised dense fields) and the same rows in the same order, as the accuracy reference and
  the "plain PyTorch" speed reference. Its embeddings start like mtlrec's (N(0, model.embedding_init_std)), so
  that only the implementation differs. It trains once per init seed (`--reference-seeds`, 3): its AUC is the
  mean, reported with the seeds' spread; `auc_vs_reference` is mtlrec's AUC minus that mean. It
  trains once more from mtlrec's own initial weights (copied in), so that nothing but the
  implementation differs: `auc_vs_reference_same_init`.

RSS "after imports" is read after importing torch, mtlrec and torch._dynamo, which every
`torch.optim` optimizer imports when it is built (about 68 MB of Python modules, reported as
`dynamo_import_mb`); the training figure is its peak RSS (VmHWM, reset right before the epoch)
minus that.

FLOPs per sample are the dense part's matmul FLOPs counted by `torch.utils.flop_counter` on one
forward pass (2 x multiply-adds), x 3 for training. The matmul rate is measured in the same
process on the model's own matmul shapes, recorded from one forward and backward pass of the real
model and replayed as bare matmuls at `--threads` threads, for 2 s right before and right after the
timed epoch (and the timed inference), averaged; the headline is the ratio achieved GFLOP/s /
matmul GFLOP/s (`train_peak_ratio`, `infer_peak_ratio`), which carries across machines.

Peers (torch-rechub, DeepCTR-Torch): when installed, each trains its own MMoE class on the same rows
and config through its own training path, in a fresh subprocess (`benchmarks/peers.py` says how, and
where each model departs from the config); printed with mtlrec's MMoE's ratios to it. Otherwise the
output says they were skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlrec.memory import (
    file_rss_mb,
    high_water_mb,
    peak_rss_mb,
    release_freed_memory,
    reset_peak_rss,
    rss_mb,
)

MODELS = ("mmoe", "shared_bottom", "ple")
PEERS = {"torch_rechub": "torch-rechub", "deepctr_torch": "DeepCTR-Torch"}


def _tensor_mb(tensors: Any) -> float:
    import torch

    total = 0
    stack = [tensors]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total / 2**20


def _rss_after_imports() -> tuple[float, float]:
    """(RSS after the imports, what torch._dynamo's import adds to it), in MiB.

    Every `torch.optim` optimizer imports torch._dynamo when it is built (`Optimizer.add_param_group`
    is wrapped by `torch._disable_dynamo`): about 68 MB of Python modules (sympy among them) that
    any PyTorch training process carries, whatever its data or model. It is imported here, before
    the baseline is read, so that the training's figure counts what training holds, not torch's
    code; its size is reported beside it.
    """
    before = rss_mb()
    import torch._dynamo  # noqa: F401

    after = rss_mb()
    return after, after - before


# -------------------------------------------------------------------------------------------------
# The matmul rate on the model's own shapes


def record_matmuls(step: Any) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """The (op, shape a, shape b) of every matmul that `step()` runs (forward and backward)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    ops = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm",
           aten.baddbmm.default: "baddbmm"}
    seen: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = ops.get(func)
            if name is not None:
                a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
                seen.append((name, tuple(a.shape), tuple(b.shape)))
            return func(*args, **(kwargs or {}))

    with Recorder():
        step()
    return seen


def matmul_rate(shapes: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]], seconds: float = 2.0
                ) -> float:
    """GFLOP/s of bare float32 matmuls of these shapes, run in their recorded proportions."""
    import torch

    work = []
    for _, sa, sb in shapes:
        a = torch.randn(sa)
        b = torch.randn(sb)
        out = torch.empty(*sa[:-1], sb[-1])
        flops = 2 * a.numel() * sb[-1]
        work.append((a, b, out, flops))
    for a, b, out, _ in work:  # warm up
        torch.matmul(a, b, out=out)
    flops_total, started, rounds = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds or rounds < 3:
        for a, b, out, flops in work:
            torch.matmul(a, b, out=out)
            flops_total += flops
        rounds += 1
    return flops_total / (time.perf_counter() - started) / 1e9


# -------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def _profile(step: Any, sampler: Any, steps: int) -> None:
    """Print where a training step's time goes: torch.profiler's top operators over `steps` steps.

    Runs on its own sampler epoch (10,000) before the timed epoch, so the figures after it are unchanged
    except for the model having trained `steps` more steps.
    """
    from torch.profiler import ProfilerActivity, profile

    batches = iter(sampler.epoch(10_000))
    for _ in range(3):
        step(next(batches))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(next(batches))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr, flush=True)
    # Tensor memory of one step, from the allocator events: the running sum of every operator's own
    # allocations minus frees, from the step's start (when the previous step's tensors are held).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(next(batches))
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    print(f"tensor memory allocated during one step: peak {peak / 2**20:.1f} MB above the step's start",
          file=sys.stderr, flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=12), file=sys.stderr, flush=True)


def _library(data: Path, model_name: str, threads: int, work: Path, profile_steps: int = 0,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtlrec.config import load_config
    from mtlrec.data.ctr import ctr_config
    from mtlrec.training.evaluate import metrics_of, predict_split
    from mtlrec.training.trainer import Trainer, train_step

    rss_imports, dynamo_mb = _rss_after_imports()
    file_imports = file_rss_mb()
    cfg, base = load_config(ctr_config(data, model_name), [f"train.threads={threads}", *overrides])
    trainer = Trainer(cfg, base, work / f"library-{model_name}")
    trainer.prepare()
    rss_prepared = rss_mb()
    model, spec = trainer.model, trainer.spec
    source = trainer.main_source
    sampler = trainer.samplers[source]
    args = (spec.tasks, trainer.weighting, trainer.optimizers, trainer.clip_params, cfg.train.clip_norm)

    # The model's matmul shapes and FLOPs, from one forward (+ backward) pass that changes nothing.
    test_rows = trainer.split.rows(source, "test")
    batch = trainer.data.batch(source, torch.as_tensor(test_rows[: cfg.train.batch_size]))
    with FlopCounterMode(display=False) as counter:
        model(batch)
    flops_forward = counter.get_total_flops() / len(batch)

    def one_step() -> None:
        from mtlrec.training.losses import task_losses

        losses = task_losses(model(batch), batch, spec.tasks, model.entire_space)
        sum(losses.values()).backward()

    train_shapes = record_matmuls(one_step)
    model.zero_grad(set_to_none=True)
    infer_batch = trainer.data.batch(source, torch.as_tensor(test_rows[: cfg.train.eval_batch_size]))
    model.eval()
    with torch.no_grad():
        infer_shapes = record_matmuls(lambda: model(infer_batch))
    model.train()

    if profile_steps:
        _profile(lambda rows: train_step(model, [trainer.data.batch(source, rows)], *args), sampler, profile_steps)
    # The matmul rate is measured right before and after the timed work and averaged, so that a
    # machine shared with other jobs slows both sides of the ratio alike.
    train_matmul = [matmul_rate(train_shapes)]
    release_freed_memory()  # the replayed matmuls' buffers are not the training's
    rss_before_training = rss_mb()
    reset_peak_rss()
    started = time.perf_counter()
    rows_seen = 0
    for rows in sampler.epoch(0):
        rows_seen += len(rows)
        train_step(model, [trainer.data.batch(source, rows)], *args)
    train_rate = rows_seen / (time.perf_counter() - started)
    peak_training = high_water_mb()
    file_training = file_rss_mb()
    # What the allocators hold freed but resident at the end of the epoch: what returning it gives back.
    rss_end = rss_mb()
    release_freed_memory()
    freed_resident = rss_end - rss_mb()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    train_matmul.append(matmul_rate(train_shapes))

    infer_matmul = [matmul_rate(infer_shapes)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    predictions = predict_split(model, trainer.data, spec, {source: test_rows}, cfg.train.eval_batch_size,
                                trainer.device)
    infer_rate = len(test_rows) / (time.perf_counter() - started)
    # Minor page faults: memory the allocator maps fresh for each batch instead of reusing.
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    infer_batches = -(-len(test_rows) // cfg.train.eval_batch_size)
    infer_matmul.append(matmul_rate(infer_shapes))
    metrics = metrics_of(predictions)
    optim_state = [opt.state_dict()["state"] for opt in trainer.optimizers]
    return {
        "model": model_name,
        "train_samples_per_second": train_rate,
        "infer_samples_per_second": infer_rate,
        "infer_page_faults_per_batch": faults / infer_batches,
        "auc": {name: m["auc"] for name, m in metrics.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_sample_forward": flops_forward,
        "rss_after_imports_mb": rss_imports,
        "dynamo_import_mb": dynamo_mb,
        "rss_after_prepare_mb": rss_prepared,
        "rss_before_training_mb": rss_before_training,
        "file_rss_growth_mb": file_training - file_imports,
        "freed_resident_after_training_mb": freed_resident,
        "peak_rss_training_mb": peak_training,
        "training_growth_mb": peak_training - rss_before_training,
        "peak_rss_mb": peak_rss_mb(),
        "encoded_data_mb": _tensor_mb([vars(s) for s in trainer.data.sources.values()]),
        "parameters_mb": _tensor_mb(list(model.parameters())),
        "optimizer_state_mb": _tensor_mb(optim_state),
        "gradients_mb": _tensor_mb(gradients),
        "train_matmul_gflops_measured": train_matmul,
        "infer_matmul_gflops_measured": infer_matmul,
    }


def _cli(data: Path, model_name: str, threads: int, work: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    import yaml

    from mtlrec.data.ctr import ctr_config

    config = work / f"cli-{model_name}.yaml"
    config.write_text(yaml.safe_dump(ctr_config(data, model_name)))
    out = work / f"cli-{model_name}"
    command = [sys.executable, "-m", "mtlrec", "train", str(config), "--out", str(out), f"train.threads={threads}",
               *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    epochs = [h for h in history if "train_samples_per_second" in h]
    return {"model": model_name, "train_samples_per_second": epochs[-1]["train_samples_per_second"],
            "auc": {t: m["test"]["auc"] for t, m in metrics["tasks"].items()}}


def _stream(data: Path, model_name: str, threads: int, work: Path) -> dict[str, Any]:
    """One epoch of `mtlrec train` with `data.stream: true` on the log at `data` (never loaded whole)."""
    from mtlrec.config import load_config
    from mtlrec.data.ctr import ctr_config
    from mtlrec.training.trainer import Trainer

    rss_imports, _ = _rss_after_imports()
    overrides = [f"train.threads={threads}", "data.stream=true", "data.stream_buffer_rows=1000000",
                 "train.diagnostics_every=0"]
    cfg, base = load_config(ctr_config(data, model_name), overrides)
    started = time.perf_counter()
    result = Trainer(cfg, base, work / f"stream-{model_name}-{data.stem}").fit()
    return {"model": model_name, "train_samples_per_second": result.history[-1]["train_samples_per_second"],
            "split_sizes": result.metrics["split_sizes"]["interactions"],
            "auc": {t: m["test"]["auc"] for t, m in result.metrics["tasks"].items()},
            "rss_after_imports_mb": rss_imports, "peak_rss_mb": peak_rss_mb(),
            "run_seconds": time.perf_counter() - started}


def _reference(data: Path, threads: int, seeds: int = 3) -> dict[str, Any]:
    """A straightforward PyTorch MMoE on mtlrec's encoded inputs (see the module docstring).

    Trained once per init seed 0..seeds-1 on the same rows in the same order; speed from seed 0.
    """
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from mtlrec.config import load_config
    from mtlrec.data.ctr import CtrShape, ctr_config
    from mtlrec.data.dataset import Sampler
    from mtlrec.data.schema import Schema
    from mtlrec.data.split import split_tables
    from mtlrec.data.tables import load_tables
    from mtlrec.models import build_model

    torch.set_num_threads(threads)
    rss_imports, _ = _rss_after_imports()
    cfg, base = load_config(ctr_config(data, "mmoe"))
    tables = load_tables(cfg, base, None)
    split = split_tables(tables, cfg)
    # mtlrec's encoders, so that both models read the very same inputs: each field's vocabulary
    # from the training rows (0 missing, 1 for a value unseen in training, 2.. known values) and
    # the dense fields standardised with the training mean and std.
    schema = Schema(cfg).fit(tables, split)
    encoded_data = schema.encode(tables, split)
    encoded = encoded_data.sources["interactions"]
    del tables
    shape = CtrShape()
    vocab_sizes = [schema.spec_.vocab_sizes[c] for c in shape.categorical()]
    cats = torch.stack([encoded.context[c].long() for c in shape.categorical()], dim=1)  # [N, F]
    dense = torch.stack([encoded.context[d][:, 0] for d in shape.dense()], dim=1)  # [N, 10]
    click = encoded.labels["click"]  # [N] float
    joint = encoded.labels["purchase"]  # [N]: click and purchase (0 where no click)
    train_rows, test_rows = split.rows("interactions", "train"), split.rows("interactions", "test")

    class MMoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.ModuleList(nn.Embedding(v, 16, padding_idx=0) for v in vocab_sizes)
            with torch.no_grad():
                for table in self.embeddings:  # mtlrec's initialisation; a missing value embeds to zeros
                    nn.init.normal_(table.weight, std=cfg.model.embedding_init_std)
                    table.weight[0] = 0.0
            width = 16 * shape.n_categorical + shape.n_dense
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 128),
                                                       nn.ReLU()) for _ in range(8))
            self.gates = nn.ModuleList(nn.Linear(width, 8) for _ in range(2))
            self.towers = nn.ModuleList(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))
                                        for _ in range(2))

        def forward(self, c: torch.Tensor, d: torch.Tensor) -> list[torch.Tensor]:
            x = torch.cat([e(c[:, k]) for k, e in enumerate(self.embeddings)] + [d], dim=1)
            experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, 8, 128]
            outs = []
            for gate, tower in zip(self.gates, self.towers, strict=True):
                w = torch.softmax(gate(x), dim=1).unsqueeze(-1)  # [B, 8, 1]
                outs.append(tower((w * experts).sum(1)).squeeze(-1))
            return outs  # click logit, purchase-given-click logit

    def mtlrec_init(model: MMoE) -> None:
        """Copy in the initial weights of mtlrec's model (built as `Trainer.prepare` builds it)."""
        torch.manual_seed(cfg.train.seed)
        ours = build_model(schema.spec_, cfg.model)
        theirs = ours.state_dict()
        table, start = theirs["embedding.table.weight"], 0
        weights: dict[str, torch.Tensor] = {}
        for k, size in enumerate(vocab_sizes):  # the fused table holds the fields in this order
            weights[f"embeddings.{k}.weight"] = table[start:start + size].clone()
            weights[f"embeddings.{k}.weight"][0] = 0.0
            start += size
        for e in range(8):
            weights[f"experts.{e}.0.weight"] = theirs["backbone.experts.weights.0"][:, e, :].T
            weights[f"experts.{e}.0.bias"] = theirs["backbone.experts.biases.0"][e]
            weights[f"experts.{e}.2.weight"] = theirs["backbone.experts.weights.1"][e].T
            weights[f"experts.{e}.2.bias"] = theirs["backbone.experts.biases.1"][e]
        for k, task in enumerate(("click", "purchase")):
            for part in ("weight", "bias"):
                weights[f"gates.{k}.{part}"] = theirs[f"backbone.gates.{task}.{part}"]
                for layer in (0, 2):
                    weights[f"towers.{k}.{layer}.{part}"] = theirs[f"towers.{task}.mlp.{layer}.{part}"]
        model.load_state_dict(weights)
        with torch.no_grad():
            rows = torch.as_tensor(train_rows[:256])
            expected = ours(encoded_data.batch("interactions", rows))
            for name, got in zip(("click", "purchase"), model(cats[rows], dense[rows]), strict=True):
                if not torch.allclose(got, expected[name], atol=1e-5):
                    raise RuntimeError(f"the reference started from mtlrec's weights computes other {name} logits")

    def run(seed: int | None) -> dict[str, Any]:
        """Train and test from init seed `seed`, or (None) from mtlrec's own initial weights."""
        torch.manual_seed(0 if seed is None else seed)
        model = MMoE()
        if seed is None:
            mtlrec_init(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        bce = nn.BCELoss()
        release_freed_memory()  # as the library worker does before its epoch
        rss_before = rss_mb()
        reset_peak_rss()
        started = time.perf_counter()
        for rows in Sampler(train_rows, 1024, seed=cfg.train.seed).epoch(0):
            ctr, cvr = model(cats[rows], dense[rows])
            p_click = torch.sigmoid(ctr)
            p_joint = (p_click * torch.sigmoid(cvr)).clamp(1e-7, 1 - 1e-7)
            loss = bce(p_click, click[rows]) + bce(p_joint, joint[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_rate = len(train_rows) / (time.perf_counter() - started)
        peak = high_water_mb()
        memory = {"rss_after_imports_mb": rss_imports, "rss_before_training_mb": rss_before,
                  "peak_rss_training_mb": peak, "training_growth_mb": peak - rss_before,
                  "encoded_data_mb": _tensor_mb([cats, dense, click, joint]),
                  "parameters_mb": _tensor_mb(list(model.parameters())),
                  "optimizer_state_mb": _tensor_mb(optimizer.state_dict()["state"])}
        model.eval()
        test = torch.as_tensor(test_rows)
        started = time.perf_counter()
        outs: list[list[torch.Tensor]] = [[], []]
        with torch.no_grad():
            for chunk in test.split(4096):
                ctr, cvr = model(cats[chunk], dense[chunk])
                outs[0].append(torch.sigmoid(ctr))
                outs[1].append(torch.sigmoid(cvr))
        infer_rate = len(test) / (time.perf_counter() - started)
        p_ctr, p_cvr = (torch.cat(o).numpy() for o in outs)
        clicked = click[test].numpy() == 1
        return {"train_samples_per_second": train_rate, "infer_samples_per_second": infer_rate, "memory": memory,
                "auc": {"click": float(roc_auc_score(click[test].numpy(), p_ctr)),
                        "purchase": float(roc_auc_score(joint[test].numpy()[clicked], p_cvr[clicked]))}}

    runs = [run(seed) for seed in range(max(seeds, 1))]
    by_task = {t: [r["auc"][t] for r in runs] for t in runs[0]["auc"]}
    return {"model": "reference mmoe", "train_samples_per_second": runs[0]["train_samples_per_second"],
            "infer_samples_per_second": runs[0]["infer_samples_per_second"], "peak_rss_mb": peak_rss_mb(),
            **runs[0]["memory"], "seeds": len(runs), "auc_by_seed": by_task,
            "auc": {t: float(np.mean(v)) for t, v in by_task.items()},
            "auc_spread": {t: max(v) - min(v) for t, v in by_task.items()},
            "auc_same_init": run(None)["auc"]}


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.worker == "library":
        result = _library(Path(args.data), args.model, args.threads, work, args.profile, args.set)
    elif args.worker == "cli":
        result = _cli(Path(args.data), args.model, args.threads, work, args.set)
    elif args.worker == "stream":
        result = _stream(Path(args.data), args.model, args.threads, work)
    elif args.worker in PEERS:
        from peers import ADAPTERS  # benchmarks/peers.py, beside this script (a worker runs it as a script)

        result = ADAPTERS[args.worker](Path(args.data), args.threads)
    else:
        result = _reference(Path(args.data), args.threads, args.reference_seeds)
    print("RESULT " + json.dumps(result))


def _run_worker(kind: str, data: Path, work: Path, threads: int, model: str = "", profile: int = 0,
                overrides: Sequence[str] = (), reference_seeds: int = 3) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--work", str(work),
               "--threads", str(threads), "--profile", str(profile), "--reference-seeds", str(reference_seeds)] + \
        (["--model", model] if model else []) + [arg for o in overrides for arg in ("--set", o)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if profile and kind == "library":
        print(f"profile of {profile} training steps of {model}:\n{done.stderr}", flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"speed worker {kind} {model} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]))


# -------------------------------------------------------------------------------------------------


def summarize(library: dict[str, Any], train_rate: float, infer_rate: float) -> dict[str, Any]:
    """Achieved GFLOP/s and its ratio to the matmul rate, for training (3x forward) and inference."""
    fwd = library["flops_per_sample_forward"]
    train_gflops = 3 * fwd * library["train_samples_per_second"] / 1e9
    infer_gflops = fwd * library["infer_samples_per_second"] / 1e9
    return {"train_gflops": train_gflops, "infer_gflops": infer_gflops,
            "train_matmul_gflops": train_rate, "infer_matmul_gflops": infer_rate,
            "train_peak_ratio": train_gflops / train_rate, "infer_peak_ratio": infer_gflops / infer_rate}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the CTR log (default 200,000)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated backbones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--work", type=Path, help="folder for the data and runs (default: a temporary one)")
    parser.add_argument("--no-cli", action="store_true", help="skip the `mtlrec train` measurement")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the plain PyTorch reference and the peers (torch-rechub, DeepCTR-Torch)")
    parser.add_argument("--reference-seeds", type=int, default=3, metavar="N",
                        help="train the plain reference with init seeds 0..N-1 (its AUC is their mean, "
                             "beside their spread; default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every mtlrec run (library and cli), e.g. "
                             "train.sparse_embeddings=on; repeatable")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="print torch.profiler's top operators over STEPS training steps of each model")
    parser.add_argument("--stream-rows", default="",
                        help="comma-separated row counts: train one epoch of each streamed from Parquet "
                             "(data.stream) and report samples/s and peak RSS")
    parser.add_argument("--worker", choices=["library", "cli", "stream", "reference", *PEERS],
                        help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    try:
        args.stream_rows = [int(n.replace("_", "")) for n in args.stream_rows.split(",") if n]
    except ValueError:
        parser.error(f"--stream-rows must be comma-separated row counts, got {args.stream_rows!r}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        return _benchmark(args, models, work)


def _benchmark(args: argparse.Namespace, models: list[str], work: Path) -> int:
    import torch

    from mtlrec.data.ctr import write_ctr_parquet

    work.mkdir(parents=True, exist_ok=True)
    data = work / f"ctr_{args.rows}.parquet"
    if not data.is_file():
        write_ctr_parquet(data, args.rows, seed=0)
    print(f"data: {data} ({args.rows:,} rows); threads {args.threads}; torch {torch.__version__}", flush=True)
    torch.set_num_threads(args.threads)
    if args.set:
        print(f"config overrides: {' '.join(args.set)}", flush=True)
    results: dict[str, Any] = {"rows": args.rows, "threads": args.threads, "torch": torch.__version__,
                               "overrides": args.set,
                               "models": {}, "peers": {}}
    for name in models:
        lib = _run_worker("library", data, work, args.threads, name, args.profile, args.set)
        train_rate = sum(lib["train_matmul_gflops_measured"]) / 2
        infer_rate = sum(lib["infer_matmul_gflops_measured"]) / 2
        lib.update(summarize(lib, train_rate, infer_rate))
        if not args.no_cli:
            cli = _run_worker("cli", data, work, args.threads, name, overrides=args.set)
            lib["cli_train_samples_per_second"] = cli["train_samples_per_second"]
            lib["cli_ratio"] = cli["train_samples_per_second"] / lib["train_samples_per_second"]
        results["models"][name] = lib
        _print_model(lib)
    if not args.no_reference:
        ref = _run_worker("reference", data, work, args.threads, reference_seeds=args.reference_seeds)
        results["reference"] = ref
        print(f"reference (plain PyTorch MMoE on mtlrec's encoded inputs): train "
              f"{ref['train_samples_per_second']:,.0f}/s, infer {ref['infer_samples_per_second']:,.0f}/s (seed 0); "
              f"AUC over {ref['seeds']} init seeds " +
              ", ".join(f"{t} {a:.4f} (spread {ref['auc_spread'][t]:.4f}: "
                        + " / ".join(f"{x:.4f}" for x in ref["auc_by_seed"][t]) + ")"
                        for t, a in ref["auc"].items()), flush=True)
        print(f"    reference RSS: before training {ref['rss_before_training_mb']:.0f} MB, peak while training "
              f"{ref['peak_rss_training_mb']:.0f} MB: the epoch adds {ref['training_growth_mb']:.0f} MB to "
              f"parameters of {ref['parameters_mb']:.0f} MB (Adam's state {ref['optimizer_state_mb']:.0f} MB)",
              flush=True)
        if "mmoe" in results["models"]:
            lib = results["models"]["mmoe"]
            lib["auc_vs_reference"] = {t: lib["auc"][t] - ref["auc"][t] for t in ref["auc"]}
            lib["auc_vs_reference_same_init"] = {t: lib["auc"][t] - ref["auc_same_init"][t] for t in ref["auc"]}
            print(f"mmoe vs reference: train x{lib['train_samples_per_second'] / ref['train_samples_per_second']:.2f}"
                  f", infer x{lib['infer_samples_per_second'] / ref['infer_samples_per_second']:.2f}; AUC minus the "
                  f"reference's mean " + ", ".join(f"{t} {d:+.4f}" for t, d in lib["auc_vs_reference"].items()) +
                  "; minus the reference started from mtlrec's initial weights " +
                  ", ".join(f"{t} {d:+.4f}" for t, d in lib["auc_vs_reference_same_init"].items()), flush=True)
    if args.stream_rows:
        results["stream"] = _benchmark_stream(args, results, work)
    if args.no_reference:
        results["peers"] = {label: "skipped (--no-reference)" for label in PEERS.values()}
    else:
        results["peers"] = _benchmark_peers(results["models"].get("mmoe"), data, work, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _benchmark_stream(args: argparse.Namespace, results: dict[str, Any], work: Path) -> dict[str, Any]:
    """One streamed epoch of the MMoE per row count in `args.stream_rows`, against the in-memory rate."""
    from mtlrec.data.ctr import write_ctr_parquet

    in_memory = results["models"].get("mmoe", {}).get("train_samples_per_second")
    out: dict[str, Any] = {"in_memory_rows": args.rows, "in_memory_train_samples_per_second": in_memory, "runs": {}}
    for rows in args.stream_rows:
        data = work / f"ctr_{rows}.parquet"
        if not data.is_file():
            started = time.perf_counter()
            write_ctr_parquet(data, rows, seed=0)
            print(f"stream: wrote {data} ({rows:,} rows) in {time.perf_counter() - started:.0f} s", flush=True)
        run = _run_worker("stream", data, work, args.threads, "mmoe")
        run["rows"] = rows
        if in_memory:
            run["ratio_to_in_memory"] = run["train_samples_per_second"] / in_memory
        out["runs"][str(rows)] = run
        print(f"stream mmoe, {rows:,} rows: train {run['train_samples_per_second']:,.0f} samples/s"
              + (f" = {run['ratio_to_in_memory']:.0%} of in-memory ({in_memory:,.0f}/s on {args.rows:,} rows)"
                 if in_memory else " (in-memory mmoe not measured in this run)")
              + f"; peak RSS {run['peak_rss_mb']:,.0f} MB (after imports {run['rss_after_imports_mb']:.0f} MB); AUC "
              + ", ".join(f"{t} {a:.4f}" for t, a in run["auc"].items()) + f"; run {run['run_seconds']:.0f} s",
              flush=True)
    return out


def _benchmark_peers(mmoe: dict[str, Any] | None, data: Path, work: Path, threads: int) -> dict[str, Any]:
    """Each installed peer's MMoE (benchmarks/peers.py) on the same data, against mtlrec's `mmoe` if measured.

    A peer that is not installed is skipped; one that fails is reported, and the run goes on.
    """
    out: dict[str, Any] = {}
    for module, label in PEERS.items():
        if importlib.util.find_spec(module) is None:  # found without importing it here
            out[label] = "skipped (not installed)"
            print(f"{label}: skipped (not installed)", flush=True)
            continue
        try:
            peer = _run_worker(module, data, work, threads)
        except RuntimeError as error:
            out[label] = f"failed: {str(error).strip().splitlines()[-1]}"
            print(f"{label}: {error}", flush=True)
            continue
        print(f"{label} {peer['version']} ({peer['model']}): train {peer['train_samples_per_second']:,.0f} "
              f"samples/s, infer {peer['infer_samples_per_second']:,.0f} samples/s, peak RSS "
              f"{peer['peak_rss_mb']:,.0f} MB, {peer['parameters']:,} parameters; AUC "
              + ", ".join(f"{t} {a:.4f}" for t, a in peer["auc"].items())
              + f" (purchase by p(purchase) / p(click): {peer['auc_purchase_from_ratio']:.4f})", flush=True)
        if mmoe is not None:
            peer.update(compare(mmoe, peer))
            print(f"    mmoe vs {label}: train x{peer['mmoe_train_ratio']:.2f}, infer x{peer['mmoe_infer_ratio']:.2f}, "
                  "AUC diff " + ", ".join(f"{t} {d:+.4f}" for t, d in peer["mmoe_auc_minus_peer"].items()),
                  flush=True)
        out[label] = peer
    return out


def compare(mmoe: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """mtlrec's MMoE against a peer's: throughput ratios (mtlrec / peer) and AUC differences (mtlrec - peer)."""
    return {"mmoe_train_ratio": mmoe["train_samples_per_second"] / peer["train_samples_per_second"],
            "mmoe_infer_ratio": mmoe["infer_samples_per_second"] / peer["infer_samples_per_second"],
            "mmoe_auc_minus_peer": {t: mmoe["auc"][t] - peer["auc"][t] for t in peer["auc"]}}


def _print_model(r: dict[str, Any]) -> None:
    resident = r["encoded_data_mb"] + r["parameters_mb"] + r["optimizer_state_mb"]
    above = r["peak_rss_training_mb"] - r["rss_after_imports_mb"]
    print(f"{r['model']}: train {r['train_samples_per_second']:,.0f} samples/s ({r['train_gflops']:.1f} GFLOP/s = "
          f"{r['train_peak_ratio']:.0%} of matmul {r['train_matmul_gflops']:.1f}); infer "
          f"{r['infer_samples_per_second']:,.0f} samples/s ({r['infer_gflops']:.1f} GFLOP/s = "
          f"{r['infer_peak_ratio']:.0%} of matmul {r['infer_matmul_gflops']:.1f}; "
          f"{r['infer_page_faults_per_batch']:,.0f} page faults a batch)", flush=True)
    print(f"    {r['parameters']:,} parameters, {r['flops_per_sample_forward'] / 1e6:.2f} MFLOP/sample forward; "
          f"AUC " + ", ".join(f"{t} {a:.4f}" for t, a in r["auc"].items()) +
          (f"; mtlrec train {r['cli_train_samples_per_second']:,.0f}/s = {r['cli_ratio']:.0%} of library"
           if "cli_ratio" in r else ""), flush=True)
    print(f"    RSS: after imports {r['rss_after_imports_mb']:.0f} MB (torch._dynamo's import "
          f"{r['dynamo_import_mb']:.0f} MB of it), after prepare {r['rss_after_prepare_mb']:.0f} MB, before training "
          f"{r['rss_before_training_mb']:.0f} MB, peak while training {r['peak_rss_training_mb']:.0f} MB (the epoch "
          f"adds {r['training_growth_mb']:.0f} MB), peak of the process {r['peak_rss_mb']:.0f} MB; library code paged "
          f"in since the imports {r['file_rss_growth_mb']:.0f} MB; freed memory still resident after the epoch "
          f"{r['freed_resident_after_training_mb']:.0f} MB", flush=True)
    print(f"    data {r['encoded_data_mb']:.0f} + parameters {r['parameters_mb']:.0f} + optimizer state "
          f"{r['optimizer_state_mb']:.0f} = {resident:.0f} MB (gradients {r['gradients_mb']:.0f} MB more); "
          f"training peak - imports = {above:.0f} MB = {above / resident:.2f}x of it "
          f"({above / (resident + r['gradients_mb']):.2f}x with the gradients)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
