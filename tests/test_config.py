"""Config: typed, validated once, defaults < file < overrides, errors name the key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mtlrec.config import Config, config_from_dict, dump_config, load_config, parse_overrides
from mtlrec.errors import ConfigError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def base() -> dict:
    return {
        "data": {"interactions": "i.parquet", "users": "u.parquet"},
        "tasks": [
            {"name": "click", "kind": "interaction", "label": "click", "type": "binary"},
            {"name": "buy", "kind": "interaction", "label": "buy", "type": "binary", "after": "click"},
            {"name": "segment", "kind": "user", "label": "segment", "type": "multiclass"},
        ],
    }


def docs_example() -> dict:
    text = DOCS.read_text()
    block = re.search(r"## Full example.*?```yaml\n(.*?)```", text, re.S)
    assert block is not None
    return yaml.safe_load(block.group(1))


def test_docs_full_example_loads_and_sets_every_section() -> None:
    cfg = config_from_dict(docs_example())
    assert cfg.model.backbone == "ple"
    assert [t.name for t in cfg.tasks][:3] == ["click", "like", "purchase"]
    assert cfg.tasks[2].after == "click"
    assert cfg.recommend.fusion["purchase"] == 2.0


def test_docs_document_every_key() -> None:
    text = DOCS.read_text()
    for section in Config.model_fields:
        model = Config.model_fields[section].annotation
        fields = getattr(model, "model_fields", None)
        if fields is None:  # list sections: document their item model
            args = getattr(model, "__args__", ())
            fields = args[0].model_fields if args else {}
        for key in fields:
            assert f"`{key}`" in text or f"{key}:" in text, f"docs/config.md does not document {section}.{key}"


def test_defaults_file_overrides_precedence(tmp_path: Path) -> None:
    raw = base() | {"train": {"epochs": 7, "batch_size": 64}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, base_dir = load_config(path, ["train.epochs=3", "model.backbone=ple", "tasks.1.weight=2.5"])
    assert cfg.train.epochs == 3  # override beats file
    assert cfg.train.batch_size == 64  # file beats default
    assert cfg.train.lr == 1e-3  # default
    assert cfg.model.backbone == "ple"
    assert cfg.tasks[1].weight == 2.5
    assert base_dir == tmp_path.resolve()


def test_config_is_frozen() -> None:
    cfg = config_from_dict(base())
    with pytest.raises(ValidationError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_dump_round_trip() -> None:
    cfg = config_from_dict(base())
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["train"].update(foo=1), r"train\.foo: unknown key"),
        (lambda c: c.update(extra={}), r"extra: unknown key"),
        (lambda c: c["train"].update(epochs="many"), r"train\.epochs: .*integer.*'many'"),
        (lambda c: c["tasks"][0].update(type="binry"), r"tasks\.0\.type"),
        (lambda c: c["tasks"].append(dict(c["tasks"][0])), r"duplicate names \['click'\]"),
        (lambda c: c["tasks"][1].update(after="nope"), r"tasks\[1\]\.after names 'nope'"),
        (lambda c: c["tasks"][1].update(after="segment"), r"tasks\[1\]\.after names 'segment', a user multiclass"),
        (lambda c: c["tasks"].append({"name": "cat", "kind": "item", "label": "c", "type": "multiclass"}),
         r"tasks\[3\] \('cat'\) is a item task, but data\.items is not set"),
        (lambda c: c.update(features=[{"name": "a", "type": "numeric"}, {"name": "a", "type": "numeric"}]),
         r"features: duplicate names \['a'\]"),
        (lambda c: c.update(features=[{"name": "h", "type": "sequence"}]), r"needs data\.timestamp"),
        (lambda c: c["data"]["split"].update(valid=0.6, test=0.5), r"valid \+ test must be < 1"),
        (lambda c: c.update(recommend={"fusion": {"segment": 1.0}}), r"recommend\.fusion names 'segment'"),
        (lambda c: c.pop("tasks"), r"tasks: Field required"),
        (lambda c: c["tasks"].append({"name": "r", "kind": "retrieval", "label": "click", "type": "binary"}),
         r"tasks\.3: task 'r': type 'retrieval' goes with kind 'retrieval' and only with it"),
        (lambda c: c["tasks"][0].update(type="retrieval"), r"tasks\.0: task 'click': type 'retrieval' goes with"),
        (lambda c: c["tasks"][0].update(temperature=0.1), r"task 'click': \['temperature'\] apply to retrieval"),
        (lambda c: c["tasks"].append({"name": "r", "kind": "retrieval", "temperature": 0}),
         r"tasks\.3\.temperature: .*greater than 0"),
        (lambda c: c["tasks"].append({"name": "r", "kind": "retrieval", "after": "click"}),
         r"'r' is a retrieval task; after, classes and directed do not apply"),
        (lambda c: c["tasks"].append({"name": "seg2", "kind": "user", "type": "multiclass"}),
         r"task 'seg2' needs a label column"),
        (lambda c: c["tasks"].extend([{"name": "r1", "kind": "retrieval"}, {"name": "r2", "kind": "retrieval"}]),
         r"\['r1', 'r2'\] are all retrieval tasks; a run has at most one"),
        (lambda c: (c["data"].update(item_id=None), c["tasks"].append({"name": "r", "kind": "retrieval"})),
         r"'r' is a retrieval task, which needs data\.user_id and data\.item_id"),
        (lambda c: c.update(recommend={"candidates": -1}), r"recommend\.candidates: .*greater than or equal to 0"),
    ],
)
def test_invalid_configs_name_the_key(mutate, message) -> None:  # type: ignore[no-untyped-def]
    raw = base() | {"train": {}}
    raw["data"]["split"] = {}
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_retrieval_task_defaults_and_round_trip() -> None:
    raw = base()
    raw["tasks"].append({"name": "retrieval", "kind": "retrieval"})
    cfg = config_from_dict(raw)
    task = cfg.tasks[-1]
    assert (task.type, task.label, task.dim, task.temperature, task.table) == (
        "retrieval", None, 32, 0.05, "interactions")
    assert cfg.recommend.candidates == 500
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="out of range"):
        config_from_dict(base(), ["tasks.9.weight=1"])
    with pytest.raises(ConfigError, match=r"train\.nope: unknown key"):
        config_from_dict(base(), ["train.nope=1"])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
