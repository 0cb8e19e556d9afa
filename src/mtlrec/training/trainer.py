"""The trainer: data -> encoders -> model -> epochs of plain training steps -> a run directory.

The training step (`train_step`) is one readable function: a batch per source -> forward ->
per-task losses -> weighting (which does the backward pass) -> clip -> step. Early stopping,
checkpoints and logging are small helpers around it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from mtlrec.config import Config, dump_config, load_config
from mtlrec.data.batch import Batch
from mtlrec.data.dataset import EncodedData, Sampler
from mtlrec.data.schema import Schema
from mtlrec.data.spec import InputSpec, TaskSpec
from mtlrec.data.split import SplitIndex, split_catalogue, split_tables
from mtlrec.data.stream import InteractionStream, StreamSplit, fit_chunks, open_stream
from mtlrec.data.tables import Tables, load_tables
from mtlrec.errors import ArtifactError, ConfigError
from mtlrec.models.model import RecModel, build_model
from mtlrec.serve.integrity import write_manifest
from mtlrec.training import checkpoint as ckpt
from mtlrec.training.diagnostics import Diagnostics
from mtlrec.training.evaluate import (
    TaskPredictions,
    metrics_of,
    predict_batches,
    predict_split,
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
        # This process's share of the streamed interactions (`data.stream`); one process reads all.
        self.rank = 0
        self.world_size = 1

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, resume: bool = False) -> None:
        """Read, split and encode the data; build the model, weighting, optimizers and samplers.

        `fit` calls it; call it alone to drive `train_step` yourself (as benchmarks/speed.py does).
        """
        cfg = self.config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = choose_device(cfg.train.device)
        reuse_schema = resume and (self.out_dir / "schema.json").is_file()
        self.stream: InteractionStream | None = None
        if cfg.data.stream:
            self._prepare_stream(reuse_schema)
        else:
            tables: Tables = load_tables(cfg, self.base_dir, self.given_tables)
            self.split: SplitIndex = split_tables(tables, cfg)
            self.schema = Schema.load(self.out_dir, cfg) if reuse_schema else Schema(cfg).fit(tables, self.split)
            self.data: EncodedData = self.schema.encode(tables, self.split)
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

        # Embedding rows see a gradient only when their id is in the batch, so they may train with
        # their own (usually larger) learning rate; sparse tables get SparseAdam.
        embedding_lr = cfg.train.embedding_lr or cfg.train.lr
        sparse_params = list(self.model.sparse_parameters())
        embed_ids = {id(p) for p in self.model.embedding_parameters()}
        sparse_ids = {id(p) for p in sparse_params}
        dense_embeddings = [p for p in self.model.embedding_parameters() if id(p) not in sparse_ids]
        dense = [p for p in self.model.parameters() if id(p) not in embed_ids]
        self.clip_params = dense + dense_embeddings
        groups: list[dict[str, Any]] = [{"params": dense + list(self.weighting.parameters())}]
        if dense_embeddings:
            groups.append({"params": dense_embeddings, "lr": embedding_lr})
        # The fused AdamW updates every tensor in one pass (on CPU the default is a Python loop
        # of several elementwise kernels per tensor, 3-10x slower on a large embedding table).
        self.optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(
            groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            fused=self.device.type in ("cpu", "cuda"))]
        if sparse_params:
            self.optimizers.append(torch.optim.SparseAdam(sparse_params, lr=embedding_lr))

        self.sources = sources_with_tasks(self.spec)
        self.main_source = self.sources[0]
        self.samplers: dict[str, Sampler] = {}
        main_steps = math.ceil(self._num_rows(self.main_source, "train") / cfg.train.batch_size)
        for i, source in enumerate(self.sources):
            if self._streamed(source):
                continue
            rows = self.split.rows(source, "train")
            # Auxiliary sources (users, items, pairs) ride along every step with a batch sized so
            # that they make `aux_passes` passes per epoch of the main source: small tables are
            # not revisited hundreds of times an epoch (which overfits their heads).
            size = cfg.train.batch_size if source == self.main_source else \
                max(1, math.ceil(len(rows) * cfg.train.aux_passes / max(main_steps, 1)))
            self.samplers[source] = Sampler(rows, size, seed=cfg.train.seed + 7919 * i)
        self.progress = _Progress()

    def _prepare_stream(self, reuse_schema: bool) -> None:
        """`data.stream`: the catalogue tables in memory, the interactions read from Parquet as needed."""
        cfg = self.config
        log, tables = open_stream(cfg, self.base_dir, self.given_tables)
        self.split = split_catalogue(tables, cfg)
        interaction_split = StreamSplit(log, cfg)
        if reuse_schema:
            self.schema = Schema.load(self.out_dir, cfg)
        else:
            self.schema = Schema(cfg).fit_stream(tables, self.split, fit_chunks(log, interaction_split, cfg))
        self.data = self.schema.encode_catalogue(tables)
        self.stream = InteractionStream(log, interaction_split, self.schema, self.data, cfg.train.batch_size,
                                        cfg.data.stream_buffer_rows, cfg.train.seed)

    def _streamed(self, source: str) -> bool:
        return self.stream is not None and source == "interactions"

    def _num_rows(self, source: str, part: str) -> int:
        if self.stream is not None and source == "interactions":
            return self.stream.num_rows(part)
        return len(self.split.rows(source, part))

    def _split_sizes(self) -> dict[str, dict[str, int]]:
        sizes = self.split.sizes()
        if self.stream is not None:
            sizes = {"interactions": self.stream.split.sizes(), **sizes}
        return sizes

    def _main_batches(self, epoch: int) -> tuple[int, Iterator[Batch]]:
        """(batches, the batches) of the main source in `epoch`: from the stream or the sampler."""
        if self._streamed(self.main_source):
            assert self.stream is not None
            return (self.stream.num_batches(epoch, self.rank, self.world_size),
                    self.stream.epoch(epoch, self.rank, self.world_size))
        main = self.samplers[self.main_source]
        return len(main), (self.data.batch(self.main_source, rows) for rows in main.epoch(epoch))

    def _predict(self, part: str) -> dict[str, TaskPredictions]:
        """Every task's predictions on `part` of each source (streamed interactions read as they go)."""
        batch_size = self.config.train.eval_batch_size
        rows = {s: self.split.rows(s, part) for s in self.sources if not self._streamed(s)}
        predictions = predict_split(self.model, self.data, self.spec, rows, batch_size, self.device)
        if self.stream is not None and "interactions" in self.sources:
            batches = self.stream.batches(part, batch_size, self.rank, self.world_size)
            predictions.update(predict_batches(self.model, self.spec, batches, self.device))
        return predictions

    def _check_early_stopping_metric(self) -> None:
        stop = self.config.train.early_stopping
        if stop is None or stop.metric == "auto":
            return
        task, dot, _ = stop.metric.partition(".")
        names = [t.name for t in self.spec.tasks]
        if not dot or task not in names:
            raise ConfigError(f"train.early_stopping.metric '{stop.metric}' must be 'auto' or '<task>.<metric>' "
                              f"with a task from {names}")

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
        if self.stream is not None:
            meta["stream"] = self.stream.state_dict()
        ckpt.save_tensors(self._checkpoint_path(name), tensors, meta)

    def _load_checkpoint(self) -> None:
        tensors, meta = ckpt.load_tensors(self._checkpoint_path())
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.weighting.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("weighting.")})
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(ckpt.unflatten_optimizer(f"optim{i}", tensors, meta["optimizers"][i]))
        for source, state in meta["samplers"].items():
            self.samplers[source].load_state_dict(state)
        if self.stream is not None:
            if "stream" not in meta:
                raise ArtifactError(f"'{self._checkpoint_path()}' was written without data.stream; resume with "
                                    "the run's own config")
            self.stream.load_state_dict(meta["stream"])
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
        logger.info(f"split sizes: {self._split_sizes()}")
        stop = cfg.train.early_stopping
        tasks = self.spec.tasks
        aux = {s: self.samplers[s] for s in self.sources[1:]}
        try:
            while self.progress.epoch < cfg.train.epochs:
                epoch = self.progress.epoch
                self.model.train()
                sums: dict[str, Tensor] = {}
                counts: dict[str, int] = {}
                epoch_started, rows_seen = time.perf_counter(), 0
                num_batches, main_batches = self._main_batches(epoch)
                with logger.epoch_bar(epoch, cfg.train.epochs, num_batches) as bar:
                    for batch in main_batches:
                        rows_seen += len(batch)
                        batches = [batch]
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
        has_valid = any(self._num_rows(source, "valid") for source in self.sources)
        valid = metrics_of(self._predict("valid")) if has_valid else {}
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
        predictions = self._predict("test")
        test = metrics_of(predictions)
        self.diagnostics.on_fit_end(predictions)
        valid = self.progress.history[self.progress.best_epoch - 1]["valid"] if self.progress.history else {}
        from mtlrec.recommend import (
            ranking_report,
            save_serving_state,
            stream_ranking_report,
            stream_serving_state,
        )

        if self.stream is not None:
            state = stream_serving_state(self.stream, self.spec, collect_seen=cfg.recommend.exclude_seen)
            state.save(self.out_dir)
            ranking = stream_ranking_report(self.model, self.stream, state, self.spec, cfg, self.device)
        else:
            save_serving_state(self.out_dir, self.schema, self.data, self.split)
            ranking = ranking_report(self.model, self.data, self.spec, self.split, cfg, self.device)
        metrics: dict[str, Any] = {
            "tasks": {t.name: {"kind": t.kind, "type": t.type, "valid": valid.get(t.name, {}),
                               "test": test.get(t.name, {})} for t in self.spec.tasks},
            "ranking": ranking,
            "best_epoch": self.progress.best_epoch,
            "epochs_run": self.progress.epoch,
            "split_sizes": self._split_sizes(),
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
