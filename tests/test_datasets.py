"""Dataset loaders: on tiny files written here (always) and on the shared reference files (CI has them).

Tests on the shared files read ../shared/data relative to the repository and skip, naming the
missing folder, only where that folder is absent.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtlrec.config import config_from_dict, load_config
from mtlrec.data.split import split_tables
from mtlrec.data.tables import Tables
from mtlrec.datasets import LOADERS, import_dataset, load_dataset
from mtlrec.datasets.base import SPLIT_PART, predefined_split
from mtlrec.datasets.census import COLUMNS
from mtlrec.errors import ConfigError, DataError
from mtlrec.training.trainer import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_TRAIN = ["train.epochs=1", "train.batch_size=32", "train.progress=false", "model.embedding_dim=4",
              "model.encoder_dim=8", "model.encoder_hidden=[8]", "model.expert_hidden=[8]", "model.tower_hidden=[4]",
              "model.head_hidden=[4]", "model.num_experts=2"]


def shared(folder: str) -> Path:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is missing")
    return path


# ---------------------------------------------------------------------------------------------
# Tiny files in each publisher's format


def write_ml100k(folder: Path, seed: int = 0, n_users: int = 40, n_items: int = 10, n: int = 700) -> Path:
    """u.data / u.user / u.item / u.genre in the ml-100k layout, with every user and item rated."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    users = np.concatenate([np.arange(1, n_users + 1), rng.integers(1, n_users + 1, n - n_users)])
    items = np.concatenate([rng.integers(1, n_items + 1, n_users), rng.integers(1, n_items + 1, n - n_users)])
    items[:n_items] = np.arange(1, n_items + 1)
    taste = rng.normal(size=n_users + 1)[users] * rng.normal(size=n_items + 1)[items]
    ratings = np.clip(np.round(3 + 1.5 * taste + rng.normal(0, 0.7, n)), 1, 5).astype(int)
    ts = 880_000_000 + rng.integers(0, 10_000_000, n)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in
                                           zip(users, items, ratings, ts, strict=True)))
    occupations = ["engineer", "student", "writer", "other"]
    (folder / "u.user").write_text("".join(
        f"{u}|{rng.integers(10, 70)}|{'MF'[u % 2]}|{occupations[u % 4]}|{rng.integers(10000, 99999)}\n"
        for u in range(1, n_users + 1)))
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
              "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
              "Western"]
    (folder / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genres)) + "\n")
    lines = []
    for i in range(1, n_items + 1):
        flags = ["0"] * 19
        flags[1 + i % 18] = "1"
        flags[1 + (i * 7) % 18] = "1"
        lines.append(f"{i}|Movie {i} (19{70 + i % 30})|01-Jan-19{70 + i % 30}||http://x|{'|'.join(flags)}\n")
    (folder / "u.item").write_bytes("".join(lines).replace("Movie 1 ", "Mövie 1 ").encode("latin-1"))
    return folder


def write_ml1m(folder: Path, seed: int = 0, n_users: int = 30, n_items: int = 12, n: int = 300) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    users = np.concatenate([np.arange(1, n_users + 1), rng.integers(1, n_users + 1, n - n_users)])
    items = rng.integers(1, n_items + 1, n)
    ratings = rng.integers(1, 6, n)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{978300000 + k}\n" for k, (u, i, r) in
                                                enumerate(zip(users, items, ratings, strict=True))))
    ages = [1, 18, 25, 35, 45, 50, 56]
    (folder / "users.dat").write_text("".join(
        f"{u}::{'MF'[u % 2]}::{ages[u % 7]}::{u % 21}::{55000 + u}\n" for u in range(1, n_users + 1)))
    (folder / "movies.dat").write_bytes("".join(
        f"{i}::Film: Part {i} ({1990 + i})::{'Comedy|Drama' if i % 2 else 'Action'}\n"
        for i in range(1, n_items + 1)).encode("latin-1"))
    return folder


def census_line(rng: np.random.Generator, k: int) -> str:
    values = []
    for column in COLUMNS:
        if column in ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp",
                      "weeks_worked", "det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year"):
            values.append(str(int(rng.integers(0, 60))))
        elif column == "instance_weight":
            values.append(f"{rng.uniform(100, 3000):.2f}")
        elif column == "education":
            values.append(["Children", "High school graduate", "Bachelors degree(BA AB BS)",
                           "Some college but no degree"][k % 4])
        elif column == "marital_stat":
            values.append(["Never married", "Married-civilian spouse present", "Divorced"][k % 3])
        elif column == "income_50k":
            values.append("50000+." if k % 5 == 0 else "- 50000.")
        else:
            values.append(f"{column}-{rng.integers(0, 4)}")
    return ", ".join(values) + "\n"


