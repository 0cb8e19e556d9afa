"""The fast paths equal a plain reference: fused lookups, fused experts, fused and sparse optimizers.

The reference is the straightforward PyTorch model of the speed benchmark (one `nn.Embedding` per
field, one `nn.Sequential` per expert, `torch.optim.Adam` without fusion; a hand-written lazy Adam
for sparse tables), with weights copied from mtlrec's model. Forward outputs and the parameters
after a few optimisation steps must agree within float tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlrec.config import ModelConfig, TrainConfig
from mtlrec.data.batch import Batch
from mtlrec.data.spec import PAD, FieldSpec, InputSpec, TaskSpec
from mtlrec.models import MultiTaskModel, build_model
from mtlrec.models.embedding import FeatureEmbedding
from mtlrec.training.trainer import build_optimizers, train_step
from mtlrec.training.weighting import WEIGHTINGS

VOCABS = {"c0": 7, "c1": 11, "c2": 50, "c3": 5}
DENSE = ("d0", "d1", "d2")
TASKS = (TaskSpec("click", "interaction", "binary", 1), TaskSpec("buy", "interaction", "binary", 1, parent="click"))


def ctr_spec() -> InputSpec:
    fields = tuple(FieldSpec(name, "context", "categorical", name) for name in VOCABS) + \
        tuple(FieldSpec(name, "context", "numeric") for name in DENSE)
    return InputSpec(fields, dict(VOCABS), TASKS)


def ctr_model(sparse: bool = False) -> MultiTaskModel:
    config = ModelConfig(backbone="mmoe", embedding_dim=4, encoder_dim=None, numeric_input="raw",
                         expert_hidden=[12, 6], num_experts=3, tower_hidden=[5], wide=False)
    torch.manual_seed(0)
    model = build_model(ctr_spec(), config, sparse=sparse)
    assert isinstance(model, MultiTaskModel)
    return model


def ctr_batch(rows: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    batch = Batch("interactions")
    for name, size in VOCABS.items():
        batch.context[name] = torch.randint(0, size, (rows,), generator=g)  # PAD (0) included
    for name in DENSE:
        x = torch.randn(rows, generator=g)
        batch.context[name] = torch.stack([x, torch.zeros(rows)], dim=1)
    click = (torch.rand(rows, generator=g) < 0.5).float()
    buy = (torch.rand(rows, generator=g) < 0.4).float()
    batch.labels = {"click": click, "buy": buy}
    batch.masks = {"click": torch.ones(rows, dtype=torch.bool), "buy": click > 0.5}
    return batch


class PlainMMoE(nn.Module):
    """The straightforward implementation, with mtlrec's weights copied in."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        table = model.embedding.weight.detach()
        offsets = model.embedding.offsets.tolist()
        self.embeddings = nn.ModuleList(nn.Embedding.from_pretrained(table[o:o + n].clone(), freeze=False)
                                        for o, n in zip(offsets, VOCABS.values(), strict=True))
        backbone = model.backbone
        assert backbone is not None
        experts = backbone.experts
        sizes = [experts.weights[0].shape[0], *(b.shape[1] for b in experts.biases)]
        self.experts = nn.ModuleList()
        for e in range(experts.num_experts):
            layers: list[nn.Module] = []
            for i in range(len(sizes) - 1):
                lin = nn.Linear(sizes[i], sizes[i + 1])
                w = experts.weights[i]
                with torch.no_grad():
                    lin.weight.copy_((w[:, e, :] if i == 0 else w[e]).T)
                    lin.bias.copy_(experts.biases[i][e])
                layers += [lin, nn.ReLU()]
            self.experts.append(nn.Sequential(*layers))
        self.gates = nn.ModuleList(_copy(backbone.gates[t.name]) for t in TASKS)
        self.towers = nn.ModuleList(_copy(model.towers[t.name].mlp) for t in TASKS)

    def forward(self, batch: Batch) -> list[Tensor]:
        cats = [emb(batch.context[name]) * (batch.context[name] != PAD).unsqueeze(-1)
                for emb, name in zip(self.embeddings, VOCABS, strict=True)]
        x = torch.cat(cats + [batch.context[name][:, :1] for name in DENSE], dim=1)
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        out = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            w = torch.softmax(gate(x), dim=1).unsqueeze(-1)
            out.append(tower((w * experts).sum(dim=1)).squeeze(-1))
        return out

    def loss(self, batch: Batch) -> Tensor:
        click_logit, buy_logit = self(batch)
        p_click = torch.sigmoid(click_logit)
        joint = p_click * torch.sigmoid(buy_logit)
        click, buy = batch.labels["click"], batch.labels["buy"]
        return F.binary_cross_entropy(p_click, click) + F.binary_cross_entropy(joint, click * buy)


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _embedding_of(model: MultiTaskModel, plain: PlainMMoE) -> tuple[Tensor, Tensor]:
    """The fused table and the plain per-field tables concatenated, row for row."""
    return model.embedding.weight.detach(), torch.cat([e.weight.detach() for e in plain.embeddings])


