"""`edgeship optimize --html` on the digits model with a budget: the chosen candidate meets
every line within the time limit, the bundle carries reference statistics for drift, and the
HTML report renders in headless Chromium (the screenshot is kept in tests/artifacts/)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from device_agent.bundle import load_bundle
from tests.browser import browse, keep


@pytest.mark.slow
def test_optimize_html_report_renders(
    digits_onnx: Any, digits_npz: dict[str, Path], tmp_path: Path, chromium: str
) -> None:
    html = tmp_path / "report.html"
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "optimize", str(digits_onnx.path),
         "--calibration", str(digits_npz["calibration"]), "--eval", str(digits_npz["eval"]),
         "--target", "rpi4", "--budget", "p95<=20ms,rss<=128MB,drop<=1%,size<=1MB",
         "-o", str(tmp_path / "bundle"), "--json", str(tmp_path / "r.json"), "--html", str(html),
         "--runs", "50", "--seconds", "0.5"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert elapsed < 600
    report = json.loads((tmp_path / "r.json").read_text())
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert chosen["meets_budget"] and all(line["passed"] for line in chosen["budget"])
    assert any(n.startswith("int8 outlook on rpi4") for n in report["notes"])
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.reference_file == "reference.json"
    assert bundle.manifest.detector is not None
    page = html.read_text()
    assert "<svg" in page and report["chosen"] in page
    dom = browse(chromium, html.as_uri())
    assert "Latency against quality" in dom and "circle" in dom
    # The search's own record: skipped recipes with reasons, time and calibration per candidate.
    assert "Skipped recipes" in dom and "CPU execution provider" in dom  # fp16 on rpi4
    assert "calibrated" in dom or "cached" in dom
    assert any(s["name"] == "fp16" for s in report["skipped"])
    shot = tmp_path / "report.png"
    browse(chromium, html.as_uri(), screenshot=shot)
    assert shot.stat().st_size > 10_000
    keep(shot, "optimize-report.png")
