"""The answers behind the HTTP API: a `Predictor` turned into typed responses.

Recommending is two-stage when the run has a retrieval task: the items that pass the filters
(candidates, categories, seen items) are narrowed to the N of largest retrieval score u_r . v_r
(exact top-N by chunked matrix product, `mtlrec.retrieval.top_n_inner_product`), which the
multi-task heads then rank with the run's fusion rule. N is the run's `recommend.candidates`,
or `ServeSettings.retrieval_candidates` when set. With N = 0, without a retrieval task, or when
no more than N items pass the filters, every allowed item is ranked exactly. Related items draw
their candidates from the item retrieval vectors the same way.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import mtlrec
from mtlrec.data.batch import Batch
from mtlrec.data.spec import OOV, PAD, TaskSpec
from mtlrec.errors import ConfigError, DataError
from mtlrec.outputs import to_probabilities
from mtlrec.predict import Predictor
from mtlrec.recommend import Ranking
from mtlrec.serve import schemas as s
from mtlrec.serve.settings import ServeSettings

logger = logging.getLogger("mtlrec.serve")


class ServeError(Exception):
    """An answer other than 200 that the client caused: 404 (unknown item) or 422 (bad value).

    Args:
        status: HTTP status.
        message: what is wrong and how to fix it.
        field: the request field at fault, dotted ('body.k'), for 422.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _py(value: Any) -> str | int:
    """An id as JSON wants it: int for integer ids, else str."""
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    return str(value)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _preview(values: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(_py(v)) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}] ({len(values)} in all)"


_Answer = TypeVar("_Answer")


def _in_slot(method: Callable[..., _Answer]) -> Callable[..., _Answer]:
    """Run an answer inside one of the service's inference slots, without autograd."""

    @functools.wraps(method)
    def wrapper(self: ServingService, *args: Any, **kwargs: Any) -> _Answer:
        with self._slots, torch.inference_mode():
            return method(self, *args, **kwargs)

    return wrapper


