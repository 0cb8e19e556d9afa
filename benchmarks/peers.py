"""The speed benchmark's MMoE in peer libraries: torch-rechub and DeepCTR-Torch.

`benchmarks/speed.py` runs each adapter in its own worker process (so that its peak RSS is its own)
when the library is installed; each returns a dict like speed.py's `_reference`.

Common to both adapters:

- Rows: mtlrec's split of the same Parquet file, read as `_reference` reads it (160,000 train /
  40,000 test rows at 200,000). Categorical values are already indices in [0, V_f), so each field is
  an embedding table of V_f rows and dim 16; the ten dense fields enter raw (mtlrec's
  `numeric_input: raw`). The library's own loader shuffles the training rows (`torch.manual_seed(0)`).
- Model: the library's own MMoE class, 8 experts [256, 128] (ReLU), towers [64], no dropout.
- Training: Adam lr 1e-3 without weight decay or L2 (both libraries default to some; the config has
  none), batch 1024, one epoch, through the library's own training path. Inference: the library's
  own predict path, batch 4096. Each is timed alone; building the library's inputs is not timed.
- Labels: neither library's MMoE has ESMM, so the purchase head is trained on the `purchase` column
  over all rows. A purchase needs a click in this log, so that column is the joint click-and-purchase
  label (CTCVR), the target mtlrec's ESMM loss puts on p(click) x p(purchase | click); but here the
  head itself learns p(click and purchase), not p(purchase | click).
- AUC: click over all test rows; purchase over the clicked test rows (as `_reference`) of the
  purchase head's output. `auc_purchase_from_ratio` ranks the same rows by p(purchase) / p(click)
  instead, an estimate of the conditional mtlrec and `_reference` rank by.

torch-rechub (`torch_rechub.models.multi_task.MMOE`, `MTLTrainer`): inputs are
`DataGenerator(x, y).generate_dataloader(...)`, as in its tutorials (a dict of per-field arrays,
collated row by row). The timed epoch is `MTLTrainer.train_one_epoch`, the epoch `MTLTrainer.fit`
runs before its validation pass and checkpoint, which are not timed; loss: the mean of the two
tasks' BCE (the trainer's default for non-ESMM models). Inference is `MTLTrainer.predict` over a
`PredictDataset` loader. Deviations it imposes: its `MLP` puts a BatchNorm1d after every linear
layer of the experts, the towers and the gates (a gate is Linear -> BatchNorm -> softmax), with no
switch to turn it off; embeddings start N(0, 1e-4) (its default). That initialisation, not the
BatchNorm, was most of why its click AUC beat mtlrec's former N(0, 1/16) embeddings on this
long-tailed log: re-initialised N(0, 1/16), its click AUC fell from 0.775 to 0.730 (one run,
200,000 rows); mtlrec's embeddings now start at N(0, 0.01).

DeepCTR-Torch (`deepctr_torch.models.MMOE`): `compile("adam", ["binary_crossentropy"] * 2)`, then
`fit(x, y, batch_size=1024, epochs=1, verbose=0)`; the epoch is timed by a callback from
`on_epoch_begin` to `on_epoch_end`, so fit's own array stacking is excluded. Loss: the sum of the
two tasks' BCE, each summed over the batch (`fit`'s `reduction='sum'`; Adam is almost invariant to
the scale). Inference is `predict(x, batch_size=4096)`, timed whole (it stacks the 30 input arrays
into one float tensor first). Config choices: `gate_dnn_hidden_units=()` for linear softmax gates
(its default is a hidden layer of 64); `l2_reg_embedding=0` (default 1e-5). Deviations it imposes:
the gates' linear layer has no bias; embeddings and expert/tower weights start N(0, 1e-4)
(`init_std`, its default); every input goes through one float tensor, so the categorical indices
are cast float -> long (exact below 2^24).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _rows(data: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The CTR log and mtlrec's train and test rows of it (as speed.py's `_reference` reads them)."""
    from mtlrec.config import load_config
    from mtlrec.data.ctr import ctr_config
    from mtlrec.data.split import split_tables
    from mtlrec.data.tables import load_tables

    cfg, base = load_config(ctr_config(data, "mmoe"))
    tables = load_tables(cfg, base, None)
    split = split_tables(tables, cfg)
    return tables.interactions, split.rows("interactions", "train"), split.rows("interactions", "test")


