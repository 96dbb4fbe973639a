"""Headless Chromium for tests that look at a page as a person would: Debian's ``chromium``,
installed with apt-get when missing and we may (root, as on CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_IMG = ROOT / "docs" / "img"


def chromium_path() -> str:
    """The chromium binary, installing Debian's package first when it is missing."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(
            "headless Chromium is needed: install Debian's chromium package "
            "(sudo apt-get install -y chromium)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.fail("apt-get installed chromium, but there is no chromium on PATH")
    return found


def browse(chromium: str, url: str, *, screenshot: Path | None = None) -> str:
    """Load ``url`` headless, let its scripts run for 5 s of virtual time; the DOM as HTML
    (or write a 1280x900 screenshot)."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    args = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--window-size=1280,900", "--virtual-time-budget=5000",
    ]  # fmt: skip
    args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    try:
        done = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def keep(image: Path, name: str) -> Path:
    """Keep a screenshot in tests/artifacts/; refresh docs/img/ when it has none yet or when
    EDGESHIP_UPDATE_SCREENSHOTS=1 (so a plain test run leaves the docs unchanged)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / name
    shutil.copyfile(image, kept)
    docs = DOCS_IMG / name
    if not docs.exists() or os.environ.get("EDGESHIP_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, docs)
    return kept
