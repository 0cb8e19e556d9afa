"""Where training reports to: a progress bar, the console, a JSONL log and TensorBoard (if installed)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


class _Bar:
    """Advances the epoch's progress bar and shows running per-task losses."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None, refresh_every: int = 20) -> None:
        self.progress = progress
        self.task_id = task_id
        self.refresh_every = refresh_every
        self.steps = 0
        self.running: dict[str, float] = {}

    def advance(self, losses: Mapping[str, Tensor]) -> None:
        self.steps += 1
        if self.progress is None or self.task_id is None:
            return
        # Reading a loss value synchronises with the device: do it only every few steps.
        if self.steps % self.refresh_every == 0:
            for name, loss in losses.items():
                value = float(loss)
                old = self.running.get(name, value)
                self.running[name] = 0.9 * old + 0.1 * value
            text = " ".join(f"{n}={v:.3f}" for n, v in self.running.items())
            self.progress.update(self.task_id, advance=self.refresh_every, losses=text)


class RunLogger:
    """Console + JSONL (+ TensorBoard) logging for one run directory.

    `enabled=False` makes every method a no-op: the replicas other than rank 0 of a distributed
    run log nothing.
    """

    def __init__(self, run_dir: Path, show_progress: bool, append: bool = False, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.show_progress = show_progress and enabled
        self.path = run_dir / "log.jsonl"
        self._fh = self.path.open("a" if append else "w", encoding="utf-8") if enabled else None
        self._tb: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except Exception:  # TensorBoard is optional; its absence must not stop training.
            self._tb = None

    def info(self, message: str) -> None:
        if self.show_progress:
            self.console.print(f"[dim]{message}[/dim]")
        self._write({"event": "info", "message": message})

    @contextmanager
    def epoch_bar(self, epoch: int, epochs: int, steps: int) -> Iterator[_Bar]:
        if not self.show_progress:
            yield _Bar(None, None)
            return
        columns = (TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"))
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task("train", total=steps, losses="")
            yield _Bar(progress, task_id)

    def epoch(self, record: Mapping[str, Any]) -> None:
        self._write({"event": "epoch", **record})
        if self.show_progress:
            losses = " ".join(f"{k}={_fmt(v)}" for k, v in record["train_loss"].items())
            self.console.print(f"epoch {record['epoch']}: train loss {losses}")
            for task, values in record["valid"].items():
                shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
                self.console.print(f"  valid {task}: {shown}")
        if self._tb is not None:
            step = record["epoch"]
            for task, value in record["train_loss"].items():
                self._tb.add_scalar(f"train_loss/{task}", value, step)
            for task, values in record["valid"].items():
                for name, value in values.items():
                    self._tb.add_scalar(f"valid/{task}/{name}", value, step)

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, default=float, allow_nan=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
