"""The report's figures, drawn with matplotlib's object API (no pyplot state, any backend).

Every function takes the loaded runs (the first is the main one; the others are laid beside it)
and returns a `Figure`, or None when no run has what the figure shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mtlrec.metrics import PRIMARY_METRIC, higher_is_better
from mtlrec.report.runs import Reference, RunData, oriented_delta, relative_delta

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
TASK_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
               "#ccb974", "#64b5cd")
GOOD, BAD = "#2e7d32", "#c62828"


def run_color(i: int) -> str:
    return RUN_COLORS[i % len(RUN_COLORS)]


def task_color(i: int) -> str:
    return TASK_COLORS[i % len(TASK_COLORS)]


def _grid(n: int, ncols: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
    """A figure with n panels in rows of at most `ncols`; unused panels are hidden."""
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def all_tasks(runs: Sequence[RunData]) -> list[str]:
    """Every task of the runs, in the order of the first run that has it."""
    names: list[str] = []
    for run in runs:
        names += [t for t in run.tasks if t not in names]
    return names


def _valid_loss(task_type: str, values: dict[str, Any]) -> float | None:
    """The validation counterpart of the training loss: logloss, or RMSE squared (the MSE)."""
    if "logloss" in values and values["logloss"] is not None:
        return float(values["logloss"])
    if task_type == "regression" and values.get("rmse") is not None:
        return float(values["rmse"]) ** 2
    return None


# ---------------------------------------------------------------------- learning curves


def learning_curves(runs: Sequence[RunData]) -> Figure | None:
    """Per task: train loss (epoch means and sampled steps) and validation loss per epoch."""
    if not any(r.history for r in runs):
        return None
    tasks = all_tasks(runs)
    fig, axes = _grid(len(tasks), 4, 3.3, 2.5)
    for ax, task in zip(axes, tasks, strict=True):
        for i, run in enumerate(runs):
            color = run_color(i)
            task_type = run.tasks.get(task, {}).get("type", "")
            samples = (run.diagnostics or {}).get("samples", [])
            points = [(run.epoch_of_step(s["step"] + 1), s["losses"][task]) for s in samples
                      if s.get("losses", {}).get(task) is not None]
            if len(points) > 1:
                x, y = zip(*points, strict=True)
                ax.plot(x, y, color=color, alpha=0.3, linewidth=0.9)
            train = [(r["epoch"] - 0.5, r["train_loss"][task]) for r in run.history
                     if r.get("train_loss", {}).get(task) is not None]
            if train:
                x, y = zip(*train, strict=True)
                ax.plot(x, y, color=color, marker="o", markersize=3.5, linewidth=1.6)
            valid = [(r["epoch"], v) for r in run.history
                     if (v := _valid_loss(task_type, r.get("valid", {}).get(task) or {})) is not None]
            if valid:
                x, y = zip(*valid, strict=True)
                ax.plot(x, y, color=color, marker="s", markersize=3.5, linewidth=1.6, linestyle="--")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="0.3", marker="o", markersize=3.5, label="train loss (epoch mean)"),
               Line2D([], [], color="0.3", alpha=0.35, label="train loss (sampled steps)"),
               Line2D([], [], color="0.3", marker="s", markersize=3.5, linestyle="--",
                      label="validation loss (logloss / MSE)")]
    if len(runs) > 1:
        handles += [Line2D([], [], color=run_color(i), linewidth=3, label=r.label) for i, r in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def validation_metrics(runs: Sequence[RunData]) -> Figure | None:
    """Per task: the primary validation metric per epoch; a star marks the best (restored) epoch."""
    if not any(r.history for r in runs):
        return None
    tasks = all_tasks(runs)
    fig, axes = _grid(len(tasks), 4, 3.3, 2.4)
    for ax, task in zip(axes, tasks, strict=True):
        metric = ""
        for i, run in enumerate(runs):
            metric = PRIMARY_METRIC.get(run.tasks.get(task, {}).get("type", ""), metric)
            points = [(r["epoch"], v) for r in run.history
                      if (v := (r.get("valid", {}).get(task) or {}).get(metric)) is not None and math.isfinite(v)]
            if not points:
                continue
            x, y = zip(*points, strict=True)
            ax.plot(x, y, color=run_color(i), marker="o", markersize=3.5, linewidth=1.6, label=run.label)
            best = run.metrics.get("best_epoch")
            if isinstance(best, int) and best in x:
                ax.plot([best], [y[x.index(best)]], marker="*", markersize=11, color=run_color(i),
                        markeredgecolor="black", markeredgewidth=0.5, linestyle="none")
        arrow = "higher is better" if higher_is_better(metric or "auc") else "lower is better"
        ax.set_title(f"{task}: {metric} ({arrow})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        handles = [Line2D([], [], color=run_color(i), linewidth=3, label=r.label) for i, r in enumerate(runs)]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8,
                   frameon=False)
    return fig


# ---------------------------------------------------------------------- metrics vs single-task


def metric_deltas(runs: Sequence[RunData], ref: Reference) -> Figure | None:
    """Per task and multi-task run: the relative difference from single-task, red where worse."""
    others = [r for r in runs if r is not ref.run]
    tasks = [t for t in all_tasks(runs) if t in ref.single]
    if not tasks or not others:
        return None
    fig = Figure(figsize=(7.5, 0.45 * len(tasks) * max(1, len(others)) + 1.3), layout="constrained")
    ax = fig.add_subplot()
    height = 0.8 / len(others)
    for j, run in enumerate(others):
        for k, task in enumerate(tasks):
            metric, value = run.primary(task)
            if value is None:
                continue
            rel = relative_delta(metric, value, ref.single[task])
            if not math.isfinite(rel):
                continue
            y = k + (j - (len(others) - 1) / 2) * height
            ax.barh(y, rel, height=height * 0.9, color=GOOD if rel >= 0 else BAD,
                    edgecolor=run_color(runs.index(run)) if len(others) > 1 else "none", linewidth=1.5)
            ax.annotate(f"{value - ref.single[task]:+.4f} {metric}", (rel, y), xytext=(4 if rel >= 0 else -4, 0),
                        textcoords="offset points", ha="left" if rel >= 0 else "right", va="center", fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.invert_yaxis()
    lo, hi = ax.get_xlim()
    span = max(abs(lo), abs(hi), 0.5)
    ax.set_xlim(-1.35 * span, 1.35 * span)
    ax.set_xlabel("relative difference from single-task, % (positive = better, sign-corrected)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    names = ", ".join(r.label for r in others)
    ax.set_title(f"{names} vs single-task (red: negative transfer)", fontsize=9)
    return fig


# ---------------------------------------------------------------------- task weights


def task_weights(runs: Sequence[RunData]) -> Figure | None:
    """Per run: each task's weight from the weighting strategy over training."""
    have = [(i, r) for i, r in enumerate(runs) if (r.diagnostics or {}).get("samples")]
    if not have:
        return None
    fig, axes = _grid(len(have), 3, 4.6, 3.0)
    for ax, (_, run) in zip(axes, have, strict=True):
        samples = run.diagnostics["samples"] if run.diagnostics else []
        tasks = [t for t in run.tasks if any(s["weights"].get(t) is not None for s in samples)]
        for k, task in enumerate(tasks):
            points = [(run.epoch_of_step(s["step"]), s["weights"][task]) for s in samples
                      if s["weights"].get(task) is not None]
            x, y = zip(*points, strict=True)
            ax.plot(x, y, color=task_color(k), linewidth=1.5, marker="." if len(x) < 40 else None, label=task)
        values = [s["weights"][t] for s in samples for t in tasks if s["weights"].get(t) is not None]
        if values and max(values) - min(values) < 1e-9:
            ax.text(0.5, 0.55, f"constant weights ({run.weighting})", transform=ax.transAxes, ha="center",
                    fontsize=9, color="0.35")
        ax.set_title(f"{run.label}: weighting '{run.weighting}'", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("task weight", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=2, frameon=False)
    return fig


# ---------------------------------------------------------------------- gradient conflict


def mean_cosines(samples: Sequence[dict[str, Any]], tasks: Sequence[str], group: str | None = None) -> np.ndarray:
    """Mean over the samples of each task pair's gradient cosine [K, K] (nan where never seen)."""
    k = len(tasks)
    total, count = np.zeros((k, k)), np.zeros((k, k))
    pos = {t: i for i, t in enumerate(tasks)}
    for sample in samples:
        matrix = sample["cosine"] if group is None else sample.get("groups", {}).get(group)
        if matrix is None:
            continue
        idx = [pos.get(t, -1) for t in sample["tasks"]]
        for a, ia in enumerate(idx):
            for b, ib in enumerate(idx):
                value = matrix[a][b]
                if ia >= 0 and ib >= 0 and value is not None:
                    total[ia, ib] += value
                    count[ia, ib] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _conflict_tasks(run: RunData) -> list[str]:
    samples = (run.diagnostics or {}).get("conflict", [])
    seen = {t for s in samples for t in s["tasks"]}
    return [t for t in run.tasks if t in seen]


def _heatmap(ax: Axes, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], cmap: str,
             vmin: float, vmax: float, fmt: str = "{:+.2f}", diverging: bool = True) -> Any:
    colors = matplotlib.colormaps[cmap].with_extremes(bad="#e0e0e0")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colors, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if matrix.size <= 144:
        for (r, c), value in np.ndenumerate(matrix):
            if math.isfinite(value):
                # White text on the dark end(s) of the colormap: both ends when it diverges.
                dark = abs(value - (vmin + vmax) / 2) > 0.6 * (vmax - vmin) / 2 if diverging else \
                    value > vmin + 0.6 * (vmax - vmin)
                ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black")
    return image


