"""Amazon Review Data (2018) product metadata: an item task and an item-pair task.

Ni, Li & McAuley, "Justifying recommendations using distantly-labeled reviews and fine-grained
aspects", EMNLP 2019. The per-category metadata files `meta_<Category>.json.gz` (JSON lines) are
offered at https://nijianmo.github.io/amazon/ (research use).

Tables:
  items       one row per asin (duplicated records of the 2018 dump are dropped, the first kept):
              `brand` (categorical), `price` (numeric; '$12.99', a range takes its low end,
              anything else is missing), `title_words` (the title's lower-cased words, '|'-joined,
              at most 12; titles that are HTML fragments count as missing) and the label `category`
  item_pairs  pairs of asins that are both in the file: also_viewed -> 'substitute',
              also_bought -> 'complement' (a pair listed both ways is a complement, buying together
              being the stronger signal), plus as many 'unrelated' pairs as the larger of the two
              classes: pairs listed in neither, each item drawn in proportion to its number of
              listed relations (so an item's degree alone does not give the class away). Pairs
              are unordered.
  interactions there are none in this file. The data layer needs an interactions table, so the
              loader writes the catalogue itself: one row per item with its id and no label. It
              carries no task, so the first source with tasks (items) drives training.

Item task `category`: level `category_level` (default 1, the level below the department, e.g.
'Professional & Educational Journals') of the category path, HTML entities decoded; items
without that level have no label (masked). Classes with fewer than `min_class_items` items are
merged into 'Other'.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlrec.datasets.base import (
    LOADERS,
    ImportedDataset,
    check_folder,
    find_file,
    pair_keys,
    read_json_lines,
    sample_pairs,
)
from mtlrec.errors import DataError

NAME = "amazon_meta"
OFFERED = ("the Amazon Review Data (2018) metadata files (meta_<Category>.json.gz) are offered at "
           "https://nijianmo.github.io/amazon/")
RELATIONS = ("unrelated", "substitute", "complement")
_PRICE = re.compile(r"^\s*\$\s*([0-9][0-9,]*(?:\.[0-9]+)?)")
_WORD = re.compile(r"[a-z0-9]+")


def _price(value: Any) -> float:
    match = _PRICE.match(value) if isinstance(value, str) else None
    return float(match.group(1).replace(",", "")) if match else float("nan")


def _title_words(value: Any, limit: int = 12) -> str | None:
    if not isinstance(value, str) or "<" in value:
        return None
    words = list(dict.fromkeys(_WORD.findall(html.unescape(value).lower())))
    return "|".join(words[:limit]) if words else None


def _category(value: Any, level: int) -> str | None:
    if not isinstance(value, list) or len(value) <= level or not isinstance(value[level], str):
        return None
    text = html.unescape(value[level]).strip()
    return text or None


def _asins(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def amazon_config(split: dict[str, Any]) -> dict[str, Any]:
    """The config of an imported Amazon metadata folder."""
    return {
        "data": {"interactions": "interactions.parquet", "items": "items.parquet",
                 "item_pairs": "item_pairs.parquet", "user_id": None, "item_id": "item_id",
                 "item_a": "item_a", "item_b": "item_b", "split": split,
                 # An item id needs a few training pairs to earn its own embedding: with one, the
                 # id memorises the item's category and generalises worse than brand and title.
                 "id_min_count": 5},
        "features": [
            {"name": "brand", "type": "categorical", "table": "items", "min_count": 2},
            {"name": "price", "type": "numeric", "table": "items"},
            {"name": "title_words", "type": "multi_categorical", "table": "items", "separator": "|",
             "max_len": 12, "min_count": 2},
        ],
        "tasks": [
            {"name": "category", "kind": "item", "label": "category", "type": "multiclass"},
            {"name": "relation", "kind": "item_pair", "label": "relation", "type": "multiclass",
             "classes": list(RELATIONS)},
        ],
        "model": {"backbone": "mmoe", "embedding_dim": 16, "encoder_dim": 32, "encoder_hidden": [64],
                  "head_hidden": [32], "dropout": 0.2},
        "train": {"epochs": 40, "batch_size": 32, "lr": 0.003, "seed": split.get("seed", 0),
                  "early_stopping": {"metric": "auto", "patience": 5}},
    }


@LOADERS.register(NAME)
def load_amazon_meta(path: str | Path, seed: int = 0, category_level: int = 1,
                     min_class_items: int = 10) -> ImportedDataset:
    """Read every `meta_*.json(.gz)` file in `path` (Amazon 2018 product metadata).

    Args:
        path: the folder holding the metadata file(s).
        seed: seed of the split and of the unrelated-pair sampling.
        category_level: index of the category-path level used as the item task's label.
        min_class_items: categories with fewer items become 'Other'.

    Raises:
        DataError: no metadata file (the message says where it is offered), a malformed line, or
            records without an asin.
    """
    folder = check_folder(path, NAME, OFFERED)
    first = find_file(folder, ["meta_*.json.gz", "meta_*.json"], NAME, OFFERED)
    files = sorted({p for p in (*folder.glob("meta_*.json.gz"), *folder.glob("meta_*.json")) if p.is_file()}) or [first]
    records: list[dict[str, Any]] = []
    for file in files:
        for number, record in enumerate(read_json_lines(file, NAME), start=1):
            if not isinstance(record.get("asin"), str) or not record["asin"]:
                raise DataError(f"{NAME}: '{file.name}' record {number} has no 'asin' (the product id)")
            records.append(record)
    unique: dict[str, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(record["asin"], record)
    asins = list(unique)
    items = pd.DataFrame({
        "item_id": asins,
        "brand": [(unique[a].get("brand") or None) if isinstance(unique[a].get("brand"), str) else None
                  for a in asins],
        "price": [_price(unique[a].get("price")) for a in asins],
        "title_words": [_title_words(unique[a].get("title")) for a in asins],
        "category": [_category(unique[a].get("category"), category_level) for a in asins],
    })
    counts = items["category"].value_counts()
    rare = counts.index[counts < min_class_items]
    items.loc[items["category"].isin(rare), "category"] = "Other"

    index = pd.Index(asins)
    n = len(asins)
    edges: dict[str, np.ndarray] = {}
    for field, relation in (("also_view", "substitute"), ("also_buy", "complement")):
        a_list: list[int] = []
        b_list: list[int] = []
        for k, asin in enumerate(asins):
            targets = index.get_indexer(pd.Index(_asins(unique[asin].get(field)), dtype=object))
            targets = targets[(targets >= 0) & (targets != k)]
            a_list.extend([k] * targets.size)
            b_list.extend(targets.tolist())
        edges[relation] = np.unique(pair_keys(np.array(a_list, dtype=np.int64), np.array(b_list, dtype=np.int64),
                                              n))
    substitute = np.setdiff1d(edges["substitute"], edges["complement"])
    complement = edges["complement"]
    related = np.concatenate([substitute, complement])
    if related.size == 0:
        raise DataError(f"{NAME}: no also_buy / also_view entry of {[f.name for f in files]} names another product "
                        "of the file, so there are no item pairs; use a category's complete metadata file")
    degree = np.bincount(np.concatenate([related // n, related % n]), minlength=n).astype(np.float64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2018]))
    un_a, un_b = sample_pairs(rng, degree + 0.5, max(substitute.size, complement.size), related)
    keys = np.concatenate([substitute, complement])
    flip = rng.random(keys.size) < 0.5
    lo, hi = keys // n, keys % n
    ids = np.asarray(asins, dtype=object)
    pairs = pd.DataFrame({
        "item_a": np.concatenate([ids[np.where(flip, hi, lo)], ids[un_a]]),
        "item_b": np.concatenate([ids[np.where(flip, lo, hi)], ids[un_b]]),
        "relation": ["substitute"] * substitute.size + ["complement"] * complement.size + ["unrelated"] * un_a.size,
    })
    pairs = pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)
    interactions = pd.DataFrame({"item_id": asins})
    split = {"method": "random", "valid": 0.1, "test": 0.1, "seed": seed}
    notes = [
        f"Amazon 2018 metadata from {', '.join(f.name for f in files)}: {n:,} products (duplicate asins dropped).",
        f"Item task category = level {category_level} of the category path (classes under {min_class_items} "
        "items merged into 'Other'; items without that level unlabelled).",
        f"Item pairs inside the file: also_view = substitute ({substitute.size:,}), also_buy = complement "
        f"({complement.size:,}; wins over also_view), unrelated ({un_a.size:,}) sampled by relation degree.",
        "interactions.parquet is the catalogue (one row per product, no labels): the data layer needs an "
        "interactions table; it has no tasks, so training is driven by the item and pair tasks.",
    ]
    tables = {"interactions": interactions, "items": items, "item_pairs": pairs}
    return ImportedDataset(NAME, tables, {"config.yaml": amazon_config(split)}, notes, seeded_split=True)
