"""`build_report`: one run (and others beside it) -> RUN/report.html and the PNGs beside it."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtlrec.errors import MtlrecError
from mtlrec.metrics import PRIMARY_METRIC
from mtlrec.report import html
from mtlrec.report.runs import Reference, RunData, label_runs, load_run, oriented_delta, reference
from mtlrec.training.checkpoint import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_FILE = "report.html"
FIGURES = ("learning_curves", "validation_metrics", "metric_deltas", "task_weights", "gradient_conflict",
           "gradient_conflict_steps", "expert_utilisation", "calibration", "ranking")
"""Names of the PNGs a report may write (a rebuilt report removes those it no longer draws)."""

DPI = 100


def build_report(run_dir: str | Path, compare: Sequence[str | Path] = ()) -> Path:
    """Write RUN/report.html (self-contained: images embedded, nothing fetched) and its PNGs.

    Args:
        run_dir: a run directory written by `mtlrec train` (or `mtlrec.train`).
        compare: other run directories to lay beside it (e.g. PLE vs MMoE vs single). A run with
            the `single` backbone among them is the single-task reference of the metric table;
            without one, a demo's report.json beside the run provides single-task and oracle numbers.

    Returns:
        The path of report.html.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MtlrecError("mtlrec report needs matplotlib; install it with: pip install 'mtlrec[plot]'") from exc
    from mtlrec.report import figures as fg

    out = Path(run_dir)
    runs = [load_run(out), *(load_run(c) for c in compare)]
    label_runs(runs)
    ref = reference(runs)
    main = runs[0]

    sections = [html.Section("runs", "Runs", "", _runs_table(runs))]
    notes = findings(runs, ref)
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        sections.append(html.Section("findings", "What stands out", "", f'<ul class="findings">{items}</ul>'))
    sections.append(html.Section("metrics", "Test metrics", _metrics_how(ref), _metrics_tables(runs, ref)))

    drawn: list[tuple[str, str, str, Callable[[], Figure | None]]] = [
        ("learning_curves", "Learning curves",
         "Training loss of each task (epoch means, and the sampled steps as a faint line) and its validation "
         "loss per epoch. A validation loss that rises while the training loss falls is overfitting; a task "
         "whose loss stays flat is not learning from the shared representation. A multi-task model trains a "
         "conditional task (after: click) over the entire space (ESMM), a single-task model on the parent's "
         "positive rows only, so those two losses are on different scales.",
         lambda: fg.learning_curves(runs)),
        ("validation_metrics", "Validation metric per epoch",
         "Each task's primary metric on the validation split after every epoch; the star is the epoch whose "
         "weights were kept (early stopping / best checkpoint).",
         lambda: fg.validation_metrics(runs)),
        ("metric_deltas", "Difference from single-task models",
         "Relative difference of each task's primary test metric from the single-task model's, sign-corrected so "
         "that positive is always better. Red bars are negative transfer: sharing made that task worse.",
         lambda: fg.metric_deltas(runs, ref) if ref is not None else None),
        ("task_weights", "Task weights over training",
         "The weight the loss-weighting strategy gave each task, sampled during training. Constant for 'equal' "
         "and 'fixed'; learned or adapted for 'uncertainty', 'dwa' and 'gradnorm'.",
         lambda: fg.task_weights(runs)),
        ("gradient_conflict", "Gradient conflict between tasks",
         "Mean cosine similarity of two tasks' loss gradients on the shared parameters, over the sampled steps: "
         "over all shared parameters, then per module. Blue (positive): the tasks help each other; red "
         "(negative): they pull the shared parameters in opposite directions, where negative transfer starts. "
         "Grey: the two tasks share no parameters there (e.g. a user task and an item task on the backbone).",
         lambda: fg.gradient_conflict(runs)),
        ("gradient_conflict_steps", "Gradient conflict over training",
         "The cosine of the most conflicting and the most aligned task pairs of the first run at each sampled step.",
         lambda: fg.conflict_over_time(main)),
        ("expert_utilisation", "Expert utilisation",
         "Mean gate weight each interaction task gives each expert over the first and the last epoch (MMoE, "
         "OMoE: one row per task over the shared experts; PLE: the last level's gates over the shared experts "
         "and the task's own). Rows that look alike mean the tasks share experts; a row concentrated on one "
         "expert means the gate has collapsed onto it.",
         lambda: fg.expert_utilisation(runs)),
        ("calibration", "Calibration on the test split",
         "Reliability diagrams: the observed frequency of the outcome against the mean predicted probability, "
         "per bin of predictions (dot size: number of predictions). On the diagonal the probabilities can be "
         "taken at face value; ECE is the count-weighted mean distance from it. Binary tasks as they are; "
         "multilabel tasks pool every label; multiclass tasks show top-label confidence against accuracy.",
         lambda: fg.reliability_diagrams(runs)),
        ("ranking", "Ranking quality",
         "Hit rate, NDCG and recall of the top K recommended items against held-out positive interactions, "
         "training items excluded, for each K in train.ranking_k.",
         lambda: fg.ranking_curves(runs)),
    ]
    missing: list[str] = []
    for name, title, how, draw in drawn:
        figure = draw()
        target = out / f"{name}.png"
        if figure is None:
            target.unlink(missing_ok=True)
            if name in ("task_weights", "gradient_conflict", "expert_utilisation", "calibration"):
                missing.append(title.lower())
            continue
        png = _png(figure)
        target.write_bytes(png)
        sections.append(html.Section(name, title, how, html.image(png, title)))
    if missing:
        sections.append(html.Section(
            "not-shown", "Not shown", "",
            f"<p class=\"note\">No data for: {escape(', '.join(missing))}. Expert utilisation needs a gated backbone "
            "(mmoe, omoe, ple); gradient conflict needs shared parameters (not the 'single' backbone); every "
            "diagnostic needs train.diagnostics_every &gt; 0 (runs from before diagnostics have none).</p>"))

    names = " vs ".join(r.label for r in runs)
    subtitle = f"{len(runs)} run{'s' if len(runs) > 1 else ''}: {names}. Written by mtlrec report."
    path = out / REPORT_FILE
    atomic_write_text(path, html.page(f"mtlrec report: {main.label}", subtitle, sections))
    path.chmod(0o644)
    return path


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------- tables


