"""Data-parallel training on PyTorch DistributedDataParallel (DDP), launched by torchrun.

torchrun (`python -m torch.distributed.run`) starts one process per replica and gives each its
place in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `Replicas.from_env`
reads them and joins the process group: gloo when the replicas train on CPU, nccl on CUDA (one GPU
per process, `cuda:LOCAL_RANK`). Without those variables (or with WORLD_SIZE=1) it is a single
process and every collective below is the identity.

What the trainer gets from it:

- `forward`: the model applied to one step's batches (one per source) through DDP, in a single
  call: DDP supports one forward per backward, and all-reduces (averages) the gradients of the
  model's parameters during the backward pass, sparse embedding gradients included (gloo).
- `loss_denominators`: each task's loss is its summed per-row loss over this replica's rows
  divided by the mean labelled-row count over the replicas. Averaging the replicas' gradients then
  gives exactly the gradient of the loss over the global batch, however the label masks of a
  conditional or partly labelled task fall across the replicas.
- `average_gradients`: for parameters DDP does not see (the weighting strategy's own), and, via
  `average_`, for per-task gradients that strategies take with `torch.autograd.grad`
  (GradNorm, PCGrad), which DDP never reduces.
- `gather_predictions`: each replica predicts its contiguous share of a split and the shares
  are gathered in rank order, so every replica holds the predictions a single process would
  compute, in the same order, and computes the same metrics.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtlrec.data.batch import Batch
from mtlrec.data.spec import TaskSpec
from mtlrec.errors import ConfigError
from mtlrec.training.evaluate import TaskPredictions

__all__ = ["Replicas", "average_", "backend_for", "check_launch", "env_place", "is_main_process", "launch",
           "replica_mean"]

_DTYPES = [np.dtype(t) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                  np.float16, np.float32, np.float64)]
_MAX_DIMS = 6
TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for the other replicas (rank 0 alone computes the ranking report
and writes the artifact while the others wait at a barrier)."""


def env_place() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) outside torchrun."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers ({exc}); "
                          "launch with torchrun, which sets them") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world, local


def is_main_process() -> bool:
    """True unless this process is a replica other than rank 0 (the one that prints and writes)."""
    return env_place()[0] == 0


def backend_for(device: torch.device) -> str:
    """The collective backend for replicas training on `device`: nccl on CUDA, gloo elsewhere."""
    return "nccl" if device.type == "cuda" else "gloo"


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The mean over the replicas of each tensor (dense or sparse; None stays None).

    Dense tensors travel in one flat buffer (one all-reduce); sparse ones one by one (gloo
    reduces sparse tensors; their indices become the union). Without an initialised process group
    of more than one process the tensors come back as they are. Every replica must call this with
    the same structure (same shapes, same None positions, same sparse layout).
    """
    out = list(tensors)
    if not _active():
        return out
    world = dist.get_world_size()
    dense = [i for i, t in enumerate(out) if t is not None and not t.is_sparse]
    if dense:
        flat = torch.cat([out[i].reshape(-1) for i in dense])      # type: ignore[union-attr]
        dist.all_reduce(flat)
        flat /= world
        start = 0
        for i in dense:
            t = out[i]
            assert t is not None
            out[i] = flat[start:start + t.numel()].view_as(t).to(t.dtype)
            start += t.numel()
    for i, t in enumerate(out):
        if t is not None and t.is_sparse:
            reduced = t.coalesce()
            dist.all_reduce(reduced)
            out[i] = (reduced / world).coalesce()
    return out


def replica_mean(tensor: Tensor) -> Tensor:
    """The mean of a dense tensor over the replicas (itself when there is one process)."""
    result = average_([tensor])[0]
    assert result is not None
    return result


class _Sources(nn.Module):
    """The model applied to each of one step's batches (one per source) in a single call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: Sequence[Batch]) -> list[dict[str, Tensor]]:
        return [self.model(batch) for batch in batches]