GROUP_ORDER = ("embedding", "user_encoder", "item_encoder", "context_encoder", "backbone")


def _group_rank(group: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER), group)


def gradient_conflict(runs: Sequence[RunData], ncols: int = 3) -> Figure | None:
    """Mean gradient cosine of each task pair, over all shared parameters, then per module (each
    module with the tasks that reach it); each run starts a new row of panels."""
    blocks: list[list[tuple[str, list[str], np.ndarray]]] = []
    for run in runs:
        samples = (run.diagnostics or {}).get("conflict", [])
        tasks = _conflict_tasks(run)
        if len(tasks) < 2:
            continue
        title = f"{run.label}: all shared parameters" if len(runs) > 1 else "all shared parameters"
        panels = [(title, tasks, mean_cosines(samples, tasks))]
        for group in sorted({g for s in samples for g in s.get("groups", {})}, key=_group_rank):
            matrix = mean_cosines(samples, tasks, group)
            reach = [i for i in range(len(tasks)) if math.isfinite(matrix[i, i])]
            if len(reach) >= 2:
                panels.append((group, [tasks[i] for i in reach], matrix[np.ix_(reach, reach)]))
        blocks.append(panels)
    if not blocks:
        return None
    ncols = min(ncols, max(len(b) for b in blocks))
    nrows = sum(math.ceil(len(b) / ncols) for b in blocks)
    size = max(len(t) for b in blocks for _, t, _ in b)
    side = 1.1 + 0.42 * size
    fig = Figure(figsize=(side * ncols + 1.0, side * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    off = [m[~np.eye(len(t), dtype=bool)] for b in blocks for _, t, m in b]
    finite = np.concatenate([v[np.isfinite(v)] for v in off])
    vmax = float(max(0.1, np.abs(finite).max())) if finite.size else 1.0
    image = None
    row = 0
    for panels in blocks:
        for k in range(math.ceil(len(panels) / ncols) * ncols):
            ax = axes[row + k // ncols, k % ncols]
            if k >= len(panels):
                ax.set_visible(False)
                continue
            title, tasks, matrix = panels[k]
            shown = matrix.copy()
            np.fill_diagonal(shown, np.nan)
            image = _heatmap(ax, shown, tasks, tasks, "RdBu", -vmax, vmax)
            ax.set_title(title, fontsize=9)
        row += math.ceil(len(panels) / ncols)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="mean cosine of task gradients")
    return fig


def conflict_over_time(run: RunData, pairs: int = 6) -> Figure | None:
    """The most conflicting and most aligned task pairs' gradient cosine over training (one run)."""
    samples = (run.diagnostics or {}).get("conflict", [])
    tasks = _conflict_tasks(run)
    if len(tasks) < 2 or len(samples) < 2:
        return None
    mean = mean_cosines(samples, tasks)
    candidates = [(mean[a, b], a, b) for a in range(len(tasks)) for b in range(a + 1, len(tasks))
                  if math.isfinite(mean[a, b])]
    candidates.sort()
    low = candidates[:pairs // 2]
    chosen = low + [c for c in candidates[-(pairs - pairs // 2):] if c not in low]
    if not chosen:
        return None
    fig = Figure(figsize=(7.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for k, (_, a, b) in enumerate(sorted(chosen)):
        points = []
        for s in samples:
            if tasks[a] in s["tasks"] and tasks[b] in s["tasks"]:
                value = s["cosine"][s["tasks"].index(tasks[a])][s["tasks"].index(tasks[b])]
                if value is not None:
                    points.append((run.epoch_of_step(s["step"]), value))
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, color=task_color(k), linewidth=1.4, marker="." if len(x) < 40 else None,
                    label=f"{tasks[a]} / {tasks[b]}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("gradient cosine", fontsize=8)
    ax.set_title(f"{run.label}: most conflicting and most aligned task pairs", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, frameon=False, loc="outside right upper")
    return fig


# ---------------------------------------------------------------------- experts


def expert_names(run: RunData, width: int) -> list[str]:
    """Column names of a run's gates: PLE's are [shared experts, the task's own experts]."""
    model = run.config.get("model", {})
    if run.backbone == "ple":
        shared, own = int(model.get("shared_experts", 0)), int(model.get("task_experts", 0))
        if shared + own == width:
            return [f"shared {i + 1}" for i in range(shared)] + [f"own {i + 1}" for i in range(own)]
    return [f"expert {i + 1}" for i in range(width)]


def expert_utilisation(runs: Sequence[RunData]) -> Figure | None:
    """Per run (rows): mean gate weight per task x expert in the first and the last epoch."""
    rows = [r for r in runs if (r.diagnostics or {}).get("experts")]
    if not rows:
        return None
    ncols = max(2 if len((r.diagnostics or {})["experts"]) > 1 else 1 for r in rows)
    width = max(len(next(iter(e["gates"].values()))) for r in rows for e in (r.diagnostics or {})["experts"])
    height = max(len(e["gates"]) for r in rows for e in (r.diagnostics or {})["experts"])
    fig = Figure(figsize=(ncols * (1.6 + 0.62 * width) + 0.8, len(rows) * (0.9 + 0.38 * height) + 0.4),
                 layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    image = None
    for r, run in enumerate(rows):
        epochs = (run.diagnostics or {})["experts"]
        shown = [epochs[0], epochs[-1]] if len(epochs) > 1 and ncols > 1 else [epochs[-1]]
        for c in range(ncols):
            ax = axes[r, c]
            if c >= len(shown):
                ax.set_visible(False)
                continue
            entry = shown[c]
            tasks = list(entry["gates"])
            matrix = np.array([entry["gates"][t] for t in tasks], dtype=float)
            cols = expert_names(run, matrix.shape[1])
            image = _heatmap(ax, matrix, tasks, cols, "Blues", 0.0, 1.0, "{:.2f}", diverging=False)
            title = f"epoch {entry['epoch']}"
            ax.set_title(f"{run.label}: {title}" if c == 0 else title, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="mean gate weight")
    return fig


# ---------------------------------------------------------------------- calibration


def reliability_diagrams(runs: Sequence[RunData]) -> Figure | None:
    """Per task: observed frequency against mean predicted probability per bin, one line per run."""
    tasks = [t for t in all_tasks(runs) if any(t in (r.diagnostics or {}).get("calibration", {}) for r in runs)]
    if not tasks:
        return None
    fig, axes = _grid(len(tasks), 4, 3.0, 3.0)
    for ax, task in zip(axes, tasks, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        kind = ""
        for i, run in enumerate(runs):
            cal = (run.diagnostics or {}).get("calibration", {}).get(task)
            if cal is None:
                continue
            kind = cal["kind"]
            pts = [(c, f, n) for c, f, n in zip(cal["confidence"], cal["frequency"], cal["count"], strict=True)
                   if c is not None and f is not None]
            if not pts:
                continue
            x, y, n = (np.array(v, dtype=float) for v in zip(*pts, strict=True))
            sizes = 8 + 60 * n / max(n.max(), 1)
            ece = cal.get("ece")
            label = f"ECE {ece:.3f}" if ece is not None else "ECE -"
            if len(runs) > 1:
                label = f"{run.label}: {label}"
            ax.plot(x, y, color=run_color(i), linewidth=1.4, label=label)
            ax.scatter(x, y, s=sizes, color=run_color(i), alpha=0.8, edgecolors="white", linewidths=0.5)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_aspect("equal")
        ax.set_title(f"{task} ({kind})", fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=7)
        ax.set_ylabel("observed frequency", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False, loc="lower right")
    return fig


# ---------------------------------------------------------------------- ranking


def ranking_curves(runs: Sequence[RunData]) -> Figure | None:
    """HR@K, NDCG@K and Recall@K against K for runs that rank items."""
    series: list[tuple[int, RunData, dict[str, list[tuple[int, float]]]]] = []
    for i, run in enumerate(runs):
        metrics = (run.metrics.get("ranking") or {}).get("metrics") or {}
        by_name: dict[str, list[tuple[int, float]]] = {}
        for key, value in metrics.items():
            name, _, k = key.partition("@")
            if k.isdigit() and value is not None and math.isfinite(value):
                by_name.setdefault(name, []).append((int(k), float(value)))
        if by_name:
            series.append((i, run, by_name))
    if not series:
        return None
    names = [n for n in ("hr", "ndcg", "recall") if any(n in s for _, _, s in series)]
    fig, axes = _grid(len(names), 3, 3.4, 2.8)
    for ax, name in zip(axes, names, strict=True):
        for i, run, by_name in series:
            points = sorted(by_name.get(name, []))
            if not points:
                continue
            x, y = zip(*points, strict=True)
            ax.plot(x, y, color=run_color(i), marker="o", markersize=4, linewidth=1.6, label=run.label)
        ax.set_title(f"{name.upper() if name != 'recall' else 'Recall'}@K", fontsize=9)
        ax.set_xlabel("K", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    task = (series[0][1].metrics.get("ranking") or {}).get("task", "")
    fig.suptitle(f"top-K ranking of held-out positive '{task}' interactions (training items excluded)", fontsize=9)
    axes[0].legend(fontsize=7, frameon=False)
    return fig


def deltas_table(runs: Sequence[RunData], ref: Reference) -> dict[str, dict[str, float]]:
    """Run label -> task -> oriented difference from single-task (positive = better)."""
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        if run is ref.run:
            continue
        for task, single in ref.single.items():
            metric, value = run.primary(task)
            if value is not None:
                out.setdefault(run.label, {})[task] = oriented_delta(metric, value, single)
    return out
