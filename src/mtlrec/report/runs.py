"""What a report reads from run directories, as plain data: metrics, epoch log, diagnostics, config.

Also where the single-task numbers each task is compared with come from, in this order:
a compared run trained with the `single` backbone; a `report.json` beside the run (or one folder
up, as `mtlrec demo` writes it) whose `multi_task` numbers are this run's; `single_task` entries
in the run's own metrics.json.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtlrec.errors import ArtifactError
from mtlrec.metrics import PRIMARY_METRIC, higher_is_better
from mtlrec.training.diagnostics import load_diagnostics


@dataclass
class RunData:
    """One run directory, loaded."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    diagnostics: dict[str, Any] | None
    side_report: dict[str, Any] | None = None

    @property
    def backbone(self) -> str:
        return str(self.config.get("model", {}).get("backbone", "?"))

    @property
    def weighting(self) -> str:
        return str(self.config.get("train", {}).get("weighting", "equal"))

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = self.metrics.get("tasks", {})
        return tasks

    def primary(self, task: str) -> tuple[str, float | None]:
        """(metric name, test value) of a task's primary metric."""
        entry = self.tasks.get(task, {})
        metric = PRIMARY_METRIC.get(entry.get("type", ""), "")
        return metric, _finite(entry.get("test", {}).get(metric))

    def epoch_of_step(self, step: float) -> float:
        """Fractional epoch at a global step, from the steps at the end of each logged epoch."""
        ends = [(0.0, 0.0)] + [(float(r["step"]), float(r["epoch"])) for r in self.history]
        for (s0, e0), (s1, e1) in zip(ends, ends[1:], strict=False):
            if step <= s1 and s1 > s0:
                return e0 + (step - s0) / (s1 - s0) * (e1 - e0)
        if len(ends) >= 3 and ends[-1][0] > ends[-2][0]:     # past the last logged epoch: extrapolate
            (s0, e0), (s1, e1) = ends[-2], ends[-1]
            return e1 + (step - s1) / (s1 - s0) * (e1 - e0)
        return float(step)


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return float(value)
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read '{path}': {exc}") from exc


def _history(path: Path) -> list[dict[str, Any]]:
    """Epoch records of log.jsonl; a resumed run's repeated epochs keep their latest record."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue                                  # a line cut short by a crash
        if record.get("event") == "epoch":
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_run(path: str | Path) -> RunData:
    """Load a run directory written by `mtlrec train` (metrics.json is required)."""
    run = Path(path)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        what = "does not exist" if not run.exists() else "has no metrics.json (is the run finished?)"
        raise ArtifactError(f"cannot report on '{run}': it {what}; give a run directory written by `mtlrec train`")
    config_path = run / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    side = None
    for candidate in (run / "report.json", run.parent / "report.json"):
        if candidate.is_file():
            data = _read_json(candidate)
            if isinstance(data, dict) and isinstance(data.get("tasks"), dict):
                side = data
                break
    return RunData(path=run, label=run.name or str(run), config=config or {}, metrics=_read_json(metrics_path),
                   history=_history(run / "log.jsonl"), diagnostics=load_diagnostics(run), side_report=side)


def label_runs(runs: Sequence[RunData]) -> None:
    """Give each run a short label that is unique among them: the folder, then parent/folder."""
    for run in runs:
        run.label = f"{run.path.name} ({run.backbone})"
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name} ({run.backbone})"
    for i, run in enumerate(runs):
        if [r.label for r in runs].count(run.label) > 1:
            run.label = f"{run.label} #{i + 1}"


@dataclass
class Reference:
    """Single-task (and oracle) numbers of each task's primary metric, and where they come from."""

    source: str
    single: dict[str, float] = field(default_factory=dict)
    oracle: dict[str, float] = field(default_factory=dict)
    run: RunData | None = None


def _side_matches(run: RunData, side: dict[str, Any]) -> bool:
    """A report.json describes this run when its multi_task numbers are this run's test metrics."""
    matched = 0
    for task, row in side.get("tasks", {}).items():
        if not isinstance(row, dict):
            continue
        ours = _finite(run.tasks.get(task, {}).get("test", {}).get(row.get("metric", "")))
        theirs = _finite(row.get("multi_task"))
        if ours is None or theirs is None:
            continue
        if abs(ours - theirs) > 1e-9 * max(1.0, abs(ours)):
            return False
        matched += 1
    return matched > 0


def reference(runs: Sequence[RunData]) -> Reference | None:
    """Where each task's single-task number comes from (see the module docstring), and the oracle's
    numbers when a matching report.json has them; None when there are neither."""
    main = runs[0]
    ref = Reference(source="")
    side = main.side_report if main.side_report is not None and _side_matches(main, main.side_report) else None
    if side is not None:
        for task, row in side["tasks"].items():
            if (oracle := _finite(row.get("oracle"))) is not None:
                ref.oracle[task] = oracle
    single_run = next((r for r in runs[1:] if r.backbone == "single"), None)
    if single_run is not None:
        ref.single = {t: v for t in main.tasks if (v := single_run.primary(t)[1]) is not None}
        ref.source, ref.run = single_run.label, single_run
    elif side is not None:
        ref.single = {t: v for t, row in side["tasks"].items() if (v := _finite(row.get("single_task"))) is not None}
        ref.source = "report.json (single-task models trained on the same split)" if ref.single else ""
    for task, entry in main.tasks.items():
        given = entry.get("single_task")
        value = _finite(given.get(main.primary(task)[0])) if isinstance(given, dict) else _finite(given)
        if value is not None and task not in ref.single:
            ref.single[task] = value
            ref.source = ref.source or "metrics.json"
    return ref if ref.single or ref.oracle else None


def oriented_delta(metric: str, value: float, baseline: float) -> float:
    """value - baseline, sign-flipped for lower-is-better metrics: positive always means better."""
    return value - baseline if higher_is_better(metric) else baseline - value


def relative_delta(metric: str, value: float, baseline: float) -> float:
    """Oriented relative difference in percent (as in delta-m, Maninis et al., CVPR 2019)."""
    if baseline == 0.0:
        return math.nan
    return 100.0 * oriented_delta(metric, value, baseline) / abs(baseline)
