"""The collector as a fleet server gets it: a virtualenv with only ``edgeship[collector]``.

``tests/test_collector_install.py`` runs ``edgeship collect`` and ``edgeship-collector`` in it,
away from the developer's ``.venv``, to prove the collector's extra pulls no ML library
(torch, onnx, onnxruntime, scikit-learn) and that the collector runs on what it does pull.

What is built, under ``.cache/collector-env/`` (git-ignored), as ``scripts/board_envs.py`` does
for the agent-only environment:

``wheels/<key>/``
    a wheel of the working tree (``pip wheel`` of a copy of ``pyproject.toml``, ``README.md``
    and the packages, so no ``build/`` or ``*.egg-info`` lands in the checkout);
``venv/<key>/``
    a virtualenv from the ``.venv``'s base interpreter with ``pip install '<wheel>[collector]'``
    (pip run from ``.venv`` with ``--python``: the new venv needs no pip of its own).

Both are keyed by what they were built from (the sources, the extra's requirements, the
interpreter) and rebuilt when that changes; versions unused for an hour are removed when a new
one is built. Dependencies come from the configured package index through pip (its own cache
makes a rebuild cheap). A missing prerequisite raises :class:`SetupError` saying what failed.

Command line (run it with the repository's ``.venv/bin/python``)::

    python scripts/collector_env.py        # build if needed, print the venv's path
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the TOML parser pip vendors
    from pip._vendor import tomli as tomllib

__all__ = ["CACHE", "ROOT", "SetupError", "collector_venv", "project_wheel", "venv_python"]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "collector-env"

_PROJECT_FILES = ("pyproject.toml", "README.md")
_PROJECT_PACKAGES = ("collector", "device_agent", "sdk")
_STAMP = ".collector-env-key"
_KEEP_UNUSED_S = 3600.0


class SetupError(RuntimeError):
    """The environment cannot be built; the message says which step failed and why."""


def _log(message: str) -> None:
    print(f"collector-env: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str | Path], *, what: str) -> None:
    """Run ``cmd``; on failure raise SetupError with ``what`` and the end of its output."""
    args = [str(c) for c in cmd]
    proc = subprocess.run(
        args, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SetupError(f"{what} failed (exit {proc.returncode}): {shlex.join(args)}\n{tail}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time across processes (two test runs may share a checkout)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(parent: Path, key: str, build: Callable[[Path], None], *, what: str) -> Path:
    """``parent/key``, built by ``build`` unless its stamp records ``key``; the stamp is written
    last, so an interrupted build is redone. Stale siblings are pruned after a build."""
    target = parent / key
    stamp = target / _STAMP
    if stamp.is_file() and stamp.read_text() == key:
        stamp.touch()  # in use: keeps this version from being pruned
        return target
    with _locked():
        if not (stamp.is_file() and stamp.read_text() == key):
            started = time.monotonic()
            _log(f"building {what} in {target.relative_to(ROOT)} ...")
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            stamp.write_text(key)
            _log(f"built {what} in {time.monotonic() - started:.1f} s")
        now = time.time()
        for other in parent.iterdir():
            other_stamp = other / _STAMP
            if other != target and other.is_dir():
                used = (other_stamp if other_stamp.is_file() else other).stat().st_mtime
                if now - used > _KEEP_UNUSED_S:
                    shutil.rmtree(other, ignore_errors=True)
    return target


def _sources() -> list[Path]:
    files = [ROOT / name for name in _PROJECT_FILES]
    for package in _PROJECT_PACKAGES:
        files += sorted(
            p
            for p in (ROOT / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    return files


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _source_key() -> str:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _collector_requirements() -> list[str]:
    """The base dependencies and the ``collector`` extra's, from ``pyproject.toml``."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh).get("project", {})
    extras = project.get("optional-dependencies", {})
    if "collector" not in extras:
        raise SetupError("pyproject.toml has no optional dependency group 'collector'")
    return [str(r) for r in [*project.get("dependencies", []), *extras["collector"]]]


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def project_wheel() -> Path:
    """A wheel of the working tree, rebuilt when a source changes."""

    def build(target: Path) -> None:
        src = CACHE / "build" / "src"
        shutil.rmtree(src, ignore_errors=True)
        for path in _sources():
            dest = src / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        base = [*_pip(), "wheel", "--quiet", "--no-deps", "-w", str(target), str(src)]
        try:  # setuptools from .venv: no download
            _run([*base, "--no-build-isolation"], what="building the edgeship wheel")
        except SetupError:
            _run(base, what="building the edgeship wheel (isolated build)")
        shutil.rmtree(src, ignore_errors=True)

    out = _cached(CACHE / "wheels", _source_key(), build, what="the edgeship wheel")
    wheels = sorted(out.glob("edgeship-*.whl"))
    if len(wheels) != 1:
        raise SetupError(f"expected one edgeship wheel in {out}, found {wheels}")
    return wheels[0]


def collector_venv() -> Path:
    """A virtualenv with only ``edgeship[collector]`` installed from a wheel; returns its root."""
    wheel = project_wheel()
    base = Path(getattr(sys, "_base_executable", None) or sys.executable)
    key = _digest("collector-v1", str(base), wheel.parent.name, *_collector_requirements())

    def build(target: Path) -> None:
        _run([base, "-m", "venv", "--without-pip", target], what="creating a virtualenv")
        _run(
            [*_pip(), "--python", venv_python(target), "install", "--quiet",
             f"{wheel}[collector]"],
            what="pip install 'edgeship[collector]' (is the package index reachable?)",
        )  # fmt: skip

    return _cached(CACHE / "venv", key, build, what="the collector-only virtualenv")


if __name__ == "__main__":
    try:
        print(collector_venv())
    except SetupError as exc:
        sys.exit(f"collector-env: {exc}")
