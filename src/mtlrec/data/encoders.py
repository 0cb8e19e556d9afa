"""Feature and label encoders: fitted on training rows only, JSON-serialisable, vectorised.

Every encoder follows the scikit-learn shape: the constructor stores parameters, `fit` learns
state that ends in `_`, `transform` applies it. `to_dict()` / `from_dict()` round-trip through
plain JSON types (never pickle), so an artifact can be inspected and loaded safely.

Values are compared as strings: `1`, `1.0` and `"1"` are the same category. The work is done on
the distinct values of a column (`pandas.factorize`), never row by row, so a column of ten
million rows costs one hash pass plus work proportional to its number of distinct values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Self, TypeAlias

import numpy as np
import pandas as pd

from mtlrec.data.spec import OOV, PAD
from mtlrec.errors import DataError

ArrayLike: TypeAlias = "pd.Series | pd.Index | np.ndarray | Sequence[Any]"
LabelType = Literal["binary", "multiclass", "multilabel", "regression"]

HASH_KEY = "mtlrec-hash-v1.0"
"""The fixed 16-character key of the stable hash used by hashing encoders (pandas' SipHash)."""

_TRUE_FALSE = {"False": "0", "True": "1"}


# ---------------------------------------------------------------------------------------------
# Value normalisation


def _as_series(values: ArrayLike) -> pd.Series:
    if isinstance(values, pd.Series):
        return values.reset_index(drop=True)
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"expected a 1-d column of values, got an array of shape {values.shape}")
    return pd.Series(values, dtype=None if len(values) else object)