def test_lookup_many_equals_per_field_lookups_forward_and_gradient() -> None:
    torch.manual_seed(0)
    for sparse in (False, True):
        fused = FeatureEmbedding(VOCABS, 4, sparse=sparse)
        single = FeatureEmbedding(VOCABS, 4, sparse=sparse)
        single.load_state_dict(fused.state_dict())
        idx = torch.stack([torch.randint(0, n, (64,)) for n in VOCABS.values()], dim=1)  # [B, F]
        out = fused.lookup_many(list(VOCABS), idx)  # [B, F, D]
        ref = torch.stack([single.lookup(v, idx[:, k]) for k, v in enumerate(VOCABS)], dim=1)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert (out[idx == PAD] == 0).all()
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (ref * weights).sum().backward()
        g_fused, g_single = fused.weight.grad, single.weight.grad
        assert g_fused is not None and g_single is not None
        torch.testing.assert_close(g_fused.to_dense(), g_single.to_dense(), rtol=1e-6, atol=1e-6)


def test_lookup_many_names_an_unknown_vocabulary() -> None:
    with pytest.raises(KeyError, match="nope"):
        FeatureEmbedding(VOCABS, 4).lookup_many(["c0", "nope"], torch.zeros(3, 2, dtype=torch.long))


def test_ctr_model_forward_equals_the_plain_implementation() -> None:
    model = ctr_model()
    plain = PlainMMoE(model)
    batch = ctr_batch(96, seed=1)
    ours = model(batch)
    click, buy = plain(batch)
    torch.testing.assert_close(ours["click"], click, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["buy"], buy, rtol=1e-5, atol=1e-5)


def test_inference_path_equals_the_plain_implementation() -> None:
    # Without autograd in eval mode, the experts run one by one and the gates mix without an
    # [E, B, H] temporary (`Experts._each`, `_mix`): the outputs are the training path's.
    model = ctr_model().eval()
    plain = PlainMMoE(model).eval()
    batch = ctr_batch(96, seed=2)
    with torch.no_grad():
        ours = model(batch)
        click, buy = plain(batch)
    torch.testing.assert_close(ours["click"], click, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["buy"], buy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["omoe", "mmoe", "ple"])