class Replicas:
    """This process's place among the replicas of a data-parallel run, and their collectives.

    Build it with `from_env`. With `world_size` 1 every method is the identity (or a no-op).

    Args:
        rank: this process's rank in [0, world_size).
        world_size: number of replicas.
        device: the device this replica trains on.
        owns_group: whether `close` should destroy the process group (it was created here).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 owns_group: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device if device is not None else torch.device("cpu")
        self.owns_group = owns_group
        self._ddp: nn.Module | None = None

    @classmethod
    def from_env(cls, device: torch.device) -> Replicas:
        """Join the process group torchrun describes (gloo on CPU, nccl on CUDA), if any.

        Args:
            device: the device the config asks for; on CUDA each replica takes `cuda:LOCAL_RANK`.
        """
        rank, world, local = env_place()
        if world == 1:
            return cls(0, 1, device)
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if local >= count:
                raise ConfigError(f"process LOCAL_RANK={local} needs GPU {local}, but this machine has {count}; "
                                  "start at most one process per GPU (--nproc_per_node) or set train.device=cpu")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun "
                                  "(or `mtlrec train --nproc N`), which sets them")
            dist.init_process_group(backend_for(device), rank=rank, world_size=world, timeout=TIMEOUT)
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise ConfigError(f"a process group of world size {dist.get_world_size()} (rank {dist.get_rank()}) "
                              f"is already initialised, but the environment says WORLD_SIZE={world}, RANK={rank}")
        return cls(rank, world, device, owns)

    @property
    def active(self) -> bool:
        """More than one replica."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the replica that logs, checkpoints and writes the artifact."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every replica gets here."""
        if not self.active:
            return
        if backend_for(self.device) == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group if this object created it.

        Args:
            wait: leave together with the other replicas (after a normal end). After an error,
                leave at once: the others may be blocked in another collective, and the
                launcher stops them when this process exits.
        """
        self._ddp = None
        if self.owns_group and dist.is_initialized():
            # DDP's reducer sits in reference cycles and holds the process group: collect it now,
            # or the group outlives destroy_process_group and gloo's threads abort the process
            # while the interpreter shuts down.
            gc.collect()
            if wait:
                self.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    # -- training -------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> None:
        """Wrap `model` in DDP (which broadcasts rank 0's parameters to every replica now).

        `find_unused_parameters`: a task whose labels are all missing in a step contributes no
        loss, so its head gets no gradient that step; DDP must not wait for it. Parameters no
        replica used keep `grad` None, as in a single process.
        """
        if not self.active:
            return
        # Gradients of parameters with a dimension of size 1 may carry another (equivalent) stride
        # on that dimension; DDP copies them into its buckets all the same, but warns every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self._ddp = nn.parallel.DistributedDataParallel(
            _Sources(model), device_ids=None, find_unused_parameters=True, forward_sync_buffers=False)

    def forward(self, batches: Sequence[Batch]) -> list[dict[str, Tensor]]:
        """Logits of every batch of a step, through DDP once `wrap` was called."""
        if self._ddp is None:
            raise RuntimeError("Replicas.forward needs wrap(model) first")
        outputs: list[dict[str, Tensor]] = self._ddp(batches)
        return outputs

    def loss_denominators(self, counts: Tensor) -> Tensor:
        """Labelled-row counts of this replica [T] -> their mean over the replicas [T]."""
        return self.mean(counts)

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace `.grad` of each parameter (outside DDP) by its mean over the replicas."""
        params = [p for p in params if p.grad is not None]
        if not self.active or not params:
            return
        for p, g in zip(params, average_([p.grad for p in params]), strict=True):
            p.grad = g

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of a dense tensor over the replicas (on the tensor's device)."""
        if not self.active:
            return tensor
        return replica_mean(self._comm(tensor)).to(tensor.device)

    # -- gathering ------------------------------------------------------------------------------

    def _comm(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device) if backend_for(self.device) == "nccl" else tensor

    def gather_equal(self, tensor: Tensor) -> list[Tensor]:
        """Every replica's `tensor` (same shape and dtype everywhere), in rank order, on the CPU."""
        if not self.active:
            return [tensor]
        local = self._comm(tensor.contiguous())
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [p.cpu() for p in parts]

    def gather_rows(self, array: np.ndarray | None) -> np.ndarray | None:
        """Concatenate every replica's rows along the first axis, in rank order.

        Replicas may hold different numbers of rows, or None (nothing); the result is None only
        when every replica passes None. Arrays travel as raw bytes, so the values come back
        exactly (no float round trip).
        """
        if not self.active:
            return array
        meta = np.zeros(3 + _MAX_DIMS, dtype=np.int64)
        if array is not None:
            array = np.ascontiguousarray(array)
            if array.dtype not in _DTYPES or array.ndim > _MAX_DIMS:
                raise ValueError(f"gather_rows takes numeric arrays of at most {_MAX_DIMS} dimensions; "
                                 f"got {array.dtype} {array.shape}")
            meta[:3] = (1, _DTYPES.index(array.dtype), array.ndim)
            meta[3:3 + array.ndim] = array.shape
        metas = [m.numpy() for m in self.gather_equal(torch.from_numpy(meta))]
        present = [m for m in metas if m[0]]
        if not present:
            return None
        dtype = _DTYPES[int(present[0][1])]
        ndim = int(present[0][2])
        tail = tuple(int(d) for d in present[0][4:3 + ndim])
        if any(int(m[1]) != _DTYPES.index(dtype) or tuple(int(d) for d in m[4:3 + ndim]) != tail
               for m in present):
            raise ValueError(f"replicas hold arrays of different dtypes or trailing shapes: {metas}")
        sizes = [int(np.prod(m[3:3 + ndim])) * dtype.itemsize if m[0] else 0 for m in metas]
        payload = np.zeros(max(max(sizes), 1), dtype=np.uint8)
        if array is not None:
            payload[:array.nbytes] = array.reshape(-1).view(np.uint8)
        parts = self.gather_equal(torch.from_numpy(payload))
        return np.concatenate([part.numpy()[:size].view(dtype).reshape(-1, *tail)
                               for part, size, m in zip(parts, sizes, metas, strict=True) if m[0]])

    def gather_predictions(self, predictions: Mapping[str, TaskPredictions],
                           tasks: Sequence[TaskSpec]) -> dict[str, TaskPredictions]:
        """Every replica's predictions of its share of a split, concatenated in rank order.

        A replica whose share was empty has no entry for its source's tasks; a task appears in
        the result when any replica predicted it.
        """
        if not self.active:
            return dict(predictions)
        present = torch.tensor([t.name in predictions for t in tasks], dtype=torch.float64)
        present = self.mean(present)
        out: dict[str, TaskPredictions] = {}
        for task, share in zip(tasks, present.tolist(), strict=True):
            if share <= 0:
                continue
            local = predictions.get(task.name)
            arrays = [self.gather_rows(None if local is None else getattr(local, field))
                      for field in ("outputs", "labels", "mask", "groups")]
            outputs, labels, mask, groups = arrays
            assert outputs is not None and labels is not None and mask is not None
            out[task.name] = TaskPredictions(task, outputs, labels, mask, groups)
        return out


