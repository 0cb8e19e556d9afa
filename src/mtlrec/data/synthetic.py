"""Built-in synthetic data: a recommender world with known truth, and the MMoE two-task generator.

**The synthetic world** (`make_world`) is drawn from latent factors with numpy's `Generator`,
fully vectorised, and keeps the true probability behind every label (`SyntheticWorld.oracle`), so
a trained model can be scored against the best possible (oracle) metric with `oracle_metrics`.
Notation: K segments, C categories, latent dimension d, sigma(x) = 1 / (1 + e^-x),
std(x) = (x - mean) / sd over the catalogue (or the users).

Users (i = 1..n_users)::

    z_i ~ Cat(pi),  pi ~ Dirichlet(8 * 1_K)               hidden segment
    u_i = mu_{z_i} + s_u * e_i,  mu_k, e_i ~ N(0, I_d)    latent taste (s_u = user_noise)
    age_band_i = A[z_i] w.p. 0.99, else uniform over 6 bands  (informative; `age_signal`)
    region_i   = R[z_i] w.p. 0.5, else uniform over regions   (weaker; `region_signal`)
               A, R: distinct preferred values per segment while there are enough values
    activity_i = exp(r_i), r_i ~ N(0, 0.5^2)                      (numeric)
    segment_i  = z_i w.p. rho_s = 0.9, else uniform over K
               => P(segment_i = k) = rho_s * 1[k = z_i] + (1 - rho_s) / K

Items (j = 1..n_items)::

    c_j ~ Cat(kappa),  kappa ~ Dirichlet(8 * 1_C)          hidden category
    v_j = nu_{c_j} + s_v * f_j,  nu_c, f_j ~ N(0, I_d)     latent profile (s_v = item_noise)
    log price_j ~ N(m_{c_j}, 0.35^2), m = a permutation of linspace(1.5, 5, C)
    brand_j = one of the brands of c_j (brand b belongs to category b mod C) w.p. 0.99 (`brand_signal`),
              else uniform over all brands (spill)
    log pop_j ~ N(0, 1), q_j ~ N(0, 0.4^2)                 popularity, quality (hidden)
    category_j = c_j w.p. rho_c = 0.85, else uniform over C
               => P(category_j = k) = rho_c * 1[k = c_j] + (1 - rho_c) / C
    P(tag t in tags_j) = sigma(logit T[c_j, t] + s_{c_j, t} * std(log price_j)),
              T[c, t] = 0.75 for two typical tags of c, 0.07 otherwise,
              s_{c, t} ~ N(0, 0.6^2) + 1.2 * 1[t = premium]

Interactions (impressions_per_user per user, no repeated item per user)::

    items shown to user i: sampled without replacement with P(j) ~ pop_j (Gumbel top-k)
    timestamp: day ~ U{0..span_days-1}, hour ~ diurnal profile, second ~ U{0..3599};
               sorted per user and made strictly increasing; hour = hour of the timestamp
    device = the user's main device w.p. 0.85, else drawn from (mobile .55, desktop .35, tablet .10)
    a_ij  = std(<u_i, v_j>)                   standardised over the impressions, so that the
    a'_ij = std(<u_i, (I + Q) v_j>)           difficulty does not depend on the draw of mu, nu;
                                              Q a random rotation: like mixes the taste dimensions
    P(click)            = sigma(b_c + g a_ij + 0.3 cos(2 pi (hour - 21) / 24) + dev_c[device]
                                + 0.6 std(log pop_j) - 0.25 std(log price_j) + 0.25 std(r_i))
    P(like | click)     = sigma(b_l + 1.5 a'_ij + q_j + dev_l[device])
    P(purchase | click) = sigma(b_p + a_ij - lambda_{z_i} std(log price_j) + 0.4 1[desktop])
    lambda_k = a permutation of linspace(0, 1.5, K)         price sensitivity by segment

g = affinity_scale. Each bias b is set by bisection so that the mean probability equals its target
rate (`click_rate`; `like_rate` and `purchase_rate` among clicks). `like` and `purchase` are 0
wherever `click` is 0: such a zero is structural, not a negative; the data layer masks a
conditional task where its parent is 0, and `oracle["interactions"]` holds the *conditional*
probabilities P(like | click), P(purchase | click) for every row.

Item pairs (n_pairs unique unordered pairs, a != b, order within a row random)::

    a uniform; b = a same-category item (the closer in price of two draws), an item of the
        complementary category comp(c_a) (a fixed pairing of categories), or uniform: 1/3 each
    logits: unrelated 0; substitute -2 + 4 1[c_a = c_b] - 3 |log price_a - log price_b|;
            complement -2.5 + 5 1[c_b = comp(c_a)]
    relation ~ softmax(logits)

**Oracle tables** are aligned row by row with their table and hold one column per task (binary),
or one column per class named `<task>=<class>` (multiclass: a distribution over the classes;
multilabel: the independent probability of each tag), in `SyntheticWorld.classes[task]` order.

**The MMoE generator** (`mmoe_synthetic`): Ma et al., KDD 2018, section 3.2, with the PLE paper's
constants (c = 1, m = 10, alpha_j, beta_j ~ N(0, 1), d = 100)::

    u1, u2 orthonormal; w1 = c u1; w2 = c (p u1 + sqrt(1 - p^2) u2); x ~ N(0, I_d)
    y_i = w_i^T x + sum_{j=1..m} sin(alpha_j w_i^T x + beta_j) + eps_i,  eps_i ~ N(0, 0.01)

with 0.01 the noise variance (`noise_var`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mtlrec.metrics import task_metrics

AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
REGION_NAMES = ("north", "south", "east", "west", "centre", "coast", "mountains", "islands")
DEVICES = ("mobile", "desktop", "tablet")
TAG_NAMES = ("eco", "premium", "gift", "kids", "outdoor", "tech", "handmade", "vintage", "sport",
             "home", "travel", "luxury")
RELATIONS = ("unrelated", "substitute", "complement")
TABLES = ("interactions", "users", "items", "item_pairs")

#: Task name -> (table, type, parent task or None). The world's seven tasks.
WORLD_TASKS: dict[str, tuple[str, str, str | None]] = {
    "click": ("interactions", "binary", None),
    "like": ("interactions", "binary", "click"),
    "purchase": ("interactions", "binary", "click"),
    "segment": ("users", "multiclass", None),
    "category": ("items", "multiclass", None),
    "tags": ("items", "multilabel", None),
    "relation": ("item_pairs", "multiclass", None),
}

_T0 = 1_704_067_200  # 2024-01-01 00:00:00 UTC, the first day of the simulated log
_DEVICE_P = np.array([0.55, 0.35, 0.10])
_CLICK_DEVICE = np.array([0.1, 0.0, -0.15])
_LIKE_DEVICE = np.array([0.1, -0.1, 0.0])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _standardise(x: np.ndarray) -> np.ndarray:
    sd = float(x.std())
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def _fit_bias(logit: np.ndarray, target: float, weight: np.ndarray | None = None) -> float:
    """The b with weighted mean sigmoid(logit + b) == target (bisection; the mean is monotone in b)."""
    w = np.ones_like(logit) if weight is None else weight
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float((w * _sigmoid(logit + mid)).sum() / w.sum()) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _draw_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One class per row of `probs` [N, C] by inverse CDF."""
    cum: np.ndarray = np.cumsum(probs, axis=1)
    draw = rng.random((probs.shape[0], 1)) * cum[:, -1:]  # [N, 1]
    idx = (draw > cum).sum(axis=1)
    return np.minimum(idx, probs.shape[1] - 1)


