"""The preprocessed CSV files of two public click / conversion benchmarks (ESMM-style tasks).

`aliexpress`: the AliExpress Searching System Dataset (Li et al., CIKM 2020; Alibaba, Tianchi
dataset 74690, https://tianchi.aliyun.com/dataset/74690) in the layout of MTReclib's
`preprocess.py` (one country, e.g. AliExpress_US/train.csv and test.csv; torch-rechub's sample
files are aliexpress_train_sample.csv / aliexpress_test_sample.csv): search_id, categorical_1..16,
numerical_1..63, click, conversion. `search_id` (the query) is dropped, as MTReclib does.

`ali_ccp`: Alibaba Click and Conversion Prediction (Ma et al., ESMM, SIGIR 2018; Tianchi dataset
408, https://tianchi.aliyun.com/dataset/408) in torch-rechub's preprocessed layout
(ali_ccp_train.csv, ali_ccp_val.csv, ali_ccp_test.csv): click, purchase, sparse fields named by
their Ali-CCP field id (101 user id, 205 item id, ...), dense fields named D<id>.

Tasks: `click` (binary) and `conversion` / `purchase` (binary, `after: click`: its label exists
only on clicked rows, and the model learns it over the entire space, ESMM's p(click and buy) =
p(click) p(buy | click)). There are no users, items or pairs tables (data.user_id and
data.item_id are null; ids that the files hold are ordinary categorical features).

Split: the files' own split, expressed as a `time` split over the `split_part` column (0 train,
1 valid, 2 test). AliExpress has no validation file: a seeded `valid` fraction of the training
file becomes the validation part (the test file is never used for early stopping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlrec.datasets.base import (
    LOADERS,
    SPLIT_PART,
    ImportedDataset,
    binary_column,
    check_folder,
    find_file,
    find_optional,
    predefined_split,
    read_csv_file,
)
from mtlrec.errors import DataError

ALIEXPRESS_OFFERED = ("AliExpress is offered by Alibaba on Tianchi at https://tianchi.aliyun.com/dataset/74690; "
                      "preprocess a country with MTReclib's data/preprocess.py into train.csv and test.csv")
ALI_CCP_OFFERED = ("Ali-CCP is offered by Alibaba on Tianchi at https://tianchi.aliyun.com/dataset/408; "
                   "torch-rechub's examples/ranking/data/ali-ccp/preprocess_ali_ccp.py writes ali_ccp_train.csv, "
                   "ali_ccp_val.csv and ali_ccp_test.csv")


def _patterns(part: str) -> list[str]:
    return [f"{part}.csv", f"{part}.csv.gz", f"*_{part}.csv", f"*_{part}.csv.gz", f"*_{part}_*.csv",
            f"*{part}*.csv", f"*{part}*.csv.gz"]


def _check_numeric(frame: pd.DataFrame, columns: list[str], path: Path, dataset: str) -> None:
    for column in columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = np.flatnonzero(values.isna().to_numpy() & frame[column].notna().to_numpy())
            if bad.size:
                raise DataError(f"{dataset}: '{path.name}' column '{column}' must be numeric; data row "
                                f"{int(bad[0]) + 1} holds {frame[column].iloc[bad[0]]!r}")


def _ctr_config(split: dict[str, Any], categorical: list[str], numeric: list[str],
                labels: tuple[str, str]) -> dict[str, Any]:
    click, conversion = labels
    return {
        "data": {"interactions": "interactions.parquet", "user_id": None, "item_id": None,
                 "timestamp": SPLIT_PART, "split": split},
        "features": [{"name": c, "type": "categorical"} for c in categorical]
        + [{"name": c, "type": "numeric"} for c in numeric],
        "tasks": [{"name": click, "kind": "interaction", "label": click, "type": "binary"},
                  {"name": conversion, "kind": "interaction", "label": conversion, "type": "binary",
                   "after": click}],
        "model": {"backbone": "ple", "embedding_dim": 8, "expert_hidden": [64], "num_experts": 4,
                  "shared_experts": 2, "task_experts": 1, "levels": 2, "tower_hidden": [32]},
        "train": {"epochs": 5, "batch_size": 2048, "lr": 0.001, "seed": 0,
                  "early_stopping": {"metric": "auto", "patience": 2}},
    }


def _load(dataset: str, folder: Path, files: list[tuple[str, Path]], labels: tuple[str, str],
          categorical_of: Any, numeric_of: Any, dropped: tuple[str, ...], valid_fraction: float,
          seed: int, offered: str) -> ImportedDataset:
    frames: list[pd.DataFrame] = []
    codes: list[np.ndarray] = []
    features: list[str] | None = None
    for part, path in files:
        frame = read_csv_file(path, dataset, labels)
        frame.columns = [str(c) for c in frame.columns]
        names = [c for c in frame.columns if c not in labels and c not in dropped]
        if features is None:
            features = names
        elif names != features:
            raise DataError(f"{dataset}: '{path.name}' has columns {names[:8]}..., unlike '{files[0][1].name}' "
                            f"({features[:8]}...); the files must share one layout")
        for label in labels:
            frame[label] = binary_column(frame, label, path, dataset)
        frames.append(frame[[*names, *labels]])
        code = {"train": 0, "valid": 1, "test": 2}[part]
        codes.append(np.full(len(frame), code, dtype=np.int8))
    assert features is not None
    categorical = [c for c in features if categorical_of(c)]
    numeric = [c for c in features if numeric_of(c)]
    unknown = [c for c in features if c not in categorical and c not in numeric]
    if unknown:
        raise DataError(f"{dataset}: columns {unknown[:8]} are neither categorical nor numeric fields of the "
                        f"{dataset} layout; {offered}")
    table = pd.concat(frames, ignore_index=True)
    _check_numeric(table, numeric, files[0][1], dataset)
    parts = np.concatenate(codes)
    if valid_fraction > 0 and not (parts == 1).any():
        train_rows = np.flatnonzero(parts == 0)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        n_valid = int(round(train_rows.size * valid_fraction))
        if 0 < n_valid < train_rows.size:
            parts[rng.choice(train_rows, n_valid, replace=False)] = 1
    table[SPLIT_PART], split = predefined_split(parts)
    config = _ctr_config(split, categorical, numeric, labels)
    config["train"]["seed"] = seed
    sizes = {name: int((parts == code).sum()) for code, name in enumerate(("train", "valid", "test"))}
    notes = [
        f"{dataset} read from {', '.join(p.name for _, p in files)}: {len(table):,} rows, {len(categorical)} "
        f"categorical and {len(numeric)} numeric fields; tasks {labels[0]} and {labels[1]} (after: {labels[0]}).",
        f"Predefined split (split_part column, as a time split): train {sizes['train']:,}, valid {sizes['valid']:,}, "
        f"test {sizes['test']:,}" + (f"; validation = {valid_fraction:.0%} of the training file (seed {seed})"
                                     if not any(p == "valid" for p, _ in files) and sizes["valid"] else "") + ".",
    ]
    return ImportedDataset(dataset, {"interactions": table}, {"config.yaml": config}, notes, seeded_split=False)


@LOADERS.register("aliexpress")
def load_aliexpress(path: str | Path, seed: int = 0, valid_fraction: float = 0.1) -> ImportedDataset:
    """Read MTReclib-layout AliExpress train / test CSV files from `path`.

    Args:
        path: the folder of one country (train.csv, test.csv, or *_train*.csv / *_test*.csv).
        seed: seed of the validation rows carved out of the training file.
        valid_fraction: share of the training file used for validation.

    Raises:
        DataError: a file is missing (the message says where it is offered) or malformed.
    """
    dataset = "aliexpress"
    folder = check_folder(path, dataset, ALIEXPRESS_OFFERED)
    files = [("train", find_file(folder, _patterns("train"), dataset, ALIEXPRESS_OFFERED)),
             ("test", find_file(folder, _patterns("test"), dataset, ALIEXPRESS_OFFERED))]
    return _load(dataset, folder, files, ("click", "conversion"), lambda c: c.startswith("categorical_"),
                 lambda c: c.startswith("numerical_"), ("search_id",), valid_fraction, seed, ALIEXPRESS_OFFERED)


@LOADERS.register("ali_ccp")
def load_ali_ccp(path: str | Path, seed: int = 0, valid_fraction: float = 0.1) -> ImportedDataset:
    """Read torch-rechub-layout Ali-CCP train / val / test CSV files from `path`.

    Args:
        path: the folder (ali_ccp_train.csv, ali_ccp_val.csv, ali_ccp_test.csv; *_sample files too).
        seed: seed of the validation rows carved from the training file when there is no val file.
        valid_fraction: share of the training file used for validation when there is no val file.

    Raises:
        DataError: a file is missing (the message says where it is offered) or malformed.
    """
    dataset = "ali_ccp"
    folder = check_folder(path, dataset, ALI_CCP_OFFERED)
    files = [("train", find_file(folder, _patterns("train"), dataset, ALI_CCP_OFFERED))]
    val = find_optional(folder, _patterns("val"))
    if val is not None:
        files.append(("valid", val))
    files.append(("test", find_file(folder, _patterns("test"), dataset, ALI_CCP_OFFERED)))
    return _load(dataset, folder, files, ("click", "purchase"), lambda c: not c.startswith("D"),
                 lambda c: c.startswith("D"), (), valid_fraction, seed, ALI_CCP_OFFERED)
