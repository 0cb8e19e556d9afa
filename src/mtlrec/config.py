"""The declarative configuration: typed, validated once at load time.

Precedence is explicit and lives in one function, `load_config`: built-in defaults < the YAML
file < `key=value` overrides from the command line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtlrec.errors import ConfigError

TaskKind = Literal["interaction", "user", "item", "item_pair", "retrieval"]
TaskType = Literal["binary", "multiclass", "multilabel", "regression", "retrieval"]
FeatureType = Literal["categorical", "numeric", "multi_categorical", "sequence"]
TableName = Literal["interactions", "users", "items"]

#: The table a task of each kind reads its label from.
TASK_TABLE: dict[str, str] = {
    "interaction": "interactions",
    "user": "users",
    "item": "items",
    "item_pair": "item_pairs",
    "retrieval": "interactions",
}

_RETRIEVAL_ONLY = ("dim", "temperature")
"""Task keys that apply to the retrieval task alone."""


class _Strict(BaseModel):
    """Unknown keys are errors; configs are frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Strict):
    """How rows are divided into train / validation / test. Encoders see only the train rows."""

    method: Literal["random", "time", "leave_last_out"] = "random"
    valid: float = Field(0.1, ge=0.0, lt=1.0)
    test: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid + self.test >= 1.0:
            raise ValueError(f"valid + test must be < 1, got {self.valid} + {self.test}")
        return self


class DataConfig(_Strict):
    """Where the four kinds of table are and how their key columns are named.

    Paths are relative to the config file's folder. Only `interactions` is required; tasks exist
    only for the tables given. `user_id` / `item_id` may be null for tables without entities
    (Census-Income, the MMoE synthetic data): then there are no user, item or pair tasks.

    With `stream`, the interactions (a Parquet file or a folder of them) are never loaded whole:
    they are read row group by row group, and training shuffles them within a buffer of
    `stream_buffer_rows` rows (see mtlrec.data.stream).
    """

    interactions: str
    users: str | None = None
    items: str | None = None
    item_pairs: str | None = None
    user_id: str | None = "user_id"
    item_id: str | None = "item_id"
    timestamp: str | None = None
    item_a: str = "item_a"
    item_b: str = "item_b"
    id_min_count: int = Field(1, ge=1)
    split: SplitConfig = SplitConfig()
    stream: bool = False
    stream_buffer_rows: int = Field(1_000_000, ge=1)

    def table_paths(self) -> dict[str, str]:
        """Name -> path of every table given."""
        paths = {"interactions": self.interactions, "users": self.users, "items": self.items,
                 "item_pairs": self.item_pairs}
        return {name: path for name, path in paths.items() if path is not None}


class FeatureConfig(_Strict):
    """One input feature.

    `table` says where the column lives: `users` and `items` features describe the entity,
    `interactions` features are context (hour, device). A `sequence` feature is the user's last
    `max_len` items strictly before each interaction, built from the interactions table; `filter`
    names a binary label column that must be 1 for an interaction to enter the history.
    """

    name: str
    type: FeatureType
    table: TableName = "interactions"
    column: str | None = None
    min_count: int = Field(1, ge=1)
    hash_buckets: int | None = Field(None, ge=2)
    separator: str = "|"
    max_len: int = Field(20, ge=1)
    filter: str | None = None

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _type_options(self) -> FeatureConfig:
        if self.type == "sequence" and self.table != "interactions":
            raise ValueError("a sequence feature is built from the interactions table; set table: interactions")
        if self.type == "numeric" and self.hash_buckets is not None:
            raise ValueError("hash_buckets applies to categorical features, not numeric")
        return self


