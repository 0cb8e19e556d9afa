"""Models on tiny synthetic specs: every backbone x sequence pooling x task kind."""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mtlrec.config import ModelConfig
from mtlrec.data.batch import Batch
from mtlrec.data.spec import OOV, PAD, SOURCE_OF_KIND, FieldSpec, Group, InputSpec, TaskSpec
from mtlrec.errors import ConfigError
from mtlrec.models import (
    BACKBONES,
    MMoE,
    MultiTaskModel,
    PairHead,
    RecModel,
    Single,
    TaskIsolatedModel,
    build_model,
)
from mtlrec.models.embedding import FeatureEmbedding
from mtlrec.models.encoders import GroupEncoder
from mtlrec.training.losses import task_losses

POOLINGS = ["mean", "din", "transformer"]
SOURCES = ["interactions", "users", "items", "item_pairs"]

FIELDS = (
    FieldSpec("user_id", "user", "categorical", "user_id"),
    FieldSpec("age", "user", "numeric"),
    FieldSpec("tags", "user", "multi_categorical", "tag", length=4),
    FieldSpec("history", "user", "sequence", "item_id", length=6),
    FieldSpec("item_id", "item", "categorical", "item_id"),
    FieldSpec("category", "item", "categorical", "category"),
    FieldSpec("price", "item", "numeric"),
    FieldSpec("hour", "context", "categorical", "hour"),
    FieldSpec("distance", "context", "numeric"),
)
VOCABS = {"user_id": 30, "item_id": 40, "tag": 10, "category": 8, "hour": 24}
TASKS = (
    TaskSpec("click", "interaction", "binary", 1),
    TaskSpec("buy", "interaction", "binary", 1, parent="click"),
    TaskSpec("rating", "interaction", "regression", 1),
    TaskSpec("genre", "interaction", "multiclass", 3),
    TaskSpec("intent", "interaction", "multilabel", 4),
    TaskSpec("segment", "user", "multiclass", 3),
    TaskSpec("churn", "user", "binary", 1),
    TaskSpec("kind", "item", "multiclass", 4),
    TaskSpec("labels", "item", "multilabel", 5),
    TaskSpec("related", "item_pair", "multiclass", 3),
    TaskSpec("follows", "item_pair", "binary", 1, directed=True),
    TaskSpec("retrieval", "retrieval", "retrieval", 6, temperature=0.1),
)
SPEC = InputSpec(FIELDS, VOCABS, TASKS)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(embedding_dim=8, encoder_dim=8, encoder_hidden=[16], expert_hidden=[16],
                                   num_experts=3, shared_experts=2, task_experts=1, levels=2,
                                   tower_hidden=[8], head_hidden=[8], transformer_heads=2)
    base.update(overrides)
    return ModelConfig.model_validate(base)


# ---------------------------------------------------------------------------------------------
# Random batches for a spec


def _field(f: FieldSpec, rows: int, vocab_sizes: dict[str, int], g: torch.Generator) -> Tensor:
    if f.kind == "numeric":
        missing = (torch.rand(rows, generator=g) < 0.2).float()
        return torch.stack([torch.randn(rows, generator=g) * (1 - missing), missing], dim=1)  # [B, 2]
    n = vocab_sizes[f.vocab]
    if f.kind == "categorical":
        return torch.randint(OOV, n, (rows,), generator=g)  # [B]
    idx = torch.randint(OOV, n, (rows, f.length), generator=g)  # [B, L]
    lengths = torch.randint(0, f.length + 1, (rows,), generator=g)  # some rows are all padding
    return idx.masked_fill(torch.arange(f.length) >= lengths[:, None], PAD)


def _label(t: TaskSpec, rows: int, g: torch.Generator) -> Tensor:
    if t.type == "retrieval":  # log q of each row's item
        return torch.log(torch.rand(rows, generator=g) * 0.1 + 1e-3)
    if t.type == "binary":
        return torch.randint(0, 2, (rows,), generator=g).float()
    if t.type == "regression":
        return torch.randn(rows, generator=g)
    if t.type == "multiclass":
        return torch.randint(0, t.num_outputs, (rows,), generator=g)
    return torch.randint(0, 2, (rows, t.num_outputs), generator=g).float()


