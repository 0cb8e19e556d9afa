"""Leakage-safe train / valid / test splits of every table.

Interactions are split by `data.split.method`: `random` rows, `time` (the latest rows are the
test part) or `leave_last_out` (each user's last interaction is a test row, the one before a
validation row). Users, items and item pairs are split by entity with the same fractions, so a
test user's label never trains; an unordered item pair {a, b} lands in exactly one part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
    split = split_catalogue(tables, config)
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
    split.parts = {"interactions": _parts_from_labels(part), **split.parts}
    return split


def split_catalogue(tables: Tables, config: Config) -> SplitIndex:
    """Split the users, items and item_pairs tables by entity; the interactions are left out.

    `split_tables` adds the interactions; with `data.stream` they are split row by row as they are
    read (`hash_parts`, `time_parts`).
    """
    cfg = config.data.split
    data = config.data
    split = SplitIndex({})
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


# ---------------------------------------------------------------------------------------------
# Splitting rows one at a time (data.stream): no pass needs the whole log in memory

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 [N] (wrapping arithmetic): a bijection that scrambles bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_parts(rows: np.ndarray, valid: float, test: float, seed: int) -> np.ndarray:
    """int8 [N] part of each global row number [N]: a seeded hash decides, row by row.

    Row r gets u(r) = hash(seed, r) / 2^64, uniform in [0, 1): test when u < `test`, valid when
    u < `test` + `valid`, else train. The same row always lands in the same part, whatever else is
    read; the parts' sizes are binomial around the fractions (not the exact counts of the
    in-memory split).
    """
    seed_key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (_mix64(np.asarray(rows).astype(np.uint64) * _GOLDEN + seed_key) >> np.uint64(11)).astype(np.float64)
    u *= 2.0 ** -53
    part = np.zeros(u.size, dtype=np.int8)
    part[u < test + valid] = 1
    part[u < test] = 2
    return part


_SIGN = np.uint64(1 << 63)


def order_keys(ts: np.ndarray) -> np.ndarray:
    """uint64 [N] keys that sort like the timestamps [N] (integers, or floats without NaN)."""
    values = np.asarray(ts)
    if values.dtype.kind == "u":
        return values.astype(np.uint64)
    if values.dtype.kind in "ib":
        return values.astype(np.int64).view(np.uint64) ^ _SIGN
    bits = (values.astype(np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | _SIGN)


def select_keys(passes: Callable[[], Iterable[np.ndarray]], ranks: Sequence[int]) -> list[int]:
    """The keys at 0-based `ranks` of the sorted keys, in a few passes of bounded memory.

    `passes()` yields every key (uint64 chunks) once per call. A first pass finds the range; each
    further pass narrows every rank's candidate range 65,536-fold with a histogram of the next 16
    bits, so at most 4 more passes find the exact key, as a full sort would.
    """
    low, high, n = None, None, 0
    for keys in passes():
        if keys.size:
            low = int(keys.min()) if low is None else min(low, int(keys.min()))
            high = int(keys.max()) if high is None else max(high, int(keys.max()))
            n += keys.size
    if low is None or high is None:
        return [0 for _ in ranks]
    for rank in ranks:
        if not 0 <= rank < n:
            raise ValueError(f"rank {rank} is outside [0, {n})")
    shift = (high - low).bit_length()
    # Per rank: the candidate range [start, start + 2^shift) and the count of keys below it.
    state = [[low, 0] for _ in ranks]
    while shift > 0:
        step = min(16, shift)
        sub = shift - step
        hists = [np.zeros(1 << step, dtype=np.int64) for _ in ranks]
        belows = [0 for _ in ranks]
        for keys in passes():
            for i, (start, _) in enumerate(state):
                offset = keys - np.uint64(start)
                inside = (keys >= np.uint64(start)) & (offset >> np.uint64(shift) == 0 if shift < 64 else True)
                belows[i] += int((keys < np.uint64(start)).sum())
                hists[i] += np.bincount((offset[inside] >> np.uint64(sub)).astype(np.int64), minlength=1 << step)
        for i, rank in enumerate(ranks):
            cumulative = np.cumsum(hists[i]) + belows[i]
            b = int(np.searchsorted(cumulative, rank, side="right"))
            state[i][0] += b << sub
        shift = sub
    return [start for start, _ in state]


def time_thresholds(passes: Callable[[], Iterable[np.ndarray]], n: int, valid: float,
                    test: float) -> tuple[int | None, int | None]:
    """Order keys from which rows are valid and test (`time_parts`), as the in-memory time split.

    The in-memory split sorts the timestamps and makes the rows at or after the (n - n_test)-th
    test, those at or after the (n - n_test - n_valid)-th valid; these are the same keys, found
    with `select_keys` over `passes` of the timestamp keys.
    """
    n_valid, n_test = _counts(n, valid, test)
    ranks = [n - n_test - n_valid] if n_valid else []
    ranks += [n - n_test] if n_test else []
    keys = select_keys(passes, ranks) if ranks else []
    t_valid = keys.pop(0) if n_valid else None
    t_test = keys.pop(0) if n_test else None
    return t_valid, t_test


def time_parts(keys: np.ndarray, thresholds: tuple[int | None, int | None]) -> np.ndarray:
    """int8 [N] part of each row from its order key [N] and `time_thresholds`."""
    t_valid, t_test = thresholds
    part = np.zeros(keys.size, dtype=np.int8)
    if t_valid is not None:
        part[keys >= np.uint64(t_valid)] = 1
    if t_test is not None:
        part[keys >= np.uint64(t_test)] = 2
    return part
