"""Board-like environments for the agent, built once and cached under ``.cache/board-envs/``.

The tests in ``tests/test_board_envs.py`` run the agent in three places that look like a board
rather than like the developer's ``.venv``:

``agent``
    a virtualenv holding only ``edgeship[agent]``, installed from a wheel built from the working
    tree (not editable): numpy, paho-mqtt and onnxruntime, no torch.
``tflite``
    a virtualenv with ``numpy<2``, ``tflite-runtime==2.14.0`` (the last release; it needs numpy
    1.x) and the project without a runtime extra, as on a board that runs tflite-runtime.
``collector``
    not a board: the fleet server as a hub installs it, a virtualenv holding only
    ``edgeship[collector]`` from the same wheel, no ML library
    (``tests/test_collector_install.py``).
``pi``
    an emulated Raspberry Pi 4: Debian bookworm's arm64 Python 3.11 (the Python of Raspberry Pi
    OS bookworm) unpacked into a sysroot and run by Debian's ``qemu-aarch64-static``, with aarch64
    wheels of the agent's dependencies and the agent's wheel on ``PYTHONPATH``.
``pi-tflite``
    the same emulated Pi with a second site of aarch64 wheels: ``numpy<2`` and
    ``tflite-runtime==2.14.0`` instead of onnxruntime (``pi_python(site=pi_tflite_site())``).

Not an environment but fetched and cached the same way (:func:`pretrained_tflite`): pretrained
float ``.tflite`` models (MediaPipe's iris landmark and short-range face detector, from the
``mediapipe`` wheel, Apache 2.0) and photos (scikit-image's bundled sample images, CC0 or public
domain), taken out of the two wheels that ``pip download --no-deps`` fetches once; the wheels
themselves are not kept.

ONNX Runtime reads ``/proc/cpuinfo`` when it is imported and crashes (SIGSEGV) on an x86 one, so
the emulated Python must see an Arm cpuinfo. Two ways, chosen by :func:`cpuinfo_method`:

``mount``
    ``unshare -m`` and a bind mount of the Pi 4 fixture over ``/proc/cpuinfo`` in that private
    mount namespace (needs CAP_SYS_ADMIN, i.e. root in this container);
``sysroot``
    qemu's ``-L`` prefix: qemu looks up every absolute path the guest opens under the prefix
    first, so a sysroot holding ``proc/cpuinfo`` serves the fixture to the guest alone. Needs no
    privilege; used when ``unshare -m`` is not permitted.

Under both, a program the guest starts (``subprocess`` of its own ``sys.executable``: the agent's
candidate timing process) does not run: qemu-user 7.2 hands ``execve`` of an aarch64 file to the
host kernel, which refuses it (``ENOEXEC``, "Exec format error") unless binfmt_misc sends aarch64
ELF files to qemu, as the package qemu-user-binfmt does on a host (and as a Pi needs not). A third
method, never chosen by default, does that for the emulated Pi alone:

``binfmt``
    ``unshare --user --map-root-user -m``: in a new user namespace a private binfmt_misc
    instance (Linux >= 6.7; the host's registrations are neither read nor changed) sends aarch64
    ELF files to ``qemu-aarch64-static`` (flag ``F``), ``QEMU_LD_PREFIX`` names the sysroot, and
    the fixture is bind-mounted over ``/proc/cpuinfo`` as in ``mount``. Every aarch64 program
    the guest starts runs emulated too, with the same cpuinfo. :func:`binfmt_works` says whether
    the kernel and the container permit it.

Nothing is installed outside ``.cache/``: Debian packages are fetched with ``apt-get`` using a
private source list and state directory and unpacked with ``dpkg-deb``; Python packages come
from the configured package index through ``pip``. Each step records a key of what it was built
from (package lists, ``pyproject.toml``, the project's source) and is rebuilt when that changes,
so a second run costs a few hash computations. A missing prerequisite raises
:class:`SetupError` saying what to do.

Command line (run it with the repository's ``.venv/bin/python``)::

    python scripts/board_envs.py setup [agent] [tflite] [collector] [pi] [pi-tflite] [promtool]
    python scripts/board_envs.py setup pretrained-tflite  # MediaPipe .tflite models, photos
    python scripts/board_envs.py pi-python [--method mount|sysroot|binfmt]  # the Pi prefix
    python scripts/board_envs.py pi -- -m device_agent.cli check BUNDLE
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the TOML parser pip vendors
    from pip._vendor import tomli as tomllib

__all__ = [
    "CACHE",
    "PI_PACKAGES",
    "ROOT",
    "SetupError",
    "agent_venv",
    "binfmt_works",
    "collector_venv",
    "cpuinfo_method",
    "pi4_cpuinfo",
    "pi_emulator",
    "pi_env",
    "pi_interpreter",
    "pi_python",
    "pi_tflite_site",
    "pi_wheelhouse",
    "pretrained_tflite",
    "project_wheel",
    "tflite_venv",
    "venv_python",
]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "board-envs"

CpuinfoMethod = Literal["mount", "sysroot", "binfmt"]

# Raspberry Pi OS bookworm is Debian bookworm: same Python (3.11.2) and glibc (2.36).
DEBIAN_SOURCES = (
    "http://deb.debian.org/debian bookworm main",
    "http://deb.debian.org/debian bookworm-updates main",
    "http://deb.debian.org/debian-security bookworm-security main",
)
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
QEMU_PACKAGE = "qemu-user-static"
PROMETHEUS_PACKAGE = "prometheus"
# python3.11-minimal and libpython3.11-stdlib with the libraries their extension modules link
# (the agent needs ssl, ctypes, hashlib, lzma/bz2/zlib, json, sqlite3 is there for a spool).
PI_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "libexpat1",
    "zlib1g",
    "libffi8",
    "libssl3",
    "libsqlite3-0",
    "libbz2-1.0",
    "liblzma5",
    "libcrypt1",
    "libuuid1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
)
PI_PYTHON = "usr/bin/python3.11"
# binfmt_misc's match for an aarch64 ELF executable or shared object (e_ident, e_type, e_machine
# EM_AARCH64); the mask lets e_type be 2 or 3. Written to the register file as \xHH escapes.
AARCH64_ELF_MAGIC = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00"
AARCH64_ELF_MASK = b"\xff" * 7 + b"\x00" + b"\xff" * 8 + b"\xfe\xff\xff\xff"
BINFMT_NAME = "edgeship-pi-aarch64"
# Modules the emulated Python must import before the sysroot counts as built.
PI_STDLIB_PROBE = "import ssl, ctypes, hashlib, lzma, bz2, zlib, json, sqlite3, uuid, decimal"
# Wheels a bookworm Pi can install: manylinux up to its glibc 2.36.
PI_PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{m}_aarch64" for m in range(17, 37)))

TFLITE_RUNTIME = "tflite-runtime==2.14.0"
OLD_NUMPY = "numpy<2"
# A real pretrained float .tflite and real photos, each from a pinned wheel (pretrained_tflite).
MEDIAPIPE_WHEEL = "mediapipe==0.10.14"
PRETRAINED_TFLITE = {  # name: path under mediapipe/modules/ in that wheel
    "iris_landmark": "iris_landmark/iris_landmark.tflite",
    "face_detector": "face_detection/face_detection_short_range.tflite",
}
PHOTOS_WHEEL = "scikit-image==0.24.0"
PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
)

# Where the Pi 4 /proc/cpuinfo fixture lives (the first that exists is used).
PI4_CPUINFO_CANDIDATES = (
    ROOT / "tests" / "fixtures" / "pi4" / "proc" / "cpuinfo",
    ROOT / "tests" / "fixtures" / "pi4-cpuinfo.txt",
)

_PROJECT_FILES = ("pyproject.toml", "README.md")
_PROJECT_PACKAGES = ("collector", "device_agent", "sdk")
_STAMP = ".board-envs-key"
_KEEP_UNUSED_S = 3600.0


class SetupError(RuntimeError):
    """A board environment cannot be built; the message says what is missing and what to do."""


def _log(message: str) -> None:
    print(f"board-envs: {message}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str | Path], *, what: str, cwd: Path | None = None) -> str:
    """Run ``cmd``; on failure raise SetupError with ``what`` and the end of its output."""
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise SetupError(f"{what}: {args[0]} is not installed ({exc})") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SetupError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(args)}\n{tail}".rstrip()
        )
    return proc.stdout


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


_lock_depth = 0


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time across processes (two test runs may share a checkout).

    Re-entrant within a process: a build may need another (the qemu build needs the lists).
    """
    global _lock_depth
    if _lock_depth:
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _lock_depth = 1
        try:
            yield
        finally:
            _lock_depth = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached(target: Path, key: str, build: Callable[[Path], None], *, what: str) -> Path:
    """Build ``target`` with ``build`` unless its stamp already records ``key``.

    The directory is emptied first and the stamp written last, so an interrupted build is
    redone. Builds happen in place because virtualenvs cannot be moved after creation.
    """
    stamp = target / _STAMP
    if stamp.is_file() and stamp.read_text() == key:
        stamp.touch()  # in use: keeps a keyed version from being pruned
        return target
    with _locked():
        if stamp.is_file() and stamp.read_text() == key:
            return target
        started = time.monotonic()
        _log(f"building {what} in {target.relative_to(ROOT)} ...")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        build(target)
        stamp.write_text(key)
        _log(f"built {what} in {time.monotonic() - started:.1f} s")
    return target


