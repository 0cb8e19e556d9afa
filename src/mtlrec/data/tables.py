"""The raw tables of a run: reading them and checking them against the config, once, up front.

Every problem a user can cause in their data is reported here as one `DataError` that names the
config key, the table and what to change, before any encoder or model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mtlrec.config import Config
from mtlrec.data.encoders import factorize_strings, preview, to_float
from mtlrec.errors import DataError
from mtlrec.memory import arrow_allocates_with_malloc

TABLE_NAMES = ("interactions", "users", "items", "item_pairs")

_PARQUET = (".parquet", ".pq")
_CSV = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


@dataclass
class Tables:
    """The raw tables as pandas DataFrames; only `interactions` is required."""

    interactions: pd.DataFrame
    users: pd.DataFrame | None = None
    items: pd.DataFrame | None = None
    item_pairs: pd.DataFrame | None = None

    def get(self, name: str) -> pd.DataFrame | None:
        """The table called `name` ('interactions', 'users', 'items', 'item_pairs'), or None."""
        if name not in TABLE_NAMES:
            raise KeyError(f"unknown table '{name}'; tables are {list(TABLE_NAMES)}")
        table: pd.DataFrame | None = getattr(self, name)
        return table

    def present(self) -> list[str]:
        """Names of the tables that are given, in canonical order."""
        return [name for name in TABLE_NAMES if getattr(self, name) is not None]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in _PARQUET + _CSV:
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def read_table(source: str | Path | pd.DataFrame, name: str) -> pd.DataFrame:
    """Read one table from Parquet (.parquet, .pq) or CSV (.csv; .tsv is tab-separated).

    A DataFrame is returned as given (not copied). Args: `name` is the table's name, used in
    error messages ('interactions', 'users', ...).

    Raises:
        DataError: the file is missing, unreadable, or has an unknown extension.
    """
    if isinstance(source, pd.DataFrame):
        return source
    if not isinstance(source, str | Path):
        raise DataError(f"table '{name}' must be a path or a pandas DataFrame, got {type(source).__name__}")
    path = Path(source)
    ext = _suffix(path)
    if ext not in _PARQUET + _CSV:
        raise DataError(f"table '{name}': cannot read '{path}': unknown file type '{ext or path.name}'; "
                        f"use one of {list(_PARQUET + _CSV)}")
    if not path.exists():
        raise DataError(f"table '{name}': file '{path}' does not exist")
    try:
        if ext in _PARQUET:
            with arrow_allocates_with_malloc():  # so that the read's freed heap can go back to the OS
                return pd.read_parquet(path)
        sep = "\t" if ext.startswith(".tsv") else ","
        return pd.read_csv(path, sep=sep)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"table '{name}': cannot read '{path}' as {ext.lstrip('.')}: {detail}") from None
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        if type(exc).__module__.startswith("pyarrow"):
            raise DataError(f"table '{name}': cannot read '{path}' as parquet: {exc}") from None
        raise


def load_tables(config: Config, base_dir: Path,
                given: Mapping[str, pd.DataFrame | str | Path] | None = None,
                labels: Mapping[str, str] | None = None) -> Tables:
    """Read every table the config names and check it against the config.

    Paths in `config.data` are relative to `base_dir` (the config file's folder). `given`
    overrides tables by name with DataFrames (the Python API) or paths (taken as they are);
    `labels` names given tables in messages (default: "the given ... DataFrame" or the file name).

    Raises:
        DataError: a table is missing or unreadable, or is inconsistent with the config; the
            message names the config key and the table.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(TABLE_NAMES))
    if unknown:
        raise DataError(f"unknown table names {unknown}; tables are {list(TABLE_NAMES)}")
    sources: dict[str, pd.DataFrame | str | Path] = {
        name: base_dir / path for name, path in config.data.table_paths().items()}
    sources.update(given)
    frames: dict[str, pd.DataFrame] = {}
    names: dict[str, str] = {}
    for name in TABLE_NAMES:
        if name not in sources:
            continue
        src = sources[name]
        frames[name] = read_table(src, name)
        names[name] = (f"the given {name} DataFrame" if isinstance(src, pd.DataFrame)
                       else Path(src).name)
    if "interactions" not in frames:
        raise DataError("no interactions table: set data.interactions or pass one")
    tables = Tables(**frames)
    validate_tables(tables, config, {**names, **(labels or {})})
    return tables


