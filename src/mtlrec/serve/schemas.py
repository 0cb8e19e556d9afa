"""Request and response bodies of the HTTP API (separate models for what comes in and goes out).

Limits in these schemas are hard caps shared by every deployment (they appear in the OpenAPI
document); `ServeSettings` may lower them per deployment (`max_k`, `max_batch`, `max_candidates`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, WithJsonSchema

from mtlrec.serve.settings import BATCH_LIMIT, CANDIDATES_LIMIT, K_LIMIT

MAX_INT_ID = 2**53 - 1
"""Integer ids are exact in every JSON parser up to here."""


def _entity_id(value: Any) -> str | int:
    if isinstance(value, str) and 1 <= len(value) <= 256:
        return value
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 632.0 as an integer
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT_ID:
        return value
    raise ValueError(f"expected a string of 1 to 256 characters or an integer of magnitude at most {MAX_INT_ID}")


def _context_value(value: Any) -> str | int | float | None:
    if value is None or (isinstance(value, str) and len(value) <= 1024):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
            and abs(value) <= 1e12:
        return value
    raise ValueError("expected a string of at most 1024 characters, a number of magnitude at most 1e12, or null")


# Plain validators: a union's errors would otherwise name each member ('user_id.constrained-str').
EntityId = Annotated[str | int, PlainValidator(_entity_id), WithJsonSchema({"anyOf": [
    {"type": "string", "minLength": 1, "maxLength": 256},
    {"type": "integer", "minimum": -MAX_INT_ID, "maximum": MAX_INT_ID}]})]
"""A user or item id as in the training data: a string, or an integer for integer id columns."""
Category = Annotated[StrictStr, Field(min_length=1, max_length=256)]
ContextValue = Annotated[str | int | float | None, PlainValidator(_context_value), WithJsonSchema({"anyOf": [
    {"type": "string", "maxLength": 1024}, {"type": "number", "minimum": -1e12, "maximum": 1e12},
    {"type": "null"}]})]
K = Annotated[int, Field(ge=1, le=K_LIMIT, description=f"How many items (at most {K_LIMIT}; the server may "
                         "allow fewer).")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- requests -----------------------------------------------------------------------------------


class RecommendRequest(_Request):
    user_id: EntityId
    k: K = 10
    exclude_seen: bool | None = Field(None, description="Drop the user's training items (default: the run's "
                                      "`recommend.exclude_seen`).")
    candidates: list[EntityId] | None = Field(None, max_length=CANDIDATES_LIMIT,
                                              description="Rank only these items; unknown ids are ignored.")
    include_categories: list[Category] | None = Field(None, max_length=1000,
                                                      description="Keep only items of these categories.")
    exclude_categories: list[Category] | None = Field(None, max_length=1000,
                                                      description="Drop items of these categories.")
    features: dict[Annotated[str, Field(max_length=256)], ContextValue] | None = Field(
        None, max_length=256, description="User features by name (the run's user-table features, e.g. age_band) "
        "of a user the model does not know: it is then ranked by the model from these features alone "
        "(`strategy: features`). Ignored for a known user; missing ones count as unknown.")


class Pair(_Request):
    user_id: EntityId
    item_id: EntityId
    context: dict[Annotated[str, Field(max_length=256)], ContextValue] | None = Field(
        None, description="Context features of the impression by feature name (e.g. hour, device); "
        "missing ones count as unknown.")


class PredictRequest(_Request):
    pairs: list[Pair] = Field(min_length=1, max_length=BATCH_LIMIT)


class ClassifyUsersRequest(_Request):
    user_ids: list[EntityId] = Field(min_length=1, max_length=BATCH_LIMIT)


class ClassifyItemsRequest(_Request):
    item_ids: list[EntityId] = Field(min_length=1, max_length=BATCH_LIMIT)


class RelateRequest(_Request):
    item_a: EntityId
    item_b: EntityId


class RelatedRequest(_Request):
    item_id: EntityId
    relation: Annotated[StrictStr, Field(min_length=1, max_length=256,
                                         description="A class of an item-pair task, e.g. 'substitute'.")]
    k: K = 10
    task: Annotated[StrictStr, Field(max_length=256)] | None = Field(
        None, description="The item-pair task to use (default: the first with this relation).")


# -- responses ----------------------------------------------------------------------------------


class TaskOutput(_Response):
    """One task's answer. binary: `probability` (of the task given `condition`, when conditional,
    and `joint_probability` of the whole chain); multiclass: `label` with `probabilities` of every
    class; multilabel: `labels` (probability >= 0.5) with `probabilities`; regression: `value`."""

    type: Literal["binary", "multiclass", "multilabel", "regression"]
    probability: float | None = None
    condition: str | None = None
    joint_probability: float | None = None
    label: str | None = None
    labels: list[str] | None = None
    probabilities: dict[str, float] | None = None
    value: float | None = None


class RecommendedItem(_Response):
    item_id: StrictStr | StrictInt
    score: float = Field(description="The fused score (model, features), or the item's popularity (popularity).")
    probabilities: dict[str, float] | None = Field(
        None, description="P(event | impression) of every binary interaction task (conditional tasks chained); "
        "null on a popularity answer.")


class RecommendResponse(_Response):
    user_id: StrictStr | StrictInt
    cold_start: bool = Field(description="True when the model does not know the user (see `strategy`).")
    strategy: Literal["model", "features", "popularity"] = Field(
        description="model: a known user, ranked by the model; features: an unknown user ranked by the model from "
        "the request's `features`; popularity: an unknown user without features, given the most popular items.")
    fusion_rule: str
    candidates_ranked: int = Field(description="How many items the multi-task heads scored.")
    two_stage: bool = Field(description="True when retrieval chose the items the heads ranked (else every item "
                            "that passed the filters was ranked).")
    items: list[RecommendedItem]


class PairOutput(_Response):
    user_id: StrictStr | StrictInt
    item_id: StrictStr | StrictInt
    known_user: bool
    tasks: dict[str, TaskOutput]


class PredictResponse(_Response):
    results: list[PairOutput]


class EntityOutput(_Response):
    id: StrictStr | StrictInt
    known: bool = Field(description="False for a user unknown to the model: answered from missing features.")
    tasks: dict[str, TaskOutput]


class ClassifyResponse(_Response):
    results: list[EntityOutput]


class RelateResponse(_Response):
    item_a: StrictStr | StrictInt
    item_b: StrictStr | StrictInt
    tasks: dict[str, TaskOutput]


class RelatedItem(_Response):
    item_id: StrictStr | StrictInt
    probability: float


class RelatedResponse(_Response):
    item_id: StrictStr | StrictInt
    relation: str
    task: str
    items: list[RelatedItem]


class TaskInfo(_Response):
    name: str
    kind: str
    type: str
    condition: str | None = None
    classes: list[str] = []


class ModelInfo(_Response):
    version: str = Field(description="mtlrec version.")
    run: str = Field(description="Name of the run directory.")
    weights_sha256: str = Field(description="Fingerprint of the served weights.")
    backbone: str
    tasks: list[TaskInfo]
    users: int
    items: int
    context_features: list[str]
    category_feature: str | None
    fusion: dict[str, float]
    fusion_rule: str
    default_k: int
    max_k: int
    retrieval_candidates: int
    auth: Literal["api_key", "disabled"]


class Health(_Response):
    status: Literal["ok"]


class ErrorItem(_Response):
    field: str
    message: str
    type: str


class ErrorResponse(_Response):
    error: str
    detail: str | list[ErrorItem] | None = None
    id: str | None = None