def random_batch(spec: InputSpec, source: str, rows: int = 32, seed: int = 0) -> Batch:
    """A batch of `source` with random features for every group it reads, labels and masks."""
    g = torch.Generator().manual_seed(seed)

    def group(name: Group) -> dict[str, Tensor]:
        return {f.name: _field(f, rows, spec.vocab_sizes, g) for f in spec.group(name)}

    batch = Batch(source)
    if source == "interactions":
        batch.user, batch.item, batch.context = group("user"), group("item"), group("context")
    elif source == "users":
        batch.user = group("user")
    elif source == "items":
        batch.item = group("item")
    else:
        batch.item, batch.item_b = group("item"), group("item")
    for t in spec.tasks:
        if SOURCE_OF_KIND[t.kind] == source:
            batch.labels[t.name] = _label(t, rows, g)
            batch.masks[t.name] = torch.rand(rows, generator=g) < 0.9
    for t in spec.tasks:
        if t.parent is not None and t.parent in batch.labels:
            batch.masks[t.name] = batch.labels[t.parent] > 0.5
    return batch


def masked_loss(spec: InputSpec, logits: dict[str, Tensor], batch: Batch) -> Tensor:
    """Sum over tasks of a masked loss by task type (what the trainer does, minus weighting)."""
    total = torch.zeros(())
    for name, out in logits.items():
        t, y, m = spec.task(name), batch.labels[name], batch.masks[name]
        if t.type == "retrieval":
            total = total + task_losses({name: out}, batch, [t])[name]
            continue
        if t.type == "multiclass":
            loss = F.cross_entropy(out, y, reduction="none")
        elif t.type == "regression":
            loss = (out - y) ** 2
        else:
            loss = F.binary_cross_entropy_with_logits(out, y, reduction="none")
            loss = loss.mean(-1) if t.type == "multilabel" else loss
        total = total + (loss * m).sum() / m.sum().clamp(min=1)
    return total


def expected_shape(t: TaskSpec, rows: int) -> tuple[int, ...]:
    if t.type == "retrieval":
        return (rows, rows)  # in-batch logits
    return (rows,) if t.type in ("binary", "regression") else (rows, t.num_outputs)


def _models_for(model: RecModel, source: str) -> list[MultiTaskModel]:
    if isinstance(model, TaskIsolatedModel):
        return [cast(MultiTaskModel, m) for t, m in model.models.items()
                if SOURCE_OF_KIND[SPEC.task(t).kind] == source]
    assert isinstance(model, MultiTaskModel)
    return [model]


def _encoders_read(m: MultiTaskModel, source: str) -> list[nn.Module]:
    readers = {"interactions": [m.user_encoder, m.item_encoder, m.context_encoder],
               "users": [m.user_encoder], "items": [m.item_encoder], "item_pairs": [m.item_encoder]}
    return [m.embedding] + [e for e in readers[source] if e is not None]


def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_backbone_pooling_and_task_kind(backbone: str, pooling: str, source: str) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(backbone=backbone, sequence_pooling=pooling))
    batch = random_batch(SPEC, source, rows=24)

    logits = model(batch)
    assert list(logits) == [t.name for t in SPEC.tasks if SOURCE_OF_KIND[t.kind] == source]
    for name, out in logits.items():
        assert out.shape == expected_shape(SPEC.task(name), 24), name
        assert torch.isfinite(out).all()

    loss = masked_loss(SPEC, logits, batch)
    loss.backward()
    for sub in _models_for(model, source):
        for module in _encoders_read(sub, source):
            assert _has_grad(module), f"no gradient reaches {type(module).__name__}"
    if isinstance(model, MultiTaskModel):
        shared = {id(p) for p in model.shared_parameters()}
        assert id(model.embedding.weight) in shared

    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    first = loss.item()
    for _ in range(40):  # embeddings start small (0.01): telling 24 random rows apart takes a few more steps
        opt.zero_grad()
        loss = masked_loss(SPEC, model(batch), batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_symmetric_pair_head_and_directed_pair_head() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config())
    batch = random_batch(SPEC, "item_pairs")
    swapped = dataclasses.replace(batch, item=batch.item_b, item_b=batch.item)
    ab, ba = model(batch), model(swapped)
    torch.testing.assert_close(ab["related"], ba["related"], rtol=0, atol=1e-6)
    assert not torch.allclose(ab["follows"], ba["follows"])

    head = PairHead(5, [7], TaskSpec("rel", "item_pair", "multiclass", 3))
    a, b = torch.randn(10, 5), torch.randn(10, 5)
    assert torch.equal(head(a, b), head(b, a))