def check_launch(config: str | Path, overrides: Sequence[str], nproc: int, resume_from: Path | None) -> None:
    """Refuse, before starting any process, what would fail in every replica.

    Args:
        config: the run's YAML config.
        overrides: its `key=value` overrides.
        nproc: processes to start on this machine.
        resume_from: the run directory to resume, or None.
    """
    from mtlrec.config import load_config
    from mtlrec.training.trainer import choose_device

    if "LOCAL_RANK" in os.environ:
        raise ConfigError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    cfg, _ = load_config(config, overrides)
    if cfg.train.batch_size < nproc:
        raise ConfigError(f"train.batch_size is the global batch, split across the {nproc} processes; "
                          f"it must be >= {nproc}, got {cfg.train.batch_size}")
    device = choose_device(cfg.train.device)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} with train.device={cfg.train.device} needs {nproc} GPUs (one per "
                          f"process); this machine has {torch.cuda.device_count()}. Use fewer processes or "
                          "train.device=cpu")
    if resume_from is not None and not (resume_from / "checkpoints" / "last.safetensors").is_file():
        raise ConfigError(f"cannot resume: '{resume_from / 'checkpoints' / 'last.safetensors'}' does not exist; "
                          "train without --resume first")


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `python -m mtlrec ARGS` in `nproc` processes on this machine with torchrun; its exit code.

    `--standalone` runs the rendezvous on localhost on a free port; torchrun sets
    OMP_NUM_THREADS=1 in each process unless it is set already.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mtlrec", *args]
    return subprocess.call(command)

