"""`build_report`: the page and its PNGs from tiny runs, single-task deltas, and the page in Chromium."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mtlrec
from mtlrec.data.synthetic import make_world
from mtlrec.errors import ArtifactError
from mtlrec.metrics import PRIMARY_METRIC, higher_is_better
from mtlrec.report import build_report, findings, load_run
from mtlrec.report.runs import reference
from mtlrec.training.diagnostics import DIAGNOSTICS_FILE

TINY = ["train.epochs=2", "train.progress=false", "model.embedding_dim=8", "model.encoder_dim=16",
        "model.expert_hidden=[16]", "model.tower_hidden=[8]", "model.head_hidden=[8]", "train.batch_size=64",
        "train.ranking_k=[1,5,10]"]
ALWAYS = ("learning_curves", "validation_metrics", "task_weights", "gradient_conflict", "gradient_conflict_steps",
          "expert_utilisation", "calibration", "ranking")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny world with an MMoE run and a single-task run on the same split."""
    root = tmp_path_factory.mktemp("report")
    config = make_world(n_users=80, n_items=40, impressions_per_user=15, n_pairs=200, seed=3).write(root / "data")
    out = {}
    for backbone in ("mmoe", "single"):
        out[backbone] = mtlrec.train(config, root / backbone, [*TINY, f"model.backbone={backbone}"]).run_dir
    return out