def _inputs(frame: pd.DataFrame, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-field arrays of `rows` (categorical int64, dense float32) and their labels [N, 2] (click, purchase)."""
    from mtlrec.data.ctr import CtrShape

    shape = CtrShape()
    part = frame.iloc[rows]
    x = {c: part[c].to_numpy(np.int64, copy=True) for c in shape.categorical()}  # writable, as torch wants
    x.update({d: part[d].to_numpy(np.float32, copy=True) for d in shape.dense()})
    y = part[["click", "purchase"]].to_numpy(np.float32)
    return x, y


def _result(model: str, version: str, y_test: np.ndarray, p: np.ndarray, train_rate: float, infer_rate: float,
            parameters: int) -> dict[str, Any]:
    """The adapter's figures, from the test labels [N, 2] and predicted probabilities [N, 2]."""
    from sklearn.metrics import roc_auc_score

    from mtlrec.memory import peak_rss_mb

    click, buy = y_test[:, 0], y_test[:, 1]
    clicked = click == 1
    ratio = p[clicked, 1] / np.maximum(p[clicked, 0], 1e-12)
    return {"model": model, "version": version, "train_samples_per_second": train_rate,
            "infer_samples_per_second": infer_rate, "peak_rss_mb": peak_rss_mb(), "parameters": parameters,
            "purchase_label": "purchase column on all rows (= click and purchase)",
            "auc": {"click": float(roc_auc_score(click, p[:, 0])),
                    "purchase": float(roc_auc_score(buy[clicked], p[clicked, 1]))},
            "auc_purchase_from_ratio": float(roc_auc_score(buy[clicked], ratio))}


def run_torch_rechub(data: Path, threads: int) -> dict[str, Any]:
    """torch-rechub's MMOE trained by its MTLTrainer (see the module docstring)."""
    import torch
    import torch_rechub
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    from mtlrec.data.ctr import CtrShape

    torch.set_num_threads(threads)
    shape = CtrShape()
    frame, train_rows, test_rows = _rows(data)
    x_train, y_train = _inputs(frame, train_rows)
    x_test, y_test = _inputs(frame, test_rows)
    features = [SparseFeature(c, vocab_size=v, embed_dim=16) for c, v in zip(shape.categorical(), shape.vocab_sizes(),
                                                                                 strict=True)]
    features += [DenseFeature(d) for d in shape.dense()]
    tasks = ["classification", "classification"]
    torch.manual_seed(0)
    model = MMOE(features, tasks, n_expert=8, expert_params={"dims": [256, 128]},
                 tower_params_list=[{"dims": [64]}, {"dims": [64]}])
    trainer = MTLTrainer(model, tasks, optimizer_params={"lr": 1e-3, "weight_decay": 0.0}, n_epoch=1, device="cpu")
    train_loader, _, _ = DataGenerator(x_train, y_train).generate_dataloader(x_test, y_test, x_test, y_test,
                                                                             batch_size=1024)
    test_loader = DataLoader(PredictDataset(x_test), batch_size=4096, shuffle=False)

    started = time.perf_counter()
    trainer.train_one_epoch(train_loader)
    train_rate = len(train_rows) / (time.perf_counter() - started)
    started = time.perf_counter()
    p = np.asarray(trainer.predict(model, test_loader), dtype=np.float64)  # [N, 2] probabilities
    infer_rate = len(test_rows) / (time.perf_counter() - started)
    return _result("torch-rechub MMOE", torch_rechub.__version__, y_test, p, train_rate, infer_rate,
                   sum(q.numel() for q in model.parameters()))


def run_deepctr_torch(data: Path, threads: int) -> dict[str, Any]:
    """DeepCTR-Torch's MMOE trained by its `fit` (see the module docstring)."""
    import deepctr_torch
    import torch
    from deepctr_torch.callbacks import Callback
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import MMOE

    from mtlrec.data.ctr import CtrShape

    class EpochTimer(Callback):  # type: ignore[misc]
        """Seconds from `fit`'s epoch start to its end, excluding its stacking of the inputs."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds = time.perf_counter() - self.started

    torch.set_num_threads(threads)
    shape = CtrShape()
    frame, train_rows, test_rows = _rows(data)
    x_train, y_train = _inputs(frame, train_rows)
    x_test, y_test = _inputs(frame, test_rows)
    features = [SparseFeat(c, vocabulary_size=v, embedding_dim=16) for c, v in zip(shape.categorical(),
                                                                                    shape.vocab_sizes(), strict=True)]
    features += [DenseFeat(d, 1) for d in shape.dense()]
    torch.manual_seed(0)
    model = MMOE(features, num_experts=8, expert_dnn_hidden_units=(256, 128), gate_dnn_hidden_units=(),
                 tower_dnn_hidden_units=(64,), l2_reg_linear=0.0, l2_reg_embedding=0.0, seed=0,
                 task_types=("binary", "binary"), task_names=("click", "purchase"), device="cpu")
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])

    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=1024, epochs=1, verbose=0, shuffle=True, callbacks=[timer])
    train_rate = len(train_rows) / timer.seconds
    started = time.perf_counter()
    p = model.predict(x_test, batch_size=4096)  # [N, 2] probabilities
    infer_rate = len(test_rows) / (time.perf_counter() - started)
    return _result("DeepCTR-Torch MMOE", deepctr_torch.__version__, y_test, p, train_rate, infer_rate,
                   sum(q.numel() for q in model.parameters()))


ADAPTERS: dict[str, Callable[[Path, int], dict[str, Any]]] = {"torch_rechub": run_torch_rechub,
                                                              "deepctr_torch": run_deepctr_torch}
