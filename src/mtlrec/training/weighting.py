"""Loss weighting strategies: how the per-task losses of a step become gradients.

A strategy is an `nn.Module` that owns its state (learned log-variances, loss history, task
weights) as parameters and buffers, so it moves with `.to(device)` and resumes exactly from a
`state_dict`. The trainer calls `backward(losses, shared)` once per step and `on_epoch_end` once
per epoch, adds `strategy.parameters()` to its optimizer, and never asks which strategy it holds.

`losses` may hold any subset of the tasks: a step draws batches from several tables and a batch
may have no label for some task. Strategies weigh only the tasks present and leave the state of
the others untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

from mtlrec.errors import ConfigError
from mtlrec.registry import Registry
from mtlrec.training.distributed import average_, replica_mean

__all__ = [
    "WEIGHTINGS",
    "DWA",
    "EqualWeighting",
    "FixedWeighting",
    "GradNorm",
    "PCGrad",
    "UncertaintyWeighting",
    "Weighting",
    "make_weighting",
]

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")

W = TypeVar("W", bound="type[Weighting]")


def _register(name: str) -> Callable[[W], W]:
    def add(cls: W) -> W:
        cls.name = name
        WEIGHTINGS.register(name)(cls)
        return cls

    return add


class Weighting(nn.Module):
    """Base of every strategy: turns a dict of task losses into gradients on all parameters.

    Constructors only store and validate parameters; state that changes during training lives in
    buffers and parameters. Subclasses declare their parameters with defaults in `defaults`; an
    unknown parameter is a `ConfigError` naming the strategy and what it accepts.

    Args:
        tasks: names of every task the strategy may see, in a fixed order (the order of its state).
        task_weights: static weight per task from the config (used by `fixed`).
        **params: strategy parameters, e.g. `T` for DWA, `alpha` and `lr` for GradNorm.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Mapping[str, float]] = {}

    def __init__(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                 **params: float) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks:
            raise ConfigError(f"weighting '{self.name}' needs at least one task; got none")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"weighting '{self.name}' got duplicate task names: {list(self.tasks)}")
        self._index = {task: i for i, task in enumerate(self.tasks)}
        weights = dict(task_weights or {})
        for task, weight in weights.items():
            if task not in self._index:
                raise ConfigError(f"weighting '{self.name}' got a weight for task '{task}', which is not "
                                  f"one of the tasks {list(self.tasks)}")
            if not (math.isfinite(weight) and weight >= 0.0):
                raise ConfigError(f"weight of task '{task}' must be a finite number >= 0; got {weight}")
        self.task_weights: dict[str, float] = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        for key in params:
            if key not in self.defaults:
                raise ConfigError(f"weighting '{self.name}' has no parameter '{key}'; it accepts "
                                  f"{sorted(self.defaults)}")
        self.hparams: dict[str, float] = {**self.defaults, **{k: float(v) for k, v in params.items()}}

    # ------------------------------------------------------------------ what the trainer calls

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[Tensor]) -> dict[str, float]:
        """Back-propagate the weighted losses into `.grad` of every parameter (accumulating).

        Args:
            losses: scalar loss per task present in this step (any subset of `tasks`).
            shared: parameters shared by the tasks (a sequence or a one-shot iterator); strategies
                that manipulate per-task gradients (GradNorm, PCGrad) take them on these.

        Returns:
            The weight used for each task present.
        """
        self._check(losses)
        if not losses:
            return {}
        weights = self.weights(losses)
        _stack([weights[t] * loss for t, loss in losses.items()]).sum().backward()
        return weights

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """The weight of each task present; strategies that only scale losses override this."""
        raise NotImplementedError(f"{type(self).__name__} overrides backward, not weights")

    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Take note of each task's mean (unweighted) loss over the epoch that ended; default no-op."""

    # ------------------------------------------------------------------ helpers

    def _check(self, losses: Mapping[str, Tensor]) -> None:
        for task in losses:
            if task not in self._index:
                raise ValueError(f"weighting '{self.name}' was built for tasks {list(self.tasks)}; "
                                 f"got a loss for '{task}'")

    def _positions(self, tasks: Sequence[str], device: torch.device) -> Tensor:
        return torch.tensor([self._index[t] for t in tasks], dtype=torch.long, device=device)

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, " + ", ".join(f"{k}={v}" for k, v in self.hparams.items())


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.reshape(()) for t in tensors])