def _cached_version(parent: Path, key: str, build: Callable[[Path], None], *, what: str) -> Path:
    """Like :func:`_cached` in ``parent/key``, for what depends on the project's source.

    The source changes with every edit, and another test run may still be using the previous
    version, so versions live side by side; those unused for ``_KEEP_UNUSED_S`` are removed
    when a new one is built.
    """
    target = _cached(parent / key, key, build, what=what)
    now = time.time()
    for other in parent.iterdir():
        if other == target or not other.is_dir():
            continue
        stamp = other / _STAMP
        last_used = stamp.stat().st_mtime if stamp.is_file() else other.stat().st_mtime
        if now - last_used > _KEEP_UNUSED_S:
            shutil.rmtree(other, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# The project as a wheel, and the x86_64 virtualenvs


def _project_sources() -> list[Path]:
    files = [ROOT / name for name in _PROJECT_FILES if (ROOT / name).is_file()]
    for package in _PROJECT_PACKAGES:
        files += sorted(
            p
            for p in (ROOT / package).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        )
    return files


def _source_key() -> str:
    digest = hashlib.sha256()
    for path in _project_sources():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        data: dict[str, object] = tomllib.load(fh)
    return data


def _requirements(extra: str | None = None) -> list[str]:
    """The project's base dependencies, plus those of ``extra``, from ``pyproject.toml``."""
    project = _pyproject().get("project")
    if not isinstance(project, dict):
        raise SetupError("pyproject.toml has no [project] table")
    reqs = [str(r) for r in project.get("dependencies", [])]
    if extra is not None:
        extras = project.get("optional-dependencies", {})
        if not isinstance(extras, dict) or extra not in extras:
            raise SetupError(f"pyproject.toml has no optional dependency group {extra!r}")
        reqs += [str(r) for r in extras[extra]]
    return reqs


def _pip() -> list[str]:
    """pip of the Python running this script (the repository's .venv)."""
    try:
        import pip  # noqa: F401
    except ImportError as exc:
        raise SetupError(
            f"{sys.executable} has no pip; run this with the repository's .venv/bin/python"
        ) from exc
    return [sys.executable, "-m", "pip"]


def project_wheel() -> Path:
    """A wheel of the working tree (``device_agent`` and ``sdk``), rebuilt when a source changes.

    It is built from a copy of the sources so that setuptools' ``build/`` and ``*.egg-info``
    stay out of the checkout.
    """
    key = _source_key()

    def build(target: Path) -> None:
        src = CACHE / "build" / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for path in _project_sources():
            dest = src / path.relative_to(ROOT)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        base = [*_pip(), "wheel", "--quiet", "--no-deps", "-w", str(target), str(src)]
        try:
            # setuptools from .venv: no download, a few seconds.
            _run([*base, "--no-build-isolation"], what="building the edgeship wheel")
        except SetupError:
            _run(base, what="building the edgeship wheel (isolated build)")
        shutil.rmtree(src, ignore_errors=True)

    out = _cached_version(CACHE / "wheels", key, build, what="the edgeship wheel")
    wheels = sorted(out.glob("edgeship-*.whl"))
    if len(wheels) != 1:
        raise SetupError(f"expected one edgeship wheel in {out}, found {wheels}")
    return wheels[0]


def _base_python() -> Path:
    """The interpreter the .venv was made from; new virtualenvs are made from it too."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(base)


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _install_offline_first(python: Path, args: Sequence[str], download: Sequence[str]) -> None:
    """``pip install args`` from the local wheelhouse; on a miss download ``download`` and retry.

    The wheelhouse (``.cache/board-envs/wheelhouse``) makes a rebuilt virtualenv cost no network.
    """
    wheelhouse = CACHE / "wheelhouse"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    install = [
        *_pip(),
        "--python",
        str(python),
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        str(wheelhouse),
        *args,
    ]
    try:
        _run(install, what="installing from the local wheelhouse")
        return
    except SetupError:
        pass
    _log(f"downloading {' '.join(download)} into the wheelhouse")
    _run(
        [*_pip(), "download", "--quiet", "--only-binary=:all:", "-d", str(wheelhouse), *download],
        what=f"downloading {' '.join(download)} from the package index (is it reachable?)",
    )
    _run(install, what=f"pip install {' '.join(args)}")


def _new_venv(target: Path) -> Path:
    _run([_base_python(), "-m", "venv", "--without-pip", target], what="creating a virtualenv")
    return venv_python(target)


def agent_venv() -> Path:
    """A virtualenv with only ``edgeship[agent]`` (wheel install, no torch); returns its root."""
    wheel = project_wheel()
    key = _digest("agent-v1", str(_base_python()), wheel.parent.name, *_requirements("agent"))

    def build(target: Path) -> None:
        python = _new_venv(target)
        _install_offline_first(python, [f"{wheel}[agent]"], _requirements("agent"))

    return _cached_version(CACHE / "agent-venv", key, build, what="the agent-only virtualenv")


def collector_venv() -> Path:
    """A virtualenv with only ``edgeship[collector]`` (wheel install, no ML library); returns its
    root. The fleet server as it is installed on a hub: ``tests/test_collector_install.py`` proves
    torch, onnx, onnxruntime and scikit-learn are not importable there and the collector runs."""
    wheel = project_wheel()
    reqs = _requirements("collector")
    key = _digest("collector-v1", str(_base_python()), wheel.parent.name, *reqs)

    def build(target: Path) -> None:
        python = _new_venv(target)
        _install_offline_first(python, [f"{wheel}[collector]"], reqs)

    return _cached_version(
        CACHE / "collector-venv", key, build, what="the collector-only virtualenv"
    )


def tflite_venv() -> Path:
    """A virtualenv with numpy<2, tflite-runtime 2.14.0 and the project without runtime extra."""
    wheel = project_wheel()
    base = [r for r in _requirements() if not r.replace(" ", "").startswith("numpy")]
    reqs = [OLD_NUMPY, TFLITE_RUNTIME, *base]
    key = _digest("tflite-v1", str(_base_python()), wheel.parent.name, *reqs)

    def build(target: Path) -> None:
        python = _new_venv(target)
        _install_offline_first(python, reqs, reqs)
        _run(
            [*_pip(), "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
            what="installing the edgeship wheel without dependencies",
        )

    return _cached_version(
        CACHE / "tflite-venv", key, build, what="the numpy<2 + tflite-runtime venv"
    )


# ---------------------------------------------------------------------------------------------
# The emulated Raspberry Pi


def _host_deb_arch() -> str:
    arch = _run(["dpkg", "--print-architecture"], what="asking dpkg for the host architecture")
    return arch.strip()


def _apt_options() -> list[str]:
    """apt-get options for a private source list, state and cache under .cache/.

    The system's apt configuration is read but nothing of its state is changed: no
    ``dpkg --add-architecture``, no system ``apt-get update``.
    """
    apt = CACHE / "apt"
    return [
        "-o",
        f"Dir::State::Lists={apt / 'lists'}",
        "-o",
        f"Dir::Cache={apt / 'cache'}",
        "-o",
        f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o",
        f"Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        "-o",
        f"Dir::Etc::Preferences={apt / 'preferences'}",
        "-o",
        f"Dir::Etc::PreferencesParts={apt / 'preferences.d'}",
        "-o",
        f"APT::Architecture={_host_deb_arch()}",
        "-o",
        "APT::Architectures::=amd64",
        "-o",
        "APT::Architectures::=arm64",
        "-o",
        "APT::Sandbox::User=root",
        "-o",
        "Debug::NoLocking=1",
        "-q",
    ]


def _apt_lists() -> Path:
    """Package lists of bookworm for amd64 and arm64, refreshed once a day at most."""
    apt = CACHE / "apt"
    if not DEBIAN_KEYRING.is_file():
        raise SetupError(
            f"{DEBIAN_KEYRING} is missing; install Debian's keyring: apt-get install "
            "debian-archive-keyring"
        )
    sources = "".join(
        f"deb [arch=amd64,arm64 signed-by={DEBIAN_KEYRING}] {line}\n" for line in DEBIAN_SOURCES
    )
    key = _digest("apt-v1", sources, time.strftime("%Y-%m-%d"))

    def build(target: Path) -> None:
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (target / sub).mkdir(parents=True, exist_ok=True)
        (target / "sources.list").write_text(sources)
        # apt-get update exits 0 when a fetch fails unless told otherwise.
        _run(
            ["apt-get", *_apt_options(), "--error-on=any", "update"],
            what="apt-get update of the private bookworm lists (is deb.debian.org reachable?)",
        )

    return _cached(apt, key, build, what="Debian bookworm package lists (amd64, arm64)")


def _apt_download(packages: Sequence[str], dest: Path) -> list[Path]:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError(
            "the emulated Pi is built from Debian packages and needs apt-get and dpkg-deb "
            "(a Debian or Ubuntu host)"
        )
    if _host_deb_arch() != "amd64":
        raise SetupError(
            f"the emulated Pi is set up for amd64 hosts, this one is {_host_deb_arch()}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", *_apt_options(), "download", *packages]
    what = f"apt-get download {' '.join(packages)} (is deb.debian.org reachable?)"
    try:
        _apt_lists()
        _run(download, what=what, cwd=dest)
    except SetupError:
        # Lists older than a security update name .debs the archive no longer has.
        _log("refreshing the package lists and downloading again")
        (CACHE / "apt" / _STAMP).unlink(missing_ok=True)
        _apt_lists()
        _run(download, what=what, cwd=dest)
    return sorted(dest.glob("*.deb"))


def qemu_aarch64() -> Path:
    """Debian bookworm's ``qemu-aarch64-static``, unpacked under .cache/ (no binfmt needed)."""
    # Only the aarch64 emulator: the package holds ~30 of them (60 MB).
    key = _digest("qemu-v1", QEMU_PACKAGE)
    return _one_binary(QEMU_PACKAGE, "qemu-aarch64-static", CACHE / "qemu", key)


def promtool() -> Path:
    """Prometheus's ``promtool`` from Debian bookworm's ``prometheus`` package, unpacked under
    .cache/: the tests lint the collector's ``/metrics`` with it (``promtool check metrics``)."""
    if shutil.which("promtool") is not None:
        return Path(str(shutil.which("promtool")))
    # The server is not needed, only its linter.
    key = _digest("promtool-v1", PROMETHEUS_PACKAGE)
    return _one_binary(PROMETHEUS_PACKAGE, "promtool", CACHE / "promtool", key)


def prometheus() -> Path:
    """The Prometheus server from Debian bookworm's ``prometheus`` package, unpacked under
    .cache/: tests scrape several collectors with it and query its HTTP API
    (``tests/test_collector_leader.py``). Only the binary: the API needs no web UI files."""
    if shutil.which("prometheus") is not None:
        return Path(str(shutil.which("prometheus")))
    key = _digest("prometheus-v1", PROMETHEUS_PACKAGE)
    return _one_binary(PROMETHEUS_PACKAGE, "prometheus", CACHE / "prometheus", key)


def _one_binary(package: str, binary: str, cache: Path, key: str) -> Path:
    """``usr/bin/<binary>`` alone, unpacked under ``cache`` from Debian's amd64 ``package``
    (the .debs are deleted once the one file is out of them)."""

    def build(target: Path) -> None:
        debs = _apt_download([f"{package}:amd64"], target / "debs")
        unpack = target / "root"
        unpack.mkdir()
        for deb in debs:
            _run(
                [
                    "sh",
                    "-c",
                    'dpkg-deb --fsys-tarfile "$0" | tar -x -C "$1" "$2"',
                    deb,
                    unpack,
                    f"./usr/bin/{binary}",
                ],
                what=f"unpacking {binary} from {deb.name}",
            )
            deb.unlink()
        if not (unpack / "usr/bin" / binary).is_file():
            raise SetupError(f"{package} did not contain usr/bin/{binary}")

    target = _cached(cache, key, build, what=binary)
    return target / "root" / "usr" / "bin" / binary


def pi_root() -> Path:
    """An arm64 sysroot with Debian bookworm's Python 3.11 and the libraries it links."""
    key = _digest("pi-root-v1", *PI_PACKAGES)
    qemu = qemu_aarch64()

    def build(target: Path) -> None:
        debs = _apt_download([f"{p}:arm64" for p in PI_PACKAGES], CACHE / "pi-debs")
        for deb in debs:
            _run(["dpkg-deb", "-x", deb, target], what=f"unpacking {deb.name}")
        _run(
            [qemu, "-L", target, target / PI_PYTHON, "-c", PI_STDLIB_PROBE],
            what="running the arm64 Python under qemu",
        )
        shutil.rmtree(CACHE / "pi-debs", ignore_errors=True)

    return _cached(CACHE / "pi-root", key, build, what="the arm64 Python 3.11 sysroot")


def _pi_target_install(target: Path, reqs: Sequence[str]) -> None:
    """``pip install --target`` of aarch64 CPython 3.11 wheels of ``reqs`` (none built here)."""
    platforms = [arg for p in PI_PLATFORMS for arg in ("--platform", p)]
    _run(
        [
            *_pip(),
            "install",
            "--quiet",
            "--target",
            str(target),
            *platforms,
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            *reqs,
        ],
        what=f"downloading aarch64 wheels of {' '.join(reqs)}",
    )


def pi_site() -> Path:
    """aarch64 wheels of the agent's dependencies (``edgeship[agent]``), for the Pi's Python."""
    reqs = _requirements("agent")
    key = _digest("pi-site-v1", *reqs, *PI_PLATFORMS)
    return _cached(
        CACHE / "pi-site",
        key,
        lambda target: _pi_target_install(target, reqs),
        what="aarch64 wheels for the Pi",
    )


def pi_tflite_site() -> Path:
    """aarch64 wheels of numpy<2, tflite-runtime 2.14.0 and the project's base dependencies (no
    onnxruntime): the Pi's site for a board that runs tflite-runtime. Pass it to
    :func:`pi_python` as ``site``."""
    base = [r for r in _requirements() if not r.replace(" ", "").startswith("numpy")]
    reqs = [OLD_NUMPY, TFLITE_RUNTIME, *base]
    key = _digest("pi-tflite-site-v1", *reqs, *PI_PLATFORMS)
    return _cached(
        CACHE / "pi-tflite-site",
        key,
        lambda target: _pi_target_install(target, reqs),
        what="aarch64 wheels of numpy<2 and tflite-runtime for the Pi",
    )


def pi_agent() -> Path:
    """The project's wheel unpacked for the Pi (pure Python, so any platform's install works)."""
    wheel = project_wheel()
    key = _digest("pi-agent-v1", wheel.parent.name)

    def build(target: Path) -> None:
        _run(
            [*_pip(), "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
            what="unpacking the edgeship wheel for the Pi",
        )

    return _cached_version(CACHE / "pi-agent", key, build, what="the agent for the Pi")


def pi4_cpuinfo() -> Path:
    """The Raspberry Pi 4 ``/proc/cpuinfo`` fixture."""
    for candidate in PI4_CPUINFO_CANDIDATES:
        if candidate.is_file():
            return candidate
    names = " or ".join(str(c.relative_to(ROOT)) for c in PI4_CPUINFO_CANDIDATES)
    raise SetupError(f"no Raspberry Pi 4 cpuinfo fixture: expected {names}")


def _pi_overlay(cpuinfo: Path) -> Path:
    """A sysroot for qemu's ``-L`` that is ``pi-root`` plus ``proc/cpuinfo`` (sysroot method)."""
    root = pi_root()
    key = _digest("pi-overlay-v1", str(root), hashlib.sha256(cpuinfo.read_bytes()).hexdigest())

    def build(target: Path) -> None:
        for entry in sorted(root.iterdir()):
            if entry.name != _STAMP:
                (target / entry.name).symlink_to(entry)
        (target / "proc").mkdir()
        shutil.copyfile(cpuinfo, target / "proc" / "cpuinfo")

    name = f"pi-overlay-{hashlib.sha256(str(cpuinfo).encode()).hexdigest()[:8]}"
    return _cached(CACHE / name, key, build, what="the sysroot with a Pi 4 cpuinfo")


@functools.cache
def _mount_namespace_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--", "sh", "-c", 'mount --bind "$0" /proc/cpuinfo', str(pi4_cpuinfo())],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def cpuinfo_method() -> CpuinfoMethod:
    """``mount`` where ``unshare -m`` and a bind mount are permitted, else ``sysroot``."""
    return "mount" if _mount_namespace_works() else "sysroot"


def _escaped(data: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in data)


def _binfmt_rule(qemu: Path) -> str:
    """The line for binfmt_misc's ``register``: aarch64 ELF files run by ``qemu`` (flag F: the
    interpreter is opened when registered, so it need not be reachable from the guest)."""
    magic, mask = _escaped(AARCH64_ELF_MAGIC), _escaped(AARCH64_ELF_MASK)
    return f":{BINFMT_NAME}:M::{magic}:{mask}:{qemu}:F"


# Run by ``sh -c`` in the new user and mount namespaces: $0 the binfmt rule, $1 the cpuinfo file,
# then the command. The private binfmt_misc instance is mounted where the host's would be.
_BINFMT_SETUP = (
    "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc"
    ' && printf %s "$0" > /proc/sys/fs/binfmt_misc/register'
    ' && mount --bind "$1" /proc/cpuinfo && shift && exec "$@"'
)


def _binfmt_prefix(qemu: Path, root: Path, info: Path) -> list[str]:
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "-m",
        "--",
        "sh",
        "-c",
        _BINFMT_SETUP,
        _binfmt_rule(qemu),
        str(info),
    ]


@functools.cache
def binfmt_works() -> bool:
    """Whether the ``binfmt`` method runs here: an emulated Python starts its own
    ``sys.executable`` in a private binfmt_misc namespace (a user namespace may be refused by
    the container, and binfmt_misc has per-namespace instances since Linux 6.7)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = "import subprocess, sys; subprocess.run([sys.executable, '-S', '-c', ''], check=True)"
    root = pi_root()
    prefix = _binfmt_prefix(qemu_aarch64(), root, pi4_cpuinfo())
    cmd = [*prefix, "env", f"QEMU_LD_PREFIX={root}", str(root / PI_PYTHON)]
    done = subprocess.run([*cmd, "-S", "-c", probe], capture_output=True, check=False)
    return done.returncode == 0


def _pi_prefix(method: CpuinfoMethod | None, cpuinfo: Path | None, env: list[str]) -> list[str]:
    """qemu with the Pi's sysroot and ``/proc/cpuinfo`` by ``method``, after ``env``."""
    qemu = qemu_aarch64()
    root = pi_root()
    info = (cpuinfo or pi4_cpuinfo()).resolve()
    chosen = method or cpuinfo_method()
    if chosen == "mount":
        if not _mount_namespace_works():
            raise SetupError(
                "unshare -m with a bind mount over /proc/cpuinfo is not permitted here "
                "(needs root / CAP_SYS_ADMIN); use method='sysroot'"
            )
        return [
            "unshare",
            "-m",
            "--",
            "sh",
            "-c",
            'mount --bind "$0" /proc/cpuinfo && exec "$@"',
            str(info),
            *env,
            str(qemu),
            "-L",
            str(root),
        ]
    if chosen == "sysroot":
        return [*env, str(qemu), "-L", str(_pi_overlay(info))]
    if chosen == "binfmt":
        if not binfmt_works():
            raise SetupError(
                "a private binfmt_misc in a user namespace is not available here (needs Linux "
                ">= 6.7 and unshare --user permitted); use method='mount' or 'sysroot', under "
                "which an aarch64 program the guest starts does not run"
            )
        # The kernel runs qemu for the interpreter: no qemu in the command itself.
        return [*_binfmt_prefix(qemu, root, info), *env, f"QEMU_LD_PREFIX={root}"]
    raise SetupError(f"unknown cpuinfo method {chosen!r}; expected 'mount', 'sysroot' or 'binfmt'")


def pi_env() -> dict[str, Path]:
    """Build (or find) everything the emulated Pi needs; returns the parts by name."""
    return {
        "qemu": qemu_aarch64(),
        "root": pi_root(),
        "site": pi_site(),
        "agent": pi_agent(),
    }


def pi_python(
    method: CpuinfoMethod | None = None, cpuinfo: Path | None = None, site: Path | None = None
) -> list[str]:
    """The command prefix that runs Python 3.11 on the emulated Raspberry Pi 4.

    Append Python's own arguments (``-c CODE``, ``-m device_agent.cli check BUNDLE``, a script).
    ``device_agent`` (from the project's wheel), numpy, paho-mqtt and onnxruntime are importable;
    ``platform.machine()`` is ``aarch64`` and ``/proc/cpuinfo`` is ``cpuinfo`` (default: the
    Pi 4 fixture). The guest shares the host's network, so it can reach a broker on localhost.
    Run it with a working directory outside the checkout, or the checkout's ``device_agent``
    (the current directory comes first on ``sys.path``) would shadow the installed one.
    Only under ``method="binfmt"`` can the guest start its own ``sys.executable`` (see the
    module's docstring). ``site`` replaces the aarch64 wheels of :func:`pi_site` (onnxruntime)
    with another folder of them, e.g. :func:`pi_tflite_site`'s (tflite-runtime, numpy<2).
    """
    parts = pi_env()
    env = [
        "env",
        "-u",
        "PYTHONHOME",
        f"PYTHONPATH={parts['agent']}{os.pathsep}{site or parts['site']}",
        "PYTHONNOUSERSITE=1",
    ]
    return [*_pi_prefix(method, cpuinfo, env), str(parts["root"] / PI_PYTHON)]


def pi_interpreter() -> Path:
    """The emulated Pi's ``python3.11``: an aarch64 binary, run it through :func:`pi_emulator`."""
    return pi_root() / PI_PYTHON


def pi_emulator(method: CpuinfoMethod | None = None, cpuinfo: Path | None = None) -> list[str]:
    """The command prefix that runs an aarch64 program on the emulated Raspberry Pi 4.

    ``[*pi_emulator(), program, *args]`` is what binfmt_misc would do for ``program`` on a host
    set up for it: qemu with the Pi's sysroot and its ``/proc/cpuinfo`` (same methods as
    :func:`pi_python`; under ``binfmt`` the prefix holds no qemu: the kernel runs it, for the
    programs ``program`` starts too). Unlike :func:`pi_python` nothing is put on
    ``PYTHONPATH``: a Python started this way (e.g. a virtualenv's ``bin/python`` made from
    :func:`pi_interpreter`) sees only what was installed into it, as on a board.
    ``PYTHONPATH`` and ``PYTHONHOME`` of the caller are removed.
    """
    env = ["env", "-u", "PYTHONHOME", "-u", "PYTHONPATH", "PYTHONNOUSERSITE=1"]
    return _pi_prefix(method, cpuinfo, env)


def pi_wheelhouse() -> Path:
    """aarch64 wheel files of ``edgeship[agent]``'s dependencies and of pip, for the Pi's Python.

    A directory for ``pip install --no-index --find-links``: pip running on the emulated Pi
    installs from it offline, and ``pip-*.whl`` bootstraps pip into a virtualenv made without
    one (Debian's Python has no ``ensurepip`` unless python3-venv is installed).
    """
    reqs = [*_requirements("agent"), "pip"]
    key = _digest("pi-wheelhouse-v1", *reqs, *PI_PLATFORMS)

    def build(target: Path) -> None:
        platforms = [arg for p in PI_PLATFORMS for arg in ("--platform", p)]
        _run(
            [
                *_pip(),
                "download",
                "--quiet",
                "--dest",
                str(target),
                *platforms,
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                *reqs,
            ],
            what=f"downloading aarch64 wheels of {' '.join(reqs)}",
        )
        if not list(target.glob("pip-*.whl")):
            raise SetupError(f"pip download left no pip wheel in {target}")

    return _cached(CACHE / "pi-wheelhouse", key, build, what="aarch64 wheel files for the Pi")


# ---------------------------------------------------------------------------------------------
# A pretrained float .tflite and photos, from wheels


def pretrained_tflite() -> dict[str, Path]:
    """Pretrained float .tflite models from MediaPipe's wheel and scikit-image's photos, fetched
    once.

    Returns ``{"iris_landmark": .tflite, "face_detector": .tflite, "photos": folder of PHOTOS}``.
    The two pinned wheels are fetched with ``pip download --no-deps`` (pip's own cache makes a
    refetch cost no network), the files are taken out and the wheels deleted; afterwards
    nothing is fetched until the pins change. MediaPipe's models are Apache 2.0; the photos are
    CC0 or public domain (scikit-image's ``skimage.data`` docstrings). ``iris_landmark``: a
    64x64x3 eye crop in [0, 1] to 71 eye-contour and 5 iris landmarks (x, y, z in the crop's
    pixels), float32 weights; ``face_detector`` (short range): 128x128x3 in [-1, 1] to 896
    anchors' box regressors and face scores, float16 weights behind DEQUANTIZE ops.
    """
    import zipfile

    files = {name: f"mediapipe/modules/{member}" for name, member in PRETRAINED_TFLITE.items()}
    key = _digest("pretrained-tflite-v1", MEDIAPIPE_WHEEL, PHOTOS_WHEEL, *files.values(), *PHOTOS)
    target = CACHE / "pretrained-tflite"
    wanted = {member: target / Path(member).name for member in files.values()}
    wanted |= {f"skimage/data/{name}": target / "photos" / name for name in PHOTOS}

    def build(target: Path) -> None:
        wheels = target / "wheels"
        download = [*_pip(), "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        for req in (MEDIAPIPE_WHEEL, PHOTOS_WHEEL):
            _run(
                [*download, "-d", str(wheels), req],
                what=f"downloading {req} from the package index (is it reachable?)",
            )
        (target / "photos").mkdir()
        missing = dict(wanted)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                for member in set(zf.namelist()) & set(missing):
                    missing.pop(member).write_bytes(zf.read(member))
        if missing:
            raise SetupError(f"not found in the downloaded wheels: {sorted(missing)}")
        shutil.rmtree(wheels)

    _cached(target, key, build, what="pretrained .tflite models and photos")
    out = {name: wanted[member] for name, member in files.items()}
    return {**out, "photos": target / "photos"}


# ---------------------------------------------------------------------------------------------
# Command line

_SETUPS: dict[str, Callable[[], object]] = {
    "agent": agent_venv,
    "tflite": tflite_venv,
    "collector": collector_venv,
    "pi": pi_env,
    "pi-tflite": pi_tflite_site,
    "pretrained-tflite": pretrained_tflite,
    "promtool": promtool,
}


def _describe() -> dict[str, str]:
    return {
        "host": f"{platform.machine()}, Python {platform.python_version()}",
        "cache": str(CACHE),
        "cpuinfo_method": cpuinfo_method(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="board_envs.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    setup = sub.add_parser("setup", help="build (or check) the cached environments")
    setup.add_argument(
        "envs",
        nargs="*",
        metavar="ENV",
        help="agent, tflite, collector, pi, pi-tflite, pretrained-tflite, promtool (default: all)",
    )
    pi_prefix = sub.add_parser("pi-python", help="print the emulated-Pi Python command prefix")
    methods = ["mount", "sysroot", "binfmt"]
    pi_prefix.add_argument("--method", choices=methods, default=None)
    run = sub.add_parser("pi", help="run the emulated Pi's Python with the given arguments")
    run.add_argument("--method", choices=methods, default=None)
    run.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            unknown = sorted(set(args.envs) - set(_SETUPS))
            if unknown:
                parser.error(f"unknown environments {unknown}; choose from {list(_SETUPS)}")
            timings = {}
            for name in args.envs or list(_SETUPS):
                started = time.monotonic()
                _SETUPS[name]()
                timings[name] = round(time.monotonic() - started, 1)
            print(json.dumps({"seconds": timings, **_describe()}, indent=2))
            return 0
        prefix = pi_python(args.method)
        if args.command == "pi-python":
            print(shlex.join(prefix))
            return 0
        extra = args.args[1:] if args.args[:1] == ["--"] else args.args
        return subprocess.run([*prefix, *extra], check=False).returncode
    except SetupError as exc:
        print(f"board_envs.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
