"""Loss weighting strategies on tiny two- and three-task models."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlrec.errors import ConfigError
from mtlrec.training.weighting import WEIGHTINGS, GradNorm, Weighting, make_weighting

TASKS = ("a", "b")


class Tiny(nn.Module):
    """A shared embedding (optionally sparse) and a shared layer, then one head per task."""

    def __init__(self, tasks: tuple[str, ...] = TASKS, sparse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(20, 4, sparse=sparse)
        self.shared = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def shared_parameters(self) -> list[Tensor]:
        return [self.embedding.weight, *self.shared.parameters()]

    def losses(self, tasks: tuple[str, ...] | None = None, seed: int = 0) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 20, (16,), generator=gen)
        h = torch.relu(self.shared(self.embedding(ids)))                    # [B, 8]
        out = {}
        for i, t in enumerate(tasks or tuple(self.heads)):
            target = torch.randn(16, generator=gen) * (i + 1)
            out[t] = (self.heads[t](h)[:, 0] - target).square().mean()
        return out


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _build(name: str, tasks: tuple[str, ...] = TASKS) -> Weighting:
    return make_weighting(name, tasks)


def _gradnorm(tasks: tuple[str, ...], **params: float) -> GradNorm:
    weighting = make_weighting("gradnorm", tasks, params=params)
    assert isinstance(weighting, GradNorm)
    return weighting


# ---------------------------------------------------------------- every strategy


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_strategy_backward_gives_finite_gradients(name: str, sparse: bool) -> None:
    model = Tiny(sparse=sparse)
    weighting = _build(name)
    weights = weighting.backward(model.losses(), model.shared_parameters())
    assert set(weights) == set(TASKS)
    assert all(math.isfinite(w) and w >= 0 for w in weights.values())
    for p in [*model.shared_parameters(), *model.heads.parameters()]:
        assert p.grad is not None
        dense = p.grad.to_dense() if p.grad.is_sparse else p.grad
        assert torch.isfinite(dense).all() and dense.abs().sum() > 0
    assert model.embedding.weight.grad is not None
    assert model.embedding.weight.grad.is_sparse == sparse
    # The optimizers the trainer uses accept the gradients.
    sparse_params = [model.embedding.weight] if sparse else []
    dense_params = [p for p in model.parameters() if all(p is not q for q in sparse_params)]
    torch.optim.AdamW(dense_params + list(weighting.parameters()), lr=1e-2).step()
    if sparse:
        torch.optim.SparseAdam(sparse_params, lr=1e-2).step()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_strategy_handles_a_subset_of_tasks(name: str, sparse: bool) -> None:
    tasks = ("a", "b", "c")
    model = Tiny(tasks, sparse=sparse)
    weighting = _build(name, tasks)
    weighting.on_epoch_end({"a": 1.0, "b": 2.0, "c": 3.0})
    weighting.on_epoch_end({"a": 0.5, "c": 2.0})
    for subset in [("b",), ("a", "c"), ("c", "a", "b")]:
        for p in model.parameters():
            p.grad = None
        weights = weighting.backward(model.losses(subset), model.shared_parameters())
        assert set(weights) == set(subset)
        assert all(math.isfinite(w) for w in weights.values())
        for t in tasks:
            head_grad = model.heads[t].weight.grad
            assert (head_grad is not None) == (t in subset)
        shared_grad = model.shared.weight.grad
        assert shared_grad is not None and torch.isfinite(shared_grad).all()
    assert weighting.backward({}, model.shared_parameters()) == {}


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_every_strategy_state_dict_resumes_exactly(name: str) -> None:
    tasks = ("a", "b", "c")
    model = Tiny(tasks)
    weighting = _build(name, tasks)
    for step in range(3):
        weighting.backward(model.losses(seed=step), model.shared_parameters())
        weighting.on_epoch_end({t: 1.0 + step + i for i, t in enumerate(tasks)})
    restored = _build(name, tasks)
    restored.load_state_dict(weighting.state_dict())
    results = []
    for w in (weighting, restored):
        for p in model.parameters():
            p.grad = None
        weights = w.backward(model.losses(seed=9), model.shared_parameters())
        results.append((weights, _grads(model)))
    assert results[0][0] == results[1][0]
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad)


@pytest.mark.parametrize("name", ["equal", "pcgrad", "gradnorm", "uncertainty"])
def test_backward_accumulates_like_loss_backward(name: str) -> None:
    model = Tiny()
    weighting = _build(name)
    weighting.backward(model.losses(), model.shared_parameters())
    once = _grads(model)
    if name == "gradnorm":                                       # weights change after each step
        weighting = _build(name)
    weighting.backward(model.losses(), model.shared_parameters())
    twice = _grads(model)
    for key, grad in once.items():
        torch.testing.assert_close(twice[key], 2 * grad)


def test_registry_and_parameter_errors() -> None:
    assert set(WEIGHTINGS.names()) >= {"equal", "fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"}
    with pytest.raises(ConfigError, match="unknown weighting 'gradnrom'"):
        make_weighting("gradnrom", TASKS)
    with pytest.raises(ConfigError, match="has no parameter 'tau'; it accepts \\['T'\\]"):
        make_weighting("dwa", TASKS, params={"tau": 2.0})
    with pytest.raises(ConfigError, match="task 'z'"):
        make_weighting("fixed", TASKS, {"z": 1.0})
    with pytest.raises(ConfigError, match="seed"):
        make_weighting("pcgrad", TASKS, params={"seed": 0.5})
    model = Tiny()
    with pytest.raises(ValueError, match="got a loss for 'zz'"):
        _build("equal").backward({"zz": model.losses()["a"]}, model.shared_parameters())


# ---------------------------------------------------------------- per strategy


def test_equal_equals_sum_of_losses_backward() -> None:
    model = Tiny()
    torch.stack(list(model.losses().values())).sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    assert _build("equal").backward(model.losses(), model.shared_parameters()) == {"a": 1.0, "b": 1.0}
    for key, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[key])


def test_fixed_uses_config_weights() -> None:
    model = Tiny()
    losses = model.losses()
    (0.3 * losses["a"] + 2.0 * losses["b"]).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    weighting = make_weighting("fixed", TASKS, {"a": 0.3, "b": 2.0})
    assert weighting.backward(model.losses(), model.shared_parameters()) == {"a": 0.3, "b": 2.0}
    for key, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[key])


def test_uncertainty_learns_log_variances() -> None:
    weighting = make_weighting("uncertainty", TASKS)
    params = list(weighting.parameters())
    assert len(params) == 1 and params[0].shape == (2,)
    with torch.no_grad():
        params[0].copy_(torch.tensor([0.5, -1.0]))
    x = torch.ones(3, requires_grad=True)
    losses = {"a": (x * 2).sum(), "b": (x * 3).sum()}                       # L_a = 6, L_b = 9
    weights = weighting.backward(losses, [])
    assert weights == pytest.approx({"a": math.exp(-0.5), "b": math.exp(1.0)})
    assert params[0].grad is not None
    # d/ds_i [exp(-s_i) L_i + s_i] = 1 - exp(-s_i) L_i
    torch.testing.assert_close(params[0].grad, torch.tensor([1 - math.exp(-0.5) * 6, 1 - math.exp(1.0) * 9]))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.full((3,), 2 * math.exp(-0.5) + 3 * math.exp(1.0)))


def test_dwa_is_equal_for_two_epochs_then_follows_the_formula() -> None:
    tasks = ("a", "b", "c")
    weighting = make_weighting("dwa", tasks, params={"T": 2.0})
    x = torch.ones(1, requires_grad=True)
    losses = {t: x.sum() * (i + 1) for i, t in enumerate(tasks)}
    assert weighting.backward(losses, [x]) == {t: 1.0 for t in tasks}
    weighting.on_epoch_end({"a": 1.0, "b": 2.0, "c": 4.0, "total": 7.0})
    assert weighting.backward({t: x.sum() for t in tasks}, [x]) == {t: 1.0 for t in tasks}
    weighting.on_epoch_end({"a": 0.5, "b": 2.0, "c": 5.0})
    ratio = torch.tensor([0.5 / 1.0, 2.0 / 2.0, 5.0 / 4.0], dtype=torch.float64)
    expected = (3 * torch.exp(ratio / 2) / torch.exp(ratio / 2).sum()).tolist()
    weights = weighting.backward({t: x.sum() for t in tasks}, [x])
    assert [weights[t] for t in tasks] == pytest.approx(expected)
    assert sum(weights.values()) == pytest.approx(3.0)
    assert weights["a"] < weights["b"] < weights["c"]                        # slower tasks weigh more
    # A task missing from an epoch gets the neutral ratio 1.
    weighting.on_epoch_end({"a": 0.25, "b": 1.0})
    weights = weighting.backward({t: x.sum() for t in tasks}, [x])
    ratio = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    expected = (3 * torch.softmax(ratio / 2, dim=0)).tolist()
    assert [weights[t] for t in tasks] == pytest.approx(expected)


def test_gradnorm_update_follows_the_formula() -> None:
    weighting = make_weighting("gradnorm", TASKS, params={"alpha": 1.5, "lr": 0.1})
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    # Gradient norms on the shared parameter: ||grad L_a|| = 3, ||grad L_b|| = 1 (for any w).
    def losses(scale_b: float) -> dict[str, Tensor]:
        return {"a": 3.0 * w[0] + 10.0, "b": scale_b * (w[1] + 4.0)}

    first = weighting.backward(losses(1.0), [w])                 # L(0) = (13, 6), r = 1
    assert first == {"a": 1.0, "b": 1.0}
    # G = (3, 1), target = mean(G) = 2: w_a -= lr * 3, w_b += lr * 1; then rescaled to sum 2.
    raw = torch.tensor([1.0 - 0.1 * 3, 1.0 + 0.1 * 1])
    expected = raw * 2 / raw.sum()
    second = weighting.backward(losses(1.0), [w])
    assert [second["a"], second["b"]] == pytest.approx(expected.tolist())
    assert w.grad is not None


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gradnorm_weights_stay_positive_and_sum_to_task_count(sparse: bool) -> None:
    tasks = ("a", "b", "c")
    model = Tiny(tasks, sparse=sparse)
    weighting = _gradnorm(tasks, lr=0.5)
    subsets = [tasks, ("a", "b"), ("c",), tasks, ("b", "c")] * 4
    for step, subset in enumerate(subsets):
        losses = model.losses(subset, seed=step)
        losses = {t: loss * (100.0 if t == "c" else 1.0) for t, loss in losses.items()}
        weighting.backward(losses, model.shared_parameters())
        all_weights = weighting.task_weight
        assert torch.all(all_weights > 0)
        assert float(all_weights.sum()) == pytest.approx(3.0, rel=1e-5)
    # The task with the largest gradients is weighted down.
    assert float(weighting.task_weight[2]) < 1.0


def test_gradnorm_leaves_absent_tasks_weights_alone() -> None:
    tasks = ("a", "b", "c")
    model = Tiny(tasks)
    weighting = _gradnorm(tasks, lr=0.5)
    weighting.backward(model.losses(tasks), model.shared_parameters())
    weighting.backward(model.losses(tasks, seed=1), model.shared_parameters())
    before = weighting.task_weight.clone()
    weighting.backward(model.losses(("a", "b"), seed=2), model.shared_parameters())
    assert float(weighting.task_weight[2]) == pytest.approx(float(before[2]))
    assert not torch.equal(weighting.task_weight[:2], before[:2])
    # A task first seen late takes its first loss as L(0).
    late = _gradnorm(tasks)
    late.backward(model.losses(("a",)), model.shared_parameters())
    assert torch.isnan(late.initial_loss[1:]).all()
    late.backward(model.losses(("a", "b")), model.shared_parameters())
    assert torch.isfinite(late.initial_loss[:2]).all()


def _linear_losses(w: nn.Parameter, g: list[list[float]]) -> dict[str, Tensor]:
    """Losses whose gradients on `w` are exactly the rows of g."""
    return {f"t{i}": torch.tensor(row) @ w for i, row in enumerate(g)}


def test_pcgrad_projects_conflicting_gradients() -> None:
    w = nn.Parameter(torch.zeros(3))
    g1, g2 = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-1.0, 1.0, 0.0])     # g1 . g2 = -1 < 0
    weighting = make_weighting("pcgrad", ("t0", "t1"))
    assert weighting.backward(_linear_losses(w, [g1.tolist(), g2.tolist()]), [w]) == {"t0": 1.0, "t1": 1.0}
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert float(p1 @ g2) == pytest.approx(0.0) and float(p2 @ g1) == pytest.approx(0.0)
    assert w.grad is not None
    torch.testing.assert_close(w.grad, p1 + p2)


def test_pcgrad_opposite_gradients_cancel_and_identical_ones_add() -> None:
    w = nn.Parameter(torch.zeros(2))
    weighting = make_weighting("pcgrad", ("t0", "t1"))
    weighting.backward(_linear_losses(w, [[1.0, 2.0], [-1.0, -2.0]]), [w])
    assert w.grad is not None
    torch.testing.assert_close(w.grad, torch.zeros(2))
    w.grad = None
    weighting.backward(_linear_losses(w, [[1.0, 2.0], [1.0, 2.0]]), [w])
    torch.testing.assert_close(w.grad, torch.tensor([2.0, 4.0]))
    w.grad = None
    weighting.backward(_linear_losses(w, [[1.0, 0.0], [1.0, 1.0]]), [w])     # no conflict: plain sum
    torch.testing.assert_close(w.grad, torch.tensor([2.0, 1.0]))


def test_pcgrad_task_specific_parameters_get_the_plain_sum() -> None:
    model = Tiny()
    torch.stack(list(model.losses().values())).sum().backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    make_weighting("pcgrad", TASKS).backward(model.losses(), model.shared_parameters())
    got = _grads(model)
    for key, grad in expected.items():
        if key.startswith("heads."):
            torch.testing.assert_close(got[key], grad)


def test_pcgrad_is_deterministic_for_a_seed() -> None:
    g = [[1.0, 0.0, -1.0], [-1.0, 1.0, 0.5], [0.2, -1.0, 1.0]]
    grads = []
    for _ in range(2):
        w = nn.Parameter(torch.zeros(3))
        weighting = make_weighting("pcgrad", ("t0", "t1", "t2"), params={"seed": 3})
        for _ in range(4):
            weighting.backward(_linear_losses(w, g), [w])
        assert w.grad is not None
        grads.append(w.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_pcgrad_leaves_parameters_no_task_reaches_alone() -> None:
    w, unused = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    make_weighting("pcgrad", ("t0", "t1")).backward(_linear_losses(w, [[1.0, 0.0], [0.0, 1.0]]), [w, unused])
    assert unused.grad is None


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(1e-6, 1e6), min_size=3, max_size=3), min_size=0, max_size=5),
       st.floats(0.05, 20.0))
def test_dwa_weights_are_finite_and_sum_to_task_count(history: list[list[float]], temperature: float) -> None:
    tasks = ("a", "b", "c")
    weighting = make_weighting("dwa", tasks, params={"T": temperature})
    for epoch in history:
        weighting.on_epoch_end(dict(zip(tasks, epoch, strict=True)))
    x = torch.ones(1, requires_grad=True)
    weights = weighting.backward({t: x.sum() for t in tasks}, [x])
    assert all(math.isfinite(v) and v >= 0 for v in weights.values())
    assert sum(weights.values()) == pytest.approx(3.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=2, max_size=2), st.integers(0, 1000))
def test_gradnorm_and_uncertainty_weights_are_finite(scales: list[float], seed: int) -> None:
    model = Tiny()
    for name in ("gradnorm", "uncertainty", "pcgrad"):
        weighting = _build(name)
        for step in range(3):
            losses = {t: loss * s for (t, loss), s in zip(model.losses(seed=seed + step).items(), scales,
                                                          strict=True)}
            weights = weighting.backward(losses, model.shared_parameters())
            assert all(math.isfinite(v) for v in weights.values())
        shared_grad = model.shared.weight.grad
        assert shared_grad is not None and torch.isfinite(shared_grad).all()
