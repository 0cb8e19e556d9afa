"""Encoders: vocabularies, hashing, scaling, labels; JSON round trips; no pickle anywhere."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlrec.data.encoders import (
    CategoricalEncoder,
    IdIndex,
    LabelEncoder,
    MultiCategoricalEncoder,
    NumericEncoder,
    encoder_from_dict,
    normalize_strings,
)
from mtlrec.data.spec import OOV, PAD
from mtlrec.errors import DataError


def roundtrip(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(d, allow_nan=False))
    return out


# ---------------------------------------------------------------------------------------------
# Categorical


def test_vocab_order_is_count_then_value_and_reserves_pad_and_oov() -> None:
    enc = CategoricalEncoder(min_count=2).fit(["b", "a", "c", "a", "b", "c", "c", "d", None])
    assert enc.vocab_ == ["c", "a", "b"]  # c x3, then a and b (x2) by value; d (x1) below min_count
    assert enc.size == 5
    out = enc.transform(["c", "a", "b", "d", "zzz", None, np.nan])
    assert out.dtype == np.int64
    assert out.tolist() == [2, 3, 4, OOV, OOV, PAD, PAD]


def test_values_compare_as_strings() -> None:
    enc = CategoricalEncoder().fit(pd.Series([1, 2, 2]))
    assert enc.transform(pd.Series(["1", "2", "3"], dtype=object)).tolist() == [3, 2, OOV]
    assert enc.transform(pd.Series([1.0, 2.0, np.nan])).tolist() == [3, 2, PAD]
    mixed = CategoricalEncoder().fit(pd.Series([1, "1", 1.0], dtype=object))
    assert mixed.vocab_ == ["1"]
    assert normalize_strings(np.array([True, False])).tolist() == ["True", "False"]
    assert normalize_strings(np.array([1.5, 2.0, -3.0])).tolist() == ["1.5", "2", "-3"]


def test_categorical_fit_uses_only_given_values() -> None:
    train = pd.Series(["x", "y", "x"])
    test_only = pd.Series(["z"])  # appears only outside training: must be OOV
    enc = CategoricalEncoder().fit(train)
    assert enc.transform(test_only).tolist() == [OOV]


def test_fit_many_adds_counts_across_columns() -> None:
    enc = CategoricalEncoder(min_count=2).fit_many([pd.Series([7, 8]), pd.Series(["7", "9"], dtype=object)])
    assert enc.vocab_ == ["7"]


def test_hashing_is_stable_and_in_range() -> None:
    enc = CategoricalEncoder(hash_buckets=16).fit(["ignored"])
    values = [f"user-{i}" for i in range(500)] + [None]
    a = enc.transform(values)
    b = CategoricalEncoder.from_dict(roundtrip(enc.to_dict())).transform(values)
    assert np.array_equal(a, b)
    assert a[-1] == PAD
    assert a[:-1].min() >= 2 and a[:-1].max() <= 17
    assert len(set(a[:-1].tolist())) > 10  # spreads over the buckets
    assert enc.size == 18
    # the same value always lands in the same bucket, whatever else is in the column
    assert enc.transform(["user-3"])[0] == a[3]
    # frozen values: a change of hashing would silently scramble every saved model
    assert enc.transform(["a", "b", 1]).tolist() == CategoricalEncoder(hash_buckets=16).fit([]).transform(
        ["a", "b", "1"]).tolist()


def test_unfitted_encoder_says_so() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        CategoricalEncoder().transform(["a"])


values_strategy = st.lists(st.one_of(st.integers(-5, 5), st.sampled_from(["a", "b", "c", "é", "a|b", ""]),
                                     st.none()), max_size=60)


@settings(max_examples=60, deadline=None)
@given(train=values_strategy, other=values_strategy, min_count=st.integers(1, 3))
def test_vocab_roundtrip_property(train: list[Any], other: list[Any], min_count: int) -> None:
    enc = CategoricalEncoder(min_count=min_count).fit(pd.Series(train, dtype=object))
    restored = CategoricalEncoder.from_dict(roundtrip(enc.to_dict()))
    probe = pd.Series(train + other, dtype=object)
    codes = enc.transform(probe)
    assert np.array_equal(codes, restored.transform(probe))
    counts = pd.Series([str(v) for v in train if v is not None]).value_counts()
    for value, code in zip(train + other, codes, strict=True):
        if value is None:
            assert code == PAD
        elif counts.get(str(value), 0) >= min_count:
            assert code >= 2 and enc.vocab_[code - 2] == str(value)  # decodes back to the value
        else:
            assert code == OOV  # unseen or rare -> OOV
    assert enc.size == len(enc.vocab_) + 2


# ---------------------------------------------------------------------------------------------
# Numeric


def test_numeric_standardises_with_missing_indicator() -> None:
    enc = NumericEncoder().fit([1.0, 2.0, 3.0, np.nan])
    assert enc.mean_ == pytest.approx(2.0)
    out = enc.transform([2.0, np.nan, np.inf, 5.0, None])
    assert out.dtype == np.float32 and out.shape == (5, 2)
    assert out[:, 1].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert out[0, 0] == 0.0 and out[1, 0] == 0.0 and out[2, 0] == 0.0
    assert out[3, 0] == pytest.approx(3.0 / np.std([1.0, 2.0, 3.0]))


def test_numeric_constant_column_gets_unit_std() -> None:
    enc = NumericEncoder().fit([4.0, 4.0])
    assert enc.std_ == 1.0
    assert enc.transform([5.0])[0, 0] == pytest.approx(1.0)


def test_numeric_rejects_text() -> None:
    with pytest.raises(DataError, match="cheap"):
        NumericEncoder().fit(pd.Series(["1.5", "cheap"], dtype=object))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.none()), min_size=1, max_size=80))
def test_numeric_standardisation_invariants(values: list[float | None]) -> None:
    enc = NumericEncoder().fit(pd.Series(values, dtype=object))
    restored = NumericEncoder.from_dict(roundtrip(enc.to_dict()))
    out = enc.transform(pd.Series(values, dtype=object))
    assert np.array_equal(out, restored.transform(pd.Series(values, dtype=object)))
    present = np.array([v is not None for v in values])
    assert np.array_equal(out[:, 1] == 1.0, ~present)
    assert np.all(out[~present, 0] == 0.0)
    assert np.isfinite(out).all()
    x = out[present, 0].astype(np.float64)
    if x.size:
        assert abs(x.mean()) < 1e-3
        raw = np.array([v for v in values if v is not None])
        if raw.std() > 1e-3 * max(1.0, np.abs(raw).max()):
            assert x.std() == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Multi-valued categorical


def test_multi_categorical_strings_and_lists() -> None:
    enc = MultiCategoricalEncoder(min_count=1, max_len=3, separator="|")
    enc.fit(["a|b", "b", "c|b|a|d", None, ""])
    assert enc.vocab_.vocab_ == ["b", "a", "c", "d"]
    out = enc.transform(["a|b", "b", "c|b|a|d", None, "", "zz|a", "a||b"])
    assert out.dtype == np.int64 and out.shape == (7, 3)
    assert out.tolist() == [[3, 2, 0], [2, 0, 0], [4, 2, 3], [0, 0, 0], [0, 0, 0], [OOV, 3, 0], [3, 2, 0]]
    lists = enc.transform(pd.Series([["a", "b"], [], None, np.array(["d"])], dtype=object))
    assert lists.tolist() == [[3, 2, 0], [0, 0, 0], [0, 0, 0], [5, 0, 0]]
    restored = encoder_from_dict(roundtrip(enc.to_dict()))
    assert isinstance(restored, MultiCategoricalEncoder)
    assert np.array_equal(restored.transform(["a|b", "zz"]), enc.transform(["a|b", "zz"]))


def test_multi_categorical_hashing() -> None:
    enc = MultiCategoricalEncoder(max_len=2, hash_buckets=8).fit(["a|b"])
    out = enc.transform(["a|b|c", None])
    assert (out[0] >= 2).all() and (out[0] <= 9).all() and (out[1] == 0).all()
    assert enc.size == 10


# ---------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize("values", [[0, 1, 1, None], [False, True, True, None], [0.0, 1.0, 1.0, np.nan]])
def test_binary_labels(values: list[Any]) -> None:
    enc = LabelEncoder("binary").fit(pd.Series(values, dtype=object))
    y, mask = enc.transform(pd.Series(values, dtype=object))
    assert y.dtype == np.float32 and y.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert mask.tolist() == [True, True, True, False]
    assert enc.num_outputs == 1


def test_binary_two_values_and_bad_values() -> None:
    enc = LabelEncoder("binary", name="task 'churn'").fit(["yes", "no", "yes"])
    assert enc.classes_ == ["no", "yes"]
    assert enc.transform(["no", "yes"])[0].tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match=r"task 'churn'.*maybe"):
        enc.transform(["maybe"])
    with pytest.raises(DataError, match=r"task 'x' is binary.*'2'"):
        LabelEncoder("binary", name="task 'x'").fit([0, 1, 2])
    with pytest.raises(DataError, match="binary"):
        LabelEncoder("binary").fit(["only"])


def test_multiclass_declared_classes_reject_other_labels() -> None:
    enc = LabelEncoder("multiclass", classes=["low", "high"], name="task 'tier' (tasks[1].label)")
    with pytest.raises(DataError, match=r"task 'tier' \(tasks\[1\]\.label\).*'mid'"):
        enc.fit(["low", "mid", "high"])
    enc = LabelEncoder("multiclass", classes=["low", "high"], name="task 'tier'").fit(["low", None])
    y, mask = enc.transform(["high", None, "low"])
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 0] and mask.tolist() == [True, False, True]
    with pytest.raises(DataError, match=r"task 'tier'.*'mid'"):
        enc.transform(["mid"])


def test_multiclass_inferred_classes_sort_numerically() -> None:
    enc = LabelEncoder("multiclass").fit([10, 2, 1, 2])
    assert enc.classes_ == ["1", "2", "10"]
    assert enc.transform([2, 10])[0].tolist() == [1, 2]
    # a class no training row has cannot be predicted: masked, with a warning naming it
    with pytest.warns(UserWarning, match=r"labels \['3'\].*classes"):
        y, mask = enc.transform([3, 2])
    assert y.tolist() == [0, 1] and mask.tolist() == [False, True]


def test_multilabel_labels() -> None:
    enc = LabelEncoder("multilabel", separator="|").fit(["p|q", "", None, "r"])
    assert enc.classes_ == ["p", "q", "r"]
    y, mask = enc.transform(pd.Series(["q|p", "", None, ["r"]], dtype=object))
    assert y.dtype == np.float32 and y.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert mask.tolist() == [True, True, False, True]
    assert enc.num_outputs == 3
    with pytest.warns(UserWarning, match="'s'"):
        y, mask = enc.transform(["p|s", "p"])
    assert mask.tolist() == [False, True]
    declared = LabelEncoder("multilabel", classes=["p", "q"], name="task 'topics'")
    with pytest.raises(DataError, match=r"task 'topics'.*'r'.*declared"):
        declared.fit(["p|r"])


def test_regression_labels() -> None:
    enc = LabelEncoder("regression").fit([1.5, None])
    y, mask = enc.transform([1.5, np.nan, 3])
    assert y.dtype == np.float32 and y.tolist() == [1.5, 0.0, 3.0] and mask.tolist() == [True, False, True]
    with pytest.raises(DataError, match=r"task 'r'.*'bad'"):
        LabelEncoder("regression", name="task 'r'").fit(pd.Series([1.0, "bad"], dtype=object))


@pytest.mark.parametrize("kind,values", [("binary", [0, 1]), ("multiclass", ["a", "b"]),
                                         ("multilabel", ["a|b", "c"]), ("regression", [0.5, 2.0])])
def test_label_encoder_json_roundtrip(kind: Any, values: list[Any]) -> None:
    enc = LabelEncoder(kind).fit(values)
    restored = LabelEncoder.from_dict(roundtrip(enc.to_dict()))
    for a, b in zip(enc.transform(values), restored.transform(values), strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Entity ids


def test_id_index_rows_extend_and_raw() -> None:
    index = IdIndex.build([pd.Series([5, 3]), pd.Series([3, 9, 5])])
    assert index.ids.tolist() == ["5", "3", "9"]
    assert index.rows(pd.Series(["9", "4", None], dtype=object)).tolist() == [2, -1, -1]
    assert index.raw().dtype == np.int64 and index.raw().tolist() == [5, 3, 9]
    grown = index.extend([pd.Series(["x", "5"])])
    assert grown.ids.tolist() == ["5", "3", "9", "x"] and not grown.integer
    assert IdIndex.from_dict(roundtrip(grown.to_dict())).rows(["x"]).tolist() == [3]
