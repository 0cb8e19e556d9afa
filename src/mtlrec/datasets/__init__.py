"""Loaders for public datasets read from a local folder; nothing downloads.

Each loader turns the publisher's files into mtlrec's tables (interactions, and users, items,
item_pairs where the data has them) and a ready config. `import_dataset` writes them as Parquet
plus `config.yaml` into a folder that `mtlrec train OUT/config.yaml` trains on:

    from mtlrec.datasets import import_dataset
    config = import_dataset("movielens", "downloads/ml-100k", "data/ml100k")

Loaders (`LOADERS`): `movielens` (ml-100k / ml-1m), `census_income` (UCI Census-Income KDD,
the MMoE paper's tasks), `amazon_meta` (Amazon 2018 product metadata: item and item-pair
tasks), `aliexpress` and `ali_ccp` (the preprocessed CSV files of the public CTR/CVR benchmarks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtlrec.datasets import aliexpress, amazon, census, movielens
from mtlrec.datasets.base import LOADERS, TABLE_FILES, ImportedDataset, Loader

__all__ = ["LOADERS", "TABLE_FILES", "ImportedDataset", "Loader", "import_dataset", "load_dataset"]

_MODULES = (aliexpress, amazon, census, movielens)  # imported for their registrations


def load_dataset(name: str, path: str | Path, seed: int = 0, **options: Any) -> ImportedDataset:
    """Read dataset `name` from the folder `path` into memory (tables and configs).

    `options` go to the loader (e.g. `min_co_ratings` of `movielens`, `category_level` of
    `amazon_meta`); see each loader's docstring.

    Raises:
        ConfigError: `name` is not a registered loader.
        DataError: a file is missing (the message says where the publisher offers it) or malformed.
    """
    return LOADERS.get(name)(Path(path), seed=seed, **options)


def import_dataset(name: str, path: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Read dataset `name` from `path` and write its tables and config.yaml into `out`.

    Args:
        name: a registered loader (`LOADERS.names()`).
        path: the folder holding the publisher's files.
        out: the folder to write (created).
        seed: seed of the split written into the config (and of any sampling the loader does,
            such as unrelated item pairs).

    Returns:
        The path of the written `config.yaml`.
    """
    return load_dataset(name, path, seed).write(out)
