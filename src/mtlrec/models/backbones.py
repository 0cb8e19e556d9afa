"""Interaction backbones: x [B, Din] -> one representation [B, H] per interaction task.

Every backbone takes `(in_dim, tasks, config)`, exposes `out_dim` (H), `gate_weights` (task ->
[B, E] of the last forward, detached; empty when it has no gates), `shared_parameters()` (those
that more than one task's output depends on) and the class attribute `isolates_tasks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from mtlrec.config import ModelConfig
from mtlrec.errors import ConfigError
from mtlrec.models.encoders import MLP
from mtlrec.registry import Registry


class Backbone(nn.Module):
    """Base of the interaction backbones (see the module docstring for the contract)."""

    isolates_tasks: ClassVar[bool] = False

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__()
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.in_dim = in_dim
        self.tasks = tuple(tasks)
        self.out_dim = in_dim
        self.gate_weights: dict[str, Tensor] = {}

    def shared_parameters(self) -> list[nn.Parameter]:
        return []


BACKBONES: Registry[type[Backbone]] = Registry("backbone")


def _params(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for m in modules if m is not None for p in m.parameters()]


def _expert_sizes(config: ModelConfig) -> list[int]:
    if not config.expert_hidden:
        raise ConfigError("model.expert_hidden must list at least one layer size for expert backbones, "
                          "got []")
    return list(config.expert_hidden)


class Experts(nn.Module):
    """E expert MLPs (Linear -> ReLU per layer) evaluated together.

    The first layer of all experts is one matmul [B, Din] @ [Din, E*H]; later layers are one
    batched matmul over experts. Each expert's layers are initialised like `nn.Linear`.

    Args:
        in_dim: input width Din.
        num_experts: E.
        hidden: layer sizes of every expert (the last one is the output width H).
        dropout: dropout after each activation.
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        sizes = [in_dim, *hidden]
        self.num_experts = num_experts
        self.out_dim = sizes[-1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            bound = fan_in**-0.5
            # First layer stored [Din, E, H] so that it views as one [Din, E*H] matrix.
            shape = (fan_in, num_experts, fan_out) if i == 0 else (num_experts, fan_in, fan_out)
            self.weights.append(nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, fan_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Run every expert.

        Args:
            x: [B, Din] read by every expert, or [E, B, Din] with one input per expert.
        Returns:
            [E, B, H]
        """
        if not (torch.is_grad_enabled() or self.training or torch.is_autocast_enabled(x.device.type)):
            return self._each(x)
        w, b = self.weights[0], self.biases[0]
        E = self.num_experts
        # In place: the matmuls' backward needs their inputs, not their outputs, so the ReLU can
        # overwrite them (no second [B, E*H] buffer to allocate, fill and free each step). The
        # first layer's ReLU runs on the matmul's own output, before it is viewed per expert: on
        # the transposed view, autograd would record a CopySlices whose backward allocates two
        # more [B, E*H1] buffers (16 MB a step in the speed benchmark's MMoE).
        if x.dim() == 2:
            h = torch.relu_(torch.addmm(b.flatten(), x, w.flatten(1)))  # [B, E*H1]
            h = h.view(x.shape[0], E, -1).transpose(0, 1)  # [E, B, H1]
        else:
            h = torch.relu_(torch.baddbmm(b.unsqueeze(1), x, w.transpose(0, 1)))  # [E, B, H1]
        h = self.dropout(h)
        for w, b in zip(self.weights[1:], self.biases[1:], strict=True):
            h = self.dropout(torch.relu_(torch.baddbmm(b.unsqueeze(1), h, w)))  # [E, B, Hi]
        return h

    def _each(self, x: Tensor) -> Tensor:
        """`forward` in inference (eval, no autograd, no autocast), expert by expert, into one [E, B, H] output.

        Inference batches are large: at B = 4096 the fused first layer's [B, E*H1] output of the
        speed benchmark's MMoE is 32 MiB, above the largest block glibc keeps for reuse, so calls
        map it fresh and page-fault it in, and its transposed view then feeds a strided batched
        matmul. Expert by expert the buffers are [B, H1], reused from the heap, and the last layer
        writes straight into its slice of the output (speed benchmark, MMoE inference: 84-88k ->
        92-98k samples/s; docs/benchmarks.md).
        """
        E = self.num_experts
        out = x.new_empty(E, x.shape[-2], self.out_dim)
        last = len(self.weights) - 1
        for e in range(E):
            h = x if x.dim() == 2 else x[e]  # [B, Din]
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                weight = w[:, e] if i == 0 else w[e]  # [H(i-1), Hi]
                y = torch.addmm(b[e], h, weight, out=out[e]) if i == last else torch.addmm(b[e], h, weight)
                h = torch.relu_(y)
        return out


def _mix(gate: Tensor, experts: Tensor) -> Tensor:
    """Gate-weighted sum: gate [B, E], experts [E, B, H] -> [B, H].

    Training: a broadcast multiply and sum (as a matmul this is B tiny [1, E] @ [E, H] products,
    which CPU bmm runs one by one). Without autograd, expert by expert into one [B, H] buffer:
    no [E, B, H] temporary, which at inference batch sizes costs more than the E small kernels.
    """
    if torch.is_grad_enabled():
        return (gate.t().unsqueeze(-1) * experts).sum(dim=0)
    out = experts[0] * gate[:, :1]
    for e in range(1, experts.shape[0]):
        out.addcmul_(experts[e], gate[:, e:e + 1])
    return out


@BACKBONES.register("single")
class Single(Backbone):
    """One independent MLP(`expert_hidden`) per task; nothing is shared (single-task baseline).

    `isolates_tasks` makes `build_model` give every task its own embeddings and encoders too.
    """

    isolates_tasks = True

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__(in_dim, tasks, config)
        self.nets = nn.ModuleDict({t: MLP(in_dim, config.expert_hidden, None, config.dropout) for t in tasks})
        self.out_dim = in_dim if not config.expert_hidden else config.expert_hidden[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t: self.nets[t](x) for t in self.tasks}  # task -> [B, H]


@BACKBONES.register("shared_bottom")
class SharedBottom(Backbone):
    """One MLP(`expert_hidden`) shared by all tasks; the towers alone are task-specific."""

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__(in_dim, tasks, config)
        self.bottom = MLP(in_dim, config.expert_hidden, None, config.dropout)
        self.out_dim = self.bottom.out_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.bottom(x)  # [B, H]
        return {t: h for t in self.tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return _params(self.bottom)


@BACKBONES.register("omoe")
class OMoE(Backbone):
    """Mixture of experts with one softmax gate shared by all tasks. OMoE: Ma et al., KDD 2018."""

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__(in_dim, tasks, config)
        self.experts = Experts(in_dim, config.num_experts, _expert_sizes(config), config.dropout)
        self.gate = nn.Linear(in_dim, config.num_experts)
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = self.experts(x)  # [E, B, H]
        gate = torch.softmax(self.gate(x), dim=-1)  # [B, E]
        h = _mix(gate, experts)  # [B, H]
        self.gate_weights = dict.fromkeys(self.tasks, gate.detach())
        return {t: h for t in self.tasks}

    def shared_parameters(self) -> list[nn.Parameter]:
        return _params(self.experts, self.gate)


@BACKBONES.register("mmoe")
class MMoE(Backbone):
    """Shared experts, one softmax gate per task. MMoE: Ma et al., KDD 2018."""

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__(in_dim, tasks, config)
        self.experts = Experts(in_dim, config.num_experts, _expert_sizes(config), config.dropout)
        # One Linear per task (not one fused gate) so each gate's parameters belong to one task.
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, config.num_experts) for t in tasks})
        self.out_dim = self.experts.out_dim

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = self.experts(x)  # [E, B, H]
        out: dict[str, Tensor] = {}
        gates: dict[str, Tensor] = {}
        for t in self.tasks:
            gate = torch.softmax(self.gates[t](x), dim=-1)  # [B, E]
            out[t] = _mix(gate, experts)  # [B, H]
            gates[t] = gate.detach()
        self.gate_weights = gates
        return out

    def shared_parameters(self) -> list[nn.Parameter]:
        return _params(self.experts)


class CGC(nn.Module):
    """One Customized Gate Control layer of PLE: shared experts, per-task experts and gates.

    Task k's gate mixes the shared experts and task k's own; the shared gate (absent on the last
    level) mixes every expert and feeds the next level's shared experts.
    """

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig, shared_gate: bool) -> None:
        super().__init__()
        sizes = _expert_sizes(config)
        self.tasks = tuple(tasks)
        self.num_shared = S = config.shared_experts
        self.num_own = T = config.task_experts
        self.shared_experts = Experts(in_dim, S, sizes, config.dropout)
        self.task_experts = Experts(in_dim, T * len(tasks), sizes, config.dropout)
        self.task_gates = nn.ModuleDict({t: nn.Linear(in_dim, S + T) for t in tasks})
        self.shared_gate = nn.Linear(in_dim, S + T * len(tasks)) if shared_gate else None
        self.out_dim = sizes[-1]

    def forward(self, shared_in: Tensor, task_in: Tensor | None
                ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """One level.

        Args:
            shared_in: [B, Din] input of the shared experts and gate.
            task_in: [K, B, Din] input of each task's experts and gate, or None when every task
                reads `shared_in` (the first level).
        Returns:
            task outputs [K, B, H], shared output [B, H] (None on the last level), task gates.
        """
        S, T = self.num_shared, self.num_own
        shared = self.shared_experts(shared_in)  # [S, B, H]
        if task_in is None:
            own = self.task_experts(shared_in)  # [K*T, B, H]
        else:
            own = self.task_experts(task_in.repeat_interleave(T, dim=0))  # [K*T, B, H]
        outs: list[Tensor] = []
        gates: dict[str, Tensor] = {}
        for k, t in enumerate(self.tasks):
            x = shared_in if task_in is None else task_in[k]  # [B, Din]
            gate = torch.softmax(self.task_gates[t](x), dim=-1)  # [B, S+T]
            outs.append(_mix(gate[:, :S], shared) + _mix(gate[:, S:], own[k * T:(k + 1) * T]))  # [B, H]
            gates[t] = gate.detach()
        shared_out = None
        if self.shared_gate is not None:
            gate = torch.softmax(self.shared_gate(shared_in), dim=-1)  # [B, S+K*T]
            shared_out = _mix(gate[:, :S], shared) + _mix(gate[:, S:], own)  # [B, H]
        return torch.stack(outs), shared_out, gates


@BACKBONES.register("ple")
class PLE(Backbone):
    """`config.levels` stacked CGC layers. PLE: Tang et al., RecSys 2020.

    Each level has `config.shared_experts` shared experts and `config.task_experts` experts per
    task; the last level drops the shared gate. `gate_weights` are the last level's task gates
    over [shared experts, own experts].
    """

    def __init__(self, in_dim: int, tasks: Sequence[str], config: ModelConfig) -> None:
        super().__init__(in_dim, tasks, config)
        sizes = _expert_sizes(config)
        self.layers = nn.ModuleList(
            CGC(in_dim if i == 0 else sizes[-1], tasks, config, shared_gate=i < config.levels - 1)
            for i in range(config.levels))
        self.out_dim = sizes[-1]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        own, shared, gates = self.layers[0](x, None)  # own [K, B, H], shared [B, H] or None
        for layer in self.layers[1:]:
            own, shared, gates = layer(shared, own)
        self.gate_weights = gates
        return {t: own[k] for k, t in enumerate(self.tasks)}  # task -> [B, H]

    def shared_parameters(self) -> list[nn.Parameter]:
        # Shared experts and gates feed every task. Task k's experts feed the shared gate below
        # the last level; task k's gate feeds task k's experts of the next level, which are shared
        # when that level is not the last.
        last = len(self.layers) - 1
        shared: list[Iterable[nn.Parameter]] = []
        for i, module in enumerate(self.layers):
            layer = cast(CGC, module)
            shared += [layer.shared_experts.parameters()]
            if layer.shared_gate is not None:
                shared += [layer.shared_gate.parameters()]
            if i < last:
                shared += [layer.task_experts.parameters()]
            if i < last - 1:
                shared += [layer.task_gates.parameters()]
        return [p for group in shared for p in group]