class TaskConfig(_Strict):
    """One prediction task: (name, kind, label column, type), optionally conditional on a parent.

    A `retrieval` task trains dedicated user and item vectors of `dim` for candidate retrieval
    (in-batch sampled softmax with log-Q correction, Yi et al., RecSys 2019): its `label` names
    the interactions column whose 1s are the positive pairs (null: every interaction), and its
    `type` is `retrieval` (the default for that kind).
    """

    name: str
    kind: TaskKind
    label: str | None = None
    type: TaskType
    after: str | None = None
    classes: list[str] | None = None
    separator: str = "|"
    weight: float = Field(1.0, ge=0.0)
    directed: bool = False
    dim: int = Field(32, ge=1)
    temperature: float = Field(0.05, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _retrieval_type(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("kind") == "retrieval" and "type" not in data:
            return {**data, "type": "retrieval"}
        return data

    @model_validator(mode="after")
    def _kind_options(self) -> TaskConfig:
        if (self.kind == "retrieval") != (self.type == "retrieval"):
            raise ValueError(f"task '{self.name}': type 'retrieval' goes with kind 'retrieval' and only with it; "
                             f"got kind '{self.kind}' and type '{self.type}'")
        if self.kind == "retrieval":
            if self.after is not None or self.classes is not None or self.directed:
                raise ValueError(f"task '{self.name}' is a retrieval task; after, classes and directed do not "
                                 "apply to it")
            return self
        if self.label is None:
            raise ValueError(f"task '{self.name}' needs a label column (only a retrieval task may omit it)")
        # Compared with the defaults, not with the keys given: a dumped config writes every key.
        given = [key for key in _RETRIEVAL_ONLY if getattr(self, key) != TaskConfig.model_fields[key].default]
        if given:
            raise ValueError(f"task '{self.name}': {given} apply to retrieval tasks only")
        return self

    @property
    def table(self) -> str:
        return TASK_TABLE[self.kind]


class ModelConfig(_Strict):
    """Sizes of the shared encoders, the interaction backbone and the heads."""

    backbone: str = "mmoe"
    embedding_dim: int = Field(16, ge=1)
    embedding_init_std: float = Field(0.01, gt=0)
    encoder_dim: int | None = Field(32, ge=1)
    encoder_hidden: list[int] = [64]
    numeric_input: Literal["linear", "raw"] = "linear"
    sequence_pooling: Literal["mean", "din", "transformer"] = "mean"
    transformer_heads: int = Field(2, ge=1)
    transformer_layers: int = Field(1, ge=1)
    expert_hidden: list[int] = [64]
    num_experts: int = Field(4, ge=1)
    shared_experts: int = Field(2, ge=1)
    task_experts: int = Field(1, ge=1)
    levels: int = Field(2, ge=1)
    tower_hidden: list[int] = [32]
    head_hidden: list[int] = [32]
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    wide: bool = True
    entity_id_gradients: bool = False


class EarlyStoppingConfig(_Strict):
    """Stop when the validation metric has not improved for `patience` epochs.

    `metric` is `auto` (the mean over tasks of each task's primary metric, oriented so that
    higher is better) or `<task>.<metric>` such as `click.auc`.
    """

    metric: str = "auto"
    patience: int = Field(2, ge=1)


class TrainConfig(_Strict):
    """Optimisation, weighting of task losses, checkpoints and logging."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(512, ge=1)
    aux_passes: float = Field(1.0, gt=0.0)
    lr: float = Field(1e-3, gt=0.0)
    embedding_lr: float | None = Field(None, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    sparse_embeddings: Literal["auto", "on", "off"] = "auto"
    sparse_threshold: int = Field(1_000_000, ge=1)

    @field_validator("sparse_embeddings", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads a bare `on` / `off` as true / false; take them as meant."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    weighting: str = "equal"
    weighting_params: dict[str, float] = {}
    clip_norm: float | None = Field(5.0, gt=0.0)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = "auto"
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    checkpoint_every: int = Field(0, ge=0)
    diagnostics_every: int = Field(50, ge=0)
    eval_batch_size: int = Field(8192, ge=1)
    ranking_k: list[int] = [10]
    progress: bool = True


class RecommendConfig(_Strict):
    """How interaction tasks' probabilities are fused into one ranking score, and how many
    candidates retrieval hands to the ranking stage (runs with a retrieval task only)."""

    k: int = Field(10, ge=1)
    fusion: dict[str, float] = {}
    fusion_rule: Literal["log_sum", "product", "sum"] = "log_sum"
    exclude_seen: bool = True
    candidates: int = Field(500, ge=0)


class Config(_Strict):
    """The whole run: data sources, features, tasks, model, training and recommendation."""

    data: DataConfig
    features: list[FeatureConfig] = []
    tasks: list[TaskConfig]
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    recommend: RecommendConfig = RecommendConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _check_unique("tasks", [t.name for t in self.tasks])
        _check_unique("features", [f.name for f in self.features])
        if not self.tasks:
            raise ValueError("at least one task is required")
        retrieval = [t.name for t in self.tasks if t.kind == "retrieval"]
        if len(retrieval) > 1:
            raise _KeyError(f"tasks: {retrieval} are all retrieval tasks; a run has at most one")
        if retrieval and (self.data.user_id is None or self.data.item_id is None):
            raise _KeyError(f"task '{retrieval[0]}' is a retrieval task, which needs data.user_id and data.item_id")
        by_name = {t.name: t for t in self.tasks}
        given = self.data.table_paths()
        for i, task in enumerate(self.tasks):
            if task.kind == "user" and self.data.user_id is None:
                raise _KeyError(f"tasks[{i}] ('{task.name}') is a user task, but data.user_id is null")
            if task.kind in ("item", "item_pair") and self.data.item_id is None:
                raise _KeyError(f"tasks[{i}] ('{task.name}') is an {task.kind} task, but data.item_id is null")
            if task.table not in given:
                raise _KeyError(f"tasks[{i}] ('{task.name}') is a {task.kind} task, but data.{task.table} is not set")
            if task.after is not None:
                parent = by_name.get(task.after)
                if parent is None:
                    raise _KeyError(f"tasks[{i}].after names '{task.after}', which is not a task; "
                                    f"tasks are {sorted(by_name)}")
                if parent.type != "binary" or parent.kind != task.kind:
                    raise _KeyError(f"tasks[{i}].after names '{task.after}', a {parent.kind} {parent.type} task; "
                                    f"the parent of a conditional task must be a binary {task.kind} task")
                if task.type != "binary":
                    raise _KeyError(f"tasks[{i}] ('{task.name}') is conditional (after: {task.after}) "
                                    f"and must be binary, got {task.type}")
                _check_acyclic(task.name, by_name)
            if task.type in ("binary", "regression") and task.classes is not None:
                raise _KeyError(f"tasks[{i}].classes applies to multiclass and multilabel tasks, not {task.type}")
        for i, feat in enumerate(self.features):
            if feat.table not in given:
                raise _KeyError(f"features[{i}] ('{feat.name}') reads table '{feat.table}', "
                                f"but data.{feat.table} is not set")
            if feat.type == "sequence" and (self.data.user_id is None or self.data.item_id is None):
                raise _KeyError(f"features[{i}] ('{feat.name}') is a sequence feature, which needs "
                                "data.user_id and data.item_id")
            if feat.type == "sequence" and self.data.timestamp is None:
                raise _KeyError(f"features[{i}] ('{feat.name}') is a sequence feature, which needs "
                                "data.timestamp to order each user's history")
            if feat.filter is not None and feat.type != "sequence":
                raise _KeyError(f"features[{i}].filter applies only to sequence features")
        if self.data.stream:
            _check_streamable(self)
        for name in self.recommend.fusion:
            fused = by_name.get(name)
            if fused is None or fused.kind != "interaction" or fused.type != "binary":
                raise _KeyError(f"recommend.fusion names '{name}', which is not a binary interaction task")
        return self

    def tasks_of(self, kind: str) -> list[TaskConfig]:
        return [t for t in self.tasks if t.kind == kind]


class _KeyError(ValueError):
    """A cross-field problem; its message already names the key path."""


def _check_streamable(config: Config) -> None:
    """What `data.stream` cannot do: anything that needs the whole log at once."""
    if config.data.split.method == "leave_last_out":
        raise _KeyError("data.split.method is 'leave_last_out', which data.stream cannot do (it needs every "
                        "user's whole log in time order); use 'random' or 'time', or set data.stream: false")
    for i, feat in enumerate(config.features):
        if feat.type == "sequence":
            raise _KeyError(f"features[{i}] ('{feat.name}') is a sequence feature, which data.stream cannot "
                            "build (it needs every user's whole log in time order); remove it or set "
                            "data.stream: false")


def _check_unique(section: str, names: list[str]) -> None:
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise _KeyError(f"{section}: duplicate names {dupes}; every name must be unique")


def _check_acyclic(start: str, by_name: Mapping[str, TaskConfig]) -> None:
    seen = {start}
    node = by_name[start].after
    while node is not None:
        if node in seen:
            raise _KeyError(f"tasks: 'after' forms a cycle through '{node}'")
        seen.add(node)
        node = by_name[node].after


# ---------------------------------------------------------------------------------------------
# Loading and merging


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `["train.epochs=3", "model.backbone=ple"]` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc.__class__.__name__})") from None
        _set_path(nested, key.split("."), value, item)
    return nested


def _set_path(tree: dict[str, Any], parts: list[str], value: Any, item: str) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        tree[head] = value
        return
    child = tree.setdefault(head, {})
    if not isinstance(child, dict):
        raise ConfigError(f"override '{item}': '{head}' is given both as a value and as a section")
    _set_path(child, rest, value, item)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`; dict keys of lists address list items."""
    out: dict[str, Any] = dict(base)
    for key, value in update.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            out[key] = merge(current, value)
        elif isinstance(current, list) and isinstance(value, Mapping) and all(k.isdigit() for k in value):
            items = list(current)
            for idx, sub in value.items():
                i = int(idx)
                if i >= len(items):
                    raise ConfigError(f"override: '{key}.{idx}' is out of range; '{key}' has {len(items)} items")
                items[i] = merge(items[i], sub) if isinstance(items[i], dict) and isinstance(sub, Mapping) else sub
            out[key] = items
        else:
            out[key] = value
    return out


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict | list):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{path}: {msg}" if path else msg)
    return "; ".join(lines)


def config_from_dict(raw: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Validate a config given as a dict, with optional `key=value` overrides applied on top."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    update = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    data = merge(dict(raw), update)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {_format_validation(exc)}") from None


def load_config(source: str | Path | Mapping[str, Any] | Config,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> tuple[Config, Path]:
    """Load and validate a config: defaults < file < overrides.

    Returns the config and the folder that relative data paths are resolved against.
    """
    if isinstance(source, Config):
        if overrides:
            return config_from_dict(source.model_dump(), overrides), Path.cwd()
        return source, Path.cwd()
    if isinstance(source, Mapping):
        return config_from_dict(source, overrides), Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if raw is None:
        raise ConfigError(f"config file '{path}' is empty")
    return config_from_dict(raw, overrides), path.resolve().parent


def dump_config(config: Config) -> str:
    """The config as YAML, with every default written out (the resolved config of a run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
