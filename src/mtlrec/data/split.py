"""Leakage-safe train / valid / test splits of every table.

Interactions are split by `data.split.method`: `random` rows, `time` (the latest rows are the
test part) or `leave_last_out` (each user's last interaction is a test row, the one before a
validation row). Users, items and item pairs are split by entity with the same fractions, so a
test user's label never trains; an unordered item pair {a, b} lands in exactly one part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mtlrec.config import Config
from mtlrec.data.encoders import canonical_codes, factorize_strings
from mtlrec.data.tables import TABLE_NAMES, Tables, timestamps
from mtlrec.errors import ConfigError, DataError

PARTS = ("train", "valid", "test")


@dataclass
class SplitIndex:
    """Row positions (sorted int64 arrays) of each source's train / valid / test parts."""

    parts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def rows(self, source: str, part: str) -> np.ndarray:
        """Sorted int64 row positions of `part` ('train', 'valid', 'test') of table `source`."""
        if source not in self.parts:
            raise KeyError(f"no split for source '{source}'; split sources are {sorted(self.parts)}")
        if part not in PARTS:
            raise KeyError(f"unknown part '{part}'; parts are {list(PARTS)}")
        return self.parts[source][part]

    def sizes(self) -> dict[str, dict[str, int]]:
        """Number of rows of each part of each source."""
        return {source: {part: int(rows.size) for part, rows in parts.items()}
                for source, parts in self.parts.items()}

    def num_rows(self, source: str) -> int:
        """Rows of `source` covered by the split (all three parts)."""
        return sum(int(rows.size) for rows in self.parts[source].values())


def _counts(n: int, valid: float, test: float) -> tuple[int, int]:
    """(valid, test) sizes for n items, rounded half up, leaving at least one training item."""
    n_test = int(np.floor(n * test + 0.5))
    n_valid = int(np.floor(n * valid + 0.5))
    while n > 0 and n_test + n_valid >= n and (n_test or n_valid):
        if n_valid >= n_test and n_valid > 0:
            n_valid -= 1
        else:
            n_test -= 1
    return n_valid, n_test


def _parts_from_labels(part_of_row: np.ndarray) -> dict[str, np.ndarray]:
    """part_of_row: int8 [N] in {0 train, 1 valid, 2 test} -> sorted rows of each part."""
    return {name: np.flatnonzero(part_of_row == code).astype(np.int64) for code, name in enumerate(PARTS)}


def _random_assignment(n: int, valid: float, test: float, rng: np.random.Generator) -> np.ndarray:
    """int8 [n]: a seeded random assignment of n items to parts with the given fractions."""
    n_valid, n_test = _counts(n, valid, test)
    part = np.zeros(n, dtype=np.int8)
    perm = rng.permutation(n)
    part[perm[:n_test]] = 2
    part[perm[n_test:n_test + n_valid]] = 1
    return part


def _rng(seed: int, source: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, TABLE_NAMES.index(source)]))


def _time_split(ts: np.ndarray, valid: float, test: float) -> np.ndarray:
    """The latest rows by timestamp are test, the ones before them valid; ties share a part."""
    n = ts.size
    n_valid, n_test = _counts(n, valid, test)
    ordered = np.sort(ts, kind="stable")
    part = np.zeros(n, dtype=np.int8)
    if n_valid:
        part[ts >= ordered[n - n_test - n_valid]] = 1
    if n_test:
        part[ts >= ordered[n - n_test]] = 2
    return part


def _leave_last_out(users: np.ndarray, ts: np.ndarray, valid: float, test: float) -> np.ndarray:
    """Per user: the last interaction (by timestamp, then row) is test, the one before valid.

    A part with fraction 0 is not held out. Users with too few interactions to keep one in
    training (fewer than 3 when both parts are held out) stay entirely in train.
    """
    n = users.size
    held = int(test > 0) + int(valid > 0)
    part = np.zeros(n, dtype=np.int8)
    if held == 0 or n == 0:
        return part
    order = np.lexsort((np.arange(n), ts, users))
    u_sorted = users[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    size_of = np.repeat(sizes, sizes)
    from_end = np.repeat(starts + sizes, sizes) - np.arange(n) - 1  # 0 for a user's last row
    eligible = size_of > held
    sorted_part = np.zeros(n, dtype=np.int8)
    if test > 0:
        sorted_part[eligible & (from_end == 0)] = 2
        if valid > 0:
            sorted_part[eligible & (from_end == 1)] = 1
    else:
        sorted_part[eligible & (from_end == 0)] = 1
    part[order] = sorted_part
    return part


def _pair_assignment(pairs: pd.DataFrame, col_a: str, col_b: str, valid: float, test: float,
                     rng: np.random.Generator) -> np.ndarray:
    """int8 [N]: assign each unordered pair {a, b} (and every row of it) to one part."""
    codes_a, uniq_a = factorize_strings(pairs[col_a])
    codes_b, uniq_b = factorize_strings(pairs[col_b])
    if (codes_a < 0).any() or (codes_b < 0).any():
        raise DataError(f"item_pairs has missing ids in '{col_a}' or '{col_b}'; drop those rows")
    joint, _ = pd.factorize(np.concatenate([uniq_a, uniq_b]))  # items compared as strings
    a = joint[: uniq_a.size][codes_a].astype(np.int64)
    b = joint[uniq_a.size:][codes_b].astype(np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    width = np.int64(int(joint.max(initial=0)) + 1)
    keys, key_of_row = np.unique(lo * width + hi, return_inverse=True)
    return _random_assignment(keys.size, valid, test, rng)[key_of_row.reshape(-1)]


def split_tables(tables: Tables, config: Config) -> SplitIndex:
    """Split every table that is given into train / valid / test (seeded, reproducible).

    Raises:
        ConfigError: the split method needs a column the config does not set.
    """
    cfg = config.data.split
    data = config.data
    inter = tables.interactions
    n = len(inter)
    if cfg.method == "random":
        part = _random_assignment(n, cfg.valid, cfg.test, _rng(cfg.seed, "interactions"))
    elif cfg.method == "time":
        if data.timestamp is None:
            raise ConfigError("data.split.method is 'time', which needs data.timestamp (the column to "
                              "order by)")
        part = _time_split(timestamps(inter, data.timestamp, "interactions"), cfg.valid, cfg.test)
    else:
        if data.timestamp is None or data.user_id is None:
            raise ConfigError("data.split.method is 'leave_last_out', which needs data.user_id and "
                              "data.timestamp (each user's interactions in time order)")
        user_codes = canonical_codes(inter[data.user_id])
        part = _leave_last_out(user_codes, timestamps(inter, data.timestamp, "interactions"),
                               cfg.valid, cfg.test)
    split = SplitIndex({"interactions": _parts_from_labels(part)})
    for name in ("users", "items"):
        df = tables.get(name)
        if df is not None:
            assignment = _random_assignment(len(df), cfg.valid, cfg.test, _rng(cfg.seed, name))
            split.parts[name] = _parts_from_labels(assignment)
    pairs = tables.item_pairs
    if pairs is not None:
        for column, key in ((data.item_a, "data.item_a"), (data.item_b, "data.item_b")):
            if column not in pairs.columns:
                raise ConfigError(f"{key} names column '{column}', which the item_pairs table does not have")
        assignment = _pair_assignment(pairs, data.item_a, data.item_b, cfg.valid, cfg.test,
                                      _rng(cfg.seed, "item_pairs"))
        split.parts["item_pairs"] = _parts_from_labels(assignment)
    return split