def test_single_backbone_isolates_tasks() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(backbone="single"))
    assert isinstance(model, TaskIsolatedModel)
    assert not model.entire_space and model.shared_parameters() == []
    assert set(model.models) == {t.name for t in SPEC.tasks}

    logits = model(random_batch(SPEC, "interactions"))
    logits["click"].sum().backward()
    for name, sub in model.models.items():
        touched = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in sub.parameters())
        assert touched == (name == "click"), name

    # The isolated conditional task has no parent inside its own model.
    buy = model.models["buy"]
    assert isinstance(buy, MultiTaskModel) and buy.spec.task("buy").parent is None

    # A single backbone inside one MultiTaskModel still keeps the per-task networks apart.
    shared = MultiTaskModel(SPEC, tiny_config(backbone="single"))
    assert shared.entire_space
    shared(random_batch(SPEC, "interactions"))["rating"].sum().backward()
    assert isinstance(shared.backbone, Single)
    for name, net in shared.backbone.nets.items():
        assert _has_grad(net) == (name == "rating")


@pytest.mark.parametrize("backbone", ["omoe", "mmoe", "ple"])
def test_gate_weights_sum_to_one(backbone: str) -> None:
    torch.manual_seed(0)
    config = tiny_config(backbone=backbone)
    model = build_model(SPEC, config)
    model(random_batch(SPEC, "interactions", rows=16))
    gates = model.gate_weights
    assert list(gates) == [t.name for t in SPEC.tasks_of("interaction")]
    experts = config.shared_experts + config.task_experts if backbone == "ple" else config.num_experts
    for g in gates.values():
        assert g.shape == (16, experts) and not g.requires_grad
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(16))


def test_fused_mmoe_matches_naive_loop() -> None:
    torch.manual_seed(0)
    config = tiny_config(expert_hidden=[12, 6], num_experts=4)
    mmoe = MMoE(10, ["a", "b"], config)
    sizes = [10, 12, 6]
    naive = []
    for e in range(4):
        layers: list[nn.Module] = []
        for i in range(2):
            lin = nn.Linear(sizes[i], sizes[i + 1])
            w = mmoe.experts.weights[i]
            with torch.no_grad():
                lin.weight.copy_((w[:, e, :] if i == 0 else w[e]).T)
                lin.bias.copy_(mmoe.experts.biases[i][e])
            layers += [lin, nn.ReLU()]
        naive.append(nn.Sequential(*layers))
    x = torch.randn(32, 10)
    out = mmoe(x)
    for t in ("a", "b"):
        gate = torch.softmax(mmoe.gates[t](x), dim=-1)  # [B, E]
        ref = sum(gate[:, e:e + 1] * naive[e](x) for e in range(4))
        torch.testing.assert_close(out[t], ref, rtol=0, atol=1e-5)
    # Per-expert inputs [E, B, Din] (PLE's later levels) agree with the same loop.
    xs = torch.randn(4, 32, 10)
    per_expert = mmoe.experts(xs)
    for e in range(4):
        torch.testing.assert_close(per_expert[e], naive[e](xs[e]), rtol=0, atol=1e-5)


def test_transformer_pooling_handles_all_padding_rows() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(sequence_pooling="transformer"))
    batch = random_batch(SPEC, "interactions", rows=8)
    batch.user["history"][:3] = PAD
    for train in (True, False):
        model.train(train)
        model.zero_grad()
        logits = model(batch)
        assert all(torch.isfinite(v).all() for v in logits.values())
        if train:
            masked_loss(SPEC, logits, batch).backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    users = random_batch(SPEC, "users", rows=4)
    users.user["history"][:] = PAD
    assert all(torch.isfinite(v).all() for v in model(users).values())


