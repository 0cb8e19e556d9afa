"""The HTTP API: every endpoint, every security rule, fuzzing from the OpenAPI schema, integrity checks."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtlrec
from mtlrec.data.synthetic import make_world
from mtlrec.errors import ArtifactError, ConfigError
from mtlrec.serve import serve_command
from mtlrec.serve.app import create_app, create_app_from_env
from mtlrec.serve.integrity import MANIFEST_FILE, verify_manifest, write_manifest
from mtlrec.serve.openapi import openapi_text
from mtlrec.serve.security import AuthFailureTracker, TokenBucketLimiter
from mtlrec.serve.settings import ServeSettings

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = ["train.epochs=1", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]"]
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def world_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("serve")
    world = make_world(n_users=80, n_items=40, impressions_per_user=15, n_pairs=200, seed=3)
    config = world.write(root / "world", retrieval=True)
    mtlrec.train(config, root / "run", FAST)
    return root / "world", root / "run"


@pytest.fixture(scope="module")
def run_dir(world_run: tuple[Path, Path]) -> Path:
    return world_run[1]


@pytest.fixture(scope="module")
def predictor(run_dir: Path) -> mtlrec.Predictor:
    return mtlrec.Predictor.load(run_dir)


@pytest.fixture
def make_client(predictor: mtlrec.Predictor) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a TestClient of an app accepting KEY and OTHER_KEY."""
    clients: list[TestClient] = []

    def make(**fields: Any) -> TestClient:
        client = TestClient(create_app(predictor, ServeSettings.from_keys([KEY, OTHER_KEY], **fields)),
                            raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def user_ids(predictor: mtlrec.Predictor) -> list[str]:
    return [str(u) for u in predictor.schema.user_ids()]


def item_ids(predictor: mtlrec.Predictor) -> list[str]:
    return [str(i) for i in predictor.schema.item_ids()]


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_healthz_needs_no_key(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_info(client: TestClient) -> None:
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["users"] == 80 and info["items"] == 40 and info["backbone"] == "ple"
    assert {t["name"]: t["kind"] for t in info["tasks"]} == {
        "click": "interaction", "like": "interaction", "purchase": "interaction", "segment": "user",
        "category": "item", "tags": "item", "relation": "item_pair", "retrieval": "retrieval"}
    assert info["version"] == mtlrec.__version__ and info["auth"] == "api_key"
    assert info["retrieval_candidates"] == 500  # the run's recommend.candidates
    assert info["context_features"] == ["hour", "device"]


def test_recommend_known_user(client: TestClient, predictor: mtlrec.Predictor) -> None:
    user = user_ids(predictor)[1]
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": user, "k": 5}).json()
    assert body["cold_start"] is False and body["strategy"] == "model"
    items = body["items"]
    assert len(items) == 5
    assert all(set(i["probabilities"]) == {"click", "like", "purchase"} for i in items)
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    seen = set(predictor.schema.item_ids()[predictor.state.seen(int(predictor.schema.user_rows([user])[0]))])
    assert not seen & {i["item_id"] for i in items}
    expected = predictor.recommend(user, k=5)  # the small catalogue is ranked whole: the library's answer
    assert [i["item_id"] for i in items] == list(expected["item_id"])
    np.testing.assert_allclose([i["probabilities"]["purchase"] for i in items], expected["purchase"], rtol=1e-5)


def test_recommend_can_include_seen_items(client: TestClient, predictor: mtlrec.Predictor) -> None:
    user = user_ids(predictor)[1]
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": user, "k": 40, "exclude_seen": False}).json()
    assert len(body["items"]) == 40 and body["candidates_ranked"] == 40


def test_recommend_unknown_user_is_cold_start(client: TestClient, predictor: mtlrec.Predictor) -> None:
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": "nobody", "k": 3}).json()
    assert body["cold_start"] is True and body["strategy"] == "popularity"
    popularity = predictor.state.popularity.numpy()
    assert [i["score"] for i in body["items"]] == sorted(popularity, reverse=True)[:3]
    assert all("probabilities" not in i for i in body["items"])


def test_recommend_candidates_filter(client: TestClient, predictor: mtlrec.Predictor) -> None:
    candidates = item_ids(predictor)[:6]
    body = client.post("/v1/recommend", headers=AUTH, json={
        "user_id": user_ids(predictor)[2], "k": 10, "exclude_seen": False,
        "candidates": [*candidates, "not-an-item"]}).json()
    assert sorted(i["item_id"] for i in body["items"]) == sorted(candidates)


def test_recommend_category_filters(make_client: Callable[..., TestClient], predictor: mtlrec.Predictor,
                                    world_run: tuple[Path, Path]) -> None:
    brands = pd.read_parquet(world_run[0] / "items.parquet").set_index("item_id")["brand"]
    chosen = sorted(brands.unique())[:3]
    client = make_client(category_feature="brand")
    user = user_ids(predictor)[3]
    body = client.post("/v1/recommend", headers=AUTH, json={
        "user_id": user, "k": 40, "exclude_seen": False, "include_categories": [*chosen, "no-such-brand"]}).json()
    assert body["items"] and {brands[i["item_id"]] for i in body["items"]} <= set(chosen)
    assert len(body["items"]) == int(brands.isin(chosen).sum())
    body = client.post("/v1/recommend", headers=AUTH, json={
        "user_id": user, "k": 40, "exclude_seen": False, "exclude_categories": chosen}).json()
    assert not {brands[i["item_id"]] for i in body["items"]} & set(chosen)
    assert len(body["items"]) == int((~brands.isin(chosen)).sum())
    cold = client.post("/v1/recommend", headers=AUTH, json={"user_id": "nobody", "include_categories": chosen[:1]})
    assert {brands[i["item_id"]] for i in cold.json()["items"]} == {chosen[0]}


def test_category_filter_without_a_category_feature_is_422(client: TestClient, predictor: mtlrec.Predictor) -> None:
    response = client.post("/v1/recommend", headers=AUTH, json={"user_id": user_ids(predictor)[0],
                                                                "exclude_categories": ["x"]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["field"] == "body.exclude_categories" and "MTLREC_CATEGORY_FEATURE" in error["message"]


def test_unknown_category_feature_refuses_to_start(predictor: mtlrec.Predictor) -> None:
    with pytest.raises(ConfigError, match="'price', which is not a categorical item feature"):
        create_app(predictor, ServeSettings.from_keys([KEY], category_feature="price"))


def _retrieval_order(predictor: mtlrec.Predictor, user_row: int) -> torch.Tensor:
    """Every item row by the user's retrieval score, best first (brute force)."""
    with torch.no_grad():
        u = predictor.model.retrieval_users({k: v[user_row:user_row + 1] for k, v in predictor.state.users.items()})
        scores = (u @ predictor.model.retrieval_items(predictor.state.items).T)[0]
    return torch.argsort(scores, descending=True)


def test_two_stage_recommend_ranks_the_retrieved_items(make_client: Callable[..., TestClient],
                                                       predictor: mtlrec.Predictor) -> None:
    """The heads rank exactly the N items of largest retrieval score among the allowed ones."""
    client = make_client(retrieval_candidates=8)
    assert client.get("/v1/model", headers=AUTH).json()["retrieval_candidates"] == 8
    user = user_ids(predictor)[4]
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": user, "k": 5}).json()
    assert body["candidates_ranked"] == 8 and body["two_stage"] is True and len(body["items"]) == 5
    row = int(predictor.schema.user_rows([user])[0])
    seen = set(predictor.state.seen(row).tolist())
    retrieved = [r for r in _retrieval_order(predictor, row).tolist() if r not in seen][:8]
    names = predictor.schema.item_ids()
    assert {i["item_id"] for i in body["items"]} <= set(names[retrieved])
    fused, _ = predictor.recommender.score(torch.tensor([row]), torch.tensor(retrieved))
    best = torch.topk(fused[0], 5).indices.numpy()
    assert [i["item_id"] for i in body["items"]] == list(names[np.asarray(retrieved)[best]])
    # The run's own setting is two-stage too, with 500 candidates: more than the 40 items, so exact.
    whole = make_client().post("/v1/recommend", headers=AUTH, json={"user_id": user, "k": 5}).json()
    assert whole["two_stage"] is False and whole["candidates_ranked"] == 40 - len(seen)


def test_two_stage_recommend_applies_filters_in_retrieval(make_client: Callable[..., TestClient],
                                                          predictor: mtlrec.Predictor,
                                                          world_run: tuple[Path, Path]) -> None:
    """Candidates, categories and seen items restrict what retrieval may return: all N are eligible."""
    brands = pd.read_parquet(world_run[0] / "items.parquet").set_index("item_id")["brand"]
    client = make_client(retrieval_candidates=6, category_feature="brand")
    user = user_ids(predictor)[5]
    row = int(predictor.schema.user_rows([user])[0])
    names = predictor.schema.item_ids()
    seen = set(names[predictor.state.seen(row)])
    excluded = sorted(brands.unique())[:2]
    candidates = item_ids(predictor)[:30]
    body = client.post("/v1/recommend", headers=AUTH, json={
        "user_id": user, "k": 6, "candidates": candidates, "exclude_categories": excluded}).json()
    eligible = [i for i in candidates if i not in seen and brands[i] not in excluded]
    assert len(eligible) > 6 and body["two_stage"] is True and body["candidates_ranked"] == 6
    returned = [i["item_id"] for i in body["items"]]
    assert len(returned) == 6 and set(returned) <= set(eligible)
    order = [names[r] for r in _retrieval_order(predictor, row).tolist()]
    assert set(returned) == set([i for i in order if i in eligible][:6])  # k = N: the retrieved set itself
    # Without excluding seen items they may come back; an empty filter result is an empty answer.
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": user, "k": 40, "exclude_seen": False,
                                                            "include_categories": ["no-such-brand"]}).json()
    assert body["items"] == [] and body["candidates_ranked"] == 0


def test_cold_start_from_request_features(make_client: Callable[..., TestClient],
                                          predictor: mtlrec.Predictor, world_run: tuple[Path, Path]) -> None:
    users = pd.read_parquet(world_run[0] / "users.parquet")
    client = make_client(retrieval_candidates=10, category_feature="brand")
    features = {"age_band": str(users["age_band"].iloc[0]), "region": str(users["region"].iloc[0]),
                "activity": float(users["activity"].iloc[0])}
    body = client.post("/v1/recommend", headers=AUTH, json={"user_id": "newcomer", "k": 4,
                                                            "features": features}).json()
    assert body["cold_start"] is True and body["strategy"] == "features" and body["two_stage"] is True
    assert len(body["items"]) == 4 and all(set(i["probabilities"]) == {"click", "like", "purchase"}
                                           for i in body["items"])
    expected = predictor.recommender.rank(predictor.schema.new_user_fields(features), 4, None, candidates=10)
    assert [i["item_id"] for i in body["items"]] == list(predictor.schema.item_ids()[expected.rows])
    frame = predictor.recommend("newcomer", k=4, user_features=features)  # the run's 500 candidates: exact
    assert frame.attrs == {"cold_start": True, "strategy": "features", "two_stage": False}
    # The answer depends on the features; missing ones count as unknown.
    other = client.post("/v1/recommend", headers=AUTH, json={"user_id": "newcomer", "k": 40, "features": {
        "age_band": str(users["age_band"].iloc[0])}}).json()
    assert other["strategy"] == "features" and len(other["items"]) == 10  # the retrieved ones
    # Without features: popularity, as before; a known user's features in the request are not used.
    assert client.post("/v1/recommend", headers=AUTH, json={"user_id": "newcomer", "features": {}}).json()[
        "strategy"] == "popularity"
    known = client.post("/v1/recommend", headers=AUTH, json={"user_id": user_ids(predictor)[0], "features": {
        "age_band": "nonsense"}}).json()
    assert known["strategy"] == "model" and known["cold_start"] is False
    # Bad features name the field and what is allowed.
    bad = client.post("/v1/recommend", headers=AUTH, json={"user_id": "newcomer", "features": {"colour": "red"}})
    assert bad.status_code == 422
    (error,) = bad.json()["detail"]
    assert error["field"] == "body.features" and "['activity', 'age_band', 'region']" in error["message"]
    bad = client.post("/v1/recommend", headers=AUTH, json={"user_id": "newcomer", "features": {"activity": "x"}})
    assert bad.status_code == 422 and "activity" in bad.json()["detail"][0]["message"]


def test_related_items_are_retrieved_then_ranked(make_client: Callable[..., TestClient],
                                                 predictor: mtlrec.Predictor) -> None:
    client = make_client(retrieval_candidates=6)
    item = item_ids(predictor)[3]
    body = client.post("/v1/related", headers=AUTH, json={"item_id": item, "relation": "substitute", "k": 3}).json()
    row = int(predictor.schema.item_rows([item])[0])
    with torch.no_grad():
        v = predictor.model.retrieval_items(predictor.state.items)
    scores = v @ v[row]
    scores[row] = -torch.inf
    nearest = set(predictor.schema.item_ids()[torch.topk(scores, 6).indices.numpy()])
    returned = {i["item_id"] for i in body["items"]}
    assert len(returned) == 3 and returned <= nearest and item not in returned


def test_retrieval_candidates_need_a_retrieval_task(tmp_path: Path, make_tables: Any,
                                                    config_dict: dict[str, Any]) -> None:
    tables = make_tables()
    mtlrec.train(config_dict, tmp_path / "run", FAST, tables={"interactions": tables.interactions,
                                                              "users": tables.users, "items": tables.items,
                                                              "item_pairs": tables.item_pairs})
    with pytest.raises(ConfigError, match="MTLREC_RETRIEVAL_CANDIDATES is 50, but this run has no retrieval task"):
        create_app(tmp_path / "run", ServeSettings.from_keys([KEY], retrieval_candidates=50))
    app = create_app(tmp_path / "run", ServeSettings.from_keys([KEY]))
    with TestClient(app) as client:
        assert client.get("/v1/model", headers=AUTH).json()["retrieval_candidates"] == 0
        body = client.post("/v1/recommend", headers=AUTH, json={"user_id": 3, "k": 4}).json()
        assert body["two_stage"] is False and body["strategy"] == "model"


def test_predict(client: TestClient, predictor: mtlrec.Predictor) -> None:
    users, items = user_ids(predictor)[:3], item_ids(predictor)[:3]
    pairs: list[dict[str, Any]] = [{"user_id": u, "item_id": i, "context": {"hour": 9, "device": "mobile"}}
                                   for u, i in zip(users, items, strict=True)]
    pairs.append({"user_id": "new-user", "item_id": items[0]})
    body = client.post("/v1/predict", headers=AUTH, json={"pairs": pairs}).json()
    results = body["results"]
    assert [r["known_user"] for r in results] == [True, True, True, False]
    expected = predictor.predict(pd.DataFrame({"user_id": users, "item_id": items, "hour": [9] * 3,
                                               "device": ["mobile"] * 3}))
    for r, (_, row) in zip(results, expected.iterrows(), strict=False):
        assert set(r["tasks"]) == {"click", "like", "purchase"}
        for task in ("click", "like", "purchase"):
            assert r["tasks"][task]["probability"] == pytest.approx(row[task], abs=1e-6)
        like = r["tasks"]["like"]
        assert like["condition"] == "click"
        assert like["joint_probability"] == pytest.approx(like["probability"] * r["tasks"]["click"]["probability"],
                                                          rel=1e-4)


def test_predict_unknown_item_is_404(client: TestClient, predictor: mtlrec.Predictor) -> None:
    response = client.post("/v1/predict", headers=AUTH, json={"pairs": [
        {"user_id": user_ids(predictor)[0], "item_id": "ghost-item"}]})
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "unknown item ['ghost-item'] (1 in all) in "
                               "'pairs.item_id': the model was not trained on it; GET /v1/model tells how many items "
                               "it knows"}


def test_predict_unknown_context_feature_names_it(client: TestClient, predictor: mtlrec.Predictor) -> None:
    response = client.post("/v1/predict", headers=AUTH, json={"pairs": [
        {"user_id": user_ids(predictor)[0], "item_id": item_ids(predictor)[0], "context": {"weather": "rain"}}]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["field"] == "body.pairs.0.context" and "'weather'" in error["message"]


def test_classify_user(client: TestClient, predictor: mtlrec.Predictor) -> None:
    body = client.post("/v1/classify/user", headers=AUTH, json={"user_ids": [user_ids(predictor)[0], "new"]}).json()
    known, unknown = body["results"]
    assert known["known"] is True and unknown["known"] is False
    segment = known["tasks"]["segment"]
    assert segment["type"] == "multiclass" and segment["label"] in segment["probabilities"]
    assert sum(segment["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert segment["label"] == max(segment["probabilities"], key=segment["probabilities"].get)


def test_classify_item(client: TestClient, predictor: mtlrec.Predictor) -> None:
    body = client.post("/v1/classify/item", headers=AUTH, json={"item_ids": item_ids(predictor)[:2]}).json()
    first = body["results"][0]["tasks"]
    assert set(first) == {"category", "tags"}
    assert first["tags"]["type"] == "multilabel"
    assert set(first["tags"]["labels"]) == {c for c, p in first["tags"]["probabilities"].items() if p >= 0.5}
    frame = predictor.classify_items(item_ids(predictor)[:2])
    assert [r["tasks"]["category"]["label"] for r in body["results"]] == list(frame["category"])


def test_classify_unknown_item_is_404(client: TestClient) -> None:
    response = client.post("/v1/classify/item", headers=AUTH, json={"item_ids": ["nope"]})
    assert response.status_code == 404 and "unknown item ['nope']" in response.json()["detail"]


def test_relate(client: TestClient, predictor: mtlrec.Predictor) -> None:
    a, b = item_ids(predictor)[:2]
    body = client.post("/v1/relate", headers=AUTH, json={"item_a": a, "item_b": b}).json()
    relation = body["tasks"]["relation"]
    assert set(relation["probabilities"]) == {"unrelated", "substitute", "complement"}
    assert sum(relation["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    frame = predictor.relate([a], [b])
    assert relation["label"] == frame["relation"][0]
    missing = client.post("/v1/relate", headers=AUTH, json={"item_a": a, "item_b": "ghost"})
    assert missing.status_code == 404 and "'item_b'" in missing.json()["detail"]


def test_related(client: TestClient, predictor: mtlrec.Predictor) -> None:
    item = item_ids(predictor)[0]
    body = client.post("/v1/related", headers=AUTH, json={"item_id": item, "relation": "complement", "k": 4}).json()
    assert body["task"] == "relation" and len(body["items"]) == 4
    expected = predictor.related_items(item, "complement", 4)
    assert [i["item_id"] for i in body["items"]] == list(expected["item_id"])
    assert item not in {i["item_id"] for i in body["items"]}


def test_related_errors(client: TestClient) -> None:
    response = client.post("/v1/related", headers=AUTH, json={"item_id": "ghost", "relation": "substitute"})
    assert response.status_code == 404 and "unknown item ['ghost']" in response.json()["detail"]
    response = client.post("/v1/related", headers=AUTH, json={"item_id": "i0000", "relation": "sibling"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["field"] == "body.relation" and "['complement', 'substitute', 'unrelated']" in error["message"]


def test_integer_ids_and_every_task_type(tmp_path: Path, make_tables: Any, config_dict: dict[str, Any]) -> None:
    """The hand-rolled tiny world: integer ids, a regression task, a numeric context feature."""
    tables = make_tables()
    mtlrec.train(config_dict, tmp_path / "run", FAST, tables={"interactions": tables.interactions,
                                                              "users": tables.users, "items": tables.items,
                                                              "item_pairs": tables.item_pairs})
    app = create_app(tmp_path / "run", ServeSettings.from_keys([KEY], category_feature="category"))
    with TestClient(app, raise_server_exceptions=False) as client:
        body = client.post("/v1/recommend", headers=AUTH, json={"user_id": 3, "k": 4,
                                                                "include_categories": ["books"]}).json()
        assert body["cold_start"] is False and all(isinstance(i["item_id"], int) for i in body["items"])
        assert set(body["items"][0]["probabilities"]) == {"click", "buy"}  # regression is not a probability
        pairs = [{"user_id": 3, "item_id": 5, "context": {"device": "ios", "price": 12.5}},
                 {"user_id": "3", "item_id": 5.0, "context": {"price": None}}]
        results = client.post("/v1/predict", headers=AUTH, json={"pairs": pairs}).json()["results"]
        assert results[0]["tasks"]["rating"]["type"] == "regression"
        assert isinstance(results[0]["tasks"]["rating"]["value"], float)
        assert results[1]["known_user"] is True  # "3" and 3 name the same user
        bad = client.post("/v1/predict", headers=AUTH, json={"pairs": [
            {"user_id": 3, "item_id": 5, "context": {"price": "cheap"}}]})
        assert bad.status_code == 422 and "expected numbers" in bad.json()["detail"][0]["message"]
        topics = client.post("/v1/classify/item", headers=AUTH, json={"item_ids": [1]}).json()
        assert topics["results"][0]["tasks"]["topics"]["type"] == "multilabel"


# ---------------------------------------------------------------------------------------------
# Security


@pytest.mark.parametrize("headers", [{}, {"Authorization": KEY}, {"Authorization": "Basic dXNlcjpwYXNz"},
                                     {"Authorization": "Bearer "}])
def test_missing_key_is_401(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/model"), ("POST", "/v1/recommend"), ("GET", "/openapi.json"),
                         ("GET", "/no/such/route")):
        response = client.request(method, path, headers=headers, json={"user_id": "u0000"})
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"] == "unauthorized"


def test_wrong_key_is_401_and_never_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    wrong = "wrong-key-0123456789abcdefgh"
    with caplog.at_level(logging.DEBUG):
        response = client.get("/v1/model", headers={"Authorization": f"Bearer {wrong}"})
        assert client.get("/v1/model", headers=AUTH).status_code == 200
    assert response.status_code == 401 and response.json()["detail"] == "invalid API key"
    assert "failed authentication" in caplog.text
    assert wrong not in caplog.text and KEY not in caplog.text


def test_keys_are_kept_hashed(predictor: mtlrec.Predictor) -> None:
    settings = ServeSettings.from_keys([KEY])
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    app = create_app(predictor, settings)
    assert KEY not in repr(vars(app.state))


def test_brute_force_is_blocked_then_released(make_client: Callable[..., TestClient]) -> None:
    client = make_client(auth_slowdown_after=1, auth_slowdown_base_s=0.001, auth_block_after=3, auth_block_s=60)
    bad = {"Authorization": "Bearer guess-0123456789abcdefgh"}
    assert [client.get("/v1/model", headers=bad).status_code for _ in range(2)] == [401, 401]
    blocked = client.get("/v1/model", headers=bad)
    assert blocked.status_code == 429 and blocked.json()["error"] == "blocked"
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    # While blocked, even the right key is refused from that address; /healthz still answers.
    assert client.get("/v1/model", headers=AUTH).status_code == 429
    assert client.get("/healthz").status_code == 200


def test_failure_tracker_slows_then_blocks_then_forgets() -> None:
    now = [0.0]
    tracker = AuthFailureTracker(ServeSettings(auth_slowdown_after=2, auth_slowdown_base_s=0.5, auth_slowdown_max_s=1.5,
                                               auth_block_after=6, auth_block_s=100, auth_failure_window_s=50),
                                 clock=lambda: now[0])
    delays = [tracker.fail("10.0.0.1")[0] for _ in range(5)]
    assert delays == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert tracker.fail("10.0.0.1") == (0.0, 100)
    assert tracker.blocked_for("10.0.0.1") == 100 and tracker.blocked_for("10.0.0.2") == 0.0
    now[0] = 101.0
    assert tracker.blocked_for("10.0.0.1") == 0.0
    assert tracker.fail("10.0.0.1") == (0.0, 0.0)  # the count started over
    now[0] = 200.0
    assert [tracker.fail("10.0.0.1")[0] for _ in range(3)] == [0.0, 0.0, 0.5]  # old failures left the window


def test_token_bucket() -> None:
    now = [0.0]
    limiter = TokenBucketLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0.0
    now[0] = 0.5
    assert limiter.take("a") == 0.0


def test_rate_limit_per_key(make_client: Callable[..., TestClient]) -> None:
    client = make_client(rate_limit_per_second=0.2, rate_limit_burst=3)
    codes = [client.get("/v1/model", headers=AUTH).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = client.get("/v1/model", headers=AUTH)
    assert limited.json()["error"] == "rate_limited" and int(limited.headers["retry-after"]) >= 1
    assert client.get("/v1/model", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200


def test_oversized_body_is_413(make_client: Callable[..., TestClient], predictor: mtlrec.Predictor) -> None:
    client = make_client(max_body_bytes=2048)
    big = json.dumps({"user_id": user_ids(predictor)[0], "candidates": ["x" * 100] * 40}).encode()
    assert len(big) > 2048
    response = client.post("/v1/recommend", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds on the raw stream
        for start in range(0, len(big), 256):
            yield big[start:start + 256]

    response = client.post("/v1/recommend", headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert response.status_code == 413
    small = json.dumps({"user_id": user_ids(predictor)[0], "k": 2}).encode()
    assert client.post("/v1/recommend", headers={**AUTH, "Content-Type": "application/json"},
                       content=iter([small])).status_code == 200


def test_default_body_limit_is_one_mib(client: TestClient) -> None:
    body = b'{"user_id": "u0000", "candidates": [' + b'"i0000",' * 150000 + b'"i0001"]}'
    assert len(body) > 1 << 20
    response = client.post("/v1/recommend", headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 413


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/v1/recommend", headers={**AUTH, "Content-Type": "application/json"},
                           content=b'{"user_id": "u0000", "k": ')
    assert response.status_code == 422
    assert response.json()["detail"] == [{"field": "body", "message": "malformed JSON", "type": "json_invalid"}]


@pytest.mark.parametrize(("body", "field"), [
    ({"user_id": "u0000", "k": 0}, "body.k"),
    ({"user_id": "u0000", "k": 1001}, "body.k"),
    ({"user_id": "u0000", "k": "ten"}, "body.k"),
    ({"k": 3}, "body.user_id"),
    ({"user_id": "u0000", "colour": "red"}, "body.colour"),
    ({"user_id": ""}, "body.user_id"),
    ({"user_id": True}, "body.user_id"),
])
def test_invalid_fields_are_named(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/recommend", headers=AUTH, json=body)
    assert response.status_code == 422
    assert field in [e["field"] for e in response.json()["detail"]]


def test_server_k_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_k=5)
    for path, body in (("/v1/recommend", {"user_id": "u0000", "k": 6}),
                       ("/v1/related", {"item_id": "i0000", "relation": "substitute", "k": 6})):
        response = client.post(path, headers=AUTH, json=body)
        assert response.status_code == 422
        assert response.json()["detail"][0]["field"] == "body.k"
        assert "at most 5" in response.json()["detail"][0]["message"]


def test_internal_error_hides_details(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]

    def broken(_: Any) -> None:
        raise RuntimeError("disk failure at /srv/secret/weights.safetensors")

    monkeypatch.setattr(service, "recommend", broken)
    with caplog.at_level(logging.ERROR, logger="mtlrec.serve"):
        response = client.post("/v1/recommend", headers=AUTH, json={"user_id": "u0000"})
    assert response.status_code == 500
    body = response.json()
    assert set(body) == {"error", "id"} and body["error"] == "internal"
    uuid.UUID(body["id"])
    assert "/srv" not in response.text and "Traceback" not in response.text
    assert body["id"] in caplog.text and "RuntimeError: disk failure" in caplog.text


def test_cors_is_off_unless_configured(make_client: Callable[..., TestClient]) -> None:
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    plain = make_client()
    assert "access-control-allow-origin" not in plain.options("/v1/recommend", headers=preflight).headers
    assert "access-control-allow-origin" not in plain.get("/v1/model", headers={**AUTH, "Origin":
                                                                                "https://shop.example"}).headers
    cors = make_client(cors_origins=("https://shop.example",))
    answer = cors.options("/v1/recommend", headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://shop.example"
    other = cors.options("/v1/recommend", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_refuses_to_start_without_keys(predictor: mtlrec.Predictor, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="no API keys"):
        create_app(predictor, ServeSettings())
    with caplog.at_level(logging.WARNING, logger="mtlrec.serve"):
        app = create_app(predictor, ServeSettings(insecure_no_auth=True))
    assert "WITHOUT AUTHENTICATION" in caplog.text
    with TestClient(app) as open_client:
        assert open_client.get("/v1/model").json()["auth"] == "disabled"


def test_settings_from_env(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# service keys\n{OTHER_KEY}\n\n")
    settings = ServeSettings.from_env({"MTLREC_API_KEYS": f"{KEY}, ", "MTLREC_RATE_LIMIT_PER_SECOND": "7.5",
                                       "MTLREC_CORS_ORIGINS": "https://a.example,https://b.example",
                                       "MTLREC_INSECURE_NO_AUTH": "false"}, api_keys_file=keys_file)
    assert len(settings.api_key_hashes) == 2 and settings.rate_limit_per_second == 7.5
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    with pytest.raises(ConfigError, match="MTLREC_MAX_K"):
        ServeSettings.from_env({"MTLREC_API_KEYS": KEY, "MTLREC_MAX_K": "5000"})
    with pytest.raises(ConfigError, match="API key #2 of MTLREC_API_KEYS is shorter") as info:
        ServeSettings.from_env({"MTLREC_API_KEYS": f"{KEY},short"})
    assert "short" not in str(info.value).replace("shorter", "")
    with pytest.raises(ConfigError, match="cannot read the API keys file"):
        ServeSettings.from_env({}, api_keys_file=tmp_path / "absent")


# ---------------------------------------------------------------------------------------------
# Artifacts: truncated and tampered weights, manifest


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return target


def test_truncated_weights_are_refused(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path)
    weights = run / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    # The trainer's manifest catches it first ...
    with pytest.raises(ArtifactError, match="truncated or was replaced"):
        mtlrec.Predictor.load(run)
    with pytest.raises(ArtifactError):
        create_app(run, ServeSettings.from_keys([KEY]))
    # ... and without a manifest, safetensors itself refuses the file.
    (run / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="damaged or not a safetensors file"):
        mtlrec.Predictor.load(run)


def _flip_a_weight(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 17] ^= 0x40  # a byte of tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))


def test_tampered_weights_fail_the_manifest(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path)
    write_manifest(run)
    assert verify_manifest(run, required=True)
    create_app(run, ServeSettings.from_keys([KEY], require_manifest=True))
    _flip_a_weight(run / "weights.safetensors")
    with pytest.raises(ArtifactError, match="does not match its SHA-256 in the manifest"):
        mtlrec.Predictor.load(run)  # well-formed, so safetensors alone could not tell
    with pytest.raises(ArtifactError, match="does not match its SHA-256 in the manifest"):
        create_app(run, ServeSettings.from_keys([KEY]))


def test_manifest_rules(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path)
    assert verify_manifest(run)  # the trainer writes one
    (run / MANIFEST_FILE).unlink()
    assert verify_manifest(run) is False
    with pytest.raises(ArtifactError, match="manifest.json' is missing"):
        create_app(run, ServeSettings.from_keys([KEY], require_manifest=True))
    write_manifest(run, key="signing-secret")
    assert verify_manifest(run, key="signing-secret")
    with pytest.raises(ArtifactError, match="not signed with this server's manifest key"):
        verify_manifest(run, key="another-secret")
    doc = json.loads((run / MANIFEST_FILE).read_text())
    doc["files"]["../outside"] = doc["files"].pop("config.yaml")
    (run / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match=r"does not list \['config.yaml'\]"):
        verify_manifest(run)
    (run / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="is malformed"):
        verify_manifest(run)
    write_manifest(run)
    with open(run / "serving.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="truncated or was replaced"):
        verify_manifest(run)


# ---------------------------------------------------------------------------------------------
# Serving entry points


def test_serve_command_passes_tls_and_refuses_bad_setups(run_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("MTLREC_API_KEYS", raising=False)
    monkeypatch.delenv("MTLREC_API_KEYS_FILE", raising=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ConfigError, match="no API keys"):
        serve_command(run_dir)
    monkeypatch.setenv("MTLREC_API_KEYS", KEY)
    with pytest.raises(ConfigError, match="both --ssl-certfile and --ssl-keyfile"):
        serve_command(run_dir, ssl_certfile=cert)
    serve_command(run_dir, host="0.0.0.0", port=8443, ssl_certfile=cert, ssl_keyfile=key)
    app, kw = calls[-1]
    assert kw["ssl_certfile"] == str(cert) and kw["ssl_keyfile"] == str(key) and kw["port"] == 8443
    assert kw["server_header"] is False and kw["proxy_headers"] is False
    assert app.state.service.info.items == 40


def test_several_workers_use_the_env_factory(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("MTLREC_API_KEYS", KEY)
    monkeypatch.delenv("MTLREC_RUN", raising=False)
    serve_command(run_dir, workers=2)
    target, kw = calls[-1]
    assert target == "mtlrec.serve.app:create_app_from_env" and kw["factory"] is True and kw["workers"] == 2
    with TestClient(create_app_from_env()) as worker:  # what each worker builds, from MTLREC_RUN
        assert worker.get("/v1/model", headers=AUTH).json()["items"] == 40
    monkeypatch.delenv("MTLREC_RUN")
    with pytest.raises(ConfigError, match="MTLREC_RUN is not set"):
        create_app_from_env()


def test_committed_openapi_is_current() -> None:
    committed = (DOCS / "openapi.json").read_text(encoding="utf-8")
    assert committed == openapi_text(), "docs/openapi.json is stale: python -m mtlrec.serve.openapi > docs/openapi.json"


# ---------------------------------------------------------------------------------------------
# Fuzzing from the OpenAPI schema


@pytest.fixture(scope="module")
def fuzz_schema(predictor: mtlrec.Predictor) -> Any:
    app = create_app(predictor, ServeSettings.from_keys([KEY], category_feature="brand", rate_limit_burst=100000,
                                                        rate_limit_per_second=100000.0, max_k=50,
                                                        # schemathesis tries wrong keys on purpose; the lockout
                                                        # has its own tests
                                                        auth_slowdown_after=10**6, auth_block_after=10**6,
                                                        # its over-long lists (> 10,000 pairs) can pass 1 MiB,
                                                        # and it does not count 413 as a rejection; the body
                                                        # limit has its own tests
                                                        max_body_bytes=1 << 26))
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)


OPERATIONS = [(method.upper(), path) for path, ops in json.loads((DOCS / "openapi.json").read_text())["paths"].items()
              for method in ops]


@pytest.mark.parametrize(("method", "path", "mode"), [
    (method, path, mode) for method, path in OPERATIONS for mode in schemathesis.GenerationMode
    # a GET without parameters has no invalid form
    if method == "POST" or mode == schemathesis.GenerationMode.POSITIVE])
def test_fuzz_from_openapi(fuzz_schema: Any, method: str, path: str, mode: Any) -> None:
    """Generated requests, valid and invalid, never get a 5xx; invalid ones get a 4xx; every answer
    matches the documented schema.

    Every built-in check runs except `positive_data_acceptance`: the static schema cannot name a
    run's context features and relations, nor a server's lower `max_k`, which are answered 422.
    """

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=fuzz_schema[path][method].as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(headers=AUTH)
        assert response.status_code < 500, response.text
        case.validate_response(response, headers=AUTH,
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])

    check()


def _ids(values: list[str]) -> st.SearchStrategy[Any]:
    """Mostly known ids, sometimes unknown strings or integers."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), st.text(min_size=1, max_size=12),
                     st.integers(-(2**53) + 1, 2**53 - 1))


def test_property_requests_with_known_ids(predictor: mtlrec.Predictor, world_run: tuple[Path, Path]) -> None:
    """Random requests over the run's own ids, categories and context values: never a 5xx, and
    the answers keep their invariants (at most k items, best first, probabilities in [0, 1])."""
    users, items = user_ids(predictor), item_ids(predictor)
    brands = sorted(pd.read_parquet(world_run[0] / "items.parquet")["brand"].unique())
    app = create_app(predictor, ServeSettings.from_keys([KEY], category_feature="brand", rate_limit_burst=10**6,
                                                        retrieval_candidates=12))
    context_value = st.one_of(st.none(), st.integers(-5, 30), st.floats(-1e12, 1e12), st.text(max_size=8),
                              st.sampled_from(["mobile", "desktop"]))
    age_bands = sorted(pd.read_parquet(world_run[0] / "users.parquet")["age_band"].astype(str).unique())
    features = st.fixed_dictionaries({}, optional={
        "age_band": st.one_of(st.none(), st.sampled_from([*age_bands, "zz"])),
        "activity": st.one_of(st.none(), st.floats(-1e6, 1e6), st.integers(-100, 100))})
    recommend = st.fixed_dictionaries({"user_id": _ids(users), "k": st.integers(1, 60)}, optional={
        "exclude_seen": st.booleans(), "candidates": st.lists(_ids(items), max_size=30),
        "include_categories": st.lists(st.sampled_from([*brands, "zz"]), max_size=4),
        "exclude_categories": st.lists(st.sampled_from([*brands, "zz"]), max_size=4), "features": features})
    pair = st.fixed_dictionaries({"user_id": _ids(users), "item_id": st.sampled_from(items)}, optional={
        "context": st.fixed_dictionaries({}, optional={"hour": context_value, "device": context_value})})

    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=recommend)
        def check_recommend(body: dict[str, Any]) -> None:
            response = client.post("/v1/recommend", headers=AUTH, json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert len(answer["items"]) <= body["k"]
            scores = [i["score"] for i in answer["items"]]
            assert scores == sorted(scores, reverse=True)
            assert len({i["item_id"] for i in answer["items"]}) == len(answer["items"])
            for item in answer["items"]:
                assert all(0.0 <= p <= 1.0 for p in (item.get("probabilities") or {}).values())

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(pairs=st.lists(pair, min_size=1, max_size=5))
        def check_predict(pairs: list[dict[str, Any]]) -> None:
            response = client.post("/v1/predict", headers=AUTH, json={"pairs": pairs})
            assert response.status_code in (200, 422), response.text
            if response.status_code == 200:
                for result in response.json()["results"]:
                    assert all(0.0 <= task["probability"] <= 1.0 for task in result["tasks"].values())

        check_recommend()
        check_predict()
