"""Figures of the fault tests (pytest marker ``faults``): each test prints one line and, when
``EDGESHIP_FAULTS_REPORT`` names a file, appends one JSON object to it, which is where
docs/reliability.md takes its figures from::

    EDGESHIP_FAULTS_REPORT=/tmp/faults.jsonl .venv/bin/python -m pytest -m faults -s
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def record(fault: str, **figures: Any) -> dict[str, Any]:
    line = {"fault": fault, **figures}
    print(f"\n[{fault}] " + ", ".join(f"{k}: {v}" for k, v in figures.items()), flush=True)
    path = os.environ.get("EDGESHIP_FAULTS_REPORT")
    if path:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(path, "a") as f:
            f.write(json.dumps({"at": stamp, **line}) + "\n")
    return line
