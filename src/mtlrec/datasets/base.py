"""What every dataset loader shares: the result type, the registry, file lookup and errors.

A loader reads a local folder (nothing downloads), and returns an `ImportedDataset`: the four
tables as DataFrames and a ready config (a dict that `mtlrec.config.config_from_dict` accepts,
with table paths relative to the folder the dataset is written to).
"""

from __future__ import annotations

import gzip
import io
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mtlrec.config import config_from_dict
from mtlrec.errors import DataError
from mtlrec.registry import Registry

TABLE_FILES: dict[str, str] = {
    "interactions": "interactions.parquet",
    "users": "users.parquet",
    "items": "items.parquet",
    "item_pairs": "item_pairs.parquet",
}
"""File name of each table in an imported dataset's folder."""

SPLIT_PART = "split_part"
"""Column that holds a predefined split (0 train, 1 valid, 2 test); see `predefined_split`."""


@dataclass
class ImportedDataset:
    """The tables and configs a loader produced.

    Attributes:
        name: the loader's name.
        tables: table name ('interactions', 'users', 'items', 'item_pairs') -> DataFrame.
        configs: config file name -> config dict; `config.yaml` is the main one.
        notes: how the data was turned into tasks and splits, one sentence each (written into
            the config's header and shown in benchmark captions).
        seeded_split: True when `data.split.seed` changes the split; False for a predefined split.
    """

    name: str
    tables: dict[str, pd.DataFrame]
    configs: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    seeded_split: bool = True

    @property
    def config(self) -> dict[str, Any]:
        """The main config (`config.yaml`)."""
        return self.configs["config.yaml"]

    def write(self, out: str | Path) -> Path:
        """Write every table as Parquet and every config as YAML into `out`; returns config.yaml's path.

        Each config is validated first (`config_from_dict`), so a written config always loads.
        """
        for config in self.configs.values():
            config_from_dict(config)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, frame in self.tables.items():
            frame.to_parquet(folder / TABLE_FILES[name], index=False)
        header = "".join(f"# {line}\n" for note in [f"mtlrec dataset '{self.name}'.", *self.notes]
                         for line in textwrap.wrap(note, 98))
        for file_name, config in self.configs.items():
            text = header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            (folder / file_name).write_text(text, encoding="utf-8")
        return folder / "config.yaml"


Loader = Callable[..., ImportedDataset]
"""`loader(path, seed=0, **options) -> ImportedDataset`."""

LOADERS: Registry[Loader] = Registry("dataset loader")
"""Dataset loaders by name: `movielens`, `census_income`, `amazon_meta`, `aliexpress`, `ali_ccp`."""


# ---------------------------------------------------------------------------------------------
# Files


def check_folder(path: str | Path, dataset: str, offered: str) -> Path:
    """The folder `path`, or a DataError that says where the publisher offers the data."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{dataset}: folder '{folder}' does not exist; {offered}")
    return folder


def find_file(folder: Path, names: Sequence[str], dataset: str, offered: str) -> Path:
    """The first of `names` that exists in `folder` (glob patterns allowed), else a DataError."""
    found = find_optional(folder, names)
    if found is None:
        listed = " or ".join(f"'{n}'" for n in names)
        raise DataError(f"{dataset}: file {listed} not found in '{folder}'; {offered}")
    return found


def find_optional(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of `names` (file names or glob patterns) that exists in `folder`, or None."""
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = sorted(p for p in folder.glob(name) if p.is_file())
            if matches:
                return matches[0]
        elif (folder / name).is_file():
            return folder / name
    return None


