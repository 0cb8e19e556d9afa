"""Run reports: `build_report(run, compare=...)` writes RUN/report.html and PNGs of what the model learned.

The page is self-contained (CSS inline, images as base64 data URIs, no script), so it opens from
a file with no network. It reads metrics.json, log.jsonl, config.yaml and diagnostics.json of each
run (`mtlrec.training.diagnostics`). Needs matplotlib (`pip install 'mtlrec[plot]'`).
"""

from mtlrec.report.build import REPORT_FILE, build_report, findings
from mtlrec.report.runs import RunData, load_run

__all__ = ["REPORT_FILE", "RunData", "build_report", "findings", "load_run"]