def _task_grads(loss: Tensor, shared: Iterable[Tensor]) -> tuple[Tensor | None, ...]:
    """Gradient of one task's loss on the shared parameters (None where the task does not use one).

    Under data-parallel training the gradient is averaged over the replicas (DDP reduces only
    what reaches `.grad`, never what `torch.autograd.grad` returns), so that every replica sees
    the task's gradient over the global batch and takes the same decisions from it.
    """
    params = [p for p in shared if p.requires_grad]
    if not loss.requires_grad or not params:
        return tuple(None for _ in shared)
    grads = iter(average_(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)))
    return tuple(next(grads) if p.requires_grad else None for p in shared)


def _squared_norm(grads: Sequence[Tensor | None], like: Tensor) -> Tensor:
    """Sum of squares of every gradient; sparse ones are coalesced, not densified."""
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for g in grads:
        if g is None:
            continue
        values = g.coalesce().values() if g.is_sparse else g
        total = total + values.to(total.dtype).square().sum()
    return total


def _flatten(grads: Sequence[Tensor | None], shared: Iterable[Tensor]) -> Tensor:
    """One dense vector [P] of the gradients on `shared`, zeros where a parameter is unused."""
    parts = []
    for g, p in zip(grads, shared, strict=True):
        if g is None:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
        else:
            parts.append((g.to_dense() if g.is_sparse else g).reshape(-1))
    return torch.cat(parts)


# ---------------------------------------------------------------------- scaling strategies


@_register("equal")
class EqualWeighting(Weighting):
    """Sum of the task losses (every weight is 1)."""

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {t: 1.0 for t in losses}


@_register("fixed")
class FixedWeighting(Weighting):
    """Static weights from the config (`task_weights`; 1 for a task without one)."""

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {t: self.task_weights[t] for t in losses}


@_register("uncertainty")
class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty: L = sum_i exp(-s_i) L_i + s_i with learned s_i = log sigma_i^2.

    The s_i are `nn.Parameter`s of the strategy, which the trainer adds to its optimizer.
    Kendall et al., CVPR 2018.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                 **params: float) -> None:
        super().__init__(tasks, task_weights, **params)
        self.log_var = nn.Parameter(torch.zeros(len(self.tasks)))

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[Tensor]) -> dict[str, float]:
        self._check(losses)
        if not losses:
            return {}
        s = self.log_var[self._positions(list(losses), self.log_var.device)]      # [n]
        task_loss = _stack(list(losses.values())).to(s.dtype)                   # [n]
        (torch.exp(-s) * task_loss + s).sum().backward()
        return dict(zip(losses, torch.exp(-s.detach()).tolist(), strict=True))