def test_inference_path_equals_the_autograd_path(backbone: str) -> None:
    # PLE's second level feeds its experts one input each ([E, B, Din]); three expert layers.
    config = ModelConfig(backbone=backbone, embedding_dim=4, encoder_dim=None, numeric_input="raw",
                         expert_hidden=[12, 8, 6], num_experts=3, tower_hidden=[5], wide=False,
                         levels=2, task_experts=2, shared_experts=2)
    torch.manual_seed(0)
    model = build_model(ctr_spec(), config).eval()
    batch = ctr_batch(64, seed=3)
    with_grad = model(batch)
    with torch.no_grad():
        without = model(batch)
    assert with_grad.keys() == without.keys()
    for name in with_grad:
        torch.testing.assert_close(without[name], with_grad[name].detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes: the fused path
        autocast = model(batch)
    for name in with_grad:
        torch.testing.assert_close(autocast[name].float(), with_grad[name].detach(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("sparse", [False, True])
def test_training_steps_equal_the_plain_implementation(sparse: bool) -> None:
    """Fused AdamW (dense) or SparseAdam (sparse tables) against unfused Adam / a hand-written lazy Adam."""
    model = ctr_model(sparse=sparse)
    plain = PlainMMoE(model)
    train = TrainConfig(lr=1e-2, weight_decay=0.0, clip_norm=None)
    weighting = WEIGHTINGS.get("equal")([t.name for t in TASKS])
    optimizers, clip = build_optimizers(model, weighting, train, torch.device("cpu"))
    dense_plain = [p for name, p in plain.named_parameters() if not name.startswith("embeddings")]
    table_plain = [e.weight for e in plain.embeddings]
    reference = torch.optim.Adam(dense_plain + ([] if sparse else table_plain), lr=1e-2, foreach=False)
    lazy = LazyAdam(table_plain, lr=1e-2) if sparse else None
    for step in range(4):
        batch = ctr_batch(64, seed=10 + step)
        train_step(model, [batch], TASKS, weighting, optimizers, clip, None)
        reference.zero_grad()
        if lazy is not None:
            lazy.zero_grad()
        plain.loss(batch).backward()
        reference.step()
        if lazy is not None:
            lazy.step()
    ours, theirs = _embedding_of(model, plain)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    batch = ctr_batch(128, seed=99)
    out = model(batch)
    click, buy = plain(batch)
    torch.testing.assert_close(out["click"], click, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["buy"], buy, rtol=1e-4, atol=1e-4)


class LazyAdam:
    """Adam that updates (and decays the moments of) only the rows with a nonzero gradient.

    Like `torch.optim.SparseAdam`, eps is added to sqrt(v) before bias correction (the paper's
    eps-hat form), which matters here: embedding gradients are ~1e-6, near eps.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            g = p.grad.to_dense()
            rows = (g != 0).any(dim=1)
            m[rows] = b1 * m[rows] + (1 - b1) * g[rows]
            v[rows] = b2 * v[rows] + (1 - b2) * g[rows] ** 2
            step_size = self.lr * (1 - b2**self.t) ** 0.5 / (1 - b1**self.t)
            p[rows] -= step_size * m[rows] / (v[rows].sqrt() + self.eps)


def _graph_nodes(tensor: Tensor) -> set[str]:
    """Names of every autograd node behind `tensor`."""
    seen: set[str] = set()
    stack = [tensor.grad_fn]
    visited = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        seen.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


def test_experts_relu_in_place_records_no_copy_slices() -> None:
    """The in-place ReLU runs on the first matmul's own output, not on its per-expert view: on a
    view, autograd would record a CopySlices, whose backward allocates two more [B, E*H] buffers."""
    model = ctr_model()
    out = model(ctr_batch(32, seed=3))
    nodes = _graph_nodes(out["click"])
    assert "ReluBackward0" in nodes or "ThresholdBackward1" in nodes
    assert not {"CopySlices", "AsStridedBackward0"} & nodes, sorted(nodes)


def test_train_step_frees_the_previous_gradients_before_the_forward() -> None:
    """The previous step's gradients (a dense table's is table-sized) never coexist with the
    next forward pass's activations."""
    model = ctr_model()
    train = TrainConfig(lr=1e-2, weight_decay=0.0, clip_norm=None)
    weighting = WEIGHTINGS.get("equal")([t.name for t in TASKS])
    optimizers, clip = build_optimizers(model, weighting, train, torch.device("cpu"))
    held: list[int] = []
    model.register_forward_pre_hook(lambda module, args: held.append(
        sum(p.grad is not None for p in module.parameters())))
    for step in range(3):
        train_step(model, [ctr_batch(32, seed=step)], TASKS, weighting, optimizers, clip, None)
        assert model.embedding.weight.grad is not None  # the step's own gradients stay readable
    assert held == [0, 0, 0]
