"""The trainer: data -> encoders -> model -> epochs of plain training steps -> a run directory.

The training step (`train_step`) is one readable function: a batch per source -> forward ->
per-task losses -> weighting (which does the backward pass) -> clip -> step. Early stopping,
checkpoints and logging are small helpers around it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mtlrec.config import Config, TrainConfig, dump_config, load_config
from mtlrec.data.batch import Batch
from mtlrec.data.dataset import EncodedData, Sampler
from mtlrec.data.schema import Schema
from mtlrec.data.spec import InputSpec, TaskSpec
from mtlrec.data.split import SplitIndex, split_tables
from mtlrec.data.tables import Tables, load_tables
from mtlrec.errors import ArtifactError, ConfigError
from mtlrec.memory import release_freed_memory
from mtlrec.models.model import RecModel, build_model
from mtlrec.serve.integrity import write_manifest
from mtlrec.training import checkpoint as ckpt
from mtlrec.training.diagnostics import Diagnostics
from mtlrec.training.evaluate import (
    evaluate,
    metrics_of,
    predict_split,
    retrieval_metrics,
    selection_score,
    sources_with_tasks,
)
from mtlrec.training.logging import RunLogger
from mtlrec.training.losses import task_losses
from mtlrec.training.weighting import WEIGHTINGS, Weighting


def train_step(model: RecModel, batches: Sequence[Batch], tasks: Sequence[TaskSpec], weighting: Weighting,
               optimizers: Sequence[torch.optim.Optimizer], clip_params: Sequence[nn.Parameter],
               clip_norm: float | None, diagnostics: Diagnostics | None = None, step: int = 0
               ) -> dict[str, Tensor]:
    """One optimisation step over one batch per source; returns the detached per-task losses."""
    losses: dict[str, Tensor] = {}
    for batch in batches:
        outputs = model(batch)
        losses.update(task_losses(outputs, batch, tasks, model.entire_space))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if losses:
        if diagnostics is not None:
            diagnostics.before_backward(step, losses, model)
        weights = weighting.backward(losses, model.shared_parameters())
        if diagnostics is not None:
            diagnostics.on_step(step, losses, weights, model)
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
        for opt in optimizers:
            opt.step()
    return {name: loss.detach() for name, loss in losses.items()}


def build_optimizers(model: RecModel, weighting: Weighting, train: TrainConfig, device: torch.device
                     ) -> tuple[list[torch.optim.Optimizer], list[nn.Parameter]]:
    """The optimizers of a model (and of the weighting's own parameters), and the parameters to clip.

    Dense parameters train with AdamW (`train.lr`, `train.weight_decay`); dense embedding tables with
    the same AdamW at `train.embedding_lr`; sparse embedding tables with SparseAdam (a row-wise
    update of just the rows in the batch) at `train.embedding_lr`. Embedding rows see a gradient only
    when their id is in the batch, so they may train with their own (usually larger) learning rate.
    """
    embedding_lr = train.embedding_lr or train.lr
    sparse_params = list(model.sparse_parameters())
    embed_ids = {id(p) for p in model.embedding_parameters()}
    sparse_ids = {id(p) for p in sparse_params}
    dense_embeddings = [p for p in model.embedding_parameters() if id(p) not in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in embed_ids]
    groups: list[dict[str, Any]] = [{"params": dense + list(weighting.parameters())}]
    if dense_embeddings:
        groups.append({"params": dense_embeddings, "lr": embedding_lr})
    # The fused AdamW updates every tensor in one pass (on CPU the default is a Python loop of
    # several elementwise kernels per tensor, 3-10x slower on a large embedding table).
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
        groups, lr=train.lr, weight_decay=train.weight_decay, fused=device.type in ("cpu", "cuda"))]
    if sparse_params:
        optimizers.append(torch.optim.SparseAdam(sparse_params, lr=embedding_lr))
    return optimizers, dense + dense_embeddings


@dataclass
class TrainResult:
    """What a finished run returns: where it is and its metrics, as plain data."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def test_metric(self, task: str, metric: str) -> float:
        return float(self.metrics["tasks"][task]["test"][metric])


@dataclass
class _Progress:
    """Position of the run; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    stale_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains one model on one config and writes its run directory.

    Args:
        config: a validated Config.
        base_dir: folder that relative data paths are resolved against.
        out_dir: the run directory to write.
        tables: tables given in memory (DataFrames or paths), overriding the config's paths.
    """

    def __init__(self, config: Config, base_dir: Path, out_dir: Path,
                 tables: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        self.out_dir = out_dir
        self.given_tables = tables

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, resume: bool = False) -> None:
        """Read, split and encode the data; build the model, weighting, optimizers and samplers.

        `fit` calls it; call it alone to drive `train_step` yourself (as benchmarks/speed.py does).
        """
        cfg = self.config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = choose_device(cfg.train.device)
        tables: Tables = load_tables(cfg, self.base_dir, self.given_tables)
        self.split: SplitIndex = split_tables(tables, cfg)
        schema_path = self.out_dir / "schema.json"
        if resume and schema_path.is_file():
            self.schema = Schema.load(self.out_dir, cfg)
        else:
            self.schema = Schema(cfg).fit(tables, self.split)
        self.data: EncodedData = self.schema.encode(tables, self.split)
        del tables  # training holds the encoded tensors only
        release_freed_memory()
        self.spec: InputSpec = self.schema.spec_
        self._check_early_stopping_metric()

        torch.manual_seed(cfg.train.seed)
        vocab_rows = sum(self.spec.vocab_sizes.values())
        sparse = cfg.train.sparse_embeddings == "on" or (
            cfg.train.sparse_embeddings == "auto" and vocab_rows > cfg.train.sparse_threshold)
        self.model = build_model(self.spec, cfg.model, sparse=sparse).to(self.device)
        task_weights = {t.name: t.weight for t in cfg.tasks}
        self.weighting = WEIGHTINGS.get(cfg.train.weighting)(
            [t.name for t in self.spec.tasks], task_weights, **cfg.train.weighting_params).to(self.device)

        self.optimizers, self.clip_params = build_optimizers(self.model, self.weighting, cfg.train, self.device)

        self.sources = sources_with_tasks(self.spec)
        self.main_source = self.sources[0]
        self.samplers: dict[str, Sampler] = {}
        main_steps = math.ceil(len(self.split.rows(self.main_source, "train")) / cfg.train.batch_size)
        for i, source in enumerate(self.sources):
            rows = self.split.rows(source, "train")
            # Auxiliary sources (users, items, pairs) ride along every step with a batch sized so
            # that they make `aux_passes` passes per epoch of the main source: small tables are
            # not revisited hundreds of times an epoch (which overfits their heads).
            size = cfg.train.batch_size if source == self.main_source else \
                max(1, math.ceil(len(rows) * cfg.train.aux_passes / max(main_steps, 1)))
            self.samplers[source] = Sampler(rows, size, seed=cfg.train.seed + 7919 * i)
        self.progress = _Progress()

    def _check_early_stopping_metric(self) -> None:
        stop = self.config.train.early_stopping
        if stop is None or stop.metric == "auto":
            return
        task, dot, _ = stop.metric.partition(".")
        names = [t.name for t in self.spec.tasks]
        if not dot or task not in names:
            raise ConfigError(f"train.early_stopping.metric '{stop.metric}' must be 'auto' or '<task>.<metric>' "
                              f"with a task from {names}")

    def _rows(self, part: str) -> dict[str, np.ndarray]:
        return {source: self.split.rows(source, part) for source in self.sources}

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint_path(self, name: str = "last") -> Path:
        return self.out_dir / "checkpoints" / f"{name}.safetensors"

    def _save_checkpoint(self, name: str = "last") -> None:
        """Everything needed to continue exactly: model, optimizers, weighting, RNG, samplers."""
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items()})
        optim_docs = []
        for i, opt in enumerate(self.optimizers):
            flat, doc = ckpt.flatten_optimizer(f"optim{i}", opt.state_dict())
            tensors.update(flat)
            optim_docs.append(doc)
        tensors["rng"] = ckpt.rng_state()
        p = self.progress
        meta = {"epoch": p.epoch, "step": p.step, "best_score": p.best_score, "best_epoch": p.best_epoch,
                "stale_epochs": p.stale_epochs, "history": p.history, "optimizers": optim_docs,
                "samplers": {s: sampler.state_dict() for s, sampler in self.samplers.items()}}
        ckpt.save_tensors(self._checkpoint_path(name), tensors, meta)

    def _load_checkpoint(self) -> None:
        tensors, meta = ckpt.load_tensors(self._checkpoint_path())
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.weighting.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("weighting.")})
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(ckpt.unflatten_optimizer(f"optim{i}", tensors, meta["optimizers"][i]))
        for source, state in meta["samplers"].items():
            self.samplers[source].load_state_dict(state)
        ckpt.set_rng_state(tensors["rng"])
        self.progress = _Progress(meta["epoch"], meta["step"], meta["best_score"], meta["best_epoch"],
                                  meta["stale_epochs"], meta["history"])

    def _save_best(self) -> None:
        ckpt.save_tensors(self.out_dir / "weights.safetensors", self.model.state_dict(),
                          {"epoch": self.progress.epoch})

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume: bool = False, show_progress: bool | None = None) -> TrainResult:
        """Train (or continue with `resume`), evaluate on the test split and write the run."""
        started = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and not self._checkpoint_path().is_file():
            raise ArtifactError(f"cannot resume: '{self._checkpoint_path()}' does not exist; "
                                "train without --resume first")
        self.prepare(resume)
        cfg = self.config
        if resume:
            self._load_checkpoint()
        else:
            self._write_static()
        self.diagnostics = Diagnostics(self.out_dir, cfg.train.diagnostics_every)
        if resume:
            self.diagnostics.restore(self.progress.epoch, self.progress.step)
        show = cfg.train.progress if show_progress is None else show_progress
        logger = RunLogger(self.out_dir, show, append=resume)
        logger.info(f"split sizes: {self.split.sizes()}")
        stop = cfg.train.early_stopping
        tasks = self.spec.tasks
        main = self.samplers[self.main_source]
        aux = {s: self.samplers[s] for s in self.sources[1:]}
        try:
            while self.progress.epoch < cfg.train.epochs:
                epoch = self.progress.epoch
                self.model.train()
                sums: dict[str, Tensor] = {}
                counts: dict[str, int] = {}
                epoch_started, rows_seen = time.perf_counter(), 0
                with logger.epoch_bar(epoch, cfg.train.epochs, len(main)) as bar:
                    for rows in main.epoch(epoch):
                        rows_seen += len(rows)
                        batches = [self.data.batch(self.main_source, rows)]
                        batches += [self.data.batch(source, sampler.next()) for source, sampler in aux.items()]
                        if self.device.type != "cpu":
                            batches = [b.to(self.device) for b in batches]
                        losses = train_step(self.model, batches, tasks, self.weighting, self.optimizers,
                                            self.clip_params, cfg.train.clip_norm, self.diagnostics,
                                            self.progress.step)
                        for name, value in losses.items():
                            sums[name] = sums.get(name, 0.0) + value
                            counts[name] = counts.get(name, 0) + 1
                        self.progress.step += 1
                        bar.advance(losses)
                        if cfg.train.checkpoint_every and self.progress.step % cfg.train.checkpoint_every == 0:
                            self._save_checkpoint()
                train_losses = {n: float(sums[n]) / counts[n] for n in sums}
                # Training throughput of this epoch (or of its resumed part): validation excluded.
                rate = rows_seen / max(time.perf_counter() - epoch_started, 1e-9)
                self.weighting.on_epoch_end(train_losses)
                self.diagnostics.on_epoch_end(epoch + 1, self.progress.step)
                self._end_epoch(epoch, train_losses, rate, logger)
                if stop is not None and self.progress.stale_epochs >= stop.patience:
                    logger.info(f"early stopping after epoch {epoch + 1}: no improvement for "
                                f"{stop.patience} epochs")
                    break
        finally:
            logger.close()
        return self._finish(time.perf_counter() - started)

    def _end_epoch(self, epoch: int, train_losses: dict[str, float], samples_per_second: float,
                   logger: RunLogger) -> None:
        cfg = self.config
        valid_rows = self._rows("valid")
        has_valid = any(len(r) for r in valid_rows.values())
        valid = evaluate(self.model, self.data, self.spec, valid_rows, cfg.train.eval_batch_size,
                         self.device) if has_valid else {}
        metric = cfg.train.early_stopping.metric if cfg.train.early_stopping else "auto"
        score = selection_score(valid, self.spec, metric) if valid else float("nan")
        p = self.progress
        p.epoch = epoch + 1
        improved = not has_valid or (math.isfinite(score) and score > p.best_score) or p.best_epoch < 0
        if improved:
            p.best_score = score if math.isfinite(score) else p.best_score
            p.best_epoch = epoch + 1
            p.stale_epochs = 0
            self._save_best()
        else:
            p.stale_epochs += 1
        record = {"epoch": epoch + 1, "step": p.step, "train_loss": train_losses, "valid": valid,
                  "score": score, "best_epoch": p.best_epoch,
                  "train_samples_per_second": round(samples_per_second, 1)}
        p.history.append(record)
        logger.epoch(record)
        self._save_checkpoint()
        if improved:
            self._save_checkpoint("best")

    # -- the run directory ---------------------------------------------------------------------
    def _write_static(self) -> None:
        ckpt.atomic_write_text(self.out_dir / "config.yaml", dump_config(self._resolved_config()))
        self.schema.save(self.out_dir)

    def _resolved_config(self) -> Config:
        """The config with data paths made absolute, so the run can be re-evaluated from anywhere."""
        data = self.config.data.model_dump()
        for name in ("interactions", "users", "items", "item_pairs"):
            path = data.get(name)
            if path is not None and not Path(path).is_absolute():
                data[name] = str((self.base_dir / path).resolve())
        raw = self.config.model_dump()
        raw["data"] = data
        return Config.model_validate(raw)

    def _finish(self, seconds: float) -> TrainResult:
        tensors, _ = ckpt.load_tensors(self.out_dir / "weights.safetensors")
        self.model.load_state_dict(tensors)
        cfg = self.config
        predictions = predict_split(self.model, self.data, self.spec, self._rows("test"),
                                    cfg.train.eval_batch_size, self.device)
        test = metrics_of(predictions)
        test.update(retrieval_metrics(self.model, self.data, self.spec, self._rows("test").get("interactions"),
                                      cfg.train.eval_batch_size, self.device))
        self.diagnostics.on_fit_end(predictions)
        valid = self.progress.history[self.progress.best_epoch - 1]["valid"] if self.progress.history else {}
        from mtlrec.recommend import ranking_report, save_serving_state

        save_serving_state(self.out_dir, self.schema, self.data, self.split)
        metrics: dict[str, Any] = {
            "tasks": {t.name: {"kind": t.kind, "type": t.type, "valid": valid.get(t.name, {}),
                               "test": test.get(t.name, {})} for t in self.spec.tasks},
            "ranking": ranking_report(self.model, self.data, self.spec, self.split, cfg, self.device),
            "best_epoch": self.progress.best_epoch,
            "epochs_run": self.progress.epoch,
            "split_sizes": self.split.sizes(),
            "train_seconds": round(seconds, 2),
        }
        ckpt.atomic_write_text(self.out_dir / "metrics.json", json.dumps(_jsonable(metrics), indent=2))
        write_manifest(self.out_dir)
        return TrainResult(self.out_dir, metrics, self.progress.history)


def _jsonable(value: Any) -> Any:
    """NaN and numpy scalars to JSON-safe values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def train(config: str | Path | Mapping[str, Any] | Config, out: str | Path = "runs/latest",
          overrides: Sequence[str] | Mapping[str, Any] = (),
          tables: Mapping[str, pd.DataFrame | str | Path] | None = None,
          resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a multi-task model from a config and write its run directory.

    Args:
        config: a YAML path, a dict, or a Config.
        out: the run directory (created).
        overrides: `key=value` strings (or a nested dict) applied over the config.
        tables: DataFrames (or paths) by table name, used instead of the config's paths.
        resume: continue from `out/checkpoints/last.safetensors`.
        progress: show progress bars (default: the config's train.progress).

    Returns:
        The run directory and its metrics.
    """
    cfg, base_dir = load_config(config, overrides)
    return Trainer(cfg, base_dir, Path(out), tables).fit(resume=resume, show_progress=progress)
