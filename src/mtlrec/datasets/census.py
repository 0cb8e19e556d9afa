"""UCI Census-Income (KDD) with the MMoE paper's task groups.

Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, section 5.2. Data: UCI dataset 117 (CC BY 4.0),
https://archive.ics.uci.edu/dataset/117/census+income+kdd (census-income.data.gz, train, 199,523
rows; census-income.test.gz, test, 99,762 rows; 42 comma-separated columns, no header).

Tasks (all binary, over one row per person; there are no user or item ids):
  `income`     income > 50K (last column is '50000+.')
  `marital`    marital status is 'Never married'
  `education`  education at least some college: 'Some college but no degree', an associate,
               bachelor's, master's, professional-school or doctorate degree
Group 1 (`config.yaml`) trains income + marital, group 2 (`config_group2.yaml`) education +
marital. Education and marital status are removed from the inputs, instance_weight is dropped;
the other 38 columns are inputs (7 numeric, 31 categorical).

Split: with both files, the paper's protocol: train = the train file, and the test file halved
at random (seeded) into validation and test; the config expresses this predefined split as a
`time` split over the `split_part` column (0 train, 1 valid, 2 test). With one file only, it is
split 50/25/25 at random by `data.split.seed`.
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
    check_folder,
    find_optional,
    predefined_split,
    read_delimited,
)
from mtlrec.errors import DataError

NAME = "census_income"
OFFERED = ("UCI offers Census-Income (KDD) at https://archive.ics.uci.edu/dataset/117/census+income+kdd "
           "(census-income.data.gz and census-income.test.gz)")
TRAIN_FILES = ("census-income.data.gz", "census-income.data")
TEST_FILES = ("census-income.test.gz", "census-income.test")

COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father",
    "country_mother", "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits", "weeks_worked",
    "year", "income_50k",
)
"""The 42 columns, in file order (names as in the keras-mmoe reproduction)."""

NUMERIC = ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked")
REMOVED = ("education", "marital_stat", "instance_weight", "income_50k")
CATEGORICAL = tuple(c for c in COLUMNS if c not in NUMERIC and c not in REMOVED)
COLLEGE = ("Some college but no degree", "Associates degree-occup /vocational", "Associates degree-academic program",
           "Bachelors degree(BA AB BS)", "Masters degree(MA MS MEng MEd MSW MBA)",
           "Prof school degree (MD DDS DVM LLB JD)", "Doctorate degree(PhD EdD)")
INCOME_VALUES = ("- 50000.", "50000+.")

#: Model and training settings used for Census-Income (written into the config). The MMoE paper
#: used 8 experts and small towers; these sizes were chosen on the validation part.
MODEL = {"backbone": "mmoe", "embedding_dim": 8, "encoder_dim": 32, "encoder_hidden": [64],
         "expert_hidden": [64], "num_experts": 8, "shared_experts": 2, "task_experts": 2, "levels": 1,
         "tower_hidden": [32], "head_hidden": [32], "dropout": 0.0}
TRAIN = {"epochs": 12, "batch_size": 512, "lr": 0.002, "weight_decay": 0.0,
         "early_stopping": {"metric": "auto", "patience": 3}}


def _read(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, NAME, COLUMNS, ",", "42 comma-separated census fields", encoding="latin-1",
                           skipinitialspace=True, dtypes={c: np.float64 for c in NUMERIC})
    bad = ~frame["income_50k"].isin(INCOME_VALUES)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{NAME}: '{path.name}' line {row + 1}: the last field must be '- 50000.' or '50000+.', "
                        f"got {frame['income_50k'].iloc[row]!r}")
    return frame


def census_tables(raw: pd.DataFrame) -> pd.DataFrame:
    """The interactions table: the 38 input columns and the three labels (0/1)."""
    table = raw[list(NUMERIC) + list(CATEGORICAL)].copy()
    table["income"] = (raw["income_50k"] == "50000+.").astype(np.int8)
    table["marital"] = (raw["marital_stat"] == "Never married").astype(np.int8)
    table["education"] = raw["education"].isin(COLLEGE).astype(np.int8)
    return table


def census_config(split: dict[str, Any], tasks: tuple[str, ...], timestamp: str | None) -> dict[str, Any]:
    """A config over the interactions table alone (no ids) with the given binary tasks."""
    return {
        "data": {"interactions": "interactions.parquet", "user_id": None, "item_id": None,
                 "timestamp": timestamp, "split": split},
        "features": [{"name": c, "type": "numeric"} for c in NUMERIC]
        + [{"name": c, "type": "categorical"} for c in CATEGORICAL],
        "tasks": [{"name": t, "kind": "interaction", "label": t, "type": "binary"} for t in tasks],
        "model": dict(MODEL),
        "train": {**TRAIN, "seed": split.get("seed", 0)},
        "recommend": {"fusion": {}},
    }


@LOADERS.register(NAME)
def load_census_income(path: str | Path, seed: int = 0) -> ImportedDataset:
    """Read census-income.data(.gz) and/or census-income.test(.gz) from `path`.

    Args:
        path: the folder with the UCI files.
        seed: seed of the split (the random 50/25/25 split with one file; the halving of the
            test file into validation and test with both).

    Raises:
        DataError: neither file is there (the message says where UCI offers them), or a file
            is malformed (the message names the line).
    """
    folder = check_folder(path, NAME, OFFERED)
    train_path, test_path = find_optional(folder, TRAIN_FILES), find_optional(folder, TEST_FILES)
    if train_path is None and test_path is None:
        raise DataError(f"{NAME}: neither 'census-income.data(.gz)' nor 'census-income.test(.gz)' is in "
                        f"'{folder}'; {OFFERED}")
    frames = [_read(p) for p in (train_path, test_path) if p is not None]
    table = census_tables(pd.concat(frames, ignore_index=True))
    notes: list[str]
    timestamp: str | None = None
    if train_path is not None and test_path is not None:
        n_train, n_test = len(frames[0]), len(frames[1])
        parts = np.zeros(n_train + n_test, dtype=np.int8)
        halves = np.random.default_rng(seed).permutation(n_test)
        test_part = np.full(n_test, 1, dtype=np.int8)
        test_part[halves[: n_test // 2]] = 2
        parts[n_train:] = test_part
        table[SPLIT_PART], split = predefined_split(parts)
        timestamp = SPLIT_PART
        notes = [f"Paper protocol: train = {train_path.name} ({n_train:,} rows); {test_path.name} halved at "
                 f"random (seed {seed}) into validation and test. The split is predefined (split_part column "
                 "0/1/2, expressed as a time split): data.split.seed does not change it."]
        seeded = False
    else:
        only = train_path or test_path
        assert only is not None
        split = {"method": "random", "valid": 0.25, "test": 0.25, "seed": seed}
        notes = [f"Only {only.name} is available ({len(table):,} rows): split 50/25/25 (train/valid/test) at "
                 f"random by data.split.seed, not the paper's split (train file; test file halved)."]
        seeded = True
    notes.append("Tasks: income > 50K, marital = never married (group 1, config.yaml); education >= some college "
                  "and marital (group 2, config_group2.yaml). Education and marital status are not inputs; "
                  "instance_weight is dropped.")
    configs = {"config.yaml": census_config(split, ("income", "marital"), timestamp),
               "config_group2.yaml": census_config(split, ("education", "marital"), timestamp)}
    return ImportedDataset(NAME, {"interactions": table}, configs, notes, seeded_split=seeded)
