"""Where a benchmark ran: commit, CPU, cores, Python, OS and package versions, for its JSON."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine_facts(packages: Iterable[str]) -> dict[str, Any]:
    """The facts a result needs to be read later; ``packages`` are the versions to record."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in packages:
        with contextlib.suppress(Exception):
            versions[name] = version(name)
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "commit": git.stdout.strip() or None,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": versions,
    }
