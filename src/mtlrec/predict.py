"""A trained run as answers: task probabilities, classes, recommendations, related items.

`Predictor.load(run_dir)` reads the resolved config, the fitted encoders (JSON), the weights and
the serving state (safetensors); nothing is unpickled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mtlrec.config import Config, load_config
from mtlrec.data.batch import Batch
from mtlrec.data.schema import Schema
from mtlrec.data.spec import FieldSpec, InputSpec, TaskSpec
from mtlrec.data.split import split_catalogue, split_tables
from mtlrec.data.stream import InteractionStream, StreamSplit, open_stream
from mtlrec.data.tables import load_tables
from mtlrec.errors import ArtifactError, DataError
from mtlrec.models.encoders import missing_features
from mtlrec.models.model import RecModel, build_model
from mtlrec.outputs import to_probabilities
from mtlrec.recommend import Recommender, ServingState
from mtlrec.serve.integrity import verify_manifest
from mtlrec.training.checkpoint import load_tensors
from mtlrec.training.evaluate import (
    evaluate,
    metrics_of,
    predict_batches,
    predict_split,
    sources_with_tasks,
    stream_retrieval_metrics,
)

OOV_ROW = -1
"""Entity row of an id the model has never seen."""


def _require_run(run_dir: Path) -> None:
    missing = [n for n in ("config.yaml", "schema.json", "weights.safetensors") if not (run_dir / n).is_file()]
    if missing:
        raise ArtifactError(f"'{run_dir}' is not a complete run directory: {missing} missing; "
                            "train one with `mtlrec train CONFIG --out DIR`")


def load_model(run_dir: Path, config: Config, spec: InputSpec) -> RecModel:
    """Build the model of a run and load its weights (safetensors only)."""
    model = build_model(spec, config.model)
    tensors, _ = load_tensors(run_dir / "weights.safetensors")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ArtifactError(f"'{run_dir / 'weights.safetensors'}' does not match the run's config "
                            f"({str(exc).splitlines()[0]}); it was modified or belongs to another run") from None
    return model.eval()


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as Parquet or CSV, chosen by the file's extension."""
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise DataError(f"cannot write '{path}': use a .parquet or .csv file name")