@pytest.mark.parametrize("backbone", ["mmoe", "single"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_encode_then_score_equals_forward(backbone: str, pooling: str) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(backbone=backbone, sequence_pooling=pooling)).eval()
    assert model.target_aware == (pooling != "mean")
    batch = random_batch(SPEC, "interactions", rows=12)
    target = batch.item["item_id"]
    with torch.no_grad():
        u = model.encode_users(batch.user, target)
        v = model.encode_items(batch.item)
        assert u.shape == (12, model.user_dim) and v.shape == (12, model.item_dim)
        scored = model.score_interactions(u, v, batch.context)
        direct = model(batch)
        assert list(scored) == list(direct)
        for name in direct:
            torch.testing.assert_close(scored[name], direct[name])
        # Target-free user vectors (for a first pass over a catalogue) and missing context still score.
        rough = model.score_interactions(model.encode_users(batch.user), v, None)
        assert all(torch.isfinite(x).all() for x in rough.values())


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_context_only_table(backbone: str) -> None:
    """Census-style data: no user or item ids, interaction tasks on context features alone."""
    fields = (FieldSpec("education", "context", "categorical", "education"),
              FieldSpec("age", "context", "numeric"),
              FieldSpec("wage", "context", "numeric"))
    tasks = (TaskSpec("income", "interaction", "binary", 1), TaskSpec("married", "interaction", "binary", 1))
    spec = InputSpec(fields, {"education": 17}, tasks)
    torch.manual_seed(0)
    model = build_model(spec, tiny_config(backbone=backbone))
    batch = random_batch(spec, "interactions", rows=20)
    logits = model(batch)
    assert {k: v.shape for k, v in logits.items()} == {"income": (20,), "married": (20,)}
    masked_loss(spec, logits, batch).backward()
    assert model.user_dim == 0 and model.item_dim == 0
    assert model.encode_users({}, torch.zeros(20, dtype=torch.long)).shape == (20, 0)
    assert model(random_batch(spec, "users")) == {}


def test_no_context_fields_and_item_only_tasks() -> None:
    tasks = (TaskSpec("click", "interaction", "binary", 1), TaskSpec("kind", "item", "multiclass", 4))
    spec = InputSpec(FIELDS[:7], {k: VOCABS[k] for k in ("user_id", "item_id", "tag", "category")}, tasks)
    torch.manual_seed(0)
    model = build_model(spec, tiny_config())
    assert isinstance(model, MultiTaskModel) and model.context_encoder is None
    assert model(random_batch(spec, "interactions"))["click"].shape == (32,)
    assert model(random_batch(spec, "items"))["kind"].shape == (32, 4)


def test_initialisation_is_deterministic() -> None:
    def weights(seed: int, backbone: str) -> dict[str, Tensor]:
        torch.manual_seed(seed)
        return build_model(SPEC, tiny_config(backbone=backbone, sequence_pooling="transformer")).state_dict()

    for backbone in ("ple", "single"):
        a, b, c = weights(1, backbone), weights(1, backbone), weights(2, backbone)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sparse_embedding_parameters() -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(), sparse=True)
    assert isinstance(model, MultiTaskModel)
    assert model.wide is not None
    assert model.sparse_parameters() == [model.embedding.weight, model.wide.weight]
    dense = model.dense_parameters()
    assert all(p is not model.embedding.weight and p is not model.wide.weight for p in dense)
    assert len(dense) + 2 == len(list(model.parameters()))
    batch = random_batch(SPEC, "interactions")
    masked_loss(SPEC, model(batch), batch).backward()
    assert model.embedding.weight.grad is not None and model.embedding.weight.grad.is_sparse
    torch.optim.SparseAdam(model.sparse_parameters()).step()
    torch.optim.Adam(dense).step()
    assert build_model(SPEC, tiny_config()).sparse_parameters() == []
    isolated = build_model(SPEC, tiny_config(backbone="single"), sparse=True)
    # One table per task's model, plus a wide table in each interaction task's model.
    assert len(isolated.sparse_parameters()) == len(SPEC.tasks) + len(SPEC.tasks_of("interaction"))


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_shared_parameters_are_those_reached_by_several_tasks(backbone: str) -> None:
    torch.manual_seed(0)
    names = ["a", "b", "c"]
    net = BACKBONES.get(backbone)(6, names, tiny_config(levels=3))
    out = net(torch.randn(5, 6))
    # Count per element: one tensor may hold several tasks' private experts in disjoint slices.
    reached = {id(p): torch.zeros_like(p) for p in net.parameters()}
    for t in names:
        net.zero_grad()
        out[t].pow(2).sum().backward(retain_graph=True)
        for p in net.parameters():
            if p.grad is not None:
                reached[id(p)] += (p.grad != 0).float()
    assert {id(p) for p in net.shared_parameters()} == {k for k, n in reached.items() if bool((n > 1).any())}


