"""MovieLens 100K (raw `u.*` files) and 1M (`*.dat` files): all four task kinds.

Harper & Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 2015. GroupLens
offers the files at https://grouplens.org/datasets/movielens/ (research use, no redistribution).

Tasks:
  interaction  `like` = rating >= 4 (binary); `rating` 1-5 as regression (RMSE, the
               usual MovieLens metric; the ordering of the stars is kept, which multiclass loses)
  user         `gender` (binary, F = 0, M = 1), `age` (multiclass, the 7 ml-1m bands; ml-100k
               ages are put into the same bands), `occupation` (multiclass, each format's own names)
  item         `genres` (multilabel, '|'-joined genre names)
  item pair    `relation` (binary, label column `co_liked`), from the TRAINING interactions of
               the config's split only. Candidates: pairs of movies that at least
               `min_co_ratings` (20) common users rated. co_liked = 1 when at least `like_share`
               (50%) of those common raters liked (rating >= 4) both movies, else 0. Every pair
               is co-watched, so popularity alone does not give the class away (pairs never
               rated together would make 'unrelated' trivially separable). At most `max_pairs`
               (20,000) pairs, sampled with the seed; the order within a pair is random.

The split used to derive the pairs is the one the written config makes (`split_tables` with the
same method, fractions and seed), so no validation or test interaction enters a pair label.
Changing `data.split` in the config therefore needs a new import with the new seed.

Features: user `zip_region` (first character of the zip code), item `year` (release year,
numeric) and the behaviour sequence `history` (last 20 liked movies, strictly before each
rating). Gender, age and occupation are labels of user tasks, so they are not inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtlrec.config import config_from_dict
from mtlrec.data.split import split_tables
from mtlrec.data.tables import Tables
from mtlrec.datasets.base import (
    LOADERS,
    ImportedDataset,
    check_folder,
    find_optional,
    read_delimited,
    read_text,
)
from mtlrec.errors import DataError

NAME = "movielens"
OFFERED_100K = ("MovieLens 100K is offered by GroupLens at https://grouplens.org/datasets/movielens/100k/ "
                "(ml-100k.zip; unzip it and pass the ml-100k folder)")
OFFERED_1M = ("MovieLens 1M is offered by GroupLens at https://grouplens.org/datasets/movielens/1m/ "
              "(ml-1m.zip; unzip it and pass the ml-1m folder)")
OFFERED = ("MovieLens is offered by GroupLens at https://grouplens.org/datasets/movielens/ "
           "(ml-100k.zip holds u.data, u.user, u.item; ml-1m.zip holds ratings.dat, users.dat, movies.dat)")

GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
AGE_BANDS = ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
AGE_CODES_1M = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
OCCUPATIONS_1M = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                  "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                  "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist", "self-employed",
                  "technician/engineer", "tradesman/craftsman", "unemployed", "writer")


def age_band(age: pd.Series) -> pd.Series:
    """ml-100k ages (years) -> the ml-1m age bands."""
    edges = [-np.inf, 18, 25, 35, 45, 50, 56, np.inf]
    return pd.Series(pd.cut(age, edges, right=False, labels=list(AGE_BANDS)).astype(str), index=age.index)


def _year(text: pd.Series) -> pd.Series:
    """The 4-digit year at the end of a date ('01-Jan-1995') or a title ('Toy Story (1995)')."""
    found = text.fillna("").str.extract(r"(\d{4})\)?\s*$")[0]
    return pd.to_numeric(found, errors="coerce")


def _read_100k(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    ratings_path, users_path, items_path = folder / "u.data", folder / "u.user", folder / "u.item"
    for path in (ratings_path, users_path, items_path):
        if not path.is_file():
            raise DataError(f"{NAME}: file '{path.name}' not found in '{folder}'; {OFFERED_100K}")
    ratings = read_delimited(ratings_path, NAME, ["user_id", "item_id", "rating", "timestamp"], "\t",
                             "user id, item id, rating, timestamp",
                             dtypes={"user_id": np.int64, "item_id": np.int64, "rating": np.int64,
                                     "timestamp": np.int64})
    users = read_delimited(users_path, NAME, ["user_id", "age", "gender", "occupation", "zip"], "|",
                           "user id|age|gender|occupation|zip code", dtypes={"user_id": np.int64, "age": np.int64})
    genre_names = list(GENRES_100K)
    genre_path = folder / "u.genre"
    if genre_path.is_file():
        lines = [ln.split("|") for ln in read_text(genre_path, NAME, "latin-1").splitlines() if ln.strip()]
        if len(lines) == len(GENRES_100K) and all(len(p) == 2 for p in lines):
            genre_names = [p[0] for p in lines]
    flags = [f"g{k}" for k in range(len(genre_names))]
    items = read_delimited(items_path, NAME, ["item_id", "title", "release_date", "video_date", "url", *flags],
                           "|", "movie id|title|release date|video release date|IMDb URL|19 genre flags",
                           encoding="latin-1", dtypes={"item_id": np.int64, **{f: np.int64 for f in flags}})
    flag_values = items[flags].to_numpy()
    if not np.isin(flag_values, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flag_values, (0, 1)).all(axis=1))[0])
        raise DataError(f"{NAME}: 'u.item' line {row + 1}: the 19 genre flags must be 0 or 1")
    names = np.array(genre_names, dtype=object)
    items["genres"] = ["|".join(names[row.astype(bool)]) for row in flag_values]
    items["year"] = _year(items["release_date"]).fillna(_year(items["title"]))
    users["age"] = age_band(users["age"])
    return ratings, users, items[["item_id", "title", "year", "genres"]], "100k"


def _read_1m(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    paths = {name: folder / name for name in ("ratings.dat", "users.dat", "movies.dat")}
    for name, path in paths.items():
        if not path.is_file():
            raise DataError(f"{NAME}: file '{name}' not found in '{folder}'; {OFFERED_1M}")
    ratings = read_delimited(paths["ratings.dat"], NAME, ["user_id", "item_id", "rating", "timestamp"], "::",
                             "UserID::MovieID::Rating::Timestamp", encoding="latin-1",
                             dtypes={"user_id": np.int64, "item_id": np.int64, "rating": np.int64,
                                     "timestamp": np.int64})
    users = read_delimited(paths["users.dat"], NAME, ["user_id", "gender", "age", "occupation", "zip"], "::",
                           "UserID::Gender::Age::Occupation::Zip-code", encoding="latin-1",
                           dtypes={"user_id": np.int64, "age": np.int64, "occupation": np.int64})
    bad_age = ~users["age"].isin(list(AGE_CODES_1M))
    if bad_age.any():
        row = int(np.flatnonzero(bad_age.to_numpy())[0])
        raise DataError(f"{NAME}: 'users.dat' line {row + 1}: age code {users['age'].iloc[row]} is not one of "
                        f"{sorted(AGE_CODES_1M)}")
    bad_occ = ~users["occupation"].between(0, len(OCCUPATIONS_1M) - 1)
    if bad_occ.any():
        row = int(np.flatnonzero(bad_occ.to_numpy())[0])
        raise DataError(f"{NAME}: 'users.dat' line {row + 1}: occupation code {users['occupation'].iloc[row]} "
                        f"is not in 0..{len(OCCUPATIONS_1M) - 1}")
    users["age"] = users["age"].map(AGE_CODES_1M)
    users["occupation"] = np.asarray(OCCUPATIONS_1M, dtype=object)[users["occupation"].to_numpy()]
    movies = _read_movies_dat(paths["movies.dat"])
    return ratings, users, movies, "1m"


def _read_movies_dat(path: Path) -> pd.DataFrame:
    """movies.dat: MovieID::Title::Genres; titles may hold ':' but not '::'."""
    rows = []
    for number, line in enumerate(read_text(path, NAME, "latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            raise DataError(f"{NAME}: 'movies.dat' line {number} is not MovieID::Title::Genres: {line[:120]!r}")
        rows.append((int(parts[0]), parts[1], parts[2].strip()))
    movies = pd.DataFrame(rows, columns=["item_id", "title", "genres"])
    movies["year"] = _year(movies["title"])
    return movies[["item_id", "title", "year", "genres"]]


def _check_ratings(ratings: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, file: str) -> pd.DataFrame:
    bad = ~ratings["rating"].between(1, 5)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{NAME}: '{file}' line {row + 1}: rating {ratings['rating'].iloc[row]} is not in 1..5")
    for column, table, name in (("user_id", users, "users"), ("item_id", items, "items")):
        dupes = table[column][table[column].duplicated()]
        if len(dupes):
            raise DataError(f"{NAME}: the {name} file lists id {dupes.iloc[0]} twice")
        unknown = ~ratings[column].isin(table[column])
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{NAME}: '{file}' line {row + 1}: {column} {ratings[column].iloc[row]} is not in "
                            f"the {name} file")
    return ratings


def movielens_config(split: dict[str, Any], occupations: list[str], genres: list[str]) -> dict[str, Any]:
    """The config of an imported MovieLens folder."""
    return {
        "data": {"interactions": "interactions.parquet", "users": "users.parquet", "items": "items.parquet",
                 "item_pairs": "item_pairs.parquet", "user_id": "user_id", "item_id": "item_id",
                 "timestamp": "timestamp", "item_a": "item_a", "item_b": "item_b", "split": split},
        "features": [
            {"name": "zip_region", "type": "categorical", "table": "users"},
            {"name": "year", "type": "numeric", "table": "items"},
            {"name": "history", "type": "sequence", "max_len": 20, "filter": "like"},
        ],
        "tasks": [
            {"name": "like", "kind": "interaction", "label": "like", "type": "binary"},
            {"name": "rating", "kind": "interaction", "label": "rating", "type": "regression"},
            {"name": "gender", "kind": "user", "label": "gender", "type": "binary"},
            {"name": "age", "kind": "user", "label": "age", "type": "multiclass", "classes": list(AGE_BANDS)},
            {"name": "occupation", "kind": "user", "label": "occupation", "type": "multiclass",
             "classes": occupations},
            {"name": "genres", "kind": "item", "label": "genres", "type": "multilabel", "separator": "|",
             "classes": genres},
            {"name": "relation", "kind": "item_pair", "label": "co_liked", "type": "binary"},
        ],
        "model": {"backbone": "mmoe", "embedding_dim": 16, "encoder_dim": 32, "encoder_hidden": [64],
                  "expert_hidden": [64], "num_experts": 4, "tower_hidden": [32], "head_hidden": [32]},
        "train": {"epochs": 8, "batch_size": 512, "lr": 0.002, "seed": split.get("seed", 0),
                  "early_stopping": {"metric": "auto", "patience": 2}},
        "recommend": {"k": 10, "fusion": {"like": 1.0}},
    }


def derive_pairs(interactions: pd.DataFrame, train_rows: np.ndarray, item_index: pd.Index, seed: int,
                 min_co_ratings: int, like_share: float, max_pairs: int) -> pd.DataFrame:
    """The item-pair table from the training interactions only (see the module docstring).

    Args:
        interactions: user_id, item_id, like columns.
        train_rows: positions of the training interactions; no other row is read.
        item_index: item ids in catalogue order.
        seed: seeds the sampling of pairs and their order.
        min_co_ratings: common raters that make a pair a candidate.
        like_share: share of the common raters who liked both that makes a pair co-liked.
        max_pairs: most pairs (sampled uniformly from the candidates).
    """
    n_items = len(item_index)
    train = interactions.iloc[train_rows]
    users, user_codes = np.unique(train["user_id"].to_numpy(), return_inverse=True)
    items = item_index.get_indexer(pd.Index(train["item_id"]))
    rated = np.zeros((users.size, n_items), dtype=np.float32)
    rated[user_codes, items] = 1.0
    liked = np.zeros_like(rated)
    keep = train["like"].to_numpy() == 1
    liked[user_codes[keep], items[keep]] = 1.0
    co_rated = rated.T @ rated  # [I, I] common raters (exact in float32 below 2^24)
    co_liked = liked.T @ liked  # [I, I] common raters who liked both
    a, b = np.nonzero(np.triu(co_rated >= min_co_ratings, k=1))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 20240611]))
    if a.size > max_pairs:
        pick = np.sort(rng.choice(a.size, max_pairs, replace=False))
        a, b = a[pick], b[pick]
    label = (co_liked[a, b] >= like_share * co_rated[a, b]).astype(np.int8)
    flip = rng.random(a.size) < 0.5
    ids = item_index.to_numpy()
    pairs = pd.DataFrame({"item_a": ids[np.where(flip, b, a)], "item_b": ids[np.where(flip, a, b)],
                          "co_liked": label})
    return pairs.iloc[rng.permutation(len(pairs))].reset_index(drop=True)


@LOADERS.register(NAME)
def load_movielens(path: str | Path, seed: int = 0, split_method: str = "random", valid: float = 0.1,
                   test: float = 0.1, min_co_ratings: int = 20, like_share: float = 0.5,
                   max_pairs: int = 20_000) -> ImportedDataset:
    """Read ml-100k (u.data, u.user, u.item) or ml-1m (ratings.dat, users.dat, movies.dat) from `path`.

    Args:
        path: the unzipped ml-100k or ml-1m folder.
        seed: seed of the split (written into the config) and of the pair sampling.
        split_method, valid, test: the config's `data.split` (the pairs are derived from its
            training part).
        min_co_ratings: common raters (in the training interactions) that make a pair a candidate.
        like_share: share of those common raters who liked both movies that makes a pair co-liked.
        max_pairs: most item pairs (sampled uniformly from the candidates).

    Raises:
        DataError: a file is missing or malformed; the message names it.
    """
    folder = check_folder(path, NAME, OFFERED)
    if (folder / "u.data").is_file() or (folder / "u.user").is_file() or (folder / "u.item").is_file():
        ratings, users, items, version = _read_100k(folder)
        ratings_file = "u.data"
    elif find_optional(folder, ["ratings.dat", "users.dat", "movies.dat"]) is not None:
        ratings, users, items, version = _read_1m(folder)
        ratings_file = "ratings.dat"
    else:
        raise DataError(f"{NAME}: '{folder}' holds neither ml-100k files (u.data, u.user, u.item) nor ml-1m "
                        f"files (ratings.dat, users.dat, movies.dat); {OFFERED}")
    ratings = _check_ratings(ratings, users, items, ratings_file)
    interactions = ratings.assign(like=(ratings["rating"] >= 4).astype(np.int8))
    interactions = interactions[["user_id", "item_id", "timestamp", "like", "rating"]].reset_index(drop=True)
    users = users.assign(zip_region=users["zip"].astype(str).str.strip().str[:1].replace("", None))
    users = users[["user_id", "zip_region", "gender", "age", "occupation"]]
    occupations = sorted(users["occupation"].unique().tolist()) if version == "100k" else list(OCCUPATIONS_1M)

    split = {"method": split_method, "valid": valid, "test": test, "seed": seed}
    genres = sorted({g for cell in items["genres"] for g in cell.split("|") if g})
    config = movielens_config(split, occupations, genres)
    # The interactions' split depends only on the interactions table and data.split, so this is
    # exactly the split the trainer will make from the written config.
    parts = split_tables(Tables(interactions=interactions), config_from_dict(config))
    item_index = pd.Index(items["item_id"])
    pairs = derive_pairs(interactions, parts.rows("interactions", "train"), item_index, seed, min_co_ratings,
                         like_share, max_pairs)
    notes = [
        f"MovieLens {version} read from {folder.name}/.",
        "like = rating >= 4; rating is a regression task; user tasks gender (binary), age (7 bands), "
        "occupation; item task genres (multilabel).",
        f"Item pairs (task relation, label co_liked) from the training interactions of this config's split only "
        f"({split_method}, valid {valid}, test {test}, seed {seed}): pairs of movies rated by >= {min_co_ratings} "
        f"common users; co_liked = 1 when >= {like_share:.0%} of them liked both, else 0; at most {max_pairs:,} "
        "pairs. Re-import with another seed to change data.split.",
    ]
    tables = {"interactions": interactions, "users": users, "items": items[["item_id", "title", "year", "genres"]],
              "item_pairs": pairs}
    if pairs.empty:
        # Too few ratings for any candidate pair: no pair table, no pair task (the data layer
        # rejects an empty table).
        del tables["item_pairs"]
        config["data"]["item_pairs"] = None
        config["tasks"] = [t for t in config["tasks"] if t["kind"] != "item_pair"]
        notes[-1] = (f"No pair of movies has >= {min_co_ratings} common raters in the training interactions: "
                     "no item_pairs table and no relation task (lower min_co_ratings).")
    return ImportedDataset(NAME, tables, {"config.yaml": config}, notes, seeded_split=True)
