"""``edgeship inspect``: verify a bundle (``device_agent.bundle.load_bundle``) and print its
manifest, every string escaped for the terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sdk.cli.common import EXIT_OK

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add ``inspect`` to the ``edgeship`` subparsers."""
    p = sub.add_parser("inspect", help="verify a bundle and print its manifest")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw manifest JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from device_agent.bundle import load_bundle
    from sdk.terminal import printable as p

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if args.json:
        print(m.to_json(), end="")
        return EXIT_OK
    # Every string of the manifest is whoever made the bundle's: escaped (sdk.terminal).
    print(
        f"bundle {p(bundle.root)}  (format v{m.format_version}, verified: all {len(m.files)} "
        "file hashes match)"
    )
    print(
        f"model      {p(m.model.name)} v{p(m.model.version)}: {p(m.model.file)} "
        f"[{p(m.model.runtime)}, {p(m.model.precision)}, {p(m.model.recipe)}]"
    )
    for t in m.io.inputs:
        print(f"input      {p(t.name)}: {p(t.dtype)} {p(list(t.shape))}")
    for t in m.io.outputs:
        labels = f" labels={list(t.labels)}" if t.labels else ""
        print(f"output     {p(t.name)}: {p(t.dtype)} {p(list(t.shape))}{p(labels)}")
    if m.detector is not None:
        d = m.detector
        print(f"detector   {p(d.kind)}: threshold {d.threshold:.4g} (target FPR {d.target_fpr:g})")
    if m.budget:
        print(f"budget     {json.dumps(m.budget)}")
    if m.benchmark:
        lat = m.benchmark.get("latency_ms", {})
        if lat:
            print(
                "benchmark  "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in lat.items() if isinstance(v, int | float))
            )
        if "measured_on" in m.benchmark:
            print(f"           measured on {p(m.benchmark['measured_on'])}")
    for name, digest in m.files.items():
        size = bundle.path_of(name).stat().st_size
        print(f"file       {p(name)}  {size / 1024:.1f} KiB  sha256 {p(digest[:16])}…")
    print(f"tools      {p(', '.join(f'{k} {v}' for k, v in m.tools.items()))}")
    print(f"signature  {p(bundle.signature.describe())}")
    if m.model.encryption is not None:
        enc = m.model.encryption
        print(f"encrypted  {p(m.model.file)}: {p(enc.algorithm)}, key {p(enc.key_id)}")
    return EXIT_OK
