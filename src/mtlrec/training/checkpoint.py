"""Checkpoints in safetensors, written atomically: nothing is ever unpickled.

A checkpoint holds tensors (model, optimizers, weighting strategy, RNG) and a JSON document for
everything else (epoch, sampler positions, early-stopping state, history). Optimizer state dicts
are flattened to tensors plus JSON so that they, too, load without pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mtlrec.atomic import atomic_write_bytes, atomic_write_text
from mtlrec.errors import ArtifactError

__all__ = ["atomic_write_bytes", "atomic_write_text", "load_tensors", "save_tensors"]

_META_KEY = "mtlrec"


def save_tensors(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> None:
    """Save tensors (and a JSON-able `meta` document) to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp, metadata={_META_KEY: json.dumps(meta or {})})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load tensors and the JSON document written by `save_tensors`; refuse a damaged file."""
    if not path.is_file():
        raise ArtifactError(f"'{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta_text = (fh.metadata() or {}).get(_META_KEY, "{}")
        tensors = load_file(str(path))
        meta = json.loads(meta_text)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"'{path}' is damaged or not a safetensors file ({exc}); "
                            "re-run training or restore the file") from None
    return tensors, meta


def flatten_optimizer(prefix: str, state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and a JSON document."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(prefix: str, tensors: Mapping[str, Tensor], doc: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer state dict from `flatten_optimizer`'s output."""
    state: dict[int, dict[str, Any]] = {}
    start = prefix + "."
    for name, value in tensors.items():
        if name.startswith(start):
            idx, key = name[len(start):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in doc.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": doc["param_groups"]}


def rng_state() -> Tensor:
    return torch.get_rng_state()


def set_rng_state(state: Tensor) -> None:
    torch.set_rng_state(state.to(torch.uint8))