class ServingService:
    """Typed answers of one trained run.

    Args:
        predictor: the loaded run.
        settings: limits and the category feature.
        run_name: the run directory's name (never its full path: it would leak into responses).
        weights_sha256: fingerprint of the served weights.
    """

    def __init__(self, predictor: Predictor, settings: ServeSettings, run_name: str, weights_sha256: str) -> None:
        self.predictor = predictor
        self.settings = settings
        self.spec = predictor.spec
        self.config = predictor.config
        self.recommender = predictor.recommender
        self.state = predictor.state
        self.model = predictor.model
        has_items = self.config.data.item_id is not None
        self.item_ids = predictor.schema.item_ids() if has_items else np.empty(0, dtype=object)
        self.num_users = len(predictor.schema.user_ids()) if self.config.data.user_id is not None else 0
        self.context = [(f.name, f.source_column) for f in self.config.features
                        if f.table == "interactions" and f.type != "sequence"]
        self.category_feature = self._resolve_category_feature()
        # More requests computing at once than cores only adds GIL and cache contention.
        self._slots = threading.BoundedSemaphore(settings.inference_slots or os.cpu_count() or 1)
        self.retrieval = self._resolve_retrieval()
        if len(self.item_ids):  # lazy caches built once, before concurrent requests
            self.recommender.item_vectors()
            predictor.schema.item_rows(self.item_ids[:1])
        if self.num_users:
            predictor.schema.user_rows(predictor.schema.user_ids()[:1])
        self.info = self._model_info(run_name, weights_sha256)

    # -- set-up --------------------------------------------------------------------------------
    def _resolve_retrieval(self) -> int:
        """Items retrieval hands to the heads: the setting when given, else the run's (0: rank all)."""
        n = self.settings.retrieval_candidates
        if n is None:
            return self.recommender.candidates
        if n and self.recommender.retrieval_vectors is None:
            raise ConfigError(f"MTLREC_RETRIEVAL_CANDIDATES is {n}, but this run has no retrieval task, so nothing "
                              "retrieves candidates; train with a task of kind 'retrieval', or unset it to rank "
                              "every item")
        return n

    def _resolve_category_feature(self) -> str | None:
        categorical = [f.name for f in self.spec.group("item") if f.kind == "categorical" and f.name != "item_id"]
        name = self.settings.category_feature
        if name is None:
            return "category" if "category" in categorical else None
        if name not in categorical:
            raise ConfigError(f"MTLREC_CATEGORY_FEATURE is '{name}', which is not a categorical item feature of "
                              f"this run; choose from {categorical}")
        return name

    def _model_info(self, run_name: str, weights_sha256: str) -> s.ModelInfo:
        tasks = [s.TaskInfo(name=t.name, kind=t.kind, type=t.type, condition=t.parent, classes=list(t.classes))
                 for t in self.spec.tasks]
        return s.ModelInfo(
            version=mtlrec.__version__, run=run_name, weights_sha256=weights_sha256,
            backbone=self.config.model.backbone, tasks=tasks, users=self.num_users, items=len(self.item_ids),
            context_features=[name for name, _ in self.context], category_feature=self.category_feature,
            fusion=dict(self.recommender.fusion), fusion_rule=self.config.recommend.fusion_rule,
            default_k=self.config.recommend.k, max_k=self.settings.max_k, retrieval_candidates=self.retrieval,
            auth="disabled" if self.settings.insecure_no_auth else "api_key")

    # -- checks --------------------------------------------------------------------------------
    def _k(self, k: int) -> int:
        if k > self.settings.max_k:
            raise ServeError(422, f"k must be at most {self.settings.max_k} on this server, got {k}", "body.k")
        return k

    def _batch(self, n: int, field: str) -> None:
        if n > self.settings.max_batch:
            raise ServeError(422, f"at most {self.settings.max_batch} entries per request on this server, got {n}",
                             field)

    def _known_items(self, ids: Sequence[Any], field: str) -> np.ndarray:
        if not len(self.item_ids):
            raise ServeError(404, "this model has no items")
        rows = self.predictor.schema.item_rows(np.asarray(ids, dtype=object))
        unknown = [ids[int(i)] for i in np.flatnonzero(rows < 0)]
        if unknown:
            raise ServeError(404, f"unknown item {_preview(unknown)} in '{field}': the model was not trained on "
                             "it; GET /v1/model tells how many items it knows")
        return rows

    def _user_rows(self, ids: Sequence[Any]) -> np.ndarray:
        if self.config.data.user_id is None:
            raise ServeError(422, "this model has no user ids (data.user_id is null)", "body")
        return self.predictor.schema.user_rows(np.asarray(ids, dtype=object))

    def _category_codes(self, values: Sequence[str]) -> np.ndarray:
        encoder = self.predictor.schema.features_[str(self.category_feature)]
        codes = np.asarray(encoder.transform(pd.Series(list(values), dtype=object)))
        return codes[(codes != PAD) & (codes != OOV)]  # unknown categories match no item

    # -- outputs -------------------------------------------------------------------------------
    def _outputs(self, logits: Mapping[str, Tensor]) -> list[dict[str, s.TaskOutput]]:
        """Per row, every task's answer (from the logits of one batch)."""
        rows = next(iter(logits.values())).shape[0] if logits else 0
        joint: dict[str, np.ndarray] = {}
        if any(self.spec.task(n).kind == "interaction" and self.spec.task(n).parent for n in logits):
            joint = {k: v.numpy() for k, v in self.recommender.joint_probabilities(logits).items()}
        columns: list[tuple[TaskSpec, np.ndarray]] = [
            (self.spec.task(n), to_probabilities(self.spec.task(n), v).numpy()) for n, v in logits.items()]
        out: list[dict[str, s.TaskOutput]] = [{} for _ in range(rows)]
        for task, probs in columns:
            classes = list(task.classes)
            for i in range(rows):
                p = probs[i]
                if task.type == "binary":
                    answer = s.TaskOutput(type="binary", probability=_finite(float(p)), condition=task.parent,
                                          joint_probability=_finite(float(joint[task.name][i]))
                                          if task.parent and task.name in joint else None)
                elif task.type == "regression":
                    answer = s.TaskOutput(type="regression", value=_finite(float(p)))
                elif task.type == "multiclass":
                    answer = s.TaskOutput(type="multiclass", label=classes[int(p.argmax())],
                                          probabilities={c: float(x) for c, x in zip(classes, p, strict=True)})
                else:
                    answer = s.TaskOutput(type="multilabel", labels=[c for c, x in zip(classes, p, strict=True)
                                                                     if x >= 0.5],
                                          probabilities={c: float(x) for c, x in zip(classes, p, strict=True)})
                out[i][task.name] = answer
        return out

    # -- answers -------------------------------------------------------------------------------
    @_in_slot
    def recommend(self, req: s.RecommendRequest) -> s.RecommendResponse:
        k = self._k(req.k)
        if req.candidates is not None and len(req.candidates) > self.settings.max_candidates:
            raise ServeError(422, f"at most {self.settings.max_candidates} candidates on this server, got "
                             f"{len(req.candidates)}", "body.candidates")
        allowed = self._allowed(req)
        user_row = int(self._user_rows([req.user_id])[0])
        rule = self.config.recommend.fusion_rule
        if user_row >= 0:
            exclude = self.config.recommend.exclude_seen if req.exclude_seen is None else req.exclude_seen
            if exclude:
                allowed = np.ones(len(self.item_ids), dtype=bool) if allowed is None else allowed
                allowed[self.state.seen(user_row)] = False
            ranking = self.recommender.rank(self.recommender.user_fields(torch.tensor([user_row])), k, allowed,
                                            self.retrieval)
            return self._ranked(req, ranking, "model")
        if req.features:
            ranking = self.recommender.rank(self._new_user(req.features), k, allowed, self.retrieval)
            return self._ranked(req, ranking, "features")
        rows, counts = self.recommender.popular(k, None if allowed is None else np.flatnonzero(allowed))
        items = [s.RecommendedItem(item_id=_py(self.item_ids[r]), score=float(c)) for r, c in zip(rows, counts,
                                                                                                    strict=True)]
        return s.RecommendResponse(user_id=req.user_id, cold_start=True, strategy="popularity", fusion_rule=rule,
                                   candidates_ranked=0, two_stage=False, items=items)

    def _ranked(self, req: s.RecommendRequest, ranking: Ranking,
                strategy: Literal["model", "features"]) -> s.RecommendResponse:
        items = [s.RecommendedItem(item_id=_py(self.item_ids[r]), score=float(ranking.scores[j]),
                                   probabilities={t: float(p[j]) for t, p in ranking.probabilities.items()})
                 for j, r in enumerate(ranking.rows)]
        return s.RecommendResponse(user_id=req.user_id, cold_start=strategy != "model", strategy=strategy,
                                   fusion_rule=self.config.recommend.fusion_rule, candidates_ranked=ranking.ranked,
                                   two_stage=ranking.two_stage, items=items)

    def _new_user(self, features: Mapping[str, Any]) -> dict[str, Tensor]:
        """The fields of an unknown user from the request's raw feature values (cold start)."""
        try:
            return self.predictor.schema.new_user_fields(features)
        except DataError as exc:
            raise ServeError(422, str(exc), "body.features") from None

    def _allowed(self, req: s.RecommendRequest) -> np.ndarray | None:
        """bool [I] of the items the request's filters let through, or None without filters."""
        allowed: np.ndarray | None = None
        if req.candidates is not None:
            rows = self.predictor.schema.item_rows(np.asarray(req.candidates, dtype=object))
            allowed = np.zeros(len(self.item_ids), dtype=bool)
            allowed[rows[rows >= 0]] = True
        if req.include_categories is not None or req.exclude_categories is not None:
            if self.category_feature is None:
                field = "body.include_categories" if req.include_categories is not None else "body.exclude_categories"
                categorical = [f.name for f in self.spec.group("item") if f.kind == "categorical"
                               and f.name != "item_id"]
                raise ServeError(422, "this server filters on no category feature; start it with "
                                 f"MTLREC_CATEGORY_FEATURE set to one of {categorical}", field)
            values = self.state.items[self.category_feature].numpy()
            allowed = np.ones(len(self.item_ids), dtype=bool) if allowed is None else allowed
            if req.include_categories is not None:
                allowed &= np.isin(values, self._category_codes(req.include_categories))
            if req.exclude_categories is not None:
                allowed &= ~np.isin(values, self._category_codes(req.exclude_categories))
        return allowed

    @_in_slot
    def predict(self, req: s.PredictRequest) -> s.PredictResponse:
        self._batch(len(req.pairs), "body.pairs")
        names = [name for name, _ in self.context]
        for i, pair in enumerate(req.pairs):
            for key in pair.context or {}:
                if key not in names:
                    raise ServeError(422, f"'{key}' is not a context feature of this model; they are {names}",
                                     f"body.pairs.{i}.context")
        item_rows = self._known_items([p.item_id for p in req.pairs], "pairs.item_id")
        user_rows = self._user_rows([p.user_id for p in req.pairs])
        frame = pd.DataFrame({column: pd.Series([(p.context or {}).get(name) for p in req.pairs], dtype=object)
                              for name, column in self.context})
        context = self.predictor.schema.encode_context(frame) if self.context else {}
        user = self.predictor.entity_fields(self.state.users, "user", user_rows)
        item = self.predictor.entity_fields(self.state.items, "item", item_rows)
        logits = self.model(Batch("interactions", user=user, item=item, context=context))
        answers = self._outputs(logits)
        return s.PredictResponse(results=[
            s.PairOutput(user_id=p.user_id, item_id=p.item_id, known_user=bool(user_rows[i] >= 0), tasks=answers[i])
            for i, p in enumerate(req.pairs)])

    @_in_slot
    def classify_users(self, req: s.ClassifyUsersRequest) -> s.ClassifyResponse:
        self._batch(len(req.user_ids), "body.user_ids")
        rows = self._user_rows(req.user_ids)
        logits = self.model(Batch("users", user=self.predictor.entity_fields(self.state.users, "user", rows)))
        answers = self._outputs(logits)
        return s.ClassifyResponse(results=[s.EntityOutput(id=uid, known=bool(rows[i] >= 0), tasks=answers[i])
                                           for i, uid in enumerate(req.user_ids)])

    @_in_slot
    def classify_items(self, req: s.ClassifyItemsRequest) -> s.ClassifyResponse:
        self._batch(len(req.item_ids), "body.item_ids")
        rows = self._known_items(req.item_ids, "item_ids")
        logits = self.model(Batch("items", item=self.predictor.entity_fields(self.state.items, "item", rows)))
        answers = self._outputs(logits)
        return s.ClassifyResponse(results=[s.EntityOutput(id=iid, known=True, tasks=answers[i])
                                           for i, iid in enumerate(req.item_ids)])

    @_in_slot
    def relate(self, req: s.RelateRequest) -> s.RelateResponse:
        a = self._known_items([req.item_a], "item_a")
        b = self._known_items([req.item_b], "item_b")
        entity = self.predictor.entity_fields
        logits = self.model(Batch("item_pairs", item=entity(self.state.items, "item", a),
                                  item_b=entity(self.state.items, "item", b)))
        return s.RelateResponse(item_a=req.item_a, item_b=req.item_b, tasks=self._outputs(logits)[0] if logits else {})

    @_in_slot
    def related(self, req: s.RelatedRequest) -> s.RelatedResponse:
        k = self._k(req.k)
        pair_tasks = self.spec.tasks_of("item_pair")
        if req.task is not None and req.task not in [t.name for t in pair_tasks]:
            raise ServeError(422, f"'{req.task}' is not an item-pair task; they are {[t.name for t in pair_tasks]}",
                             "body.task")
        chosen = [t for t in pair_tasks if req.relation in t.classes and req.task in (None, t.name)]
        if not chosen:
            relations = sorted({c for t in pair_tasks for c in t.classes if req.task in (None, t.name)})
            raise ServeError(422, f"no item-pair task has the relation '{req.relation}'; relations are {relations}",
                             "body.relation")
        row = int(self._known_items([req.item_id], "item_id")[0])
        rows, probs = self.recommender.related(row, chosen[0], req.relation, k, self.retrieval)
        return s.RelatedResponse(item_id=req.item_id, relation=req.relation, task=chosen[0].name,
                                 items=[s.RelatedItem(item_id=_py(self.item_ids[r]), probability=float(p))
                                        for r, p in zip(rows, probs, strict=True)])