def _noisy_label(rng: np.random.Generator, truth: np.ndarray, n_classes: int,
                 accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """Label = truth w.p. `accuracy`, else uniform; returns labels [N] and true probs [N, C]."""
    probs = np.full((truth.size, n_classes), (1.0 - accuracy) / n_classes)
    probs[np.arange(truth.size), truth] += accuracy
    keep = rng.random(truth.size) < accuracy
    labels = np.where(keep, truth, rng.integers(0, n_classes, truth.size))
    return labels, probs


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(4, len(str(n - 1)))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width))


def _names(base: tuple[str, ...], n: int, prefix: str) -> list[str]:
    return [base[i] if i < len(base) else f"{prefix}{i}" for i in range(n)]


def _join_sets(flags: np.ndarray, names: list[str], sep: str = "|") -> np.ndarray:
    """Rows of a bool matrix [N, T] -> 'a|c' strings, building each distinct set's string once."""
    codes = flags.astype(np.int64) @ (np.int64(1) << np.arange(flags.shape[1], dtype=np.int64))
    uniq, inverse = np.unique(codes, return_inverse=True)
    strings = np.array([sep.join(n for t, n in enumerate(names) if (code >> t) & 1) for code in uniq],
                       dtype=object)
    return strings[inverse]


@dataclass(frozen=True, eq=False)
class SyntheticWorld:
    """A generated world: its tables, the true probability behind every label, and hidden truth.

    Attributes:
        tables: `interactions`, `users`, `items`, `item_pairs` DataFrames.
        oracle: per table, a DataFrame aligned by row with the true P(label) of each task
            (`click`, `like`, `purchase` (conditional on click); `<task>=<class>` columns for
            multiclass and multilabel tasks, in `classes[task]` order).
        classes: the class (or tag) names of each multiclass / multilabel task.
        hidden: latent truth: `segment` [n_users] and `category` [n_items] (indices),
            `user_vectors` [n_users, d], `item_vectors` [n_items, d].
        params: the arguments `make_world` was called with.
    """

    tables: dict[str, pd.DataFrame]
    oracle: dict[str, pd.DataFrame]
    classes: dict[str, list[str]]
    hidden: dict[str, np.ndarray] = field(repr=False)
    params: dict[str, Any] = field(default_factory=dict)

    def labels(self, task: str) -> np.ndarray:
        """The task's labels as numbers: [N] 0/1 (binary), [N] class index, [N, T] 0/1 (multilabel)."""
        table, kind, _ = _world_task(task)
        column = self.tables[table][task]
        if kind == "binary":
            return column.to_numpy(dtype=np.int64)
        if kind == "multiclass":
            index = {name: i for i, name in enumerate(self.classes[task])}
            return column.map(index).to_numpy(dtype=np.int64)
        dummies = column.str.get_dummies(sep="|")
        return dummies.reindex(columns=self.classes[task], fill_value=0).to_numpy(dtype=np.int64)

    def oracle_probs(self, task: str) -> np.ndarray:
        """The true probabilities: [N] (binary, conditional on the parent) or [N, C] / [N, T]."""
        table, kind, _ = _world_task(task)
        frame = self.oracle[table]
        if kind == "binary":
            return frame[task].to_numpy(dtype=np.float64)
        return frame[[f"{task}={c}" for c in self.classes[task]]].to_numpy(dtype=np.float64)

    def config_dict(self, data_dir: str = ".", retrieval: bool = False) -> dict[str, Any]:
        """A ready config that trains a PLE model on the files `write` produces in `data_dir`.

        With `retrieval`, it also has a retrieval task on the clicks (two-stage recommending).
        Validates with `mtlrec.config.config_from_dict`. No feature reveals a label.
        """
        def path(name: str) -> str:
            return (Path(data_dir) / f"{name}.parquet").as_posix()

        return {
            "data": {
                "interactions": path("interactions"), "users": path("users"), "items": path("items"),
                "item_pairs": path("item_pairs"), "user_id": "user_id", "item_id": "item_id",
                "timestamp": "timestamp", "item_a": "item_a", "item_b": "item_b",
                "split": {"method": "random", "valid": 0.1, "test": 0.1, "seed": 0},
            },
            "features": [
                {"name": "age_band", "type": "categorical", "table": "users"},
                {"name": "region", "type": "categorical", "table": "users"},
                {"name": "activity", "type": "numeric", "table": "users"},
                {"name": "price", "type": "numeric", "table": "items"},
                {"name": "brand", "type": "categorical", "table": "items"},
                {"name": "hour", "type": "categorical", "table": "interactions"},
                {"name": "device", "type": "categorical", "table": "interactions"},
                {"name": "history", "type": "sequence", "table": "interactions", "max_len": 20,
                 "filter": "click"},
            ],
            "tasks": [
                {"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
                {"name": "like", "kind": "interaction", "label": "like", "type": "binary", "after": "click"},
                {"name": "purchase", "kind": "interaction", "label": "purchase", "type": "binary",
                 "after": "click"},
                {"name": "segment", "kind": "user", "label": "segment", "type": "multiclass",
                 "classes": list(self.classes["segment"])},
                {"name": "category", "kind": "item", "label": "category", "type": "multiclass",
                 "classes": list(self.classes["category"])},
                {"name": "tags", "kind": "item", "label": "tags", "type": "multilabel",
                 "classes": list(self.classes["tags"]), "separator": "|"},
                {"name": "relation", "kind": "item_pair", "label": "relation", "type": "multiclass",
                 "classes": list(self.classes["relation"])},
                *([{"name": "retrieval", "kind": "retrieval", "label": "click"}] if retrieval else []),
            ],
            # dropout: without it the id embeddings memorise the user and item labels
            "model": {"backbone": "ple", "dropout": 0.2},
            "train": {"epochs": 8, "batch_size": 512, "lr": 0.002, "aux_passes": 2.0, "seed": 0,
                      "early_stopping": {"metric": "auto", "patience": 3}},
            "recommend": {"k": 10, "fusion": {"click": 1.0, "like": 0.5, "purchase": 2.0}},
        }

    def write(self, out_dir: str | Path, retrieval: bool = False) -> Path:
        """Write the four tables, `oracle_<table>.parquet` and `config.yaml` (with a retrieval task
        when `retrieval`); return the config's path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            self.tables[name].to_parquet(out / f"{name}.parquet", index=False)
            self.oracle[name].to_parquet(out / f"oracle_{name}.parquet", index=False)
        config_path = out / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config_dict(".", retrieval), sort_keys=False), encoding="utf-8")
        return config_path


def _world_task(task: str) -> tuple[str, str, str | None]:
    try:
        return WORLD_TASKS[task]
    except KeyError:
        raise ValueError(f"unknown synthetic-world task '{task}'; "
                         f"choose from {sorted(WORLD_TASKS)}") from None


def make_world(
    *,
    n_users: int = 2000,
    n_items: int = 1000,
    impressions_per_user: int = 60,
    n_pairs: int = 8000,
    seed: int = 0,
    n_segments: int = 5,
    n_categories: int = 8,
    latent_dim: int = 8,
    n_brands: int = 40,
    n_tags: int = 6,
    n_regions: int = 6,
    span_days: int = 60,
    user_noise: float = 0.1,
    item_noise: float = 0.1,
    affinity_scale: float = 1.3,
    age_signal: float = 0.99,
    region_signal: float = 0.5,
    brand_signal: float = 0.99,
    click_rate: float = 0.2,
    like_rate: float = 0.35,
    purchase_rate: float = 0.3,
    segment_label_accuracy: float = 0.9,
    category_label_accuracy: float = 0.85,
) -> SyntheticWorld:
    """Generate a synthetic recommender world from `seed` (the equations are in the module docstring).

    Args:
        n_users, n_items: table sizes. Ids are strings 'u0000', 'i0042' (at least 4 digits).
        impressions_per_user: interactions per user (distinct items), at most `n_items`;
            the interactions table has n_users * impressions_per_user rows.
        n_pairs: unique unordered item pairs, at most n_items * (n_items - 1) / 2.
        seed: the only source of randomness (numpy `default_rng`).
        n_segments, n_categories, latent_dim, n_brands (>= n_categories), n_tags, n_regions:
            structure sizes.
        span_days: days the interaction log covers.
        user_noise, item_noise: per-entity deviation from the segment / category centre.
        affinity_scale: weight of the user-item affinity in the click logit (sets the oracle AUC).
        age_signal, region_signal: P(age_band / region = the segment's preferred value): how much
            the user features reveal the hidden segment.
        brand_signal: P(an item's brand belongs to its hidden category).
        click_rate, like_rate, purchase_rate: target mean P(click), P(like | click),
            P(purchase | click).
        segment_label_accuracy, category_label_accuracy: P(label = hidden class).

    Returns:
        A `SyntheticWorld` with tables, oracle probabilities, class names and hidden truth.
    """
    params = dict(locals())
    _check_world_args(params)
    rng = np.random.default_rng(seed)
    d = latent_dim
    seg_names = [f"seg{k}" for k in range(n_segments)]
    cat_names = [f"cat{c}" for c in range(n_categories)]
    tag_names = _names(TAG_NAMES, n_tags, "tag")
    region_names = _names(REGION_NAMES, n_regions, "region")

    # --- users -----------------------------------------------------------------------------------
    seg_weights = rng.dirichlet(np.full(n_segments, 8.0))
    z = rng.choice(n_segments, size=n_users, p=seg_weights)
    mu = rng.normal(size=(n_segments, d))
    u = mu[z] + user_noise * rng.normal(size=(n_users, d))
    age_pref = rng.permutation(np.arange(max(n_segments, len(AGE_BANDS))) % len(AGE_BANDS))[:n_segments]
    age = np.where(rng.random(n_users) < age_signal, age_pref[z], rng.integers(0, len(AGE_BANDS), n_users))
    region_pref = rng.permutation(np.arange(max(n_segments, n_regions)) % n_regions)[:n_segments]
    region = np.where(rng.random(n_users) < region_signal, region_pref[z],
                      rng.integers(0, n_regions, n_users))
    log_activity = rng.normal(0.0, 0.5, n_users)
    segment, segment_probs = _noisy_label(rng, z, n_segments, segment_label_accuracy)
    main_device = rng.choice(len(DEVICES), size=n_users, p=_DEVICE_P)
    price_sensitivity = rng.permutation(np.linspace(0.0, 1.5, n_segments))

    # --- items -----------------------------------------------------------------------------------
    cat_weights = rng.dirichlet(np.full(n_categories, 8.0))
    c = rng.choice(n_categories, size=n_items, p=cat_weights)
    nu = rng.normal(size=(n_categories, d))
    v = nu[c] + item_noise * rng.normal(size=(n_items, d))
    price_mean = rng.permutation(np.linspace(1.5, 5.0, n_categories))
    log_price = price_mean[c] + 0.35 * rng.normal(size=n_items)
    price = np.round(np.exp(log_price), 2)
    log_price = np.log(price)  # the rounded price is what a model sees, and what the truth uses
    brands_per_cat = (n_brands - np.arange(n_categories) + n_categories - 1) // n_categories
    own_brand = c + n_categories * np.floor(rng.random(n_items) * brands_per_cat[c]).astype(np.int64)
    brand = np.where(rng.random(n_items) < brand_signal, own_brand, rng.integers(0, n_brands, n_items))
    log_pop = rng.normal(size=n_items)
    quality = 0.4 * rng.normal(size=n_items)
    category, category_probs = _noisy_label(rng, c, n_categories, category_label_accuracy)
    typical = np.argsort(rng.random((n_categories, n_tags)), axis=1)[:, : min(2, n_tags)]
    tag_base = np.full((n_categories, n_tags), 0.07)
    np.put_along_axis(tag_base, typical, 0.75, axis=1)
    # price slopes per (category, tag) keep the true probabilities continuous: tied oracle scores
    # would lower the oracle's mAP below that of a model which merely breaks the ties
    tag_slope = 0.6 * rng.normal(size=(n_categories, n_tags))
    if n_tags > 1:
        tag_slope[:, 1] += 1.2  # 'premium' follows price
    tag_logit = _logit(tag_base[c]) + tag_slope[c] * _standardise(log_price)[:, None]
    tag_probs = _sigmoid(tag_logit)
    tags = _join_sets(rng.random((n_items, n_tags)) < tag_probs, tag_names)

    # --- interactions ----------------------------------------------------------------------------
    n_rows = n_users * impressions_per_user
    user_idx = np.repeat(np.arange(n_users), impressions_per_user)
    item_idx = _exposures(rng, log_pop, n_users, impressions_per_user)
    hour_profile = 1.0 + 0.8 * np.sin(2 * np.pi * (np.arange(24) - 14) / 24)
    ts = (_T0 + 86_400 * rng.integers(0, span_days, n_rows)
          + 3_600 * rng.choice(24, size=n_rows, p=hour_profile / hour_profile.sum())
          + rng.integers(0, 3_600, n_rows))
    ts = np.sort(ts.reshape(n_users, impressions_per_user), axis=1)
    ts = (ts + np.arange(impressions_per_user)).reshape(-1)  # strictly increasing per user
    hour = (ts - _T0) // 3_600 % 24
    device = np.where(rng.random(n_rows) < 0.85, main_device[user_idx],
                      rng.choice(len(DEVICES), size=n_rows, p=_DEVICE_P))

    uu, vv = u[user_idx], v[item_idx]
    # standardised over the impressions so that the task's difficulty does not depend on the draw
    affinity = _standardise((uu * vv).sum(axis=1))
    rotation = np.linalg.qr(rng.normal(size=(d, d)))[0]
    affinity_like = _standardise((uu * (vv @ (np.eye(d) + rotation).T)).sum(axis=1))
    std_price, std_pop = _standardise(log_price), _standardise(log_pop)

    click_logit = (affinity_scale * affinity + 0.3 * np.cos(2 * np.pi * (hour - 21) / 24)
                   + _CLICK_DEVICE[device] + 0.6 * std_pop[item_idx] - 0.25 * std_price[item_idx]
                   + 0.25 * _standardise(log_activity)[user_idx])
    p_click = _sigmoid(click_logit + _fit_bias(click_logit, click_rate))
    like_logit = 1.5 * affinity_like + quality[item_idx] + _LIKE_DEVICE[device]
    p_like = _sigmoid(like_logit + _fit_bias(like_logit, like_rate, p_click))
    purchase_logit = (affinity - price_sensitivity[z[user_idx]] * std_price[item_idx]
                      + 0.4 * (device == 1))
    p_purchase = _sigmoid(purchase_logit + _fit_bias(purchase_logit, purchase_rate, p_click))
    click = rng.random(n_rows) < p_click
    like = click & (rng.random(n_rows) < p_like)
    purchase = click & (rng.random(n_rows) < p_purchase)

    # --- item pairs ------------------------------------------------------------------------------
    pair_a, pair_b, relation_probs = _item_pairs(rng, c, log_price, n_pairs)
    relation = _draw_categorical(rng, relation_probs)

    # --- tables ----------------------------------------------------------------------------------
    user_ids, item_ids = _ids("u", n_users), _ids("i", n_items)
    users = pd.DataFrame({
        "user_id": user_ids,
        "age_band": np.array(AGE_BANDS)[age],
        "region": np.array(region_names)[region],
        "activity": np.round(np.exp(log_activity), 3),
        "segment": np.array(seg_names)[segment],
    })
    items = pd.DataFrame({
        "item_id": item_ids,
        "price": price,
        "brand": _ids("b", n_brands)[brand],
        "category": np.array(cat_names)[category],
        "tags": tags.astype(str),
    })
    interactions = pd.DataFrame({
        "user_id": user_ids[user_idx],
        "item_id": item_ids[item_idx],
        "timestamp": ts.astype(np.int64),
        "hour": hour.astype(np.int64),
        "device": np.array(DEVICES)[device],
        "click": click.astype(np.int64),
        "like": like.astype(np.int64),
        "purchase": purchase.astype(np.int64),
    })
    item_pairs = pd.DataFrame({
        "item_a": item_ids[pair_a],
        "item_b": item_ids[pair_b],
        "relation": np.array(RELATIONS)[relation],
    })

    classes = {"segment": seg_names, "category": cat_names, "tags": tag_names, "relation": list(RELATIONS)}
    oracle = {
        "interactions": pd.DataFrame({"click": p_click, "like": p_like, "purchase": p_purchase}),
        "users": _prob_frame("segment", seg_names, segment_probs),
        "items": pd.concat([_prob_frame("category", cat_names, category_probs),
                            _prob_frame("tags", tag_names, tag_probs)], axis=1),
        "item_pairs": _prob_frame("relation", list(RELATIONS), relation_probs),
    }
    hidden = {"segment": z, "category": c, "user_vectors": u, "item_vectors": v}
    tables = {"interactions": interactions, "users": users, "items": items, "item_pairs": item_pairs}
    return SyntheticWorld(tables=tables, oracle=oracle, classes=classes, hidden=hidden, params=params)


def _check_world_args(p: dict[str, Any]) -> None:
    positive = ("n_users", "n_items", "impressions_per_user", "n_pairs", "n_segments", "n_categories",
                "latent_dim", "n_brands", "n_tags", "n_regions", "span_days")
    for name in positive:
        if int(p[name]) < 1:
            raise ValueError(f"make_world: {name} must be >= 1, got {p[name]}")
    if p["impressions_per_user"] > p["n_items"]:
        raise ValueError(f"make_world: impressions_per_user ({p['impressions_per_user']}) must be <= "
                         f"n_items ({p['n_items']}): a user sees each item at most once")
    if p["n_items"] < 2 or p["n_pairs"] > p["n_items"] * (p["n_items"] - 1) // 2:
        raise ValueError(f"make_world: n_pairs ({p['n_pairs']}) exceeds the number of unordered pairs of "
                         f"{p['n_items']} items")
    if p["n_brands"] < p["n_categories"]:
        raise ValueError(f"make_world: n_brands ({p['n_brands']}) must be >= n_categories "
                         f"({p['n_categories']}) so that every category has a brand")
    for name in ("click_rate", "like_rate", "purchase_rate", "segment_label_accuracy",
                 "category_label_accuracy"):
        if not 0.0 < p[name] < 1.0 and not (name.endswith("accuracy") and p[name] == 1.0):
            raise ValueError(f"make_world: {name} must be in (0, 1), got {p[name]}")
    for name in ("age_signal", "region_signal", "brand_signal"):
        if not 0.0 <= p[name] <= 1.0:
            raise ValueError(f"make_world: {name} must be in [0, 1], got {p[name]}")
    for name in ("user_noise", "item_noise", "affinity_scale"):
        if p[name] < 0:
            raise ValueError(f"make_world: {name} must be >= 0, got {p[name]}")


def _prob_frame(task: str, names: list[str], probs: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(probs, columns=[f"{task}={n}" for n in names])


def _exposures(rng: np.random.Generator, log_pop: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """k distinct items per user, drawn with P(j) ~ exp(log_pop_j), in random order (Gumbel top-k)."""
    n_items = log_pop.size
    chunk = max(1, 4_000_000 // n_items)  # bound the [chunk, n_items] key matrix
    out = np.empty((n_users, k), dtype=np.int64)
    for start in range(0, n_users, chunk):
        stop = min(n_users, start + chunk)
        keys = log_pop[None, :] + rng.gumbel(size=(stop - start, n_items))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k] if k < n_items else np.tile(
            np.arange(n_items), (stop - start, 1))
        order = np.argsort(rng.random(top.shape), axis=1)  # shuffle: time order unrelated to key
        out[start:stop] = np.take_along_axis(top, order, axis=1)
    return out.reshape(-1)


def _item_pairs(rng: np.random.Generator, c: np.ndarray, log_price: np.ndarray,
                n_pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique unordered item pairs and their true relation probabilities [n_pairs, 3]."""
    n_items, n_cat = c.size, int(c.max()) + 1
    perm = rng.permutation(n_cat)
    comp = np.full(n_cat, -1)
    comp[perm[0:-1:2]], comp[perm[1::2]] = perm[1::2], perm[0:-1:2]  # a fixed pairing of categories
    by_cat = np.argsort(c, kind="stable")
    counts = np.bincount(c, minlength=n_cat)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def member(cats: np.ndarray) -> np.ndarray:
        """A random item of each category in `cats`, or a random item where there is none."""
        ok = (cats >= 0) & (counts[np.maximum(cats, 0)] > 0)
        safe = np.where(ok, cats, 0)
        pick = by_cat[starts[safe] + np.floor(rng.random(cats.size) * np.maximum(counts[safe], 1))
                      .astype(np.int64)]
        return np.where(ok, pick, rng.integers(0, n_items, cats.size))

    keys = np.empty(0, dtype=np.int64)
    while keys.size < n_pairs:
        m = 3 * n_pairs
        a = rng.integers(0, n_items, m)
        same1, same2 = member(c[a]), member(c[a])
        closer = np.abs(log_price[same1] - log_price[a]) <= np.abs(log_price[same2] - log_price[a])
        candidates = np.stack([rng.integers(0, n_items, m), np.where(closer, same1, same2),
                               member(comp[c[a]])], axis=1)
        b = candidates[np.arange(m), rng.integers(0, 3, m)]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        new = (lo * n_items + hi)[lo != hi]
        keys = np.concatenate([keys, new])
        _, first = np.unique(keys, return_index=True)
        keys = keys[np.sort(first)]  # keep first occurrences, in draw order
    keys = keys[:n_pairs]
    lo, hi = keys // n_items, keys % n_items
    swap = rng.random(n_pairs) < 0.5
    a, b = np.where(swap, hi, lo), np.where(swap, lo, hi)

    same = (c[a] == c[b]).astype(np.float64)
    complementary = (comp[c[a]] == c[b]).astype(np.float64)
    logits = np.stack([np.zeros(n_pairs),
                       -2.0 + 4.0 * same - 3.0 * np.abs(log_price[a] - log_price[b]),
                       -2.5 + 5.0 * complementary], axis=1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return a, b, probs / probs.sum(axis=1, keepdims=True)


# -------------------------------------------------------------------------------------------------
# Oracle metrics


def oracle_metrics(world: SyntheticWorld, task_name: str, rows: np.ndarray) -> dict[str, float]:
    """Metrics of the true probabilities against the actual labels on `rows` of the task's table.

    Args:
        world: the generated world.
        task_name: one of `WORLD_TASKS` (click, like, purchase, segment, category, tags, relation).
        rows: int positions [R] into the task's table (or a boolean mask over the table). A
            conditional task (like, purchase) is scored only on the given rows where click = 1.

    Returns:
        The same metrics a trained model is scored with (`mtlrec.metrics.task_metrics`):
        binary: auc, gauc (users as groups), logloss; multiclass: accuracy (argmax of the true
        probabilities), macro_f1, logloss; multilabel: micro_f1 (at 0.5), macro_f1, map (mean over
        tags with a positive of the average precision). A metric undefined on the rows is nan.
    """
    table, kind, parent = _world_task(task_name)
    rows = np.asarray(rows)
    n = len(world.tables[table])
    if rows.dtype == bool:
        if rows.shape != (n,):
            raise ValueError(f"oracle_metrics: a boolean rows mask must have {n} entries, got {rows.shape}")
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"oracle_metrics: rows must be positions in [0, {n}) of table '{table}'")
    if parent is not None:
        rows = rows[world.labels(parent)[rows] == 1]
    groups = world.tables[table]["user_id"].to_numpy()[rows] if table == "interactions" else None
    return task_metrics(kind, world.labels(task_name)[rows], world.oracle_probs(task_name)[rows], groups)


# -------------------------------------------------------------------------------------------------
# The MMoE paper's synthetic two-task data


def mmoe_synthetic(n_rows: int, correlation: float, dim: int = 100, m: int = 10, c: float = 1.0,
                   seed: int = 0, noise_var: float = 0.01) -> pd.DataFrame:
    """Two regression tasks whose label correlation is controlled by `correlation` (p).

    MMoE: Ma et al., KDD 2018, section 3.2 (constants as in the PLE paper). See the module
    docstring for the equations; `noise_var` = 0 gives the noiseless labels.

    Returns:
        columns x0..x{dim-1} (float32 inputs, x ~ N(0, I)) and y1, y2 (float64 targets).
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"mmoe_synthetic: correlation must be in [-1, 1], got {correlation}")
    if dim < 2 or n_rows < 1 or m < 0 or noise_var < 0:
        raise ValueError(f"mmoe_synthetic: need dim >= 2, n_rows >= 1, m >= 0, noise_var >= 0; got "
                         f"dim={dim}, n_rows={n_rows}, m={m}, noise_var={noise_var}")
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 2)))[0]  # two orthonormal columns
    u1, u2 = basis[:, 0], basis[:, 1]
    w1 = c * u1
    w2 = c * (correlation * u1 + math.sqrt(max(0.0, 1.0 - correlation**2)) * u2)
    alpha, beta = rng.normal(size=m), rng.normal(size=m)
    x = rng.normal(size=(n_rows, dim)).astype(np.float32)
    xd = x.astype(np.float64)
    out: dict[str, np.ndarray] = {f"x{k}": x[:, k] for k in range(dim)}
    for name, w in (("y1", w1), ("y2", w2)):
        proj = xd @ w  # [N]
        y = proj + np.sin(alpha[None, :] * proj[:, None] + beta[None, :]).sum(axis=1)
        out[name] = y + math.sqrt(noise_var) * rng.normal(size=n_rows)
    return pd.DataFrame(out)


def mmoe_synthetic_config(data_dir: str = ".", dim: int = 100,
                          filename: str = "mmoe_synthetic.parquet") -> dict[str, Any]:
    """A config that trains MMoE on `mmoe_synthetic` data written to `<data_dir>/<filename>`."""
    return {
        "data": {
            "interactions": (Path(data_dir) / filename).as_posix(),
            "user_id": None, "item_id": None,
            "split": {"method": "random", "valid": 0.1, "test": 0.1, "seed": 0},
        },
        "features": [{"name": f"x{k}", "type": "numeric", "table": "interactions"} for k in range(dim)],
        "tasks": [
            {"name": "y1", "kind": "interaction", "label": "y1", "type": "regression"},
            {"name": "y2", "kind": "interaction", "label": "y2", "type": "regression"},
        ],
        "model": {"backbone": "mmoe", "num_experts": 8, "expert_hidden": [16]},
        "train": {"epochs": 5, "batch_size": 256, "lr": 0.001, "seed": 0},
    }
