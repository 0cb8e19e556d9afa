"""The trainer: data -> encoders -> model -> epochs of plain training steps -> a run directory.

The training step (`train_step`) is one readable function: a batch per source -> forward ->
per-task losses -> weighting (which does the backward pass) -> clip -> step. Early stopping,
checkpoints and logging are small helpers around it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from mtlrec.data.sharding import shard_bounds
from mtlrec.data.spec import InputSpec, TaskSpec
from mtlrec.data.split import SplitIndex, split_catalogue, split_tables
from mtlrec.data.stream import InteractionStream, StreamSplit, fit_chunks, open_stream
from mtlrec.data.tables import Tables, load_tables
from mtlrec.errors import ArtifactError, ConfigError
from mtlrec.memory import release_freed_memory
from mtlrec.models.model import RecModel, build_model
from mtlrec.serve.integrity import write_manifest
from mtlrec.training import checkpoint as ckpt
from mtlrec.training.diagnostics import Diagnostics
from mtlrec.training.distributed import Replicas, backend_for
from mtlrec.training.evaluate import (
    TaskPredictions,
    metrics_of,
    predict_batches,
    predict_split,
    retrieval_metrics,
    selection_score,
    sources_with_tasks,
    stream_retrieval_metrics,
)
from mtlrec.training.logging import RunLogger
from mtlrec.training.losses import task_losses
from mtlrec.training.weighting import WEIGHTINGS, Weighting


def train_step(model: RecModel, batches: Sequence[Batch], tasks: Sequence[TaskSpec], weighting: Weighting,
               optimizers: Sequence[torch.optim.Optimizer], clip_params: Sequence[nn.Parameter],
               clip_norm: float | None, diagnostics: Diagnostics | None = None, step: int = 0,
               replicas: Replicas | None = None) -> dict[str, Tensor]:
    """One optimisation step over one batch per source; returns the detached per-task losses.

    With `replicas` (data-parallel training, `model` wrapped by `replicas.wrap`), the batches are
    this replica's part of the global batches: the forward runs through DDP, each task's loss is
    normalised by its labelled rows over all replicas, and the weighting's own parameters'
    gradients are averaged, so the step equals a single process's step on the global batches.
    """
    # The previous step's gradients (the dense embedding table's is table-sized) are freed before
    # the forward pass, not after it, so they never coexist with this step's activations.
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    outputs = replicas.forward(batches) if replicas is not None else [model(batch) for batch in batches]
    denominators = replicas.loss_denominators if replicas is not None else None
    losses: dict[str, Tensor] = {}
    for batch, output in zip(batches, outputs, strict=True):
        losses.update(task_losses(output, batch, tasks, model.entire_space, denominators))
    if losses:
        if diagnostics is not None:
            diagnostics.before_backward(step, losses, model)
        weights = weighting.backward(losses, model.shared_parameters())
        if replicas is not None:
            replicas.average_gradients(weighting.parameters())
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
        # One process until `fit` joins the process group torchrun describes (if any).
        self.replicas = Replicas(device=choose_device(config.train.device))

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, resume: bool = False) -> None:
        """Read, split and encode the data; build the model, weighting, optimizers and samplers.

        `fit` calls it; call it alone to drive `train_step` yourself (as benchmarks/speed.py does).
        """
        cfg = self.config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = self.replicas.device
        rank, world = self.replicas.rank, self.replicas.world_size
        if cfg.train.batch_size < world:
            raise ConfigError(f"train.batch_size is the global batch, split across the {world} processes; "
                              f"it must be >= {world}, got {cfg.train.batch_size}")
        self.stream: InteractionStream | None = None
        if cfg.data.stream:
            self._prepare_stream(resume)
        else:
            tables: Tables = load_tables(cfg, self.base_dir, self.given_tables)
            self.split: SplitIndex = split_tables(tables, cfg)
            self.schema = self._fit_schema(lambda: Schema(cfg).fit(tables, self.split), resume)
            self.data: EncodedData = self.schema.encode(tables, self.split)
            del tables  # training holds the encoded tensors only
            self.schema.release_lookups()
            release_freed_memory()
        self.spec: InputSpec = self.schema.spec_
        self._check_early_stopping_metric()

        torch.manual_seed(cfg.train.seed)
        vocab_rows = sum(self.spec.vocab_sizes.values())
        sparse = cfg.train.sparse_embeddings == "on" or (
            cfg.train.sparse_embeddings == "auto" and vocab_rows > cfg.train.sparse_threshold)
        if sparse and self.replicas.active and backend_for(self.device) != "gloo":
            raise ConfigError(f"sparse embedding gradients ({vocab_rows:,} embedding rows, train.sparse_embeddings="
                              f"{cfg.train.sparse_embeddings}) need the gloo backend, but these replicas train on "
                              f"{self.device.type} with {backend_for(self.device)}; set train.sparse_embeddings=off "
                              "(dense DDP) or shard the table (docs/distributed.md)")
        self.model = build_model(self.spec, cfg.model, sparse=sparse).to(self.device)
        task_weights = {t.name: t.weight for t in cfg.tasks}
        self.weighting = WEIGHTINGS.get(cfg.train.weighting)(
            [t.name for t in self.spec.tasks], task_weights, **cfg.train.weighting_params).to(self.device)
        self.replicas.wrap(self.model)
        if rank > 0:  # own dropout masks per replica; rank 0 keeps a single process's random stream
            torch.manual_seed(cfg.train.seed + 1_000_003 * rank)

        self.optimizers, self.clip_params = build_optimizers(self.model, self.weighting, cfg.train, self.device)

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
            self.samplers[source] = Sampler(rows, size, seed=cfg.train.seed + 7919 * i, rank=rank, world_size=world)
        self.progress = _Progress()

    def _fit_schema(self, fit: Callable[[], Schema], resume: bool) -> Schema:
        """The encoders: loaded on resume, else fitted once (`fit`), by rank 0, and saved to the run.

        The other replicas wait for that file and load it, so every replica encodes with the very
        same encoders; the run directory must be on a filesystem every process sees.
        """
        cfg = self.config
        path = self.out_dir / "schema.json"
        if resume and path.is_file():
            return Schema.load(self.out_dir, cfg)
        schema = None
        if self.replicas.is_main:
            schema = fit()
            schema.save(self.out_dir)
        self.replicas.barrier()
        if schema is None:
            if not path.is_file():
                raise ArtifactError(f"rank {self.replicas.rank} cannot see '{path}', which rank 0 wrote: the run "
                                    "directory must be on a filesystem every process sees (a shared volume "
                                    "when several machines train)")
            schema = Schema.load(self.out_dir, cfg)
        return schema

    def _batch(self, source: str, sampler: Sampler, rows: Tensor) -> Batch:
        """This replica's batch of `source`; when its part of the global batch is empty, one row of
        that batch with every label masked out, so that every replica still steps."""
        if len(rows) == 0:
            return self.data.batch(source, sampler.head()).unlabelled()
        return self.data.batch(source, rows)

    def _prepare_stream(self, resume: bool) -> None:
        """`data.stream`: the catalogue tables in memory, the interactions read from Parquet as needed."""
        cfg = self.config
        log, tables = open_stream(cfg, self.base_dir, self.given_tables)
        self.split = split_catalogue(tables, cfg)
        interaction_split = StreamSplit(log, cfg)
        self.schema = self._fit_schema(
            lambda: Schema(cfg).fit_stream(tables, self.split, fit_chunks(log, interaction_split, cfg)), resume)
        self.data = self.schema.encode_catalogue(tables)
        self.stream = InteractionStream(log, interaction_split, self.schema, self.data, cfg.train.batch_size,
                                        cfg.data.stream_buffer_rows, cfg.train.seed)
        release_freed_memory()  # the fit pass's row groups are gone; training should not carry their heap

    def _retrieval_metrics(self, part: str) -> dict[str, dict[str, float]]:
        """The retrieval task's recall@K and MRR on `part` (in memory or streamed)."""
        size = self.config.train.eval_batch_size
        if self.stream is not None:
            return stream_retrieval_metrics(self.model, self.stream, self.spec, part, size, self.device)
        return retrieval_metrics(self.model, self.data, self.spec, self._rows(part).get("interactions"), size,
                                 self.device)

    def _rows(self, part: str) -> dict[str, np.ndarray]:
        """Rows of `part` of every source held in memory (streamed interactions are read as they go)."""
        return {source: self.split.rows(source, part) for source in self.sources if not self._streamed(source)}

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
            rank, world = self.replicas.rank, self.replicas.world_size
            return self.stream.num_batches(), self.stream.epoch(epoch, rank, world)
        main = self.samplers[self.main_source]
        return len(main), (self._batch(self.main_source, main, rows) for rows in main.epoch(epoch))

    def _predict(self, part: str) -> dict[str, TaskPredictions]:
        """Predictions of every task on a split part, on every replica.

        Each replica predicts a contiguous run of whole evaluation batches, the very batches one
        process would form, and the runs are gathered in rank order: every replica holds,
        bit for bit, the predictions of a single process, and computes the same metrics.
        Streamed interactions are read as they go, each replica a contiguous run of row groups.
        """
        size = self.config.train.eval_batch_size
        rank, world = self.replicas.rank, self.replicas.world_size
        rows = {}
        for source, part_rows in self._rows(part).items():
            first, stop = shard_bounds(-(-len(part_rows) // size), rank, world)
            rows[source] = part_rows[first * size:stop * size]
        local = predict_split(self.model, self.data, self.spec, rows, size, self.device)
        if self.stream is not None and "interactions" in self.sources:
            # The epoch's buffers are gone: give their heap back before the predictions (which grow with
            # the part's rows) and the metrics' sorts are allocated on top of it.
            release_freed_memory()
            local.update(predict_batches(self.model, self.spec, self.stream.batches(part, size, rank, world),
                                         self.device))
        return self.replicas.gather_predictions(local, self.spec.tasks)

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
        """Everything needed to continue exactly: model, optimizers, weighting, RNG, samplers.

        Every replica calls it (to hand over its random state); rank 0 writes, and no replica goes
        on before the file is complete, so a replica that dies right after cannot take an
        unfinished checkpoint down with it. The rest of the state is the same on every replica.
        """
        rng = self.replicas.gather_equal(ckpt.rng_state())
        if self.replicas.is_main:
            self._write_checkpoint(name, rng)
        self.replicas.barrier()

    def _write_checkpoint(self, name: str, rng: list[Tensor]) -> None:
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items()})
        optim_docs = []
        for i, opt in enumerate(self.optimizers):
            flat, doc = ckpt.flatten_optimizer(f"optim{i}", opt.state_dict())
            tensors.update(flat)
            optim_docs.append(doc)
        tensors["rng"] = rng[0]
        tensors.update({f"rng.{r}": state for r, state in enumerate(rng) if r > 0})
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
        ckpt.set_rng_state(tensors.get(f"rng.{self.replicas.rank}", tensors["rng"]))
        self.progress = _Progress(meta["epoch"], meta["step"], meta["best_score"], meta["best_epoch"],
                                  meta["stale_epochs"], meta["history"])

    def _save_best(self) -> None:
        if not self.replicas.is_main:
            return
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
        self.replicas = Replicas.from_env(choose_device(self.config.train.device))
        try:
            self.prepare(resume)
            result = self._fit(resume, show_progress, started)
        except BaseException:
            self.replicas.close(wait=False)
            raise
        self.replicas.close()
        return result

    def _fit(self, resume: bool, show_progress: bool | None, started: float) -> TrainResult:
        cfg = self.config
        main_replica = self.replicas.is_main
        if resume:
            self._load_checkpoint()
        elif main_replica:
            self._write_static()
        self.diagnostics = Diagnostics(self.out_dir, cfg.train.diagnostics_every if main_replica else 0)
        if resume:
            self.diagnostics.restore(self.progress.epoch, self.progress.step)
        show = cfg.train.progress if show_progress is None else show_progress
        logger = RunLogger(self.out_dir, show, append=resume, enabled=main_replica)
        ddp = self.replicas if self.replicas.active else None
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
                        batches += [self._batch(source, sampler, sampler.next()) for source, sampler in aux.items()]
                        if self.device.type != "cpu":
                            batches = [b.to(self.device) for b in batches]
                        losses = train_step(self.model, batches, tasks, self.weighting, self.optimizers,
                                            self.clip_params, cfg.train.clip_norm, self.diagnostics,
                                            self.progress.step, ddp)
                        for name, value in losses.items():
                            sums[name] = sums.get(name, 0.0) + value
                            counts[name] = counts.get(name, 0) + 1
                        self.progress.step += 1
                        bar.advance(losses)
                        if cfg.train.checkpoint_every and self.progress.step % cfg.train.checkpoint_every == 0:
                            self._save_checkpoint()
                train_seconds = time.perf_counter() - epoch_started
                train_losses = self._epoch_losses(sums, counts)
                # Training throughput of this epoch (or of its resumed part) over all replicas,
                # validation excluded.
                rows_all = float(self.replicas.mean(torch.tensor([float(rows_seen)]))[0]) * self.replicas.world_size
                rate = rows_all / max(train_seconds, 1e-9)
                self.weighting.on_epoch_end(train_losses)
                self.diagnostics.on_epoch_end(epoch + 1, self.progress.step)
                self._end_epoch(epoch, train_losses, logger, train_seconds, rate)
                if stop is not None and self.progress.stale_epochs >= stop.patience:
                    logger.info(f"early stopping after epoch {epoch + 1}: no improvement for "
                                f"{stop.patience} epochs")
                    break
        finally:
            logger.close()
        return self._finish(time.perf_counter() - started)

    def _epoch_losses(self, sums: dict[str, Tensor], counts: dict[str, int]) -> dict[str, float]:
        """Each task's mean loss over the epoch's steps (and over the replicas: the same everywhere)."""
        if not sums:
            return {}
        means = self.replicas.mean(torch.stack([sums[n].reshape(()).double() for n in sums])).tolist()
        return {n: mean / counts[n] for n, mean in zip(sums, means, strict=True)}

    def _end_epoch(self, epoch: int, train_losses: dict[str, float], logger: RunLogger,
                   train_seconds: float = math.nan, samples_per_second: float = math.nan) -> None:
        cfg = self.config
        has_valid = any(self._num_rows(source, "valid") for source in self.sources)
        valid = metrics_of(self._predict("valid")) if has_valid else {}
        if has_valid:
            valid.update(self._retrieval_metrics("valid"))
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
        # train_seconds: the epoch's training steps only (a resumed epoch: since the resume).
        record = {"epoch": epoch + 1, "step": p.step, "train_loss": train_losses, "valid": valid,
                  "score": score, "best_epoch": p.best_epoch, "train_seconds": round(train_seconds, 3),
                  "train_samples_per_second": round(samples_per_second, 1)}
        p.history.append(record)
        logger.epoch(record)
        self._save_checkpoint()
        if improved:
            self._save_checkpoint("best")

    # -- the run directory ---------------------------------------------------------------------
    def _write_static(self) -> None:
        ckpt.atomic_write_text(self.out_dir / "config.yaml", dump_config(self._resolved_config()))

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
        self.replicas.barrier()                         # rank 0 has written the best weights
        tensors, _ = ckpt.load_tensors(self.out_dir / "weights.safetensors")
        self.model.load_state_dict(tensors)
        cfg = self.config
        predictions = self._predict("test")
        if not self.replicas.is_main:
            self.replicas.barrier()                     # rank 0 writes the artifact and metrics.json
            metrics_text = (self.out_dir / "metrics.json").read_text(encoding="utf-8")
            return TrainResult(self.out_dir, json.loads(metrics_text), self.progress.history)
        test = metrics_of(predictions)
        test.update(self._retrieval_metrics("test"))
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
        self.replicas.barrier()
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