class Predictor:
    """Answers of a trained run for every task kind.

    Args:
        config: the run's resolved config.
        schema: its fitted encoders.
        model: its trained model.
        state: entity features, seen items and popularity.
    """

    def __init__(self, config: Config, schema: Schema, model: RecModel, state: ServingState) -> None:
        self.config = config
        self.schema = schema
        self.spec = schema.spec_
        self.model = model.eval()
        self.state = state
        self.recommender = Recommender(model, self.spec, state, config.recommend)

    @classmethod
    def load(cls, run_dir: str | Path) -> Predictor:
        run = Path(run_dir)
        _require_run(run)
        verify_manifest(run)
        config, _ = load_config(run / "config.yaml")
        schema = Schema.load(run, config)
        return cls(config, schema, load_model(run, config, schema.spec_), ServingState.load(run))

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.spec.tasks]

    # -- entities ----------------------------------------------------------------------------
    def entity_fields(self, fields: dict[str, Tensor], group: str, rows: np.ndarray) -> dict[str, Tensor]:
        """Fields of entity rows; unknown ids (row -1) get missing features and the OOV id."""
        known = rows >= 0
        safe = torch.as_tensor(np.where(known, rows, 0), dtype=torch.int64)
        out = {k: v.index_select(0, safe) for k, v in fields.items()}
        if not known.all():
            specs: tuple[FieldSpec, ...] = self.spec.group(group)  # type: ignore[arg-type]
            blank = missing_features(specs, len(rows), torch.device("cpu"))
            unknown = torch.as_tensor(~known)
            for name, value in out.items():
                if name in blank:
                    value[unknown] = blank[name][unknown]
                elif name.endswith("_id"):
                    value[unknown] = 1  # the OOV row of the id vocabulary
        return out

    def _user_rows(self, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        return self.schema.user_rows(np.asarray(ids, dtype=object))

    def _item_rows(self, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        return self.schema.item_rows(np.asarray(ids, dtype=object))

    def _known_item(self, item_id: Any) -> int:
        row = int(self._item_rows([item_id])[0])
        if row < 0:
            raise DataError(f"unknown item '{item_id}': it was not in the training data")
        return row

    # -- answers -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, interactions: pd.DataFrame) -> pd.DataFrame:
        """Every interaction task's probability for user-item rows.

        Binary tasks: P(label = 1) (for a conditional task, given its parent: P(purchase | click));
        multiclass: the predicted class and its probability; regression: the prediction.
        """
        data = self.config.data
        frame = interactions.reset_index(drop=True)
        user: dict[str, Tensor] = {}
        item: dict[str, Tensor] = {}
        if data.user_id is not None:
            user = self.entity_fields(self.state.users, "user", self._user_rows(self._column(frame, data.user_id)))
        if data.item_id is not None:
            item = self.entity_fields(self.state.items, "item", self._item_rows(self._column(frame, data.item_id)))
        context = self.schema.encode_context(frame)
        logits = self.model(Batch("interactions", user=user, item=item, context=context))
        out = frame[[c for c in (data.user_id, data.item_id) if c is not None]].copy()
        return self._append(out, logits)

    @staticmethod
    def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
        if name not in frame.columns:
            raise DataError(f"input lacks column '{name}'; its columns are {list(frame.columns)}")
        return frame[name].to_numpy()

    def _append(self, out: pd.DataFrame, logits: dict[str, Tensor]) -> pd.DataFrame:
        for name, value in logits.items():
            task = self.spec.task(name)
            probs = to_probabilities(task, value).numpy()
            if task.type == "multiclass":
                best = probs.argmax(1)
                out[name] = np.asarray(task.classes, dtype=object)[best]
                out[f"{name}_proba"] = probs[np.arange(len(best)), best]
            elif task.type == "multilabel":
                classes = np.asarray(task.classes, dtype=object)
                out[name] = [list(classes[row >= 0.5]) for row in probs]
                for j, label in enumerate(task.classes):
                    out[f"{name}={label}"] = probs[:, j]
            else:
                out[name] = probs
        return out

    @torch.no_grad()
    def classify_users(self, user_ids: Sequence[Any]) -> pd.DataFrame:
        """Every user task's predicted class (and probabilities) for the given users."""
        rows = self._user_rows(user_ids)
        logits = self.model(Batch("users", user=self.entity_fields(self.state.users, "user", rows)))
        return self._append(pd.DataFrame({"user_id": list(user_ids), "known": rows >= 0}), logits)

    @torch.no_grad()
    def classify_items(self, item_ids: Sequence[Any]) -> pd.DataFrame:
        """Every item task's predicted class (and probabilities) for the given items."""
        rows = self._item_rows(item_ids)
        logits = self.model(Batch("items", item=self.entity_fields(self.state.items, "item", rows)))
        return self._append(pd.DataFrame({"item_id": list(item_ids), "known": rows >= 0}), logits)

    @torch.no_grad()
    def relate(self, items_a: Sequence[Any], items_b: Sequence[Any]) -> pd.DataFrame:
        """Every item-pair task's predicted relation (and probability) of item pairs."""
        if len(items_a) != len(items_b):
            raise DataError(f"relate needs as many first items as second items, got {len(items_a)} and {len(items_b)}")
        a = self.entity_fields(self.state.items, "item", self._item_rows(items_a))
        b = self.entity_fields(self.state.items, "item", self._item_rows(items_b))
        logits = self.model(Batch("item_pairs", item=a, item_b=b))
        return self._append(pd.DataFrame({"item_a": list(items_a), "item_b": list(items_b)}), logits)

    def recommend(self, user_id: Any, k: int | None = None, exclude_seen: bool | None = None,
                  candidates: Sequence[Any] | None = None,
                  user_features: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """The top-K items for a user: item id, fused score and each binary interaction task's
        probability per impression (conditional tasks chained: P(click and purchase)).

        Two-stage when the run has a retrieval task (`recommend.candidates` retrieved, then ranked).
        An unknown user with `user_features` (raw values of the run's user features, by name) is
        encoded from them alone and ranked like a known one; without them, gets the most popular
        items. `frame.attrs` says which: `cold_start` (bool), `strategy` ('model', 'features' or
        'popularity') and `two_stage` (bool).
        """
        k = self.config.recommend.k if k is None else k
        if k < 1:
            raise DataError(f"k must be >= 1, got {k}")
        cand_rows = None
        if candidates is not None:
            cand_rows = self._item_rows(candidates)
            cand_rows = cand_rows[cand_rows >= 0]
        row = int(self._user_rows([user_id])[0]) if self.config.data.user_id is not None else -1
        item_ids = self.schema.item_ids()
        exclude = self.config.recommend.exclude_seen if exclude_seen is None else exclude_seen
        if row >= 0:
            user = self.recommender.user_fields(torch.tensor([row]))
            allowed, strategy = self.recommender.eligible(row, exclude, cand_rows), "model"
        elif user_features:
            user = self.schema.new_user_fields(user_features)
            allowed, strategy = self.recommender.eligible(None, False, cand_rows), "features"
        else:
            rows, counts = self.recommender.popular(k, cand_rows)
            frame = pd.DataFrame({"item_id": item_ids[rows], "popularity": counts.astype(float)})
            frame.attrs.update(cold_start=True, strategy="popularity", two_stage=False)
            return frame
        ranking = self.recommender.rank(user, k, allowed)
        frame = pd.DataFrame({"item_id": item_ids[ranking.rows], "score": ranking.scores.astype(float)})
        for task, values in ranking.probabilities.items():
            frame[task] = values.astype(float)
        frame.attrs.update(cold_start=row < 0, strategy=strategy, two_stage=ranking.two_stage)
        return frame

    def related_items(self, item_id: Any, relation: str, k: int = 10, task: str | None = None) -> pd.DataFrame:
        """The K items most likely to stand in `relation` (e.g. 'substitute') to an item."""
        pair_tasks = [t for t in self.spec.tasks_of("item_pair") if relation in t.classes]
        if task is not None:
            pair_tasks = [t for t in pair_tasks if t.name == task]
        if not pair_tasks:
            known = sorted({c for t in self.spec.tasks_of("item_pair") for c in t.classes})
            raise DataError(f"no item-pair task has the relation '{relation}'; relations are {known}")
        chosen: TaskSpec = pair_tasks[0]
        rows, probs = self.recommender.related(self._known_item(item_id), chosen, relation, k)
        return pd.DataFrame({"item_id": self.schema.item_ids()[rows], f"p_{relation}": probs.astype(float)})


def evaluate_run(run_dir: str | Path, data_config: str | Path | None = None, part: str = "test") -> dict[str, Any]:
    """Recompute a run's metrics on a split part of its own data (or another config's data)."""
    run = Path(run_dir)
    _require_run(run)
    if part not in ("train", "valid", "test"):
        raise DataError(f"part must be train, valid or test, got '{part}'")
    config, base_dir = load_config(data_config if data_config is not None else run / "config.yaml")
    run_config, _ = load_config(run / "config.yaml")
    schema = Schema.load(run, run_config)
    model = load_model(run, run_config, schema.spec_)
    batch_size, device = run_config.train.eval_batch_size, torch.device("cpu")
    sources = sources_with_tasks(schema.spec_)
    if config.data.stream:  # the interactions are read row group by row group, never whole
        log, tables = open_stream(config, base_dir)
        split = split_catalogue(tables, config)
        data = schema.encode_catalogue(tables)
        stream = InteractionStream(log, StreamSplit(log, config), schema, data, run_config.train.batch_size,
                                   config.data.stream_buffer_rows, run_config.train.seed)
        rows = {s: split.rows(s, part) for s in sources if s != "interactions"}
        predictions = predict_split(model, data, schema.spec_, rows, batch_size, device)
        if "interactions" in sources:
            predictions.update(predict_batches(model, schema.spec_, stream.batches(part, batch_size), device))
        metrics = metrics_of(predictions)
        metrics.update(stream_retrieval_metrics(model, stream, schema.spec_, part, batch_size, device))
        return {"part": part, "tasks": metrics}
    tables = load_tables(config, base_dir)
    split = split_tables(tables, config)
    data = schema.encode(tables, split)
    rows = {s: split.rows(s, part) for s in sources}
    return {"part": part, "tasks": evaluate(model, data, schema.spec_, rows, batch_size, device)}