def _scalar_str(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        if np.isfinite(f) and f == int(f) and abs(f) < 2**53:
            return str(int(f))
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def normalize_strings(uniques: pd.Index | np.ndarray | Sequence[Any]) -> np.ndarray:
    """The canonical string of each value: integral floats lose their `.0`, bools are 'True'/'False'.

    Args:
        uniques: K values (typically the distinct values of a column).

    Returns:
        object array [K] of `str`.
    """
    idx = pd.Index(uniques)
    if len(idx) == 0:
        return np.empty(0, dtype=object)
    kind = idx.dtype.kind
    if kind in "iu":
        return np.asarray(idx.to_numpy().astype(str), dtype=object)
    if kind == "b":
        return np.where(idx.to_numpy(dtype=bool), "True", "False").astype(object)
    if kind == "f":
        raw = idx.to_numpy()
        out = np.asarray(raw.astype(str), dtype=object)
        as64 = raw.astype(np.float64)
        integral = np.isfinite(as64) & (np.abs(as64) < 2**53)
        integral[integral] = as64[integral] == np.round(as64[integral])
        out[integral] = as64[integral].astype(np.int64).astype(str)
        return out
    if pd.api.types.is_string_dtype(idx.dtype) and idx.dtype != object:
        return np.asarray(idx.to_numpy(dtype=object), dtype=object)
    if idx.dtype == object and pd.api.types.infer_dtype(idx, skipna=False) == "string":
        return np.asarray(idx.to_numpy(), dtype=object)
    # Mixed objects: one Python call per distinct value (not per row).
    return np.array([_scalar_str(v) for v in idx], dtype=object)


def factorize_strings(values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Codes of each row into its distinct values, and the canonical string of each distinct value.

    Returns:
        codes: int64 [N], -1 where the value is missing (None, NaN, NA);
        uniques: object array [K] of `str`. Two raw values with the same string (1 and "1") may
        appear twice in `uniques`; callers map through strings, so that is harmless.
    """
    series = _as_series(values)
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    return np.asarray(codes, dtype=np.int64), normalize_strings(uniques)


def canonical_codes(values: ArrayLike) -> np.ndarray:
    """int64 [N] codes with equal codes exactly for equal canonical strings; -1 where missing."""
    codes, uniques = factorize_strings(values)
    canon, _ = pd.factorize(uniques)
    return _gather(codes, np.asarray(canon, dtype=np.int64), -1)


def _gather(codes: np.ndarray, mapped: np.ndarray, missing: Any) -> np.ndarray:
    """`mapped[codes]`, with `missing` where the code is -1 (one vectorised take)."""
    lookup = np.empty(len(mapped) + 1, dtype=mapped.dtype)
    lookup[0] = missing
    lookup[1:] = mapped
    return lookup[codes + 1]


def explode_tokens(values: ArrayLike, separator: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a multi-valued column into (row, token) pairs, vectorised.

    Each row is a list / array of values or a string of values joined by `separator`. Missing
    rows and empty tokens yield nothing. Token order within a row is kept.

    Returns:
        rows: int64 [T] row of each token (non-decreasing);
        codes: int64 [T] code of each token into `uniques`;
        uniques: object array [U] of canonical token strings.
    """
    series = _as_series(values)
    exploded = series.explode(ignore_index=False)
    exploded = exploded[exploded.notna()]
    if len(exploded) and pd.api.types.infer_dtype(exploded, skipna=True) == "string":
        exploded = exploded.astype(object).str.split(separator, regex=False).explode(ignore_index=False)
        exploded = exploded[exploded.notna() & (exploded != "")]
    rows = np.asarray(exploded.index.to_numpy(), dtype=np.int64)
    codes, uniques = factorize_strings(exploded)
    keep = codes >= 0
    return rows[keep], codes[keep], uniques


def _positions(rows: np.ndarray) -> np.ndarray:
    """Position of each token within its row, for `rows` sorted non-decreasingly."""
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    lengths = np.diff(np.r_[starts, rows.size])
    return np.arange(rows.size, dtype=np.int64) - np.repeat(starts, lengths)


def preview(values: Iterable[Any], limit: int = 5) -> str:
    items = sorted({str(v) for v in values})
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def _sort_classes(names: Iterable[str]) -> list[str]:
    """Numeric-looking classes sort by value ('2' before '10'), others by string."""
    classes = sorted(set(names))
    try:
        return sorted(classes, key=float)
    except ValueError:
        return classes


def _check_type(d: dict[str, Any], expected: str) -> None:
    if d.get("type") != expected:
        raise ValueError(f"expected an encoder of type '{expected}', got {d.get('type')!r}")


# ---------------------------------------------------------------------------------------------
# Accumulators: fit on a column given in chunks (larger-than-memory data)


class ValueCounts:
    """Occurrences of each canonical value string, accumulated over chunks of a column.

    Memory grows with the number of distinct values, never with the number of rows: each chunk
    is reduced to its distinct values and their counts, and these are merged into the running
    totals. Fitting a vocabulary on the totals gives exactly the vocabulary of fitting on the
    concatenated chunks.
    """

    def __init__(self) -> None:
        self._strings = np.empty(0, dtype=object)
        self._counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, values: ArrayLike) -> ValueCounts:
        """Count the values [N] of one chunk (missing values are not counted)."""
        codes, uniques = factorize_strings(values)
        self._push(uniques, np.bincount(codes[codes >= 0], minlength=len(uniques)))
        return self

    def add_tokens(self, values: ArrayLike, separator: str) -> ValueCounts:
        """Count the tokens of a multi-valued chunk [N] (lists or `separator`-joined strings)."""
        _, codes, uniques = explode_tokens(values, separator)
        self._push(uniques, np.bincount(codes, minlength=len(uniques)))
        return self

    def _push(self, strings: np.ndarray, counts: np.ndarray) -> None:
        self._pending.append((strings, counts.astype(np.int64)))
        self._pending_size += len(strings)
        # Merging costs a pass over the totals; doing it only once the pending parts outgrow them
        # keeps the cost linear in the data.
        if self._pending_size > max(len(self._strings), 1 << 16):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        strings = np.concatenate([self._strings] + [s for s, _ in self._pending])
        counts = np.concatenate([self._counts] + [c for _, c in self._pending])
        codes, uniques = pd.factorize(strings)
        self._counts = np.bincount(codes, weights=counts, minlength=len(uniques)).astype(np.int64)
        self._strings = np.asarray(uniques, dtype=object)
        self._pending, self._pending_size = [], 0

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """(canonical value strings [K], their counts int64 [K]), each value once, in first-seen order."""
        self._merge()
        return self._strings, self._counts

    def __len__(self) -> int:
        """Distinct values counted so far."""
        return len(self.totals()[0])


class Moments:
    """Count, mean and spread of the finite values of a numeric column given in chunks.

    Values are shifted by the first finite value (as `NumericEncoder.fit` does) and each chunk's
    mean and sum of squared deviations are merged with Chan et al.'s pairwise update, which is
    numerically stable; one chunk gives exactly `NumericEncoder.fit`'s numbers.
    """

    def __init__(self) -> None:
        self.shift: float | None = None
        self.count = 0
        self.mean = 0.0  # of the shifted values
        self.m2 = 0.0  # sum of squared deviations from `mean`

    def add(self, values: ArrayLike) -> Moments:
        """Accumulate the finite values of one chunk [N] (raises DataError on non-numbers)."""
        x = to_float(values)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return self
        if self.shift is None:
            self.shift = float(x[0])
        centred = x - self.shift
        mean = float(centred.mean())
        deviation = centred - mean
        m2 = float(np.multiply(deviation, deviation).sum())
        n_a, n_b = self.count, int(x.size)
        if n_a == 0:
            self.count, self.mean, self.m2 = n_b, mean, m2
            return self
        total = n_a + n_b
        delta = mean - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2 + delta * delta * n_a * n_b / total
        self.count = total
        return self


# ---------------------------------------------------------------------------------------------
# Categorical


class CategoricalEncoder:
    """A vocabulary with padding and OOV slots, or a stable hash into a fixed number of buckets.

    Index 0 is missing/padding, 1 is out-of-vocabulary, 2.. are the values seen in training at
    least `min_count` times, by descending count then by value string (deterministic). With
    `hash_buckets`, every value maps to 2 + (SipHash(value) mod hash_buckets) and `min_count` is
    not used (no vocabulary is stored).

    Args:
        min_count: fewest training occurrences for a value to get its own index.
        hash_buckets: number of hash buckets, or None for a vocabulary.
    """

    def __init__(self, min_count: int = 1, hash_buckets: int | None = None) -> None:
        self.min_count = min_count
        self.hash_buckets = hash_buckets

    # fitted state: vocab_ (list[str]); _index is a lookup cache rebuilt on demand
    vocab_: list[str]
    _index: pd.Index | None = None

    def fit(self, values: ArrayLike) -> Self:
        """Learn the vocabulary from training values [N]."""
        return self.fit_many([values])

    def fit_many(self, parts: Sequence[ArrayLike]) -> Self:
        """Learn one vocabulary from several columns (counts add up across them)."""
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.hash_buckets is not None:
            if self.hash_buckets < 1:
                raise ValueError(f"hash_buckets must be >= 1, got {self.hash_buckets}")
            self.vocab_ = []
            self._index = None
            return self
        strings, counts = [], []
        for part in parts:
            codes, uniques = factorize_strings(part)
            strings.append(uniques)
            counts.append(np.bincount(codes[codes >= 0], minlength=len(uniques)))
        self._fit_counts(strings, counts)
        return self

    def fit_counts(self, counts: ValueCounts) -> Self:
        """Learn the vocabulary from value counts accumulated over chunks (see `ValueCounts`)."""
        if self.hash_buckets is not None:
            return self.fit_many([])
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        strings, totals = counts.totals()
        self._fit_counts([strings], [totals])
        return self

    def _fit_counts(self, strings: Sequence[np.ndarray], counts: Sequence[np.ndarray]) -> None:
        """Keep values counted at least `min_count` times, by descending count then value string.

        Args:
            strings: canonical value strings of each part (a value may repeat across parts).
            counts: occurrences of each of those values.
        """
        joined = (np.concatenate([np.asarray(s, dtype=object) for s in strings]) if strings
                  else np.empty(0, dtype=object))
        weights = np.concatenate(counts).astype(np.int64) if counts else np.empty(0, np.int64)
        codes, uniques = pd.factorize(joined)
        totals = np.bincount(codes, weights=weights, minlength=len(uniques)).astype(np.int64)
        keep = totals >= self.min_count
        values = np.asarray(uniques, dtype=object)[keep]
        totals = totals[keep]
        # Sort on fixed-width unicode: a native comparison, much faster than Python str objects.
        order = np.lexsort((values.astype(str), -totals))
        self.vocab_ = values[order].tolist()
        self._index = None

    def _check_fitted(self) -> None:
        if not hasattr(self, "vocab_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    @property
    def size(self) -> int:
        """Rows of the embedding table: padding + OOV + vocabulary (or hash buckets)."""
        self._check_fitted()
        if self.hash_buckets is not None:
            return self.hash_buckets + 2
        return len(self.vocab_) + 2

    def map_strings(self, strings: np.ndarray) -> np.ndarray:
        """Index [K] of each canonical value string [K] (OOV when unknown; never 0)."""
        self._check_fitted()
        strings = np.asarray(strings, dtype=object)
        if self.hash_buckets is not None:
            if strings.size == 0:
                return np.zeros(0, dtype=np.int64)
            hashed = pd.util.hash_array(strings, encoding="utf8", hash_key=HASH_KEY, categorize=False)
            return (hashed % np.uint64(self.hash_buckets)).astype(np.int64) + 2
        if self._index is None:
            self._index = pd.Index(self.vocab_, dtype=object)
        found = self._index.get_indexer(pd.Index(strings, dtype=object))
        return np.where(found >= 0, found + 2, OOV).astype(np.int64)

    def transform(self, values: ArrayLike) -> np.ndarray:
        """Encode values [N] -> int64 [N] (0 missing, 1 OOV, 2.. known values)."""
        codes, uniques = factorize_strings(values)
        return _gather(codes, self.map_strings(uniques), PAD)

    def release_lookup(self) -> None:
        """Drop the lookup table `map_strings` builds (the next call rebuilds it).

        Its hash table costs about 40 bytes per vocabulary value beside the strings themselves; a
        trainer that has encoded its data does not look values up again.
        """
        self._index = None

    def fit_transform(self, values: ArrayLike) -> np.ndarray:
        return self.fit(values).transform(values)

    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"type": "categorical", "min_count": self.min_count, "hash_buckets": self.hash_buckets,
                "hash_key": HASH_KEY if self.hash_buckets is not None else None, "vocab": list(self.vocab_)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoricalEncoder:
        _check_type(d, "categorical")
        if d.get("hash_buckets") is not None and d.get("hash_key") != HASH_KEY:
            raise ValueError(f"hash key {d.get('hash_key')!r} differs from this version's {HASH_KEY!r}")
        enc = cls(int(d["min_count"]), d["hash_buckets"])
        enc.vocab_ = [str(v) for v in d["vocab"]]
        return enc


# ---------------------------------------------------------------------------------------------
# Multi-valued categorical


class MultiCategoricalEncoder:
    """Several categories per row (tags): a list column or a `separator`-joined string.

    Output is int64 [N, max_len]: the first `max_len` tokens of each row, padded with 0. The
    vocabulary works exactly like `CategoricalEncoder`'s (counts are over tokens).

    Args:
        min_count: fewest training occurrences for a token to get its own index.
        max_len: tokens kept per row.
        separator: joins tokens in string cells.
        hash_buckets: hash tokens instead of keeping a vocabulary.
    """

    def __init__(self, min_count: int = 1, max_len: int = 20, separator: str = "|",
                 hash_buckets: int | None = None) -> None:
        self.min_count = min_count
        self.max_len = max_len
        self.separator = separator
        self.hash_buckets = hash_buckets

    vocab_: CategoricalEncoder

    def fit(self, values: ArrayLike) -> Self:
        """Learn the token vocabulary from training values [N]."""
        return self.fit_counts(ValueCounts().add_tokens(values, self.separator))

    def fit_counts(self, counts: ValueCounts) -> Self:
        """Learn the token vocabulary from token counts accumulated over chunks (`add_tokens`)."""
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        self.vocab_ = CategoricalEncoder(self.min_count, self.hash_buckets).fit_counts(counts)
        return self

    @property
    def size(self) -> int:
        return self.vocab_.size

    def transform(self, values: ArrayLike) -> np.ndarray:
        """Encode values [N] -> int64 [N, max_len] padded with 0."""
        if not hasattr(self, "vocab_"):
            raise RuntimeError("MultiCategoricalEncoder is not fitted; call fit() first")
        n = len(values)
        rows, codes, uniques = explode_tokens(values, self.separator)
        pos = _positions(rows)
        keep = pos < self.max_len
        out = np.zeros((n, self.max_len), dtype=np.int64)
        out[rows[keep], pos[keep]] = self.vocab_.map_strings(uniques)[codes[keep]]
        return out

    def release_lookup(self) -> None:
        """Drop the vocabulary's lookup table (see `CategoricalEncoder.release_lookup`)."""
        if hasattr(self, "vocab_"):
            self.vocab_.release_lookup()

    def to_dict(self) -> dict[str, Any]:
        return {"type": "multi_categorical", "max_len": self.max_len, "separator": self.separator,
                "vocab": self.vocab_.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiCategoricalEncoder:
        _check_type(d, "multi_categorical")
        vocab = CategoricalEncoder.from_dict(d["vocab"])
        enc = cls(vocab.min_count, int(d["max_len"]), str(d["separator"]), vocab.hash_buckets)
        enc.vocab_ = vocab
        return enc


# ---------------------------------------------------------------------------------------------
# Numeric


def to_float(values: ArrayLike) -> np.ndarray:
    """float64 [N]; missing -> NaN. Raises DataError naming non-numeric values."""
    series = _as_series(values)
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        return np.asarray(series.to_numpy(dtype=np.float64, na_value=np.nan))
    converted = pd.to_numeric(series, errors="coerce")
    bad = converted.isna() & series.notna()
    if bad.any():
        raise DataError(f"expected numbers, found values such as {preview(series[bad].unique()[:50])}")
    return np.asarray(converted.to_numpy(dtype=np.float64, na_value=np.nan))


class NumericEncoder:
    """Standardise with the training mean and standard deviation; keep a missing indicator.

    Output float32 [N, 2]: column 0 is (x - mean) / std with missing (NaN, inf) -> 0, column 1 is
    1.0 where the value is missing. A constant column gets std 1.
    """

    mean_: float
    std_: float

    def fit(self, values: ArrayLike) -> Self:
        """Learn mean and std from training values [N]."""
        return self.fit_moments(Moments().add(values))

    def fit_moments(self, moments: Moments) -> Self:
        """Learn mean and std from moments accumulated over chunks (see `Moments`)."""
        if moments.count == 0 or moments.shift is None:
            self.mean_, self.std_ = 0.0, 1.0
            return self
        # Shifting by one value makes a constant column exactly constant (no rounding in the mean).
        std = float(np.sqrt(moments.m2 / moments.count))
        self.mean_ = float(moments.shift + moments.mean)
        # A spread within rounding error of the values' magnitude is a constant column.
        tiny = 1e-12 * max(1.0, abs(self.mean_))
        self.std_ = std if np.isfinite(std) and std > tiny else 1.0
        return self

    def transform(self, values: ArrayLike) -> np.ndarray:
        """Encode values [N] -> float32 [N, 2]."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("NumericEncoder is not fitted; call fit() first")
        x = to_float(values)
        missing = ~np.isfinite(x)
        out = np.empty((x.size, 2), dtype=np.float32)
        out[:, 0] = np.where(missing, 0.0, (x - self.mean_) / self.std_)
        out[:, 1] = missing
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": "numeric", "mean": self.mean_, "std": self.std_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NumericEncoder:
        _check_type(d, "numeric")
        enc = cls()
        enc.mean_ = float(d["mean"])
        enc.std_ = float(d["std"])
        return enc


# ---------------------------------------------------------------------------------------------
# Labels


class LabelEncoder:
    """Turn a task's label column into a target tensor and a mask (True where the label exists).

    - binary: 0/1, booleans, or exactly two distinct values (the first in string order is 0)
      -> float32 [N];
    - multiclass: the declared `classes`, else the classes seen in training (numeric-looking
      classes sorted by value) -> int64 [N] class index;
    - multilabel: list cells or `separator`-joined strings -> float32 [N, L] multi-hot; an empty
      cell is a row with no positive class;
    - regression: numbers -> float32 [N].

    A missing label (None, NaN) is masked. A value outside the classes is a DataError that names
    the task (`name`) and the bad values.

    Args:
        task_type: 'binary', 'multiclass', 'multilabel' or 'regression'.
        classes: declared classes (multiclass, multilabel), compared as strings.
        separator: joins classes in string cells of a multilabel column.
        name: how errors refer to the label column, e.g. "task 'buy' (tasks[2].label)".
    """

    def __init__(self, task_type: LabelType, classes: Sequence[str] | None = None, separator: str = "|",
                 name: str = "label") -> None:
        self.task_type = task_type
        self.classes = classes
        self.separator = separator
        self.name = name

    classes_: list[str]

    @property
    def num_outputs(self) -> int:
        """1 for binary and regression, C for multiclass, L for multilabel."""
        if self.task_type in ("multiclass", "multilabel"):
            return len(self.classes_)
        return 1

    def fit(self, values: ArrayLike) -> Self:
        """Learn the classes from training labels [N] (declared classes win)."""
        kind = self.task_type
        if kind not in ("binary", "multiclass", "multilabel", "regression"):
            raise ValueError(f"unknown task type {kind!r}")
        if kind == "regression":
            to_float_label(values, self.name)
            self.classes_ = []
            return self
        if kind == "binary":
            _, uniques = factorize_strings(values)
            seen = set(uniques)
            canonical = {_TRUE_FALSE.get(s, s) for s in seen}
            if canonical <= {"0", "1"}:
                self.classes_ = ["0", "1"]
            elif len(seen) == 2:
                self.classes_ = sorted(seen)
            else:
                raise DataError(f"{self.name} is binary, but its training labels are {preview(seen)}; "
                                "expected 0/1, booleans or exactly two distinct values")
            return self
        if self.classes is not None:
            declared = [str(c) for c in self.classes]
            if len(set(declared)) != len(declared) or not declared:
                raise DataError(f"{self.name}: declared classes {declared} must be non-empty and distinct")
            self.classes_ = declared
            self.transform(values)  # labels outside the declared classes fail here, naming them
            return self
        if kind == "multiclass":
            _, uniques = factorize_strings(values)
        else:
            _, _, uniques = explode_tokens(values, self.separator)
        self.classes_ = _sort_classes(str(u) for u in uniques)
        if not self.classes_:
            raise DataError(f"{self.name} has no labels in the training rows, so its classes cannot be "
                            "inferred; declare them with `classes`")
        return self

    def _class_index(self, uniques: np.ndarray) -> np.ndarray:
        """Class index of each distinct label [K]; -1 for labels outside inferred classes.

        Labels outside declared classes are a DataError. Labels outside classes inferred from the
        training rows (a class seen only in validation or test rows) cannot be predicted by the
        model: they are masked, with a warning that suggests declaring the classes.
        """
        index = pd.Index(self.classes_, dtype=object)
        found = np.asarray(index.get_indexer(pd.Index(uniques, dtype=object)), dtype=np.int64)
        if (found < 0).any():
            bad = uniques[found < 0]
            if self.classes is not None or self.task_type == "binary":
                where = "declared in `classes`" if self.classes is not None else "of this binary label"
                raise DataError(f"{self.name} has labels {preview(bad)} outside its classes "
                                f"{preview(self.classes_, 20)}, the classes {where}")
            warnings.warn(f"{self.name} has labels {preview(bad)} that no training row has; the model "
                          f"cannot predict them, so they are masked. Declare the full list with `classes` "
                          f"to keep them", UserWarning, stacklevel=4)
        return found

    def transform(self, values: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Encode labels [N] -> (targets, mask bool [N]); targets are 0 where masked.

        Targets are float32 [N] (binary, regression), int64 [N] (multiclass) or float32 [N, L]
        (multilabel).
        """
        if not hasattr(self, "classes_"):
            raise RuntimeError("LabelEncoder is not fitted; call fit() first")
        kind = self.task_type
        if kind == "regression":
            x = to_float_label(values, self.name)
            mask = ~np.isnan(x)
            return np.where(mask, x, 0.0).astype(np.float32), mask
        if kind == "multilabel":
            series = _as_series(values)
            mask = np.array(series.notna().to_numpy(), dtype=bool)  # a writable copy
            rows, codes, uniques = explode_tokens(series, self.separator)
            out = np.zeros((len(series), len(self.classes_)), dtype=np.float32)
            classes = self._class_index(uniques)[codes]
            known = classes >= 0
            out[rows[known], classes[known]] = 1.0
            mask[rows[~known]] = False  # a row with a class the model does not know is not scored
            return out, mask
        codes, uniques = factorize_strings(values)
        if kind == "binary":
            standard = self.classes_ == ["0", "1"]
            keyed = np.array([_TRUE_FALSE.get(u, u) for u in uniques] if standard else uniques, dtype=object)
            mapped = self._class_index(keyed).astype(np.float32)
            return _gather(codes, mapped, 0.0), codes >= 0
        mapped = _gather(codes, self._class_index(uniques), -1)
        mask = mapped >= 0
        return np.where(mask, mapped, 0), mask

    def to_dict(self) -> dict[str, Any]:
        return {"type": "label", "task_type": self.task_type,
                "classes": None if self.classes is None else [str(c) for c in self.classes],
                "separator": self.separator, "name": self.name, "fitted_classes": list(self.classes_)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelEncoder:
        _check_type(d, "label")
        enc = cls(d["task_type"], d["classes"], str(d["separator"]), str(d["name"]))
        enc.classes_ = [str(c) for c in d["fitted_classes"]]
        return enc


def to_float_label(values: ArrayLike, name: str) -> np.ndarray:
    """float64 [N] of a regression label; a DataError names `name` when a value is not a number."""
    try:
        return to_float(values)
    except DataError as exc:
        raise DataError(f"{name} is a regression target: {exc}") from None


Encoder: TypeAlias = CategoricalEncoder | NumericEncoder | MultiCategoricalEncoder


def encoder_from_dict(d: dict[str, Any]) -> Encoder:
    """Rebuild a feature encoder from its `to_dict()`."""
    kinds: dict[str, Any] = {"categorical": CategoricalEncoder, "numeric": NumericEncoder,
                             "multi_categorical": MultiCategoricalEncoder}
    cls = kinds.get(str(d.get("type")))
    if cls is None:
        raise ValueError(f"unknown encoder type {d.get('type')!r}; expected one of {sorted(kinds)}")
    enc: Encoder = cls.from_dict(d)
    return enc


# ---------------------------------------------------------------------------------------------
# Entity ids


class IdIndex:
    """The ordered list of known entity ids (users or items): raw id -> entity row.

    Ids are compared as canonical strings; `integer` records whether every id came from an
    integer column, so `raw()` can give them back as int64.
    """

    def __init__(self, ids: np.ndarray, integer: bool) -> None:
        self.ids = np.asarray(ids, dtype=object)
        self.integer = integer
        self._index = pd.Index(self.ids, dtype=object)

    @classmethod
    def build(cls, columns: Sequence[ArrayLike]) -> IdIndex:
        """Distinct ids of `columns` in order of first appearance, the first column first."""
        return cls(np.empty(0, dtype=object), True).extend(columns)

    def extend(self, columns: Sequence[ArrayLike]) -> IdIndex:
        """A new index with the ids of `columns` it lacks appended; existing rows keep their place."""
        parts = [self.ids]
        integer = self.integer
        for column in columns:
            series = _as_series(column)
            integer = integer and (pd.api.types.is_integer_dtype(series.dtype) or len(series) == 0)
            parts.append(pd.unique(factorize_strings(series)[1]))
        merged = pd.unique(np.concatenate(parts)) if len(parts) > 1 else self.ids
        return IdIndex(np.asarray(merged, dtype=object), integer)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, values: ArrayLike) -> np.ndarray:
        """Entity row of each raw id [N] -> int64 [N], -1 for unknown or missing ids."""
        codes, uniques = factorize_strings(values)
        found = np.asarray(self._index.get_indexer(pd.Index(uniques, dtype=object)), dtype=np.int64)
        return _gather(codes, found, -1)

    def raw(self) -> np.ndarray:
        """The id of every entity row: int64 when all ids came from integer columns, else str."""
        if self.integer:
            return self.ids.astype(np.int64)
        return self.ids.copy()

    def to_dict(self) -> dict[str, Any]:
        return {"integer": self.integer, "ids": [str(i) for i in self.ids]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdIndex:
        return cls(np.array([str(i) for i in d["ids"]], dtype=object), bool(d["integer"]))