def _runs_table(runs: Sequence[RunData]) -> str:
    rows: list[list[str | html.Cell]] = []
    for run in runs:
        m = run.metrics
        sizes = m.get("split_sizes", {}).get("interactions", {})
        rows.append([run.label, html.Cell(str(run.path), "text"), run.backbone, run.weighting,
                     f"{m.get('epochs_run', '-')} / {m.get('best_epoch', '-')}",
                     _fmt(m.get("train_seconds"), 1), str(sizes.get("test", "-"))])
    return html.table(["run", html.Cell("directory", "text"), "backbone", "weighting", "epochs run / best",
                       "train s", "test interactions"], rows)


def _metrics_how(ref: Reference | None) -> str:
    text = "Each task's primary metric on the test split (AUC binary, accuracy multiclass, mAP multilabel, RMSE " \
           "regression)."
    if ref is not None and ref.oracle:
        text += " Oracle: the best any model could reach, from the true probabilities (synthetic data)."
    if ref is None or not ref.single:
        return text + " No single-task numbers were found: compare with a run of the 'single' backbone " \
                      "(--compare) to see the per-task difference and negative transfer."
    return text + f" Single-task reference: {ref.source}. Difference = multi-task minus single-task; red marks " \
                  "negative transfer (worse than single-task, whichever direction the metric points)."


def _metrics_tables(runs: Sequence[RunData], ref: Reference | None) -> str:
    from mtlrec.report.figures import all_tasks

    tasks = all_tasks(runs)
    others = [r for r in runs if ref is None or r is not ref.run]
    headers: list[str | html.Cell] = ["task", html.Cell("type", "text"), html.Cell("metric", "text")]
    headers += [r.label for r in runs]
    if ref is not None and ref.run is None and ref.single:
        headers.append("single-task")
    if ref is not None and ref.oracle:
        headers.append("oracle")
    if ref is not None and ref.single:
        headers += [f"{r.label} - single" if len(others) > 1 else "difference" for r in others]
    rows = []
    for task in tasks:
        entry = next(r.tasks[task] for r in runs if task in r.tasks)
        metric = PRIMARY_METRIC.get(entry.get("type", ""), "")
        row: list[str | html.Cell] = [task, html.Cell(f"{entry.get('kind', '')} {entry.get('type', '')}", "text"),
                                      html.Cell(metric, "text")]
        row += [_fmt(r.primary(task)[1]) for r in runs]
        if ref is not None and ref.run is None and ref.single:
            row.append(_fmt(ref.single.get(task)))
        if ref is not None and ref.oracle:
            row.append(_fmt(ref.oracle.get(task)))
        if ref is not None and ref.single:
            for run in others:
                value, single = run.primary(task)[1], ref.single.get(task)
                if value is None or single is None:
                    row.append("-")
                    continue
                better = oriented_delta(metric, value, single)
                row.append(html.Cell(f"{value - single:+.4f}", "good" if better > 0 else "bad" if better < 0 else "",
                                     "NT" if better < 0 else ""))
        rows.append(row)
    out = html.table(headers, rows)
    ranking = [(r, (r.metrics.get("ranking") or {}).get("metrics") or {}) for r in runs]
    keys = sorted({k for _, m in ranking for k in m}, key=_ranking_key)
    if keys:
        out += "<p class=\"note\">Ranking of held-out interactions:</p>" + html.table(
            ["run", *keys], [[r.label, *(_fmt(m.get(k)) for k in keys)] for r, m in ranking if m])
    details = "".join(
        f"<p class=\"note\">{escape(run.label)}</p>" + html.table(
            ["task", html.Cell("metrics", "text")],
            [[t, html.Cell("  ".join(f"{k}={_fmt(v)}" for k, v in e.get("test", {}).items()), "text")]
             for t, e in run.tasks.items()])
        for run in runs)
    return out + f"<details><summary>every test metric</summary>{details}</details>"


