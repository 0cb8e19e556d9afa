"""The fitted schema: every encoder of a run, the model's `InputSpec`, and encoding of tables.

`Schema(config).fit(tables, split)` learns vocabularies, scalings and label classes from the
training rows only; `encode(tables)` turns any tables (training data, or prediction input without
labels) into an `EncodedData` of contiguous tensors. The schema saves to one JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch

from mtlrec.atomic import atomic_write_text
from mtlrec.config import Config, FeatureConfig, TaskConfig
from mtlrec.data.dataset import EncodedData, EntityTable, HistoryIndex, SourceData
from mtlrec.data.encoders import (
    ArrayLike,
    CategoricalEncoder,
    Encoder,
    IdIndex,
    LabelEncoder,
    Moments,
    MultiCategoricalEncoder,
    NumericEncoder,
    ValueCounts,
    encoder_from_dict,
    to_float,
    to_float_label,
)
from mtlrec.data.spec import OOV, FieldSpec, Group, InputSpec, TaskSpec
from mtlrec.data.split import SplitIndex
from mtlrec.data.tables import Tables, timestamps, validate_tables
from mtlrec.errors import ArtifactError, ConfigError, DataError

SCHEMA_FILE = "schema.json"
FORMAT = "mtlrec.schema"
VERSION = 1

_GROUP_OF_TABLE: dict[str, Group] = {"users": "user", "items": "item", "interactions": "context"}
_RESERVED = ("user_key", "item_key", "item_b_key")


def _narrow(values: np.ndarray) -> torch.Tensor:
    """Per-row index columns as int32 when they fit (half the memory); batches widen to int64."""
    if values.dtype == np.int64 and (values.size == 0 or int(values.max(initial=0)) < 2**31 - 1):
        values = values.astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(values))


def _missing_row(encoder: Encoder) -> np.ndarray:
    """The encoding of a missing value (for entities that have no row in their table)."""
    return encoder.transform(pd.Series([None], dtype=object))[0]


InteractionChunk: TypeAlias = "tuple[pd.DataFrame, np.ndarray]"
"""Consecutive interaction rows, and the positions (int64 [T]) of the training rows among them."""


def _add_labels(values: ValueCounts, task: TaskConfig, labels: pd.Series, name: str) -> None:
    """Record the distinct training labels of a chunk (a regression label is only checked)."""
    if task.type == "regression":
        to_float_label(labels, name)
    elif task.type == "multilabel":
        values.add_tokens(labels, task.separator)
    else:
        values.add(labels)


def item_log_q(counts: np.ndarray) -> np.ndarray:
    """float32 [I] log q of each item from its count among the positive training interactions
    (q = count / total; an item without one counts once: its rows only reach evaluation)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log(np.maximum(counts, 1.0) / max(float(counts.sum()), 1.0)).astype(np.float32)


def _set_retrieval(source: SourceData, task: TaskConfig, log_q: np.ndarray, positive: np.ndarray) -> None:
    """The retrieval task's label (log q of each row's item) and mask (its positive rows)."""
    items = source.keys["item_key"].numpy().astype(np.int64)
    source.labels[task.name] = torch.from_numpy(log_q[items] if items.size else np.zeros(0, np.float32))
    source.masks[task.name] = torch.from_numpy(np.ascontiguousarray(positive))


def _depth(task: TaskConfig, by_name: dict[str, TaskConfig]) -> int:
    depth = 0
    while task.after is not None:
        task = by_name[task.after]
        depth += 1
    return depth