def write_census(folder: Path, n_test: int = 240, n_train: int = 0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "census-income.test.gz", "wt") as fh:
        fh.writelines(census_line(rng, k) for k in range(n_test))
    if n_train:
        (folder / "census-income.data").write_text("".join(census_line(rng, k) for k in range(n_train)))
    return folder


def write_amazon(folder: Path, n: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    asins = [f"B{k:09d}" for k in range(n)]
    cats = ["Travel &amp; Regional", "Sports", "Fashion"]
    records = []
    for k, asin in enumerate(asins):
        records.append({
            "asin": asin, "title": f"Magazine {k} {cats[k % 3].split()[0]}", "brand": f"brand{k % 5}",
            "price": f"${rng.uniform(5, 30):.2f}" if k % 4 else "",
            "category": ["Magazine Subscriptions", cats[k % 3]] if k % 7 else [],
            "also_view": [asins[(k + d) % n] for d in (3, 6)] + ["X0000"],
            "also_buy": [asins[(k + d) % n] for d in (1, 2)],
        })
    records.append(dict(records[0]))  # a duplicated asin, as in the 2018 dump
    with gzip.open(folder / "meta_Tiny.json.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return folder


def write_aliexpress(folder: Path, n_train: int = 120, n_test: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        click = (rng.random(n) < 0.4).astype(int)
        frame = pd.DataFrame({"search_id": np.arange(n), **{f"categorical_{k}": rng.integers(0, 5, n) for k in (1, 2)},
                              **{f"numerical_{k}": rng.random(n) for k in (1, 2, 3)},
                              "click": click, "conversion": click * (rng.random(n) < 0.3)})
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


def write_ali_ccp(folder: Path, sizes: tuple[int, int, int] = (120, 40, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part, n in zip(("train", "val", "test"), sizes, strict=True):
        click = (rng.random(n) < 0.4).astype(int)
        frame = pd.DataFrame({"click": click, "purchase": click * (rng.random(n) < 0.3),
                              **{str(f): rng.integers(0, 6, n) for f in (101, 205, 301)},
                              "D509": rng.random(n), "D702": rng.random(n)})
        frame.to_csv(folder / f"ali_ccp_{part}.csv", index=False)
    return folder


TINY_WRITERS: dict[str, Callable[[Path], Path]] = {
    "movielens": write_ml100k, "census_income": write_census, "amazon_meta": write_amazon,
    "aliexpress": write_aliexpress, "ali_ccp": write_ali_ccp}


# ---------------------------------------------------------------------------------------------
# Every loader on tiny files: tables, a config that loads, a run that trains


def test_registry_lists_every_loader() -> None:
    assert LOADERS.names() == ["ali_ccp", "aliexpress", "amazon_meta", "census_income", "movielens"]
    with pytest.raises(ConfigError, match="unknown dataset loader 'movielen'; choose from"):
        LOADERS.get("movielen")


@pytest.mark.parametrize("name", sorted(TINY_WRITERS))
def test_tiny_files_import_and_train(name: str, tmp_path: Path) -> None:
    folder = TINY_WRITERS[name](tmp_path / "raw")
    config_path = import_dataset(name, folder, tmp_path / "data", seed=1)
    assert config_path == tmp_path / "data" / "config.yaml"
    config, base = load_config(config_path)
    assert base == (tmp_path / "data").resolve()
    for table in config.data.table_paths().values():
        assert (tmp_path / "data" / table).is_file()
    text = config_path.read_text()
    assert text.startswith(f"# mtlrec dataset '{name}'.")
    result = train(config_path, tmp_path / "run", TINY_TRAIN, progress=False)
    assert set(result.metrics["tasks"]) == {t.name for t in config.tasks}


def test_tiny_movielens_tables_and_tasks(tmp_path: Path) -> None:
    dataset = load_dataset("movielens", write_ml100k(tmp_path), seed=0)
    inter, users, items = (dataset.tables[k] for k in ("interactions", "users", "items"))
    assert len(inter) == 700 and len(users) == 40 and len(items) == 10
    assert len(dataset.tables["item_pairs"]) > 0
    assert ((inter["rating"] >= 4) == (inter["like"] == 1)).all()
    assert set(users["age"]) <= {"Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert items.loc[items["item_id"] == 1, "title"].iloc[0].startswith("Mövie 1 ")  # Latin-1 decoded
    assert items["genres"].str.count(r"\|").max() == 1
    assert items["year"].between(1970, 1999).all()
    config = config_from_dict(dataset.config)
    assert {t.name: t.kind for t in config.tasks} == {
        "like": "interaction", "rating": "interaction", "gender": "user", "age": "user", "occupation": "user",
        "genres": "item", "relation": "item_pair"}
    user_features = {f.source_column for f in config.features if f.table == "users"}
    assert not user_features & {t.label for t in config.tasks_of("user")}  # a user label is never an input
    assert set(dataset.tables["item_pairs"]["co_liked"]) <= {0, 1}


def test_tiny_movielens_1m_format(tmp_path: Path) -> None:
    dataset = load_dataset("movielens", write_ml1m(tmp_path), seed=0)
    users, items = dataset.tables["users"], dataset.tables["items"]
    assert set(users["age"]) == {"Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    assert "college/grad student" in set(users["occupation"])
    assert items.loc[items["item_id"] == 3, "title"].iloc[0] == "Film: Part 3 (1993)"  # ':' in a title
    assert items.loc[items["item_id"] == 3, "year"].iloc[0] == 1993
    config_from_dict(dataset.config)


# ---------------------------------------------------------------------------------------------
# The MovieLens pair rule reads the training interactions only


def _pairs_for(folder: Path, seed: int) -> pd.DataFrame:
    pairs = load_dataset("movielens", folder, seed=seed).tables["item_pairs"]
    return pairs.sort_values(["item_a", "item_b"]).reset_index(drop=True)


def test_movielens_pairs_use_training_interactions_only(tmp_path: Path) -> None:
    """Rewriting every validation/test rating leaves the pairs unchanged; rewriting training ones does not."""
    folder = write_ml100k(tmp_path / "a", n_users=60, n_items=10, n=900)
    seed = 3
    dataset = load_dataset("movielens", folder, seed=seed, min_co_ratings=3, like_share=0.3)
    config = config_from_dict(dataset.config)
    split = split_tables(Tables(interactions=dataset.tables["interactions"]), config)
    held_out = np.concatenate([split.rows("interactions", "valid"), split.rows("interactions", "test")])
    train_rows = split.rows("interactions", "train")

    lines = (folder / "u.data").read_text().splitlines()

    def rewrite(rows: np.ndarray, target: Path) -> Path:
        changed = list(lines)
        for r in rows:
            user, item, rating, ts = changed[r].split("\t")
            changed[r] = "\t".join([user, item, str(6 - int(rating)), ts])  # 5 <-> 1, 4 <-> 2
        write_ml100k(target, n_users=60, n_items=10, n=900)
        (target / "u.data").write_text("\n".join(changed) + "\n")
        return target

    base = load_dataset("movielens", folder, seed=seed, min_co_ratings=3, like_share=0.3).tables["item_pairs"]
    assert base["co_liked"].nunique() == 2  # both labels occur, so a leak could change them
    leaked = load_dataset("movielens", rewrite(held_out, tmp_path / "b"), seed=seed, min_co_ratings=3,
                          like_share=0.3).tables["item_pairs"]
    pd.testing.assert_frame_equal(base, leaked)
    moved = load_dataset("movielens", rewrite(train_rows, tmp_path / "c"), seed=seed, min_co_ratings=3,
                         like_share=0.3).tables["item_pairs"]
    assert not base["co_liked"].equals(moved["co_liked"])


def test_movielens_pair_labels_follow_the_rule(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path, n_users=50, n_items=8, n=700)
    dataset = load_dataset("movielens", folder, seed=0, min_co_ratings=4, like_share=0.5)
    inter = dataset.tables["interactions"]
    split = split_tables(Tables(interactions=inter), config_from_dict(dataset.config))
    train_part = inter.iloc[split.rows("interactions", "train")]
    rated = train_part.groupby("item_id")["user_id"].apply(set)
    liked = train_part[train_part["like"] == 1].groupby("item_id")["user_id"].apply(set)
    pairs = dataset.tables["item_pairs"]
    assert len(pairs) > 0
    for a, b, label in pairs.itertuples(index=False):
        common = rated[a] & rated[b]
        both = liked.get(a, set()) & liked.get(b, set())
        assert len(common) >= 4
        assert label == int(len(both) >= 0.5 * len(common))


# ---------------------------------------------------------------------------------------------
# Predefined splits


def test_predefined_split_is_reproduced_row_for_row() -> None:
    rng = np.random.default_rng(0)
    for n in (7, 100, 1001):
        parts = rng.choice([0, 0, 0, 1, 2], n).astype(np.int8)
        parts[0] = 0
        column, split = predefined_split(parts)
        config = config_from_dict({"data": {"interactions": "x.parquet", "user_id": None, "item_id": None,
                                            "timestamp": SPLIT_PART, "split": split},
                                   "tasks": [{"name": "y", "kind": "interaction", "label": "y", "type": "binary"}]})
        index = split_tables(Tables(interactions=pd.DataFrame({SPLIT_PART: column, "y": 0})), config)
        for code, part in enumerate(("train", "valid", "test")):
            np.testing.assert_array_equal(index.rows("interactions", part), np.flatnonzero(parts == code))


def test_census_with_both_files_uses_the_paper_split(tmp_path: Path) -> None:
    folder = write_census(tmp_path, n_test=101, n_train=150)
    dataset = load_dataset("census_income", folder, seed=2)
    assert not dataset.seeded_split
    config = config_from_dict(dataset.config)
    table = dataset.tables["interactions"]
    split = split_tables(Tables(interactions=table), config)
    assert split.sizes()["interactions"] == {"train": 150, "valid": 51, "test": 50}
    np.testing.assert_array_equal(split.rows("interactions", "train"), np.arange(150))
    assert "Paper protocol" in dataset.notes[0]
    assert {"education", "marital_stat", "instance_weight", "income_50k"}.isdisjoint(
        f.source_column for f in config.features)


def test_census_with_the_test_file_only_splits_50_25_25(tmp_path: Path) -> None:
    dataset = load_dataset("census_income", write_census(tmp_path, n_test=200), seed=4)
    config = config_from_dict(dataset.config)
    assert (config.data.split.method, config.data.split.valid, config.data.split.test) == ("random", 0.25, 0.25)
    assert config.data.split.seed == 4 and dataset.seeded_split
    assert "50/25/25" in dataset.notes[0]
    group2 = config_from_dict(dataset.configs["config_group2.yaml"])
    assert [t.name for t in config.tasks] == ["income", "marital"]
    assert [t.name for t in group2.tasks] == ["education", "marital"]
    table = dataset.tables["interactions"]
    assert table["income"].sum() == 40 and table["marital"].sum() == 67 and table["education"].sum() == 100


def test_aliexpress_carves_validation_from_the_training_file(tmp_path: Path) -> None:
    dataset = load_dataset("aliexpress", write_aliexpress(tmp_path), seed=0)
    config = config_from_dict(dataset.config)
    split = split_tables(Tables(interactions=dataset.tables["interactions"]), config)
    assert split.sizes()["interactions"] == {"train": 108, "valid": 12, "test": 40}
    assert split.rows("interactions", "test").min() == 120  # the test file, untouched
    assert [(t.name, t.after) for t in config.tasks] == [("click", None), ("conversion", "click")]
    assert "search_id" not in {f.name for f in config.features}


# ---------------------------------------------------------------------------------------------
# Errors: missing and malformed files


@pytest.mark.parametrize(("name", "needle", "where"), [
    ("movielens", "u.data", "grouplens.org"),
    ("census_income", "census-income.test", "archive.ics.uci.edu"),
    ("amazon_meta", "meta_", "nijianmo.github.io"),
    ("aliexpress", "train.csv", "tianchi.aliyun.com/dataset/74690"),
    ("ali_ccp", "train.csv", "tianchi.aliyun.com/dataset/408"),
])
def test_missing_files_name_the_file_and_the_publisher(name: str, needle: str, where: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{name}: .*does not exist.*{where}"):
        load_dataset(name, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset(name, tmp_path / "empty")
    assert needle in str(info.value) and where in str(info.value)


def test_missing_movielens_file_is_named(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path)
    (folder / "u.item").unlink()
    with pytest.raises(DataError, match=r"file 'u.item' not found .*grouplens.org/datasets/movielens/100k"):
        load_dataset("movielens", folder)
    folder = write_ml1m(tmp_path / "m1")
    (folder / "ratings.dat").unlink()
    with pytest.raises(DataError, match=r"file 'ratings.dat' not found .*grouplens.org/datasets/movielens/1m"):
        load_dataset("movielens", folder)


def _edit(path: Path, line: int, new: str) -> None:
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[line] = new
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")


def test_malformed_movielens_files_name_the_line(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path)
    _edit(folder / "u.data", 4, "1\t2\t3")
    with pytest.raises(DataError, match=r"'u.data' line 5 has 3 '\\t'-separated fields, expected 4"):
        load_dataset("movielens", folder)
    _edit(folder / "u.data", 4, "1\t2\tfive\t880000000")
    with pytest.raises(DataError, match="'u.data' line 5: rating must be a number, got 'five'"):
        load_dataset("movielens", folder)
    _edit(folder / "u.data", 4, "1\t2\t9\t880000000")
    with pytest.raises(DataError, match=r"'u.data' line 5: rating 9 is not in 1..5"):
        load_dataset("movielens", folder)
    _edit(folder / "u.data", 4, "999\t2\t3\t880000000")
    with pytest.raises(DataError, match="'u.data' line 5: user_id 999 is not in the users file"):
        load_dataset("movielens", folder)
    folder = write_ml1m(tmp_path / "m1")
    _edit(folder / "users.dat", 2, "3::M::33::4::55003")
    with pytest.raises(DataError, match=r"'users.dat' line 3: age code 33 is not one of"):
        load_dataset("movielens", folder)


def test_malformed_census_file_names_the_line(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = [census_line(rng, k) for k in range(5)]
    (folder / "census-income.test").write_text("".join(good[:3]) + "1, 2, 3\n" + "".join(good[3:]))
    with pytest.raises(DataError, match="census_income: 'census-income.test' line 4 has 3 ','-separated fields, "
                                        "expected 42"):
        load_dataset("census_income", folder)
    bad_label = good[1].replace("- 50000.", "maybe").replace("50000+.", "maybe")
    (folder / "census-income.test").write_text(good[0] + bad_label)
    with pytest.raises(DataError, match="line 2: the last field must be '- 50000.' or '50000\\+.', got 'maybe'"):
        load_dataset("census_income", folder)
    text = good[0].split(", ")
    text[0] = "old"
    (folder / "census-income.test").write_text(", ".join(text))
    with pytest.raises(DataError, match="line 1: age must be a number, got 'old'"):
        load_dataset("census_income", folder)
    (folder / "census-income.test").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("census_income", folder)


def test_malformed_amazon_file_names_the_line(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "meta_X.json").write_text('{"asin": "B1", "also_buy": []}\n{"asin": "B2", oops}\n')
    with pytest.raises(DataError, match=r"amazon_meta: 'meta_X.json' line 2 is not valid JSON"):
        load_dataset("amazon_meta", folder)
    (folder / "meta_X.json").write_text('{"asin": "B1"}\n{"title": "no id"}\n')
    with pytest.raises(DataError, match="record 2 has no 'asin'"):
        load_dataset("amazon_meta", folder)
    (folder / "meta_X.json").write_text('{"asin": "B1", "also_buy": ["Z9"]}\n{"asin": "B2"}\n')
    with pytest.raises(DataError, match="names another product of the file"):
        load_dataset("amazon_meta", folder)


def test_malformed_ctr_files_name_the_column(tmp_path: Path) -> None:
    folder = write_aliexpress(tmp_path / "ae")
    frame = pd.read_csv(folder / "test.csv")
    frame.drop(columns=["conversion"]).to_csv(folder / "test.csv", index=False)
    with pytest.raises(DataError, match=r"aliexpress: 'test.csv' lacks column\(s\) \['conversion'\]"):
        load_dataset("aliexpress", folder)
    frame.assign(click=frame["click"].astype(object).where(frame.index != 3, "yes")).to_csv(
        folder / "test.csv", index=False)
    with pytest.raises(DataError, match="'test.csv' column 'click' must hold 0 or 1; data row 4 holds 'yes'"):
        load_dataset("aliexpress", folder)
    folder = write_ali_ccp(tmp_path / "ccp")
    (folder / "ali_ccp_val.csv").write_text("click,purchase,101\n0,0,1\n1,1,1,5,5\n")
    with pytest.raises(DataError, match="ali_ccp: cannot read '.*ali_ccp_val.csv' as CSV"):
        load_dataset("ali_ccp", folder)


# ---------------------------------------------------------------------------------------------
# The shared reference files


def test_shared_movielens_100k(tmp_path: Path) -> None:
    dataset = load_dataset("movielens", shared("movielens-100k"), seed=0)
    t = dataset.tables
    assert (len(t["interactions"]), len(t["users"]), len(t["items"])) == (100_000, 943, 1682)
    assert t["interactions"]["like"].mean() == pytest.approx(0.55375)
    assert t["items"].loc[t["items"]["item_id"] == 1, "genres"].iloc[0] == "Animation|Children's|Comedy"
    assert set(t["users"]["age"]) == {"Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"}
    pairs = t["item_pairs"]
    assert len(pairs) == 20_000 and 0.1 < pairs["co_liked"].mean() < 0.4
    path = dataset.write(tmp_path)
    config, _ = load_config(path)
    assert config.data.split.seed == 0 and config.train.seed == 0


def test_shared_movielens_1m_partial_says_what_is_missing(tmp_path: Path) -> None:
    folder = shared("movielens-1m-partial")
    with pytest.raises(DataError, match=r"file 'ratings.dat' not found in .*grouplens.org/datasets/movielens/1m"):
        load_dataset("movielens", folder)
    # With a small ratings file beside the real users.dat and movies.dat, the 1M format loads.
    local = tmp_path / "ml-1m"
    local.mkdir()
    for name in ("users.dat", "movies.dat"):
        (local / name).symlink_to(folder / name)
    (local / "ratings.dat").write_text("".join(f"{u}::{m}::{1 + (u + m) % 5}::{978300760 + u}\n"
                                               for u in range(1, 400) for m in (1, 2, 3, 260, 1196)))
    dataset = load_dataset("movielens", local, seed=0, min_co_ratings=5)
    assert (len(dataset.tables["users"]), len(dataset.tables["items"])) == (6040, 3883)
    items = dataset.tables["items"]
    assert items.loc[items["item_id"] == 1, "genres"].iloc[0] == "Animation|Children's|Comedy"
    config_from_dict(dataset.config)


def test_shared_census_income(tmp_path: Path) -> None:
    dataset = load_dataset("census_income", shared("census-income-kdd"), seed=0)
    table = dataset.tables["interactions"]
    assert len(table) == 99_762
    assert int(table["income"].sum()) == 6_186 and int(table["marital"].sum()) == 43_143
    assert 0.3 < table["education"].mean() < 0.4
    assert "census-income.test.gz" in dataset.notes[0] and "50/25/25" in dataset.notes[0]
    config = config_from_dict(dataset.config)
    assert len(config.features) == 38 and config.data.user_id is None and config.data.item_id is None


def test_shared_amazon_meta() -> None:
    dataset = load_dataset("amazon_meta", shared("amazon2018-magazine-subscriptions-meta"), seed=0)
    items, pairs = dataset.tables["items"], dataset.tables["item_pairs"]
    assert len(items) == 2_320 and items["item_id"].is_unique
    assert items["category"].nunique() >= 10
    assert not items["category"].dropna().str.contains("&amp;").any()
    counts = pairs["relation"].value_counts()
    assert set(counts.index) == {"unrelated", "substitute", "complement"}
    assert counts["unrelated"] == max(counts["substitute"], counts["complement"])
    keys = {frozenset(p) for p in zip(pairs["item_a"], pairs["item_b"], strict=True)}
    assert len(keys) == len(pairs)  # every unordered pair once
    assert set(pairs["item_a"]) | set(pairs["item_b"]) <= set(items["item_id"])
    config_from_dict(dataset.config)


@pytest.mark.parametrize(("name", "folder", "sizes"), [
    ("aliexpress", "aliexpress-sample", {"train": 90, "valid": 10, "test": 20}),
    ("ali_ccp", "ali-ccp-sample", {"train": 100, "valid": 50, "test": 50}),
])
def test_shared_ctr_samples(name: str, folder: str, sizes: dict[str, int], tmp_path: Path) -> None:
    dataset = load_dataset(name, shared(folder), seed=0)
    config = config_from_dict(dataset.config)
    split = split_tables(Tables(interactions=dataset.tables["interactions"]), config)
    assert split.sizes()["interactions"] == sizes
    conversion = config.tasks[1]
    assert conversion.after == "click"
    path = dataset.write(tmp_path)
    result = train(path, tmp_path / "run", TINY_TRAIN, progress=False)
    assert set(result.metrics["tasks"]) == {"click", conversion.name}