@_register("dwa")
class DWA(Weighting):
    """Dynamic Weight Average: w_i = K softmax_i(r_i / T), r_i = L_i(t-1) / L_i(t-2).

    L_i(t) is task i's mean loss over epoch t, reported through `on_epoch_end`. Weights are 1
    during the first two epochs; a task without both epochs' losses gets the neutral ratio 1.
    Liu et al., CVPR 2019 (MTAN).
    """

    defaults: ClassVar[Mapping[str, float]] = {"T": 2.0}
    loss_history: Tensor
    epochs_seen: Tensor

    def __init__(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                 **params: float) -> None:
        super().__init__(tasks, task_weights, **params)
        if not self.hparams["T"] > 0.0:
            raise ConfigError(f"weighting 'dwa' parameter T must be > 0; got {self.hparams['T']}")
        # Row 0: mean losses of the last epoch, row 1: of the epoch before (nan = not seen).
        self.register_buffer("loss_history", torch.full((2, len(self.tasks)), math.nan, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def all_weights(self) -> Tensor:
        """Current weight of every task [K], in the order of `tasks`."""
        k = len(self.tasks)
        history = self.loss_history
        if int(self.epochs_seen) < 2:
            return torch.ones(k, dtype=torch.float64, device=history.device)
        ratio = history[0] / history[1]
        ratio = torch.where(torch.isfinite(ratio), ratio, 1.0)
        return k * torch.softmax(ratio / self.hparams["T"], dim=0)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        weight = self.all_weights().tolist()
        return {t: weight[self._index[t]] for t in losses}

    def on_epoch_end(self, epoch_losses: Mapping[str, float]) -> None:
        """Shift the history; names that are not tasks of this strategy (e.g. 'total') are ignored."""
        history = self.loss_history
        latest = torch.full_like(history[0], math.nan)
        for task, value in epoch_losses.items():
            if task in self._index:
                latest[self._index[task]] = float(value)
        history[1] = history[0]
        history[0] = latest
        self.epochs_seen += 1


# ---------------------------------------------------------------------- gradient strategies


@_register("gradnorm")
class GradNorm(Weighting):
    """GradNorm: learn task weights that balance the tasks' gradient norms on the shared parameters.

    With G_i = w_i ||grad_shared L_i|| and r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)), the weights
    take one step of size `lr` on sum_i |G_i - mean(G) r_i^alpha|, whose gradient in w_i is
    sign(G_i - target_i) ||grad L_i|| (targets held constant, as in the paper), are kept positive
    and renormalised so that the weights always sum to the number of tasks. The weights are
    buffers, updated by the strategy itself rather than by the trainer's optimizer. A task first
    seen after the start takes its first loss as L_i(0). Chen et al., ICML 2018.
    """

    defaults: ClassVar[Mapping[str, float]] = {"alpha": 1.5, "lr": 0.025}
    min_weight: ClassVar[float] = 1e-3
    task_weight: Tensor
    initial_loss: Tensor

    def __init__(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                 **params: float) -> None:
        super().__init__(tasks, task_weights, **params)
        if not self.hparams["lr"] > 0.0:
            raise ConfigError(f"weighting 'gradnorm' parameter lr must be > 0; got {self.hparams['lr']}")
        self.register_buffer("task_weight", torch.ones(len(self.tasks)))
        self.register_buffer("initial_loss", torch.full((len(self.tasks),), math.nan))

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[Tensor]) -> dict[str, float]:
        self._check(losses)
        if not losses:
            return {}
        shared = list(shared)                                # may be a one-shot iterator
        weight_all = self.task_weight
        initial_all = self.initial_loss
        pos = self._positions(list(losses), weight_all.device)
        w = weight_all[pos]                                                    # [n]
        norms = torch.stack([_squared_norm(_task_grads(loss, shared), w).sqrt()
                             for loss in losses.values()]).to(w.device)        # [n]
        _stack([w_i * loss for w_i, loss in zip(w.unbind(), losses.values(), strict=True)]).sum().backward()

        with torch.no_grad():
            # The global batch's losses: every replica updates the weights identically.
            current = replica_mean(_stack([loss.detach() for loss in losses.values()]).to(w))   # [n]
            initial = initial_all[pos]
            initial = torch.where(torch.isnan(initial), current, initial)
            initial_all[pos] = initial
            ratio = current / initial.clamp_min(torch.finfo(w.dtype).tiny)
            r = ratio / ratio.mean().clamp_min(torch.finfo(w.dtype).tiny)
            g = w * norms
            target = g.mean() * r.pow(self.hparams["alpha"])
            updated = (w - self.hparams["lr"] * torch.sign(g - target) * norms).clamp_min(self.min_weight)
            # The tasks present keep their share of the total, so absent tasks are unaffected and
            # the weights still sum to the number of tasks.
            updated = updated * (w.sum() / updated.sum())
            weight_all[pos] = updated
            weight_all.mul_(len(self.tasks) / weight_all.sum())
        return dict(zip(losses, w.tolist(), strict=True))


@_register("pcgrad")
class PCGrad(Weighting):
    """Projecting conflicting gradients on the shared parameters, then summing them.

    For each task i, its gradient g_i is projected, for every other task j in a random order, onto
    the normal plane of g_j whenever they conflict (g_i . g_j < 0): g_i -= (g_i . g_j) / |g_j|^2 g_j.
    Task-specific parameters get the plain sum of the losses' gradients. The order comes from a
    generator seeded from `seed` and the step count (a buffer), so runs and resumes are exact.
    Sparse gradients (a sparse embedding among the shared parameters) are densified for the
    projection and written back as sparse tensors. Yu et al., NeurIPS 2020.
    """

    defaults: ClassVar[Mapping[str, float]] = {"seed": 0.0}
    step: Tensor

    def __init__(self, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                 **params: float) -> None:
        super().__init__(tasks, task_weights, **params)
        seed = self.hparams["seed"]
        if not (math.isfinite(seed) and seed == int(seed) and seed >= 0):
            raise ConfigError(f"weighting 'pcgrad' parameter seed must be a whole number >= 0; got {seed}")
        self.seed = int(seed)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def backward(self, losses: Mapping[str, Tensor], shared: Iterable[Tensor]) -> dict[str, float]:
        self._check(losses)
        if not losses:
            return {}
        shared = list(shared)                                # may be a one-shot iterator
        task_grads = [_task_grads(loss, shared) for loss in losses.values()]
        if shared:
            flat = torch.stack([_flatten(grads, shared) for grads in task_grads])   # [n, P]
            merged = self._project(flat).sum(dim=0)                                  # [P]
        else:
            merged = torch.zeros(0)

        # Task-specific parameters: plain backward of the sum. The shared parameters' gradients
        # from this pass are discarded and replaced by the projected sum.
        before = [p.grad for p in shared]
        for p in shared:
            p.grad = None
        _stack(list(losses.values())).sum().backward()
        offset = 0
        for i, p in enumerate(shared):
            size = p.numel()
            used = [g for grads in task_grads if (g := grads[i]) is not None]
            previous = before[i]
            if not used:                                     # no task reaches it: leave it as it was
                p.grad = previous
            else:
                grad = merged[offset:offset + size].view_as(p)
                sparse = [g for g in used if g.is_sparse]
                if sparse:                                   # the optimizer expects a sparse gradient
                    grad = grad.to_sparse(sparse_dim=sparse[0].sparse_dim()).coalesce()
                p.grad = grad if previous is None else previous + grad
            offset += size
        self.step += 1
        return {t: 1.0 for t in losses}

    def _project(self, flat: Tensor) -> Tensor:
        """PCGrad projection of each row of `flat` [n, P] against the original other rows."""
        n = flat.shape[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        orders = torch.argsort(torch.rand(n, n, generator=generator), dim=1).tolist()
        sq_norm = (flat * flat).sum(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)     # [n]
        projected = flat.clone()
        for i in range(n):
            for j in orders[i]:
                if j == i:
                    continue
                # Branch-free: the coefficient is 0 unless the pair conflicts (no host sync).
                dot = projected[i] @ flat[j]
                projected[i] -= torch.clamp(dot, max=0.0) / sq_norm[j] * flat[j]
        return projected


def make_weighting(name: str, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None,
                   params: Mapping[str, float] | None = None) -> Weighting:
    """Build the strategy registered as `name` (a `ConfigError` lists the choices if unknown)."""
    return WEIGHTINGS.get(name)(tasks, task_weights, **dict(params or {}))