class Schema:
    """Encoders for ids, features and labels, fitted on the training rows of a split.

    Args:
        config: the run's config; the constructor only stores it.

    Attributes (after `fit` or `from_dict`):
        spec_: the `InputSpec` the model is built from.
        users_, items_: known entity ids (`IdIndex`), or None without user / item ids.
        user_vocab_, item_vocab_: id vocabularies (training interactions plus training rows of
            the users / items / item_pairs tables, `data.id_min_count`).
        features_: feature name -> encoder (sequence features use the item vocabulary).
        labels_: task name -> `LabelEncoder`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config

    users_: IdIndex | None
    items_: IdIndex | None
    user_vocab_: CategoricalEncoder | None
    item_vocab_: CategoricalEncoder | None
    features_: dict[str, Encoder]
    labels_: dict[str, LabelEncoder]
    spec_: InputSpec

    # -----------------------------------------------------------------------------------------
    # Fitting

    def _check_config(self) -> None:
        data = self.config.data
        taken = {"user_id": data.user_id is not None, "item_id": data.item_id is not None}
        for i, feat in enumerate(self.config.features):
            if feat.name in _RESERVED or taken.get(feat.name, False):
                raise ConfigError(f"features[{i}].name '{feat.name}' is reserved for the entity id / key "
                                  "fields; rename the feature")
            if feat.type == "sequence" and feat.hash_buckets is not None:
                raise ConfigError(f"features[{i}].hash_buckets does not apply to a sequence feature "
                                  f"('{feat.name}' uses the item_id vocabulary); remove it")

    @staticmethod
    def _check_split(split: SplitIndex, tables: Tables) -> None:
        for name in tables.present():
            df = tables.get(name)
            assert df is not None
            if name not in split.parts:
                raise DataError(f"the split has no parts for table '{name}'; make it with "
                                "split_tables(tables, config) on these tables")
            parts = split.parts[name]
            covered = sum(int(r.size) for r in parts.values())
            top = max((int(r.max()) for r in parts.values() if r.size), default=-1)
            if covered != len(df) or top >= len(df):
                raise DataError(f"the split of table '{name}' covers {covered} rows, but the table has "
                                f"{len(df)}; the split was made for other tables")

    def fit(self, tables: Tables, split: SplitIndex) -> Schema:
        """Learn every encoder from the training rows of `split`.

        Id vocabularies and interaction features use the training interactions (plus the training
        rows of the users / items / item_pairs tables for ids); users / items table features use
        every row of their table (inputs, not labels); each task's label encoder uses the
        training rows of its own table only.

        Raises:
            DataError: a table lacks a configured column, a label is invalid, or the training
                part is empty.
            ConfigError: a feature name is reserved.
        """
        self._check_config()
        validate_tables(tables, self.config, check_leaks=False)
        self._check_split(split, tables)
        train = split.rows("interactions", "train")
        return self._fit(tables, split, [(tables.interactions, train)])

    def fit_stream(self, tables: Tables, split: SplitIndex, chunks: Iterable[InteractionChunk]) -> Schema:
        """Learn every encoder with the interactions given in chunks, never whole (`data.stream`).

        The result is the schema `fit` learns on the concatenated chunks: vocabularies and label
        classes exactly, numeric scalings up to rounding (means and spreads merged chunk by chunk).

        Args:
            tables: the users / items / item_pairs tables; `tables.interactions` is a sample of the
                interactions (their first row group), already validated with the other tables.
            split: the parts of the users / items / item_pairs tables.
            chunks: every interaction row once, in file order, as (frame, positions of its training
                rows in the frame).

        Raises:
            DataError: a chunk holds an invalid value or label, or no chunk has training rows.
        """
        self._check_config()
        return self._fit(tables, split, chunks)

    def _fit(self, tables: Tables, split: SplitIndex, chunks: Iterable[InteractionChunk]) -> Schema:
        """Fit on the catalogue tables and on the interactions chunk by chunk (one pass)."""
        cfg = self.config
        data = cfg.data
        users, items, pairs = tables.users, tables.items, tables.item_pairs
        user_index = IdIndex.build([users[data.user_id]] if users is not None and data.user_id else [])
        item_index = IdIndex.build([items[data.item_id]] if items is not None and data.item_id else [])
        user_counts, item_counts = ValueCounts(), ValueCounts()
        features = [(i, f) for i, f in enumerate(cfg.features) if f.table == "interactions" and f.type != "sequence"]
        feature_stats: dict[str, ValueCounts | Moments] = {
            f.name: Moments() if f.type == "numeric" else ValueCounts() for _, f in features}
        label_tasks = [(i, t) for i, t in enumerate(cfg.tasks) if t.table == "interactions" and t.label is not None]
        label_values = {t.name: ValueCounts() for _, t in label_tasks}
        train_rows = 0
        for frame, train in chunks:
            if data.user_id is not None:
                user_index = user_index.extend([frame[data.user_id]])
                user_counts.add(frame[data.user_id].iloc[train])
            if data.item_id is not None:
                item_index = item_index.extend([frame[data.item_id]])
                item_counts.add(frame[data.item_id].iloc[train])
            if len(train) == 0:
                continue
            train_rows += len(train)
            for i, feat in features:
                column = frame[feat.source_column].iloc[train]
                stats = feature_stats[feat.name]
                try:
                    if isinstance(stats, Moments):
                        stats.add(column)
                    elif feat.type == "multi_categorical":
                        stats.add_tokens(column, feat.separator)
                    elif feat.hash_buckets is None:
                        stats.add(column)
                except DataError as exc:
                    raise DataError(f"feature '{feat.name}' (features[{i}]): {exc}") from None
            for i, task in label_tasks:
                _add_labels(label_values[task.name], task, frame[task.label].iloc[train],
                            f"task '{task.name}' (tasks[{i}].label)")
        if train_rows == 0:
            raise DataError("the training part of the interactions is empty; lower data.split.valid / "
                            "data.split.test or give more rows")

        self.users_ = self.items_ = None
        self.user_vocab_ = self.item_vocab_ = None
        if data.user_id is not None:
            self.users_ = user_index
            # An id gets its own embedding row only when training reaches it: rows of the users
            # (items) table train their id only with model.entity_id_gradients; otherwise an id
            # seen only there would keep its random initial row, noise that every score of that
            # user (item) carries. It shares the OOV row instead and is known by its features.
            if users is not None and cfg.model.entity_id_gradients:
                user_counts.add(users[data.user_id].iloc[split.rows("users", "train")])
            self.user_vocab_ = CategoricalEncoder(data.id_min_count).fit_counts(user_counts)
        if data.item_id is not None:
            if items is not None and cfg.model.entity_id_gradients:
                item_counts.add(items[data.item_id].iloc[split.rows("items", "train")])
            if pairs is not None:
                item_index = item_index.extend([pairs[data.item_a], pairs[data.item_b]])
                pair_train = split.rows("item_pairs", "train")
                item_counts.add(pairs[data.item_a].iloc[pair_train])
                item_counts.add(pairs[data.item_b].iloc[pair_train])
            self.items_ = item_index
            self.item_vocab_ = CategoricalEncoder(data.id_min_count).fit_counts(item_counts)

        self.features_ = {}
        for i, feat in enumerate(cfg.features):
            if feat.type == "sequence":
                continue
            encoder = self._new_encoder(feat)
            try:
                if feat.table == "interactions":
                    stats = feature_stats[feat.name]
                    if isinstance(encoder, NumericEncoder):
                        assert isinstance(stats, Moments)
                        encoder.fit_moments(stats)
                    else:
                        assert isinstance(stats, ValueCounts)
                        encoder.fit_counts(stats)
                else:
                    df = tables.get(feat.table)
                    assert df is not None  # validate_tables checked it
                    encoder.fit(df[feat.source_column])
            except DataError as exc:
                raise DataError(f"feature '{feat.name}' (features[{i}]): {exc}") from None
            self.features_[feat.name] = encoder

        self.labels_ = {}
        for i, task in enumerate(cfg.tasks):
            if task.label is None:  # a retrieval task whose positives are every interaction
                continue
            # A retrieval task's label marks its positive pairs: a binary column.
            label_type = "binary" if task.type == "retrieval" else task.type
            encoder_l = LabelEncoder(label_type, task.classes, task.separator,
                                     name=f"task '{task.name}' (tasks[{i}].label)")
            if task.table == "interactions":
                # The classes depend only on the distinct training labels, so they are fitted on
                # those (one of each), gathered chunk by chunk.
                strings, _ = label_values[task.name].totals()
                self.labels_[task.name] = encoder_l.fit(pd.Series(strings, dtype=object))
                continue
            df = tables.get(task.table)
            assert df is not None
            rows = split.rows(task.table, "train")
            self.labels_[task.name] = encoder_l.fit(df[task.label].iloc[rows])

        self.spec_ = self._build_spec()
        return self

    def _item_columns(self, tables: Tables, interactions: bool = True) -> list[ArrayLike]:
        data = self.config.data
        assert data.item_id is not None
        columns: list[ArrayLike] = []
        if tables.items is not None:
            columns.append(tables.items[data.item_id])
        if interactions:
            columns.append(tables.interactions[data.item_id])
        if tables.item_pairs is not None:
            columns += [tables.item_pairs[data.item_a], tables.item_pairs[data.item_b]]
        return columns

    @staticmethod
    def _new_encoder(feat: FeatureConfig) -> Encoder:
        if feat.type == "categorical":
            return CategoricalEncoder(feat.min_count, feat.hash_buckets)
        if feat.type == "numeric":
            return NumericEncoder()
        return MultiCategoricalEncoder(feat.min_count, feat.max_len, feat.separator, feat.hash_buckets)

    def _build_spec(self) -> InputSpec:
        cfg = self.config
        fields: list[FieldSpec] = []
        sizes: dict[str, int] = {}
        if self.user_vocab_ is not None:
            fields.append(FieldSpec("user_id", "user", "categorical", "user_id"))
            sizes["user_id"] = self.user_vocab_.size
        if self.item_vocab_ is not None:
            sizes["item_id"] = self.item_vocab_.size
        by_group: dict[str, list[FieldSpec]] = {"user": [], "item": [], "context": [], "sequence": []}
        for feat in cfg.features:
            if feat.type == "sequence":
                by_group["sequence"].append(FieldSpec(feat.name, "user", "sequence", "item_id", feat.max_len))
                continue
            encoder = self.features_[feat.name]
            group = _GROUP_OF_TABLE[feat.table]
            if isinstance(encoder, NumericEncoder):
                by_group[group].append(FieldSpec(feat.name, group, "numeric"))
                continue
            length = encoder.max_len if isinstance(encoder, MultiCategoricalEncoder) else 1
            by_group[group].append(FieldSpec(feat.name, group, feat.type, feat.name, length))
            sizes[feat.name] = encoder.size
        fields += by_group["user"] + by_group["sequence"]
        if self.item_vocab_ is not None:
            fields.append(FieldSpec("item_id", "item", "categorical", "item_id"))
        fields += by_group["item"] + by_group["context"]
        tasks = []
        for task in cfg.tasks:
            if task.kind == "retrieval":
                tasks.append(TaskSpec(task.name, "retrieval", "retrieval", task.dim, temperature=task.temperature))
                continue
            enc = self.labels_[task.name]
            classes = tuple(enc.classes_) if task.type in ("multiclass", "multilabel") else ()
            tasks.append(TaskSpec(task.name, task.kind, task.type, enc.num_outputs, task.after,
                                  task.directed, classes))
        return InputSpec(tuple(fields), sizes, tuple(tasks))

    def _check_fitted(self) -> None:
        if not hasattr(self, "spec_"):
            raise RuntimeError("the schema is not fitted; call fit() or Schema.load() first")

    # -----------------------------------------------------------------------------------------
    # Encoding

    def encode(self, tables: Tables, split: SplitIndex | None = None) -> EncodedData:
        """Encode every row of every table given.

        Label columns may be absent (prediction input): their tasks' masks are then all False.
        Behaviour sequences hold, for each interaction, the user's items strictly before its
        timestamp. With `split` (the one the schema was fitted on), training rows' sequences draw
        only on training rows, and each user's latest history (for user batches and serving) on
        the training interactions; without it, on all rows given.

        Raises:
            DataError: a table lacks a configured column or holds an invalid label.
        """
        self._check_fitted()
        cfg = self.config
        data = cfg.data
        validate_tables(tables, cfg, require_labels=False, check_leaks=False)
        if split is not None:
            self._check_split(split, tables)
        inter = tables.interactions
        sources: dict[str, SourceData] = {}
        for name in tables.present():
            df = tables.get(name)
            if df is not None:
                sources[name] = SourceData(len(df))
        if data.item_id is None:
            sources.pop("item_pairs", None)

        items_table = self._item_entities(tables, sources, interactions=True)
        users_table = self._user_entities(tables, split, sources, items_table, interactions=True)

        context = sources["interactions"].context
        for feat in cfg.features:
            if feat.table == "interactions" and feat.type != "sequence":
                encoded = self._encode_feature(feat, inter[feat.source_column])
                context[feat.name] = (torch.from_numpy(encoded) if feat.type == "numeric"
                                      else _narrow(encoded))

        for name, source in sources.items():
            df = tables.get(name)
            assert df is not None
            source.labels, source.masks = self._labels(name, df)
        for task in cfg.tasks_of("retrieval"):
            self._retrieval_labels(task, inter, sources["interactions"], split)
        return EncodedData(self.spec_, users_table, items_table, sources)

    def release_lookups(self) -> None:
        """Drop the vocabularies' lookup tables; the next encode rebuilds them.

        A trainer calls this once its data is encoded: the tables hold a hash entry per vocabulary
        value (10 MB for the speed benchmark's 260,000 values), and training looks nothing up.
        """
        self._check_fitted()
        for encoder in [*self.features_.values(), self.user_vocab_, self.item_vocab_]:
            if isinstance(encoder, CategoricalEncoder | MultiCategoricalEncoder):
                encoder.release_lookup()

    def _retrieval_labels(self, task: TaskConfig, inter: pd.DataFrame, source: SourceData,
                          split: SplitIndex | None) -> None:
        """The retrieval task's targets: log q of each interaction's item, masked to the positives.

        q is the probability that a positive interaction drawn at random is of that item: its count
        among the positive training interactions (every interaction given, without `split`) over
        their number (`item_log_q`). The loss subtracts log q from each in-batch logit (log-Q
        correction, Yi et al., RecSys 2019), so popular items, which are in-batch negatives more
        often, are not over-penalised.
        """
        positive = self.positive_mask(task, inter)
        items = source.keys["item_key"].numpy().astype(np.int64)
        counted = positive.copy()
        if split is not None:
            train = np.zeros(len(inter), dtype=bool)
            train[split.rows("interactions", "train")] = True
            counted &= train
        counts = np.bincount(items[counted], minlength=int(items.max(initial=-1)) + 1)
        _set_retrieval(source, task, item_log_q(counts), positive)

    def positive_mask(self, task: TaskConfig, frame: pd.DataFrame) -> np.ndarray:
        """bool [R]: the interactions of `frame` labelled 1 by binary task `task` (a retrieval task
        without a label column: every row); none when its label column is absent from `frame`
        (prediction input)."""
        if task.label is None:
            return np.ones(len(frame), dtype=bool)
        if task.label not in frame.columns:
            return np.zeros(len(frame), dtype=bool)
        labels, mask = self.labels_[task.name].transform(frame[task.label])
        return np.asarray(mask & (labels == 1.0))

    def encode_catalogue(self, tables: Tables) -> EncodedData:
        """Entity tables and the users / items / item_pairs rows, without the interactions (`data.stream`).

        The interactions are encoded chunk by chunk with `encode_interactions`; `tables.interactions`
        is only a sample, used to check the columns. Entity rows are those the schema was fitted
        on (every id of the interactions is among them) plus ids of the tables given.

        Raises:
            DataError: a table lacks a configured column or holds an invalid label.
        """
        self._check_fitted()
        validate_tables(tables, self.config, require_labels=False, check_leaks=False)
        sources = {name: SourceData(len(df)) for name in tables.present() if name != "interactions"
                   if (df := tables.get(name)) is not None}
        if self.config.data.item_id is None:
            sources.pop("item_pairs", None)
        items_table = self._item_entities(tables, sources, interactions=False)
        users_table = self._user_entities(tables, None, sources, items_table, interactions=False)
        for name, source in sources.items():
            df = tables.get(name)
            assert df is not None
            source.labels, source.masks = self._labels(name, df)
        return EncodedData(self.spec_, users_table, items_table, sources)

    def encode_interactions(self, frame: pd.DataFrame, data: EncodedData, label: str,
                            log_q: Mapping[str, np.ndarray] | None = None) -> SourceData:
        """The rows of one chunk of interactions: entity keys, context fields, labels and masks.

        Args:
            frame: interaction rows; label columns may be absent (their masks are then False).
            data: `encode_catalogue`'s result, whose entity tables the keys point into.
            label: how errors refer to the chunk (file and row group).
            log_q: per retrieval task, `item_log_q` of every item entity row, counted over all the
                training interactions (a chunk alone does not give it; see `InteractionStream`).

        Raises:
            DataError: a value or label is invalid, or an id is unknown to the fitted schema
                (the interactions changed since it was fitted).
        """
        self._check_fitted()
        cfg = self.config
        source = SourceData(len(frame))
        for kind, column, table in (("user", cfg.data.user_id, data.users), ("item", cfg.data.item_id, data.items)):
            if column is None or table is None:
                continue
            keys = table.rows_of(frame[column])
            if keys.size and int(keys.min()) < 0:
                raise DataError(f"data.{kind}_id: {label} has {kind} ids that the run's schema does not know, "
                                f"such as {frame[column][keys < 0].head(5).tolist()}; streamed interactions "
                                f"must hold only ids the run was fitted on (set data.stream: false to score "
                                f"new ids as out-of-vocabulary)")
            source.keys[f"{kind}_key"] = torch.from_numpy(keys)
        for feat in cfg.features:
            if feat.table == "interactions" and feat.type != "sequence":
                encoded = self._encode_feature(feat, frame[feat.source_column])
                source.context[feat.name] = (torch.from_numpy(encoded) if feat.type == "numeric"
                                             else _narrow(encoded))
        source.labels, source.masks = self._labels("interactions", frame)
        for task in cfg.tasks_of("retrieval"):
            if log_q is None or task.name not in log_q:
                raise ValueError(f"retrieval task '{task.name}': encode_interactions needs its item log q")
            _set_retrieval(source, task, log_q[task.name], self.positive_mask(task, frame))
        return source

    def _item_entities(self, tables: Tables, sources: dict[str, SourceData],
                       interactions: bool) -> EntityTable | None:
        """The item entity table; sets the item keys of the interactions (when `interactions`),
        items and item_pairs rows."""
        data = self.config.data
        if self.items_ is None or self.item_vocab_ is None or data.item_id is None:
            return None
        index = self.items_.extend(self._item_columns(tables, interactions))
        fields = {"item_id": torch.from_numpy(self.item_vocab_.map_strings(index.ids))}
        fields.update(self._entity_features(tables.items, data.item_id, index, "items"))
        if interactions:
            inter_items = index.rows(tables.interactions[data.item_id])
            sources["interactions"].keys["item_key"] = torch.from_numpy(inter_items)
        if tables.items is not None:
            sources["items"].keys["item_key"] = torch.from_numpy(index.rows(tables.items[data.item_id]))
        if tables.item_pairs is not None:
            pairs = sources["item_pairs"]
            pairs.keys["item_key"] = torch.from_numpy(index.rows(tables.item_pairs[data.item_a]))
            pairs.keys["item_b_key"] = torch.from_numpy(index.rows(tables.item_pairs[data.item_b]))
        return EntityTable("item", index, {spec.name: fields[spec.name] for spec in self.spec_.group("item")})

    def _user_entities(self, tables: Tables, split: SplitIndex | None, sources: dict[str, SourceData],
                       items: EntityTable | None, interactions: bool) -> EntityTable | None:
        """The user entity table; sets the user keys of the users rows and (when `interactions`) the
        user keys and per-row sequences of the interactions."""
        data = self.config.data
        if self.users_ is None or self.user_vocab_ is None or data.user_id is None:
            return None
        inter, users = tables.interactions, tables.users
        columns: list[ArrayLike] = [inter[data.user_id]] if interactions else []
        if users is not None:
            columns.insert(0, users[data.user_id])
        index = self.users_.extend(columns)
        fields = {"user_id": torch.from_numpy(self.user_vocab_.map_strings(index.ids))}
        fields.update(self._entity_features(users, data.user_id, index, "users"))
        if users is not None:
            sources["users"].keys["user_key"] = torch.from_numpy(index.rows(users[data.user_id]))
        if interactions:
            self._interaction_users(tables, split, sources, items, index, fields)
        return EntityTable("user", index, {spec.name: fields[spec.name] for spec in self.spec_.group("user")})

    def _interaction_users(self, tables: Tables, split: SplitIndex | None, sources: dict[str, SourceData],
                           items: EntityTable | None, index: IdIndex, fields: dict[str, torch.Tensor]) -> None:
        """The interactions' user keys and per-row sequences; each user's latest sequences into `fields`."""
        data = self.config.data
        assert data.user_id is not None
        user_key = index.rows(tables.interactions[data.user_id])
        sources["interactions"].keys["user_key"] = torch.from_numpy(user_key)
        sequences = [f for f in self.config.features if f.type == "sequence"]
        if sequences:
            if items is None:  # the config requires item ids for sequence features
                raise ConfigError("sequence features need data.item_id")
            item_vocab = items.fields["item_id"].numpy()[sources["interactions"].keys["item_key"].numpy()]
            latest, per_row = self._sequences(tables, split, sequences, user_key, len(index), item_vocab)
            fields.update(latest)
            sources["interactions"].sequences = per_row

    def encode_context(self, frame: pd.DataFrame) -> dict[str, torch.Tensor]:
        """The context fields (interactions-table features) of `frame`'s rows, batch-ready.

        Returns:
            feature name -> int64 [N] (categorical), float32 [N, 2] (numeric) or int64 [N, L]
            (multi-categorical).

        Raises:
            DataError: `frame` lacks a feature's column.
        """
        self._check_fitted()
        out: dict[str, torch.Tensor] = {}
        for i, feat in enumerate(self.config.features):
            if feat.table != "interactions" or feat.type == "sequence":
                continue
            if feat.source_column not in frame.columns:
                columns = [str(c) for c in frame.columns]
                raise DataError(f"feature '{feat.name}' (features[{i}]) names column '{feat.source_column}', "
                                f"which the input does not have; its columns are {columns}")
            out[feat.name] = torch.from_numpy(self._encode_feature(feat, frame[feat.source_column]))
        return out

    def new_user_fields(self, features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The user-group fields of one user the model does not know, from its raw feature values.

        `features` maps names of user features (`table: users`) to raw values as the users table
        holds them; absent features and None count as missing. The id is the OOV row and behaviour
        sequences are empty, so the user encoder reads the given features alone (cold start).

        Returns:
            field name -> int64 [1] (categorical), float32 [1, 2] (numeric), int64 [1, L]
            (multi-categorical, sequence).

        Raises:
            DataError: a name that is not a user feature, or a value its encoder rejects (such as
                text for a numeric feature).
        """
        self._check_fitted()
        by_name = {f.name: f for f in self.config.features if f.table == "users"}
        unknown = sorted(set(features) - set(by_name))
        if unknown:
            raise DataError(f"{unknown} are not user features of this run; its user features are {sorted(by_name)}")
        out: dict[str, torch.Tensor] = {}
        for spec in self.spec_.group("user"):
            if spec.kind == "sequence":
                out[spec.name] = torch.zeros(1, spec.length, dtype=torch.int64)
            elif spec.name == "user_id":
                out[spec.name] = torch.tensor([OOV], dtype=torch.int64)
            else:
                value = pd.Series([features.get(spec.name)], dtype=object)
                encoded = torch.from_numpy(self._encode_feature(by_name[spec.name], value))
                out[spec.name] = encoded if spec.kind == "numeric" else encoded.long()
        return out

    def _encode_feature(self, feat: FeatureConfig, column: pd.Series) -> np.ndarray:
        index = [f.name for f in self.config.features].index(feat.name)
        try:
            return self.features_[feat.name].transform(column)
        except DataError as exc:
            raise DataError(f"feature '{feat.name}' (features[{index}]): {exc}") from None

    def _entity_features(self, df: pd.DataFrame | None, id_column: str, index: IdIndex,
                         table: str) -> dict[str, torch.Tensor]:
        """Entity-table features, one row per entity; entities without a table row get 'missing'."""
        out: dict[str, torch.Tensor] = {}
        rows = index.rows(df[id_column]) if df is not None else None
        for feat in self.config.features:
            if feat.table != table:
                continue
            encoder = self.features_[feat.name]
            missing = _missing_row(encoder)
            values = np.empty((len(index),) + missing.shape, dtype=missing.dtype)
            values[...] = missing
            if df is not None and rows is not None:
                values[rows] = self._encode_feature(feat, df[feat.source_column])
            out[feat.name] = torch.from_numpy(values)
        return out

    def _filter(self, feat: FeatureConfig, inter: pd.DataFrame) -> np.ndarray:
        """bool [N]: interactions allowed into the history of sequence feature `feat`."""
        if feat.filter is None:
            return np.ones(len(inter), dtype=bool)
        index = [f.name for f in self.config.features].index(feat.name)
        if feat.filter not in inter.columns:
            raise DataError(f"feature '{feat.name}' (features[{index}].filter) names column '{feat.filter}', "
                            "which the interactions table does not have; histories are built from it")
        column = inter[feat.filter]
        for task in self.config.tasks:
            if task.kind == "interaction" and task.type == "binary" and task.label == feat.filter:
                labels, mask = self.labels_[task.name].transform(column)
                return np.asarray(mask & (labels == 1.0))
        try:
            return np.asarray(to_float(column) == 1.0)
        except DataError as exc:
            raise DataError(f"feature '{feat.name}' (features[{index}].filter): column '{feat.filter}' "
                            f"must hold 0/1 or booleans: {exc}") from None

    def _sequences(self, tables: Tables, split: SplitIndex | None, features: Sequence[FeatureConfig],
                   user_key: np.ndarray, num_users: int,
                   items: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Latest history per user entity (int64 [K, L]) and per-row history (int32 [N, L]) of each feature.

        Args:
            user_key: int64 [N] user entity row of every interaction.
            items: int64 [N] item vocabulary index of every interaction.
        """
        data = self.config.data
        if data.timestamp is None:  # the config requires a timestamp for sequence features
            raise ConfigError("sequence features need data.timestamp")
        inter = tables.interactions
        history = HistoryIndex(user_key, timestamps(inter, data.timestamp, "the interactions table"),
                               num_users)
        is_train: np.ndarray | None = None
        if split is not None:
            is_train = np.zeros(len(inter), dtype=bool)
            is_train[split.rows("interactions", "train")] = True
        latest: dict[str, torch.Tensor] = {}
        per_row: dict[str, torch.Tensor] = {}
        for feat in features:
            eligible = self._filter(feat, inter)
            rows = np.zeros((len(inter), feat.max_len), dtype=np.int32)
            if is_train is None:
                history.fill_before(items, eligible, None, rows)
            else:
                # Training rows see only training rows; valid/test rows see every earlier row.
                history.fill_before(items, eligible, ~is_train, rows)
                eligible = eligible & is_train
                history.fill_before(items, eligible, is_train, rows)
            latest[feat.name] = torch.from_numpy(history.latest(items, eligible, feat.max_len)).long()
            per_row[feat.name] = torch.from_numpy(rows)
        return latest, per_row

    def _labels(self, source: str,
                df: pd.DataFrame) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Labels and masks of every task of `source`; conditional tasks masked where the parent is not 1."""
        tasks = [t for t in self.config.tasks if t.table == source and t.kind != "retrieval"]
        labels: dict[str, np.ndarray] = {}
        masks: dict[str, np.ndarray] = {}
        for task in tasks:
            encoder = self.labels_[task.name]
            if task.label in df.columns:
                labels[task.name], masks[task.name] = encoder.transform(df[task.label])
            else:
                shape = (len(df), encoder.num_outputs) if task.type == "multilabel" else (len(df),)
                dtype = np.int64 if task.type == "multiclass" else np.float32
                labels[task.name] = np.zeros(shape, dtype=dtype)
                masks[task.name] = np.zeros(len(df), dtype=bool)
        by_name = {t.name: t for t in self.config.tasks}
        for task in sorted(tasks, key=lambda t: _depth(t, by_name)):
            if task.after is None:
                continue
            mask = masks[task.name] & masks[task.after] & (labels[task.after] == 1.0)
            masks[task.name] = mask
            labels[task.name] = np.where(mask, labels[task.name], 0).astype(labels[task.name].dtype)
        order = [t.name for t in tasks]
        return ({name: torch.from_numpy(np.ascontiguousarray(labels[name])) for name in order},
                {name: torch.from_numpy(np.ascontiguousarray(masks[name])) for name in order})

    # -----------------------------------------------------------------------------------------
    # Entities

    def _index(self, kind: str) -> IdIndex:
        self._check_fitted()
        index = self.users_ if kind == "user" else self.items_
        if index is None:
            raise DataError(f"there are no {kind} entities: data.{kind}_id is null")
        return index

    @staticmethod
    def _ids(raw_ids: ArrayLike | str | int) -> ArrayLike:
        if isinstance(raw_ids, str | int | np.integer):
            return [raw_ids]
        return raw_ids

    def user_rows(self, raw_ids: ArrayLike | str | int) -> np.ndarray:
        """User entity row of each raw id -> int64 [N]; -1 for users unknown at fit time (cold start)."""
        return self._index("user").rows(self._ids(raw_ids))

    def item_rows(self, raw_ids: ArrayLike | str | int) -> np.ndarray:
        """Item entity row of each raw id -> int64 [N]; -1 for items unknown at fit time."""
        return self._index("item").rows(self._ids(raw_ids))

    def user_ids(self) -> np.ndarray:
        """Raw id of every user entity row known at fit time (int64 if all ids were integers, else str)."""
        return self._index("user").raw()

    def item_ids(self) -> np.ndarray:
        """Raw id of every item entity row known at fit time (int64 if all ids were integers, else str)."""
        return self._index("item").raw()

    # -----------------------------------------------------------------------------------------
    # Persistence

    def _signature(self) -> dict[str, Any]:
        cfg = self.config
        return {"user_id": cfg.data.user_id, "item_id": cfg.data.item_id,
                "features": [[f.name, f.type, f.table] for f in cfg.features],
                "tasks": [[t.name, t.kind, t.type] for t in cfg.tasks]}

    def to_dict(self) -> dict[str, Any]:
        """Every fitted encoder as plain JSON types."""
        self._check_fitted()
        return {
            "format": FORMAT, "version": VERSION, "signature": self._signature(),
            "users": None if self.users_ is None else self.users_.to_dict(),
            "items": None if self.items_ is None else self.items_.to_dict(),
            "user_vocab": None if self.user_vocab_ is None else self.user_vocab_.to_dict(),
            "item_vocab": None if self.item_vocab_ is None else self.item_vocab_.to_dict(),
            "features": {name: enc.to_dict() for name, enc in self.features_.items()},
            "labels": {name: enc.to_dict() for name, enc in self.labels_.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], config: Config) -> Schema:
        """Rebuild a fitted schema from `to_dict()`; the config must describe the same features and tasks.

        Raises:
            ArtifactError: the dict is not a schema, or was fitted for other features or tasks.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ArtifactError("not an mtlrec schema (its 'format' is not 'mtlrec.schema')")
        if d.get("version") != VERSION:
            raise ArtifactError(f"schema version {d.get('version')!r} is not supported; this mtlrec reads "
                                f"version {VERSION}")
        schema = cls(config)
        expected = schema._signature()
        if d.get("signature") != expected:
            raise ArtifactError(f"the schema was fitted for {d.get('signature')}, but the config describes "
                                f"{expected}; use the config saved with the schema")
        try:
            schema.users_ = None if d["users"] is None else IdIndex.from_dict(d["users"])
            schema.items_ = None if d["items"] is None else IdIndex.from_dict(d["items"])
            vocabs = {key: None if d[key] is None else CategoricalEncoder.from_dict(d[key])
                      for key in ("user_vocab", "item_vocab")}
            schema.user_vocab_, schema.item_vocab_ = vocabs["user_vocab"], vocabs["item_vocab"]
            schema.features_ = {name: encoder_from_dict(enc) for name, enc in d["features"].items()}
            schema.labels_ = {name: LabelEncoder.from_dict(enc) for name, enc in d["labels"].items()}
            schema.spec_ = schema._build_spec()
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"the schema is malformed: {type(exc).__name__}: {exc}") from None
        return schema

    def save(self, directory: Path) -> Path:
        """Write `schema.json` into `directory` atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SCHEMA_FILE
        text = json.dumps(self.to_dict(), allow_nan=False, ensure_ascii=False)
        atomic_write_text(path, text)
        return path

    @classmethod
    def load(cls, directory: Path, config: Config) -> Schema:
        """Read `schema.json` from `directory`.

        Raises:
            ArtifactError: the file is missing, not JSON, or not a schema for this config.
        """
        path = Path(directory) / SCHEMA_FILE
        if not path.is_file():
            raise ArtifactError(f"'{path}' does not exist; is '{directory}' a run directory?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"cannot read '{path}': {exc}") from None
        return cls.from_dict(raw, config)