def read_text(path: Path, dataset: str, encoding: str = "utf-8") -> str:
    """The whole text of a (possibly gzipped) file, or a DataError naming it."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return raw.decode(encoding)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{dataset}: cannot read '{path}': {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{dataset}: '{path}' is not {encoding} text (byte {exc.start}); is it the right "
                        "file?") from None


def read_delimited(path: Path, dataset: str, columns: Sequence[str], sep: str, expected: str,
                   encoding: str = "utf-8", dtypes: dict[str, Any] | None = None,
                   skipinitialspace: bool = False) -> pd.DataFrame:
    """Read a header-less delimited file whose every line has exactly `len(columns)` fields.

    `sep` may be a multi-character separator (`::`); `expected` describes a line for errors
    ("user item rating timestamp"). Numeric `dtypes` are checked, naming the first bad line.
    """
    text = read_text(path, dataset, encoding)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{dataset}: '{path.name}' is empty; expected lines of {expected}")
    fields = [line.split(sep) for line in lines]
    width = len(columns)
    for number, parts in enumerate(fields, start=1):
        if len(parts) != width and lines[number - 1].strip():
            raise DataError(f"{dataset}: '{path.name}' line {number} has {len(parts)} {sep!r}-separated fields, "
                            f"expected {width} ({expected}): {lines[number - 1][:120]!r}")
    rows = [parts for parts, line in zip(fields, lines, strict=True) if line.strip()]
    frame = pd.DataFrame(rows, columns=list(columns), dtype=object)
    if skipinitialspace:
        frame = frame.apply(lambda col: col.str.strip())
    for column, dtype in (dtypes or {}).items():
        frame[column] = to_number(frame[column], path, dataset, column, dtype)
    return frame


def to_number(values: pd.Series, path: Path, dataset: str, column: str, dtype: Any) -> pd.Series:
    """`values` as numbers of `dtype`; a DataError names the first line that is not a number."""
    parsed = pd.to_numeric(values.str.strip() if values.dtype == object else values, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy() & values.notna().to_numpy()
                         & (values.astype(str).str.strip() != "").to_numpy())
    if bad.size:
        raise DataError(f"{dataset}: '{path.name}' line {int(bad[0]) + 1}: {column} must be a number, got "
                        f"{values.iloc[bad[0]]!r}")
    if np.dtype(dtype).kind in "iu":
        if parsed.isna().any():
            first = int(np.flatnonzero(parsed.isna().to_numpy())[0])
            raise DataError(f"{dataset}: '{path.name}' line {first + 1}: {column} is empty")
        if (parsed != parsed.round()).any():
            first = int(np.flatnonzero((parsed != parsed.round()).to_numpy())[0])
            raise DataError(f"{dataset}: '{path.name}' line {first + 1}: {column} must be a whole number, got "
                            f"{values.iloc[first]!r}")
    return parsed.astype(dtype)


def read_csv_file(path: Path, dataset: str, required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV file with a header; a DataError names the file when it is unreadable or lacks a column."""
    try:
        frame = pd.read_csv(path, low_memory=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError,
            gzip.BadGzipFile) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{dataset}: cannot read '{path}' as CSV: {detail}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{dataset}: '{path.name}' lacks column(s) {missing}; its columns are "
                        f"{[str(c) for c in frame.columns[:20]]}{' ...' if len(frame.columns) > 20 else ''}")
    return frame


def binary_column(frame: pd.DataFrame, column: str, path: Path, dataset: str) -> pd.Series:
    """Column `column` as int8 0/1; a DataError names the first row holding anything else."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = np.flatnonzero(~values.isin([0, 1]).to_numpy())
    if bad.size:
        raise DataError(f"{dataset}: '{path.name}' column '{column}' must hold 0 or 1; data row {int(bad[0]) + 1} "
                        f"holds {frame[column].iloc[bad[0]]!r}")
    return values.astype(np.int8)


# ---------------------------------------------------------------------------------------------
# Splits and pairs


def predefined_split(parts: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Express a predefined split (int [N]: 0 train, 1 valid, 2 test) in the config as it is.

    The config has no 'predefined' split method, but `method: time` over a column that holds
    the part code, with `valid` and `test` equal to the exact fractions of rows, reproduces the
    given parts row for row (the time split gives tied timestamps one part). Returns the column
    to store as `SPLIT_PART` and the `data.split` section.
    """
    codes = np.asarray(parts, dtype=np.int8)
    n = codes.size
    if n == 0 or not np.isin(codes, (0, 1, 2)).all() or not (codes == 0).any():
        raise ValueError("a predefined split needs part codes 0/1/2 and at least one training row")
    valid, test = int((codes == 1).sum()), int((codes == 2).sum())
    return codes, {"method": "time", "valid": valid / n, "test": test / n, "seed": 0}


def pair_keys(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    """int64 key of the unordered pair {a, b} of item indices below `width`."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    return lo * np.int64(width) + hi


def sample_pairs(rng: np.random.Generator, weights: np.ndarray, n: int, exclude: np.ndarray,
                 max_rounds: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to `n` distinct unordered pairs of distinct items, each item with probability ~ `weights`.

    Pairs whose key (`pair_keys`) is in `exclude` are rejected. Drawing items by weight (e.g.
    by popularity) keeps the sampled pairs from being told apart by how popular their items are.

    Returns:
        item indices a [M], b [M] (M <= n), in random order within each pair.
    """
    width = weights.size
    p = weights.astype(np.float64) / weights.sum()
    chosen = np.zeros(0, dtype=np.int64)
    excluded = np.unique(exclude.astype(np.int64))
    for _ in range(max_rounds):
        need = n - chosen.size
        if need <= 0:
            break
        a = rng.choice(width, size=2 * need + 16, p=p)
        b = rng.choice(width, size=2 * need + 16, p=p)
        keys = pair_keys(a[a != b], b[a != b], width)
        keys = keys[~np.isin(keys, excluded) & ~np.isin(keys, chosen)]
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)][:need]
        chosen = np.concatenate([chosen, keys])
    lo, hi = chosen // width, chosen % width
    flip = rng.random(chosen.size) < 0.5
    return np.where(flip, hi, lo), np.where(flip, lo, hi)


def read_json_lines(path: Path, dataset: str) -> list[dict[str, Any]]:
    """Records of a (gzipped) JSON-lines file; a DataError names the first malformed line."""
    text = read_text(path, dataset)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{dataset}: '{path.name}' line {number} is not valid JSON ({exc.msg}): "
                            f"{line.strip()[:80]!r}") from None
        if not isinstance(record, dict):
            raise DataError(f"{dataset}: '{path.name}' line {number} is a JSON {type(record).__name__}, "
                            "expected an object")
        records.append(record)
    if not records:
        raise DataError(f"{dataset}: '{path.name}' holds no records")
    return records
