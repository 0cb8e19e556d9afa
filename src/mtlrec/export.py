"""Export the ranking model of a run to ONNX: every interaction task, for ONNX Runtime.

Inputs are the encoded field tensors of a batch of impressions, named `<group>.<field>` (groups
`user`, `item`, `context`, in the run's field order), batch dimension dynamic:

    categorical        int64 [B]
    numeric            float32 [B, 2]    (standardised value, missing indicator)
    multi_categorical  int64 [B, L]
    sequence           int64 [B, L]

(encode raw values with the run's `schema.json` encoders, or take entity rows from
`serving.safetensors`). Outputs, one per interaction task, named after it: binary P(label = 1)
[B] (a conditional task's given its parent, as `Predictor.predict`), multiclass probabilities
[B, C], multilabel probabilities [B, L], regression predictions [B]. The model's metadata
(`mtlrec.inputs`, `mtlrec.outputs`) describes both in JSON.

Needs `onnx` (the `export` extra).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from mtlrec.data.batch import Batch
from mtlrec.data.spec import FieldSpec, InputSpec, TaskSpec
from mtlrec.errors import ConfigError
from mtlrec.models.encoders import missing_features
from mtlrec.models.model import RecModel
from mtlrec.outputs import to_probabilities
from mtlrec.predict import Predictor

FORMATS = ("onnx",)
OPSET = 17
_GROUPS = ("user", "item", "context")


def ranking_fields(spec: InputSpec) -> list[FieldSpec]:
    """The fields the ranking model reads, in input order."""
    return [f for group in _GROUPS for f in spec.group(group)]  # type: ignore[arg-type]


def input_name(field: FieldSpec) -> str:
    return f"{field.group}.{field.name}"


class RankingModule(nn.Module):
    """The interaction path of a model with probabilities out, over positional field tensors.

    Args:
        model: a trained model.
        fields: the field of each positional input.
        tasks: the interaction tasks, in output order.
    """

    def __init__(self, model: RecModel, fields: list[FieldSpec], tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.model = model
        self.fields = fields
        self.tasks = tasks

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        groups: dict[str, dict[str, Tensor]] = {g: {} for g in _GROUPS}
        for spec, tensor in zip(self.fields, inputs, strict=True):
            groups[spec.group][spec.name] = tensor
        logits = self.model(Batch("interactions", user=groups["user"], item=groups["item"],
                                  context=groups["context"]))
        return tuple(to_probabilities(t, logits[t.name]) for t in self.tasks)  # task -> [B] or [B, C]


def example_inputs(predictor: Predictor, rows: int = 3) -> list[Tensor]:
    """Valid inputs for `rows` impressions: known users and items (when there are), missing context."""
    fields = ranking_fields(predictor.spec)
    blank = missing_features(fields, rows)
    out = []
    for f in fields:
        entities = predictor.state.users if f.group == "user" else predictor.state.items if f.group == "item" else {}
        if f.name in entities and len(entities[f.name]):
            picks = torch.arange(rows) % entities[f.name].shape[0]
            out.append(entities[f.name].index_select(0, picks))
        else:
            out.append(blank[f.name].contiguous())
    return out


def _describe(fields: list[FieldSpec], tasks: list[TaskSpec]) -> tuple[str, str]:
    dtype = {"categorical": "int64", "numeric": "float32", "multi_categorical": "int64", "sequence": "int64"}
    shape = {"categorical": "[B]", "numeric": "[B, 2]", "multi_categorical": "[B, {n}]", "sequence": "[B, {n}]"}
    inputs = [{"name": input_name(f), "group": f.group, "kind": f.kind, "dtype": dtype[f.kind],
               "shape": shape[f.kind].format(n=f.length), "vocab": f.vocab} for f in fields]
    outputs = [{"name": t.name, "type": t.type, "condition": t.parent, "classes": list(t.classes)} for t in tasks]
    return json.dumps(inputs), json.dumps(outputs)


def export_onnx(run_dir: str | Path, path: str | Path, opset: int = OPSET) -> Path:
    """Write the ranking model of a run (all interaction heads) as an ONNX file.

    Raises:
        ArtifactError: the run cannot be loaded.
        ConfigError: the run has no interaction tasks, or `onnx` is not installed.
    """
    try:
        import onnx
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx package: pip install 'mtlrec[export]'") from None
    predictor = Predictor.load(run_dir)
    tasks = list(predictor.spec.tasks_of("interaction"))
    if not tasks:
        raise ConfigError(f"run '{run_dir}' has no interaction tasks: there is no ranking model to export")
    fields = ranking_fields(predictor.spec)
    module = RankingModule(predictor.model, fields, tasks).eval()
    names = [input_name(f) for f in fields]
    outputs = [t.name for t in tasks]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript); it traces
        # this model exactly, and the shape checks it warns about are constant for a given run.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(example_inputs(predictor)), str(out), input_names=names,
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in names + outputs},
                          opset_version=opset, dynamo=False)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    inputs_doc, outputs_doc = _describe(fields, tasks)
    for key, value in (("mtlrec.inputs", inputs_doc), ("mtlrec.outputs", outputs_doc)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))
    return out


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "onnx") -> Path:
    """`mtlrec export RUN --format FMT --out FILE`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; choose from {list(FORMATS)}")
    return export_onnx(run_dir, out)