def _copy(run: Path, to: Path) -> Path:
    """A copy of a run whose diagnostics have samples at more steps than the tiny run reaches
    (its 30 steps sample only step 0 at the default `every`), so that over-time figures are drawn."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.png", "report.html"))
    path = to / DIAGNOSTICS_FILE
    diagnostics = json.loads(path.read_text())
    for key in ("samples", "conflict"):
        first = diagnostics[key][0] if diagnostics[key] else None
        if first is not None:
            diagnostics[key] += [{**first, "step": step} for step in (10, 20)]
    path.write_text(json.dumps(diagnostics))
    return to


def _self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"https?://", page), "the page must not reference the network"
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources, "the page has no images"
    for src in sources:
        assert src.startswith(("data:", "#")), src


def test_report_of_one_run(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["mmoe"], tmp_path / "mmoe")
    path = build_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    _self_contained(page)
    for name in ALWAYS:
        png = run / f"{name}.png"
        assert png.is_file() and png.read_bytes().startswith(b"\x89PNG"), name
        assert base64.b64encode(png.read_bytes()).decode() in page, f"{name}.png is not embedded"
    assert not (run / "metric_deltas.png").exists(), "no single-task numbers: no deltas figure"
    for task in json.loads((run / "metrics.json").read_text())["tasks"]:
        assert f">{task}<" in page
    assert "most conflicting tasks" in page and "most used expert" in page
    assert "hr@5" in page


def test_compare_with_a_single_run_shows_deltas_and_negative_transfer(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["mmoe"], tmp_path / "mmoe")
    path = build_report(run, compare=[runs["single"]])
    page = path.read_text()
    _self_contained(page)
    assert (run / "metric_deltas.png").is_file()
    assert "mmoe (mmoe)" in page and "single (single)" in page
    multi = json.loads((run / "metrics.json").read_text())["tasks"]
    single = json.loads((runs["single"] / "metrics.json").read_text())["tasks"]
    worse = []
    for task, entry in multi.items():
        metric = PRIMARY_METRIC[entry["type"]]
        m, s = entry["test"][metric], single[task]["test"][metric]
        if (m < s) if higher_is_better(metric) else (m > s):
            worse.append(task)
    assert page.count('<span class="badge">NT</span>') == len(worse)
    loaded = [load_run(run), load_run(runs["single"])]
    ref = reference(loaded)
    assert ref is not None and ref.run is loaded[1] and set(ref.single) == set(multi)
    notes = findings(loaded, ref)
    if worse:
        assert any("negative transfer on" in n and all(t in n for t in worse) for n in notes), notes
    else:
        assert any("no task is worse" in n for n in notes), notes


def test_single_task_and_oracle_numbers_from_a_demo_report_json(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["mmoe"], tmp_path / "demo" / "multi_task")
    multi = json.loads((run / "metrics.json").read_text())["tasks"]
    tasks: dict[str, Any] = {}
    for task, entry in multi.items():
        metric = PRIMARY_METRIC[entry["type"]]
        value = entry["test"][metric]
        tasks[task] = {"metric": metric, "multi_task": value, "single_task": value + 0.01, "oracle": 0.99}
    (run.parent / "report.json").write_text(json.dumps({"tasks": tasks}))
    page = build_report(run).read_text()
    assert "single-task" in page and "oracle" in page and "report.json" in page
    # single_task is 0.01 above multi_task: worse for every higher-is-better metric.
    expected = sum(higher_is_better(t["metric"]) for t in tasks.values())
    assert page.count('<span class="badge">NT</span>') == expected
    assert (run / "metric_deltas.png").is_file()

    # A report.json of another run (numbers that are not this run's) is ignored.
    for row in tasks.values():
        row["multi_task"] += 0.5
    (run.parent / "report.json").write_text(json.dumps({"tasks": tasks}))
    page = build_report(run).read_text()
    assert "NT</span>" not in page and not (run / "metric_deltas.png").exists()


def test_a_run_without_diagnostics_still_reports(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _copy(runs["mmoe"], tmp_path / "old")
    (run / DIAGNOSTICS_FILE).unlink()
    page = build_report(run).read_text()
    assert "Not shown" in page and "gradient conflict" in page
    assert (run / "learning_curves.png").is_file() and not (run / "gradient_conflict.png").exists()


def test_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no metrics.json"):
        build_report(tmp_path / "empty")


# ---------------------------------------------------------------------- the page in Chromium


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed, and the report test needs it to open report.html headless. "
                ".ci/run must install it: `apt-get update && apt-get install -y chromium` (Debian's package).")


class _DevTools:
    """Chromium headless driven over the DevTools protocol on a pipe (fds 3 and 4): no extra package."""

    def __init__(self, exe: str, user_dir: Path) -> None:
        ours_in, theirs_out = os.pipe()          # Chromium writes fd 4 -> we read
        theirs_in, ours_out = os.pipe()          # we write -> Chromium reads fd 3

        def pipes() -> None:
            os.dup2(theirs_in, 3)
            os.dup2(theirs_out, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={user_dir}",
                "--remote-debugging-pipe", "--window-size=1280,1400", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=pipes, pass_fds=(3, 4))
        os.close(theirs_in)
        os.close(theirs_out)
        self.read_fd, self.write_fd = ours_in, ours_out
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._next(deadline))

    def _next(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium exited")
                self.buffer += chunk
        raw, _, self.buffer = self.buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.read_fd)
        os.close(self.write_fd)


def _open_in_chromium(page: Path, user_dir: Path) -> tuple[list[str], list[list[Any]], bytes]:
    """Console errors, [complete, naturalWidth] of every image, and a PNG screenshot of the page."""
    browser = _DevTools(_chromium(), user_dir)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            browser.call(domain, session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        images = json.loads(browser.call("Runtime.evaluate", {
            "expression": "JSON.stringify([...document.images].map(i => [i.complete, i.naturalWidth]))",
            "returnByValue": True}, session=session)["result"]["value"])
        shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
        errors = []
        for event in browser.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails", {}))[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                errors.append(json.dumps(params.get("args", []))[:300])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") in ("error", "warning"):
                errors.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))
        return errors, images, shot
    finally:
        browser.close()


def test_the_page_opens_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.image

    run = _copy(runs["mmoe"], tmp_path / "mmoe")
    path = build_report(run, compare=[runs["single"]])
    errors, images, shot = _open_in_chromium(path, tmp_path / "chromium-profile")
    assert errors == [], f"console errors: {errors}"
    assert len(images) >= len(ALWAYS) + 1
    assert all(complete and width > 0 for complete, width in images), f"an image did not decode: {images}"
    (tmp_path / "shot.png").write_bytes(shot)
    pixels = matplotlib.image.imread(tmp_path / "shot.png")[..., :3]      # [H, W, 3] in [0, 1]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert float(pixels.std()) > 0.05, "the screenshot is blank"
    assert float((pixels.mean(axis=2) < 0.5).mean()) > 0.005, "the screenshot shows almost no text or lines"
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50


def test_chromium_check_catches_a_broken_page(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                    '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    errors, images, _ = _open_in_chromium(page, tmp_path / "profile")
    assert any("boom" in e for e in errors) and any("missing.png" in e for e in errors)
    assert images == [[True, 0]]