# ---------------------------------------------------------------------------------------------
# Validation


def _columns(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    more = f" (+{len(cols) - 40} more)" if len(cols) > 40 else ""
    return f"{cols[:40]}{more}"


def _require(df: pd.DataFrame, column: str, what: str, label: str, noun: str = "column") -> None:
    if column not in df.columns:
        raise DataError(f"{what} names {noun} '{column}', which {label} does not have; "
                        f"its columns are {_columns(df)}")


def _ids_complete(df: pd.DataFrame, column: str, what: str, label: str) -> None:
    missing = np.flatnonzero(df[column].isna().to_numpy())
    if missing.size:
        raise DataError(f"{what}: column '{column}' of {label} has {missing.size} missing ids "
                        f"(first at rows {missing[:5].tolist()}); drop or fill those rows")


def timestamps(df: pd.DataFrame, column: str, label: str) -> np.ndarray:
    """The sortable values [N] of a timestamp column: numbers as they are, datetimes as int64 ns.

    Raises:
        DataError: a timestamp is missing or the column holds neither numbers nor dates.
    """
    series = df[column]
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        if series.isna().any():
            raise DataError(f"data.timestamp: column '{column}' of {label} has missing timestamps")
        return np.asarray(pd.DatetimeIndex(series).as_unit("ns").asi8, dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy()
        if values.dtype.kind not in "iuf":
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        if values.dtype.kind == "f" and np.isnan(values).any():
            raise DataError(f"data.timestamp: column '{column}' of {label} has missing timestamps")
        return np.asarray(values)
    try:
        parsed = pd.to_datetime(series, format="ISO8601")
    except (ValueError, TypeError):
        raise DataError(f"data.timestamp: column '{column}' of {label} holds {series.dtype} values such as "
                        f"{preview(series.dropna().unique()[:20])}; expected numbers or ISO dates") from None
    return timestamps(pd.DataFrame({column: parsed}), column, label)


def _factorized(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Codes (-1 missing) and canonical strings of the distinct values; list cells compare as text."""
    try:
        return factorize_strings(series)
    except TypeError:
        return factorize_strings(series.astype(str).where(series.notna()))


class _Columns:
    """Factorised columns, each computed once however many (feature, label) pairs use it."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
        key = (id(df), column)
        if key not in self._cache:
            self._cache[key] = _factorized(df[column])
        return self._cache[key]


_SAMPLE = 1 << 16


def _reveals(df: pd.DataFrame, feature: str, label: str, columns: _Columns) -> str | None:
    """Why column `feature` trivially reveals column `label` (identical, or one-to-one), else None."""
    l_codes, l_strings = columns.get(df, label)
    # Cheap exit: a feature with more distinct values than the label cannot map one-to-one onto it.
    head = df[feature].iloc[:_SAMPLE][l_codes[:_SAMPLE] >= 0]
    try:
        if head.nunique(dropna=True) > len(l_strings):
            return None
    except TypeError:  # list cells
        pass
    f_codes, f_strings = columns.get(df, feature)
    both = (f_codes >= 0) & (l_codes >= 0)
    n = int(both.sum())
    if n == 0:
        return None
    fc, lc = f_codes[both], l_codes[both]
    k = len(pd.unique(fc))
    if k != len(pd.unique(lc)):
        return None
    # Identical values: equal canonical strings row by row, compared through joint codes.
    joint, _ = pd.factorize(np.concatenate([f_strings, l_strings]))
    if np.array_equal(joint[: f_strings.size][fc], joint[f_strings.size:][lc]):
        return "holds the same values as"
    # A bijection on few rows can be chance (and every column of distinct numbers is one);
    # demand several rows per distinct value before calling it a leak.
    if n < max(20, 5 * k):
        return None
    if len(pd.unique(fc * np.int64(l_strings.size) + lc)) == k:
        return "maps one-to-one onto"
    return None


def validate_tables(tables: Tables, config: Config, labels: Mapping[str, str] | None = None,
                    require_labels: bool = True, check_leaks: bool = True) -> None:
    """Check the tables against the config; raise one DataError naming the first problem.

    Args:
        tables: the raw tables.
        config: the run's config.
        labels: how messages refer to each table (e.g. 'interactions.parquet').
        require_labels: False for prediction input, which need not carry label columns.
        check_leaks: look for features that reveal a label (a pass over each feature and label).
    """
    data = config.data
    names = {name: name for name in TABLE_NAMES}
    names.update(labels or {})

    for name in tables.present():
        df = tables.get(name)
        if df is not None and len(df) == 0:
            raise DataError(f"table '{name}' ({names[name]}) is empty; it needs at least one row")

    inter = tables.interactions
    lab = names["interactions"]
    for key, column in (("data.user_id", data.user_id), ("data.item_id", data.item_id),
                        ("data.timestamp", data.timestamp)):
        if column is not None:
            _require(inter, column, key, lab)
            if key != "data.timestamp":
                _ids_complete(inter, column, key, lab)
    if data.timestamp is not None:
        timestamps(inter, data.timestamp, lab)

    entity_tables = (("users", data.user_id, "data.user_id"), ("items", data.item_id, "data.item_id"))
    for name, column, key in entity_tables:
        df = tables.get(name)
        if df is None:
            continue
        if column is None:
            raise DataError(f"a {name} table is given, but {key} is null; set {key} to its id column")
        _require(df, column, key, names[name])
        _ids_complete(df, column, key, names[name])
        dupes = df[column][df[column].duplicated()]
        if len(dupes):
            raise DataError(f"{key}: {names[name]} has duplicate ids in column '{column}', such as "
                            f"{preview(dupes.unique()[:20])}; each {name[:-1]} must appear once")

    pairs = tables.item_pairs
    if pairs is not None:
        lab = names["item_pairs"]
        for key, column in (("data.item_a", data.item_a), ("data.item_b", data.item_b)):
            _require(pairs, column, key, lab)
            _ids_complete(pairs, column, key, lab)
        items = tables.items
        if items is not None and data.item_id is not None:
            _, known = factorize_strings(items[data.item_id])
            known_index = pd.Index(known, dtype=object)
            for key, column in (("data.item_a", data.item_a), ("data.item_b", data.item_b)):
                _, named = factorize_strings(pairs[column])
                unknown = named[known_index.get_indexer(pd.Index(named, dtype=object)) < 0]
                if unknown.size:
                    raise DataError(f"{key}: column '{column}' of {lab} names {unknown.size} items that "
                                    f"{names['items']} does not have, such as {preview(unknown)}; "
                                    "add them to the items table or drop those pairs")

    for i, feat in enumerate(config.features):
        df = tables.get(feat.table)
        what = f"feature '{feat.name}' (features[{i}])"
        if df is None:
            raise DataError(f"{what} reads table '{feat.table}', which was not given")
        if feat.type == "sequence":
            if feat.filter is not None:
                _require(df, feat.filter, f"feature '{feat.name}' (features[{i}].filter)", names[feat.table])
            continue
        _require(df, feat.source_column, what, names[feat.table])
        if feat.type == "numeric":
            try:
                to_float(df[feat.source_column])
            except DataError as exc:
                raise DataError(f"{what} is numeric, but column '{feat.source_column}' of "
                                f"{names[feat.table]} is not: {exc}; convert it or declare the feature "
                                "categorical") from None

    columns = _Columns()
    for i, task in enumerate(config.tasks):
        df = tables.get(task.table)
        if df is None:
            raise DataError(f"task '{task.name}' (tasks[{i}]) reads table '{task.table}', "
                            "which was not given")
        if task.label is None:  # a retrieval task over every interaction
            continue
        if task.label not in df.columns:
            if require_labels:
                _require(df, task.label, f"task '{task.name}' (tasks[{i}].label)", names[task.table],
                         "label column")
            continue
        for j, feat in enumerate(config.features):
            if feat.table != task.table or feat.type == "sequence" or not check_leaks:
                continue
            what = f"feature '{feat.name}' (features[{j}])"
            if feat.source_column == task.label:
                raise DataError(f"{what} reads column '{task.label}', which is the label of task "
                                f"'{task.name}' (tasks[{i}].label); a label cannot be an input feature")
            reason = _reveals(df, feat.source_column, task.label, columns)
            if reason is not None:
                raise DataError(f"{what}: column '{feat.source_column}' of {names[task.table]} {reason} "
                                f"the label column '{task.label}' of task '{task.name}' (tasks[{i}].label), "
                                "so it would leak the label; remove the feature")