def test_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'mmo'"):
        build_model(SPEC, tiny_config(backbone="mmo"))
    with pytest.raises(ConfigError, match="transformer_heads"):
        build_model(SPEC, tiny_config(sequence_pooling="transformer", transformer_heads=3))
    with pytest.raises(ConfigError, match="expert_hidden"):
        build_model(SPEC, tiny_config(expert_hidden=[]))
    no_users = InputSpec(FIELDS[4:], VOCABS, (TaskSpec("segment", "user", "multiclass", 3),))
    with pytest.raises(ConfigError, match="no user fields"):
        build_model(no_users, tiny_config())
    model = build_model(SPEC, tiny_config())
    batch = random_batch(SPEC, "users")
    del batch.user["age"]
    with pytest.raises(KeyError, match="age"):
        model(batch)
    with pytest.raises(ValueError, match="unknown batch source"):
        model(Batch("clicks"))


@pytest.mark.parametrize("backbone", ["mmoe", "single"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_retrieval_vectors_and_in_batch_logits(backbone: str, pooling: str) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC, tiny_config(backbone=backbone, sequence_pooling=pooling))
    batch = random_batch(SPEC, "interactions", rows=10)
    assert model.retrieval_dim == 6
    u, v = model.retrieval_users(batch.user), model.retrieval_items(batch.item)
    assert u.shape == (10, 6) and v.shape == (10, 6)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(10))
    # Training mode: the in-batch logits are u_r(i) . v_r(j) / temperature, the query free of any target.
    torch.testing.assert_close(model(batch)["retrieval"], u @ v.T / 0.1)
    # Eval mode (prediction, evaluation): no [B, B] output.
    assert "retrieval" not in model.eval()(batch)
    if isinstance(model, TaskIsolatedModel):
        # The isolated retrieval model is a two-tower model of its own.
        model.train()
        model(batch)["retrieval"].sum().backward()
        for name, sub in model.models.items():
            assert any(p.grad is not None for p in sub.parameters()) == (name == "retrieval"), name


def test_retrieval_errors() -> None:
    plain = build_model(InputSpec(FIELDS, VOCABS, TASKS[:1]), tiny_config())
    assert plain.retrieval_dim == 0
    with pytest.raises(ValueError, match="no retrieval task"):
        plain.retrieval_users(random_batch(SPEC, "users").user)
    two = InputSpec(FIELDS, VOCABS, (TASKS[-1], dataclasses.replace(TASKS[-1], name="again")))
    with pytest.raises(ConfigError, match="at most one"):
        build_model(two, tiny_config())
    no_items = InputSpec(FIELDS[:4], {"user_id": 30, "item_id": 40, "tag": 10}, (TASKS[-1],))
    with pytest.raises(ConfigError, match="no item fields"):
        build_model(no_items, tiny_config())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 6), min_size=5, max_size=5), min_size=1, max_size=6))
def test_pooled_embedding_is_the_mean_over_non_padding(rows: list[list[int]]) -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding({"a": 3, "b": 7}, 4)
    idx = torch.tensor(rows)
    pooled = emb.pooled("b", idx)
    table = emb.weight[3:10]
    for r, row in enumerate(rows):
        kept = [i for i in row if i != PAD]
        want = table[kept].mean(0) if kept else torch.zeros(4)
        torch.testing.assert_close(pooled[r], want)
    assert torch.equal(emb.lookup("b", torch.zeros(2, dtype=torch.long)), torch.zeros(2, 4))


def test_group_encoder_shapes() -> None:
    torch.manual_seed(0)
    config = tiny_config(sequence_pooling="din")
    enc = GroupEncoder(SPEC.group("user"), config, target_vocab="item_id")
    emb = FeatureEmbedding(VOCABS, config.embedding_dim)
    batch = random_batch(SPEC, "users", rows=7)
    assert enc.target_aware
    with_target = enc(batch.user, emb, torch.randint(1, 40, (7,)))
    without = enc(batch.user, emb)
    assert with_target.shape == without.shape == (7, config.encoder_dim)


@pytest.mark.parametrize("backbone", ["ple", "single"])
def test_no_tensor_is_pinned_to_the_cpu(backbone: str) -> None:
    """Run on the meta device: any tensor created on the CPU inside forward would fail to mix."""
    model = build_model(SPEC, tiny_config(backbone=backbone, sequence_pooling="transformer")).to("meta")
    for source in SOURCES:
        out = model(random_batch(SPEC, source, rows=8).to("meta"))
        assert all(v.device.type == "meta" for v in out.values())
    batch = random_batch(SPEC, "interactions", rows=8).to("meta")
    scored = model.score_interactions(model.encode_users(batch.user), model.encode_items(batch.item), None)
    assert set(scored) == {t.name for t in SPEC.tasks_of("interaction")}