def _ranking_key(key: str) -> tuple[str, int]:
    name, _, k = key.partition("@")
    return name, int(k) if k.isdigit() else 0


# ---------------------------------------------------------------------- findings


def findings(runs: Sequence[RunData], ref: Reference | None) -> list[str]:
    """Short sentences on what the report's numbers say (negative transfer, conflict, experts, ...)."""
    notes: list[str] = []
    if ref is not None and ref.single:
        for run in runs:
            if run is ref.run:
                continue
            worse: list[tuple[float, str]] = []
            better: list[tuple[float, str]] = []
            for task, single in ref.single.items():
                metric, value = run.primary(task)
                if value is None:
                    continue
                delta = oriented_delta(metric, value, single)
                text = f"{task} ({metric} {value - single:+.4f})"
                (worse if delta < 0 else better).append((delta / max(abs(single), 1e-12), text))
            if worse:
                notes.append(f"{run.label}: negative transfer on {len(worse)} of {len(worse) + len(better)} tasks: "
                             + ", ".join(t for _, t in sorted(worse)) + ".")
            elif better:
                notes.append(f"{run.label}: no task is worse than its single-task model.")
    for run in runs:
        notes += _conflict_findings(run) + _expert_findings(run)
    notes += _calibration_findings(runs) + _weight_findings(runs)
    return notes


def _conflict_findings(run: RunData) -> list[str]:
    from mtlrec.report.figures import mean_cosines

    samples = (run.diagnostics or {}).get("conflict", [])
    tasks = [t for t in run.tasks if any(t in s["tasks"] for s in samples)]
    if len(tasks) < 2:
        return []
    mean = mean_cosines(samples, tasks)
    pairs = [(float(mean[a, b]), tasks[a], tasks[b]) for a in range(len(tasks)) for b in range(a + 1, len(tasks))
             if math.isfinite(mean[a, b])]
    if not pairs:
        return []
    pairs.sort()
    low, high = pairs[0], pairs[-1]
    negative = sum(v < 0 for v, _, _ in pairs)
    text = (f"{run.label}: most conflicting tasks {low[1]} and {low[2]} (mean gradient cosine {low[0]:+.2f}), "
            f"most aligned {high[1]} and {high[2]} ({high[0]:+.2f}); {negative} of {len(pairs)} task pairs "
            f"conflict on average, over {len(samples)} sampled steps.")
    return [text]


def _expert_findings(run: RunData) -> list[str]:
    from mtlrec.report.figures import expert_names

    epochs = (run.diagnostics or {}).get("experts", [])
    if not epochs:
        return []
    gates = epochs[-1]["gates"]
    parts, shared_tops = [], set()
    own_share = []
    for task, weights in gates.items():
        w = np.asarray(weights, dtype=float)
        names = expert_names(run, len(w))
        top = int(np.argmax(w))
        parts.append(f"{task} {names[top]} ({100 * w[top]:.0f}%)")
        own = [i for i, n in enumerate(names) if n.startswith("own")]
        if own:                                  # PLE: a task's own experts are its alone
            own_share.append(f"{task} {100 * w[own].sum():.0f}%")
        if not names[top].startswith("own"):
            shared_tops.add(names[top])
    width = len(next(iter(gates.values())))
    text = (f"{run.label}: most used expert per task in epoch {epochs[-1]['epoch']} (uniform = {100 / width:.0f}%): "
            + ", ".join(parts))
    if own_share:
        text += "; gate weight on the task's own experts: " + ", ".join(own_share)
    elif len(shared_tops) == 1 and len(gates) > 1:
        text += "; every task leans on the same expert"
    return [text + "."]


def _calibration_findings(runs: Sequence[RunData]) -> list[str]:
    notes = []
    for run in runs:
        calibration = (run.diagnostics or {}).get("calibration", {})
        cal = {t: c["ece"] for t, c in calibration.items() if c.get("ece") is not None}
        if not cal:
            continue
        ordered = sorted(cal.items(), key=lambda kv: kv[1])
        text = f"{run.label}: calibration (ECE) from {ordered[0][0]} {ordered[0][1]:.3f} to {ordered[-1][0]} " \
               f"{ordered[-1][1]:.3f}"
        notes.append(text + (" (well calibrated: every ECE below 0.02)." if ordered[-1][1] < 0.02 else "."))
    return notes


def _weight_findings(runs: Sequence[RunData]) -> list[str]:
    notes = []
    for run in runs:
        samples = (run.diagnostics or {}).get("samples", [])
        last: dict[str, Any] = samples[-1]["weights"] if samples else {}
        values = [s["weights"][t] for s in samples for t in s["weights"] if s["weights"][t] is not None]
        if not values or max(values) - min(values) < 1e-9:
            continue
        final = sorted(((w, t) for t, w in last.items() if w is not None), reverse=True)
        if final:
            notes.append(f"{run.label}: '{run.weighting}' ends with the largest weight on {final[0][1]} "
                         f"({final[0][0]:.2f}) and the smallest on {final[-1][1]} ({final[-1][0]:.2f}).")
    return notes
