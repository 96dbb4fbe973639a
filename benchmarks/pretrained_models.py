#!/usr/bin/env python
"""Try ``edgeship`` as a new user would, on real pretrained ONNX models that ship in PyPI wheels.

Models (each chosen for inputs unlike an image classifier's):

* ``magika`` (Google's file-type detector): one ``int32`` input ``bytes`` of shape
  ``(batch, 2048)`` holding byte values 0..255 and the padding token 256;
* ``silero-vad`` (voice activity detection): ``input`` float ``(batch, 576)`` audio, a recurrent
  ``state`` float ``(2, batch, 128)`` whose batch axis is the SECOND one, and ``sr``, an ``int64``
  scalar (rank 0) sample rate; the graph is an ``If`` on ``sr`` with both branches in subgraphs;
* ``rapidocr-onnxruntime`` (PaddleOCR v4): text detection ``x`` float ``(N, 3, H, W)`` with
  dynamic H and W, text recognition ``(N, 3, 48, W)`` with a CTC output over 6625 characters,
  and the 0/180 degree line classifier ``(N, 3, H, W)``.

Nothing is downloaded at run time. Get the models once, with pip's ordinary client, then
point this script at them (or install the packages in the environment that runs it)::

    pip download --no-deps magika silero-vad rapidocr-onnxruntime -d wheels/
    for w in wheels/*.whl; do unzip -q -o "$w" -d pkgs/; done
    python benchmarks/pretrained_models.py --packages pkgs/ --json pretrained.json

The data is made on this machine, the way each package's own code prepares it:

* magika: files found on this machine (Python sources, C headers, JSON, XML, HTML, PNG, GIF,
  ELF shared objects, gzip, zip, shell, CSS, JS, YAML, .pyc, ...) turned into features exactly as
  ``magika.Magika._extract_features_from_seekable`` does (first/last 1024 stripped bytes, padded
  with 256); labels are the magika class the file extension implies (so fp32 accuracy is < 100%);
* silero-vad: speech synthesised with ``espeak-ng`` (if installed; else a synthetic voiced
  signal) in several voices, resampled to 16 kHz, between stretches of low noise; streamed in
  512-sample chunks with 64 samples of context and the recurrent state carried over, as
  ``silero_vad.utils_vad.OnnxWrapper`` does; each chunk's state input is the fp32 model's;
* rapidocr: text rendered with PIL in the DejaVu fonts (lines for rec/cls, pages for det),
  normalised as ``rapidocr_onnxruntime``'s pre-processing does.

For every model the script runs the ``edgeship`` CLI (``bench``, ``quantize`` static and
dynamic, ``optimize``) and records exit codes, messages and figures, then checks every int8
model it got against the fp32 one with a task metric (top-1 agreement; streaming speech
probability error; CTC-decoded text; detection-mask IoU). Where edgeship cannot take a model's
inputs, a documented workaround model is also tried (silero-vad with the state transposed to
batch-first and ``sr`` baked in).

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# locating the models (no downloads: installed packages or unzipped wheels only)


def find_package_dir(package: str, search: Sequence[Path]) -> Path | None:
    """The directory of ``package``: in an unzipped-wheel folder, else installed (not imported)."""
    for root in search:
        for sub in [root / package, *sorted(root.glob(f"*/{package}"))]:  # pkgs/<dist>/<pkg>
            if (sub / "__init__.py").is_file():
                return sub
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return None


def dist_version(package_dir: Path, dist: str) -> str:
    """The distribution's version from its .dist-info next to the package (wheel or install)."""
    norm = dist.replace("-", "_").lower()
    for info in package_dir.parent.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        if name.lower().replace("-", "_") == norm:
            return version
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------------
# running the CLI


@dataclass
class Step:
    name: str
    argv: list[str]
    rc: int
    seconds: float
    stdout: str
    stderr: str
    report: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "command": " ".join(_quote(a) for a in self.argv),
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "stdout": self.stdout,
            "stderr": self.stderr,
            "report": self.report,
        }


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w./:=,-]+", arg) else repr(arg)


def _clean(text: str) -> str:
    """Drop progress-bar redraws (carriage returns) and ONNX Runtime's colour codes."""
    lines = []
    for line in text.splitlines():
        line = line.split("\r")[-1]
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def edgeship(name: str, args: list[str], *, json_out: Path | None = None) -> Step:
    argv = ["edgeship", *args]
    cmd = [sys.executable, "-m", "sdk.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    step = Step(
        name,
        argv,
        proc.returncode,
        time.perf_counter() - t0,
        _clean(proc.stdout),
        _clean(proc.stderr),
    )
    if json_out is not None and json_out.exists():
        step.report = json.loads(json_out.read_text())
    print(f"  [{name}] rc={step.rc} ({step.seconds:.0f} s)", flush=True)
    for line in (step.stdout + "\n" + step.stderr).strip().splitlines()[-40:]:
        print(f"      {line}")
    return step


# --------------------------------------------------------------------------------------------
# onnxruntime helpers for the independent checks


def session(path: Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def describe_inputs(path: Path) -> list[dict[str, Any]]:
    s = session(path, 1)
    return [{"name": i.name, "type": i.type, "shape": list(i.shape)} for i in s.get_inputs()]


def describe_outputs(path: Path) -> list[dict[str, Any]]:
    s = session(path, 1)
    return [{"name": o.name, "type": o.type, "shape": list(o.shape)} for o in s.get_outputs()]


def run_batched(path: Path, feed: dict[str, np.ndarray], batch: int = 32) -> list[np.ndarray]:
    s = session(path)
    n = len(next(iter(feed.values())))
    parts: list[list[np.ndarray]] = []
    for lo in range(0, n, batch):
        outs = s.run(None, {k: v[lo : lo + batch] for k, v in feed.items()})
        parts.append(outs)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


# --------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    name: str
    package: str
    version: str
    model: Path
    cal: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    data_note: str
    check: Callable[[Path, Path], dict[str, Any]]
    budget: str
    labels: str | None = None
    notes: list[str] = field(default_factory=list)
    # more `edgeship optimize` runs: (label, eval data or None for no --eval, budget)
    extra: list[tuple[str, dict[str, np.ndarray] | None, str]] = field(default_factory=list)
    # recipes the CLI cannot express, tried through the Python API (sdk.quantize.QuantizeConfig)
    probes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # `edgeship bench --shape` values for inputs with dynamic dimensions other than the batch
    bench_shapes: list[str] = field(default_factory=list)


# ---- magika ---------------------------------------------------------------------------------

# extension -> magika content type (standard_v3_3 label space)
MAGIKA_EXT = {
    "py": "python",
    "c": "c",
    "h": "c",
    "json": "json",
    "xml": "xml",
    "html": "html",
    "png": "png",
    "gif": "gif",
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "pdf": "pdf",
    "so": "elf",
    "gz": "gzip",
    "zip": "zip",
    "whl": "zip",
    "sh": "shell",
    "md": "markdown",
    "csv": "csv",
    "js": "javascript",
    "css": "css",
    "toml": "toml",
    "yaml": "yaml",
    "yml": "yaml",
    "pyc": "pythonbytecode",
    "npy": "npy",
    "rst": "rst",
    "ini": "ini",
    "svg": "svg",
    "ico": "ico",
    "wav": "wav",
    "tar": "tar",
    "bz2": "bzip",
    "xz": "xz",
    "ttf": "ttf",
    "pem": "pem",
    "pl": "perl",
    "cpp": "cpp",
    "txt": "txt",
}


def magika_features(data: bytes, beg: int, end: int, pad: int, block: int) -> list[int]:
    """``Magika._extract_features_from_seekable`` for ``mid_size == 0`` (magika 1.0)."""
    size = len(data)
    n = min(block, size)
    head = data[:n].lstrip()[:beg]
    beg_ints = list(head) + [pad] * (beg - len(head))
    tail = data[size - n :].rstrip()
    tail = tail[len(tail) - end :] if end < len(tail) else tail
    end_ints = [pad] * (end - len(tail)) + list(tail)
    return beg_ints + end_ints


def build_magika(pkg: Path, version: str, per_type: int, seed: int) -> Case:
    models = sorted(pkg.glob("models/*/model.onnx"))
    if not models:
        raise FileNotFoundError(f"no models/*/model.onnx under {pkg}")
    model = models[-1]
    cfg = json.loads((model.parent / "config.min.json").read_text())
    labels_space: list[str] = cfg["target_labels_space"]
    min_size = cfg["min_file_size_for_dl"]
    import sysconfig

    roots = [
        Path(sysconfig.get_paths()["stdlib"]),
        Path(sysconfig.get_paths()["purelib"]),
        Path("/usr/share"),
        Path("/usr/lib"),
        Path("/etc"),
        Path(sys.base_prefix),
    ]
    found: dict[str, list[Path]] = {}
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                ext = fn.rsplit(".", 1)[-1].lower() if "." in fn else ""
                if ext not in MAGIKA_EXT or len(found.get(ext, [])) >= 300:
                    continue
                p = Path(dirpath) / fn
                try:
                    if not p.is_file() or p.is_symlink() or p.stat().st_size < 64:
                        continue
                    real = p.resolve()
                except OSError:
                    continue
                if real in seen:
                    continue
                seen.add(real)
                found.setdefault(ext, []).append(p)
    rng = np.random.default_rng(seed)
    cal_x, ev_x, ev_y, counts = [], [], [], {}
    for ext in sorted(found):
        paths = found[ext]
        pick = rng.permutation(len(paths))[:per_type]
        rows = []
        for i in pick:
            try:
                raw = (
                    paths[i].read_bytes()
                    if paths[i].stat().st_size <= 2 * cfg["block_size"]
                    else _head_tail(paths[i], cfg["block_size"])
                )
            except OSError:
                continue
            feats = magika_features(
                raw, cfg["beg_size"], cfg["end_size"], cfg["padding_token"], cfg["block_size"]
            )
            if feats[min_size - 1] == cfg["padding_token"]:
                continue  # magika answers these without the model
            rows.append(feats)
        if not rows:
            continue
        counts[ext] = len(rows)
        label = labels_space.index(MAGIKA_EXT[ext])
        k = max(1, len(rows) // 3)  # a third calibrates, the rest evaluates
        cal_x += rows[:k]
        ev_x += rows[k:]
        ev_y += [label] * (len(rows) - k)
    cal = {"bytes": np.asarray(cal_x, dtype=np.int32)}
    ev = {"bytes": np.asarray(ev_x, dtype=np.int32), "labels": np.asarray(ev_y, dtype=np.int64)}
    note = (
        f"{len(cal_x)} calibration + {len(ev_x)} eval files from this machine, "
        f"{len(counts)} extensions ({', '.join(f'{k}:{v}' for k, v in counts.items())}); "
        "features as magika 1.0 makes them; eval labels = the class the extension implies"
    )

    def check(fp32: Path, q: Path) -> dict[str, Any]:
        # batches of 64 (as edgeship's evaluate runs them) and one file at a time (as a device
        # does): dynamic int8 scales activations per batch, so its answers depend on the batch
        x = {"bytes": ev["bytes"]}
        a = run_batched(fp32, x, batch=64)[0]
        b = run_batched(q, x, batch=64)[0]
        b1 = run_batched(q, x, batch=1)[0]
        y = ev["labels"]
        return {
            "samples": len(y),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "top1_agreement_batch1": float((a.argmax(1) == b1.argmax(1)).mean()),
            "fp32_accuracy_vs_ext": float((a.argmax(1) == y).mean()),
            "int8_accuracy_vs_ext": float((b.argmax(1) == y).mean()),
            "int8_accuracy_vs_ext_batch1": float((b1.argmax(1) == y).mean()),
            "max_abs_prob_diff": float(np.abs(a - b).max()),
        }

    unlabelled = {"bytes": ev["bytes"][:300]}
    return Case(
        "magika",
        "magika",
        version,
        model,
        cal,
        ev,
        note,
        check,
        budget="p95<=50ms,drop<=1%",
        labels=",".join(labels_space),
        extra=[("optimize, eval without labels", unlabelled, "p95<=50ms,drop<=1%")],
        probes=[
            ("static per-tensor, all ops", {"per_channel": False}),
            (
                "static per-tensor, Conv/Gemm/MatMul",
                {"per_channel": False, "op_types": ("Conv", "Gemm", "MatMul")},
            ),
            ("static per-channel, Conv/MatMul", {"op_types": ("Conv", "MatMul")}),
            ("static per-channel, Conv/Gemm/MatMul", {"op_types": ("Conv", "Gemm", "MatMul")}),
        ],
    )


def _head_tail(path: Path, block: int) -> bytes:
    """The first and last ``block`` bytes of a big file: all the features look at."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(block)
        fh.seek(max(0, size - block))
        return head + fh.read(block)


# ---- silero-vad -----------------------------------------------------------------------------

SR = 16000
CHUNK = 512
CONTEXT = 64

SENTENCES = [
    ("en", "The quick brown fox jumps over the lazy dog near the river bank."),
    ("en-us", "Please remember to switch off the lights before you leave the office tonight."),
    ("de", "Guten Morgen, heute ist das Wetter in Berlin kalt und sehr windig."),
    ("fr", "Le train pour Lyon partira avec un retard d'environ vingt minutes."),
    ("es", "Mañana vamos a visitar el museo y después comeremos en la plaza."),
    ("en-gb", "Edge devices run small models close to the sensors that feed them."),
    ("it", "La riunione di domani è stata spostata alle tre del pomeriggio."),
    ("en", "Seven hundred and forty two packets arrived, but three were lost."),
    ("nl", "De fiets staat achter het huis naast de groene schuur."),
    ("en-us", "Can you hear me now? Good. Let us start the test recording."),
    ("pt", "O relatório final será enviado para todos na sexta-feira."),
    ("en", "Voice activity detection decides which parts of a signal contain speech."),
]


def synth_speech(voice: str, text: str, speed: int, pitch: int) -> np.ndarray | None:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        r = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
            capture_output=True,
            check=False,
        )
        if r.returncode != 0 or not wav.exists():
            return None
        import wave

        with wave.open(str(wav)) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
    x /= 32768.0
    return resample(x, rate, SR)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return x
    try:
        from scipy.signal import resample_poly

        g = math.gcd(src, dst)
        return resample_poly(x, dst // g, src // g).astype(np.float32)
    except ImportError:
        t = np.arange(int(len(x) * dst / src)) * (src / dst)
        return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def synthetic_voice(seconds: float, f0: float, rng: np.random.Generator) -> np.ndarray:
    """A voiced, syllable-modulated harmonic signal (used only when espeak-ng is missing)."""
    t = np.arange(int(seconds * SR)) / SR
    f = f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    return (0.2 * x * env).astype(np.float32)


def make_stream(items: Iterable[tuple[str, str]], seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Speech between noise gaps, 16 kHz; per-sample ground truth (1 inside an utterance)."""
    rng = np.random.default_rng(seed)
    parts, truth = [], []
    source = "espeak-ng"
    for i, (voice, text) in enumerate(items):
        gap = rng.normal(0, 10 ** (-50 / 20), int(rng.uniform(0.8, 2.5) * SR)).astype(np.float32)
        parts.append(gap)
        truth.append(np.zeros(len(gap), np.int8))
        speech = synth_speech(
            voice, text, speed=int(rng.integers(130, 190)), pitch=int(rng.integers(30, 70))
        )
        if speech is None:
            source = "synthetic voiced signal (espeak-ng not found)"
            speech = synthetic_voice(rng.uniform(1.5, 3.0), rng.uniform(90, 220), rng)
        # trim the synthesiser's own leading/trailing silence so the truth is tight
        loud = np.flatnonzero(np.abs(speech) > 0.01)
        if loud.size:
            speech = speech[loud[0] : loud[-1] + 1]
        speech = speech * rng.uniform(0.3, 0.9) / max(1e-6, float(np.abs(speech).max()))
        speech = speech + rng.normal(0, 10 ** (-50 / 20), len(speech)).astype(np.float32)
        parts.append(speech.astype(np.float32))
        truth.append(np.ones(len(speech), np.int8))
        del i
    x = np.concatenate(parts)
    y = np.concatenate(truth)
    n = len(x) // CHUNK * CHUNK
    return x[:n], y[:n], source


def silero_stream(
    path: Path, audio: np.ndarray, layout: str
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the VAD over ``audio`` chunk by chunk, carrying state and context like OnnxWrapper.

    Returns the speech probability per chunk and the per-chunk inputs (input and state)."""
    s = session(path, 1)
    names = [i.name for i in s.get_inputs()]
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    probs, xs, states = [], [], []
    for lo in range(0, len(audio), CHUNK):
        x = np.concatenate([context, audio[None, lo : lo + CHUNK]], axis=1).astype(np.float32)
        feed: dict[str, np.ndarray] = {"input": x}
        if layout == "batch-first":
            feed["state"] = state.transpose(1, 0, 2).copy()
        else:
            feed["state"] = state
        if "sr" in names:
            feed["sr"] = np.array(SR, dtype=np.int64)
        xs.append(x[0])
        states.append(state[:, 0, :].copy())
        out, new_state = s.run(None, feed)
        if layout == "batch-first":
            new_state = new_state.transpose(1, 0, 2)
        state = np.ascontiguousarray(new_state, dtype=np.float32)
        context = x[:, -CONTEXT:]
        probs.append(float(out[0, 0]))
    return np.asarray(probs), {
        "input": np.asarray(xs, np.float32),
        "state": np.asarray(states, np.float32),
    }  # state: (N, 2, 128)


def silero_batch_first(src: Path, dst: Path) -> Path:
    """Workaround model: state as (batch, 2, 128) in and out, ``sr`` fixed at 16000."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    # inputs: rename the model's state to an internal name, feed it from a Transpose
    for node in g.node:
        node.input[:] = ["state__tbatch" if n == "state" else n for n in node.input]
        node.input[:] = ["sr__const" if n == "sr" else n for n in node.input]
    _rename_in_subgraphs(g, {"state": "state__tbatch", "sr": "sr__const"})
    g.node.insert(
        0,
        helper.make_node(
            "Transpose", ["state"], ["state__tbatch"], perm=[1, 0, 2], name="state_to_model_layout"
        ),
    )
    g.initializer.append(numpy_helper.from_array(np.array(SR, dtype=np.int64), "sr__const"))
    sr_index = next(i for i, vi in enumerate(g.input) if vi.name == "sr")
    del g.input[sr_index]
    for vi in g.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name == "input":
            dims[0].dim_param = "batch"
            dims[1].dim_value = CONTEXT + CHUNK  # 16 kHz streaming: always 576
        elif vi.name == "state":
            _set_dims(dims, ("batch", 2, 128))
    # output: stateN back to batch-first
    out = next(o for o in g.output if o.name == "stateN")
    for node in g.node:
        node.output[:] = ["stateN__model" if n == "stateN" else n for n in node.output]
    g.node.append(
        helper.make_node(
            "Transpose", ["stateN__model"], ["stateN"], perm=[1, 0, 2], name="state_to_batch_first"
        )
    )
    _set_dims(out.type.tensor_type.shape.dim, ("batch", 2, 128))
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def _set_dims(dims: Any, values: tuple[str | int, ...]) -> None:
    del dims[:]
    for v in values:
        d = dims.add()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v


def _rename_in_subgraphs(graph: Any, names: dict[str, str]) -> None:
    for node in graph.node:
        for attr in node.attribute:
            subs = (list(attr.g.node) and [attr.g]) or list(attr.graphs)
            for sub in subs:
                for n in sub.node:
                    n.input[:] = [names.get(x, x) for x in n.input]
                _rename_in_subgraphs(sub, names)


def build_silero(pkg: Path, version: str, variant: str, work: Path, seed: int) -> Case:
    src = pkg / "data" / "silero_vad.onnx"
    if not src.exists():
        raise FileNotFoundError(src)
    half = len(SENTENCES) // 2
    cal_audio, _, source = make_stream(SENTENCES[:half], seed)
    ev_audio, ev_truth, _ = make_stream(SENTENCES[half:], seed + 1)
    if variant == "as-shipped":
        model = src
        layout = "shipped"
    else:
        model = silero_batch_first(src, work / "silero_vad_batch_first.onnx")
        layout = "batch-first"
    # inputs seen in streaming (the state the fp32 model carries), per chunk
    _, cal_inputs = silero_stream(src, cal_audio, "shipped")
    ev_probs, ev_inputs = silero_stream(src, ev_audio, "shipped")
    chunk_truth = ev_truth.reshape(-1, CHUNK).mean(axis=1) > 0.5
    if layout == "shipped":
        # What a new user writes: each input keyed by name, in the model's own layout.
        cal = {
            "input": cal_inputs["input"],
            "state": cal_inputs["state"].transpose(1, 0, 2),
            "sr": np.array(SR, dtype=np.int64),
        }
        ev = {
            "input": ev_inputs["input"],
            "state": ev_inputs["state"].transpose(1, 0, 2),
            "sr": np.array(SR, dtype=np.int64),
        }
    else:
        cal = {"input": cal_inputs["input"], "state": cal_inputs["state"]}
        ev = {"input": ev_inputs["input"], "state": ev_inputs["state"]}
    dur = (len(cal_audio) + len(ev_audio)) / SR
    note = (
        f"{source} speech in {len(SENTENCES)} utterances ({dur:.0f} s at 16 kHz, between "
        f"-50 dBFS noise gaps); {len(cal['input'])} calibration + {len(ev['input'])} eval "
        "chunks of 512+64 samples with the fp32 model's carried state; "
        f"{int(chunk_truth.sum())} of the eval chunks are speech"
    )

    def check(fp32: Path, q: Path) -> dict[str, Any]:
        # Stream both models over the eval audio, each carrying ITS OWN state, as on a device.
        lay = "shipped" if "sr" in {i.name for i in session(q, 1).get_inputs()} else "batch-first"
        lay_ref = (
            "shipped" if "sr" in {i.name for i in session(fp32, 1).get_inputs()} else "batch-first"
        )
        a, _ = silero_stream(fp32, ev_audio, lay_ref)
        b, _ = silero_stream(q, ev_audio, lay)
        return {
            "chunks": len(a),
            "prob_mean_abs_diff": float(np.abs(a - b).mean()),
            "prob_max_abs_diff": float(np.abs(a - b).max()),
            "decision_agreement@0.5": float(((a > 0.5) == (b > 0.5)).mean()),
            "fp32_chunk_accuracy_vs_truth": float(((a > 0.5) == chunk_truth).mean()),
            "int8_chunk_accuracy_vs_truth": float(((b > 0.5) == chunk_truth).mean()),
        }

    extra: list[tuple[str, dict[str, np.ndarray] | None, str]] = []
    probes: list[tuple[str, dict[str, Any]]] = []
    if layout == "batch-first":
        probes = [
            ("static per-channel, Conv only", {"op_types": ("Conv",)}),
            ("dynamic, Conv only", {"mode": "dynamic", "op_types": ("Conv",)}),
        ]
        labelled = {**ev, "labels": chunk_truth.astype(np.int64)}
        extra = [
            ("optimize, eval with speech labels", labelled, "p95<=5ms,drop<=1%"),
            ("optimize, no eval", None, "p95<=5ms"),
        ]
    del ev_probs
    return Case(
        f"silero-vad ({variant})",
        "silero-vad",
        version,
        model,
        cal,
        ev,
        note,
        check,
        budget="p95<=5ms,drop<=1%",
        extra=extra,
        probes=probes,
        bench_shapes=["input=1,576", "state=2,1,128"] if layout == "shipped" else [],
    )


# ---- rapidocr -------------------------------------------------------------------------------

_WORD_TEXT = (
    "edge model board latency budget quantize river 2048 Raspberry Pi Jetson sensor "
    "invoice total amount due March 17 2025 order #4471 shipping address Berlin "
    "temperature 23.5 C humidity 41% battery level OK warning error retry connect "
    "the quick brown fox jumps over lazy dog HELLO World Python ONNX int8 fp32"
)
WORDS = tuple(_WORD_TEXT.split())


def _fonts() -> list[Path]:
    fonts = []
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", str(Path.home() / ".fonts")):
        fonts += sorted(Path(root).rglob("*.ttf")) if Path(root).is_dir() else []
    try:  # matplotlib ships DejaVu
        import matplotlib

        fonts += sorted(
            (Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf").glob("DejaVu*.ttf")
        )
    except ImportError:
        pass
    return [f for f in fonts if "Math" not in f.name][:12]


def render_line(
    text: str, font_path: Path | None, size: int, rng: np.random.Generator, pad: int = 6
) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size) if font_path else ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=fg)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 4, arr.shape)
    return np.clip(arr, 0, 255)[:, :, ::-1]  # BGR, as cv2.imread gives rapidocr


def resize_norm(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """rapidocr's rec/cls ``resize_norm_img``: keep the aspect, height fixed, pad right."""
    from PIL import Image

    c, h, w = shape
    ratio = img.shape[1] / img.shape[0]
    rw = min(w, math.ceil(h * ratio))
    pil = Image.fromarray(img.astype(np.uint8)).resize((rw, h), Image.BILINEAR)
    x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((c, h, w), np.float32)
    out[:, :, :rw] = x
    return out


def random_text(rng: np.random.Generator, lo: int = 2, hi: int = 5) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1))))


def text_labels(texts: list[str], chars: list[str]) -> np.ndarray:
    """Each text as the recognizer's class ids (its first index of each character), padded
    with -1: the sequence labels ``sdk.ctc`` scores."""
    index: dict[str, int] = {}
    for i, c in enumerate(chars[1:], start=1):
        index.setdefault(c, i)
    out = np.full((len(texts), max(len(t) for t in texts)), -1, np.int64)
    for row, t in enumerate(texts):
        out[row, : len(t)] = [index[c] for c in t]
    return out


def fix_dims(src: Path, dst: Path, name: str, dims: dict[int, int]) -> Path:
    """Workaround model: a copy of ``src`` whose input ``name`` has ``dims`` (axis -> size) fixed,
    so that tools which generate benchmark inputs can; the batch axis stays dynamic."""
    import onnx

    m = onnx.load(str(src))
    vi = next(i for i in m.graph.input if i.name == name)
    shape = vi.type.tensor_type.shape.dim
    shape[0].dim_param = "batch"
    for axis, size in dims.items():
        shape[axis].dim_value = size
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def ctc_decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    """Each line's text: greedy CTC decoding (:func:`sdk.ctc.greedy_decode`, blank 0)."""
    from sdk.ctc import greedy_decode

    return ["".join(chars[i] for i in seq) for seq in greedy_decode(probs)]


def cer(a: str, b: str) -> float:
    """Character error rate of ``a`` against reference ``b`` (Levenshtein / len(b))."""
    from sdk.ctc import edit_distance

    def codes(text: str) -> np.ndarray:
        return np.array([ord(c) for c in text], np.int64)

    return edit_distance(codes(a), codes(b)) / max(1, len(b))


def build_ocr_rec(
    pkg: Path,
    version: str,
    n_cal: int,
    n_eval: int,
    seed: int,
    fixed: Path | None = None,
    labelled: bool = False,
) -> Case:
    """PP-OCRv4 rec on rendered lines. ``labelled``: the eval data carries each line's text as
    sequence labels (class ids, padded with -1), so optimize scores character accuracy
    (``sdk.ctc``) instead of the cosine of the score tensors."""
    shipped = pkg / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    if not shipped.exists():
        raise FileNotFoundError(shipped)
    model = (
        shipped
        if fixed is None
        else fix_dims(shipped, fixed / "rec_48x320.onnx", "x", {2: 48, 3: 320})
    )
    meta = session(shipped, 1).get_modelmeta().custom_metadata_map
    chars = ["blank", *meta["character"].splitlines(), " "]
    rng = np.random.default_rng(seed)
    fonts = _fonts() or [None]
    texts, xs = [], []
    for i in range(n_cal + n_eval):
        t = random_text(rng)
        img = render_line(t, fonts[i % len(fonts)], int(rng.integers(20, 40)), rng)
        texts.append(t)
        xs.append(resize_norm(img, (3, 48, 320)))
    x = np.asarray(xs, np.float32)
    cal = {"x": x[:n_cal]}
    ev = {"x": x[n_cal:]}
    truth = texts[n_cal:]
    if labelled:
        ev["labels"] = text_labels(truth, chars)
    note = (
        f"{n_cal} calibration + {n_eval} eval text lines rendered with PIL in "
        f"{len(fonts)} fonts, 48x320 as rapidocr pads them (rec_img_shape [3, 48, 320])"
    )

    def check(fp32: Path, q: Path) -> dict[str, Any]:
        lines = {"x": ev["x"]}  # the labels are for optimize, not an input
        a = ctc_decode(run_batched(fp32, lines)[0], chars)
        b = ctc_decode(run_batched(q, lines)[0], chars)
        return {
            "lines": len(a),
            "text_identical_to_fp32": float(np.mean([u == v for u, v in zip(a, b, strict=True)])),
            "fp32_exact_vs_truth": float(np.mean([u == t for u, t in zip(a, truth, strict=True)])),
            "int8_exact_vs_truth": float(np.mean([v == t for v, t in zip(b, truth, strict=True)])),
            "fp32_cer": float(np.mean([cer(u, t) for u, t in zip(a, truth, strict=True)])),
            "int8_cer": float(np.mean([cer(v, t) for v, t in zip(b, truth, strict=True)])),
            "examples": [
                {"truth": t, "fp32": u, "int8": v}
                for t, u, v in list(zip(truth, a, b, strict=True))[:3]
            ],
        }

    name = "rapidocr rec (PP-OCRv4)" if fixed is None else "rapidocr rec (H,W fixed 48x320)"
    return Case(
        name,
        "rapidocr-onnxruntime",
        version,
        model,
        cal,
        ev,
        note,
        check,
        budget="p95<=50ms,drop<=1%",
        extra=[] if fixed is None else [("optimize, no eval", None, "p95<=50ms")],
        bench_shapes=["x=1,3,48,320"] if fixed is None else [],
        probes=[]
        if fixed is None
        else [
            ("static per-channel, Conv/MatMul/Gemm", {"op_types": ("Conv", "MatMul", "Gemm")}),
            ("static per-channel, Conv only", {"op_types": ("Conv",)}),
            ("dynamic with calibration check", {"mode": "dynamic", "_calibration": True}),
        ],
    )


def build_ocr_cls(
    pkg: Path, version: str, n_cal: int, n_eval: int, seed: int, fixed: Path | None = None
) -> Case:
    shipped = pkg / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not shipped.exists():
        raise FileNotFoundError(shipped)
    model = (
        shipped
        if fixed is None
        else fix_dims(shipped, fixed / "cls_48x192.onnx", "x", {2: 48, 3: 192})
    )
    rng = np.random.default_rng(seed)
    fonts = _fonts() or [None]
    xs, ys = [], []
    for i in range(n_cal + n_eval):
        img = render_line(
            random_text(rng, 1, 4), fonts[i % len(fonts)], int(rng.integers(20, 40)), rng
        )
        flip = i % 2 == 1
        if flip:
            img = img[::-1, ::-1]
        xs.append(resize_norm(img, (3, 48, 192)))
        ys.append(int(flip))
    x = np.asarray(xs, np.float32)
    y = np.asarray(ys, np.int64)
    cal = {"x": x[:n_cal]}
    ev = {"x": x[n_cal:], "labels": y[n_cal:]}
    note = (
        f"{n_cal} calibration + {n_eval} eval text lines, every other one rotated 180 "
        "degrees (labels 0='0', 1='180'), 48x192 as rapidocr's cls_image_shape"
    )

    def check(fp32: Path, q: Path) -> dict[str, Any]:
        a = run_batched(fp32, {"x": ev["x"]})[0]
        b = run_batched(q, {"x": ev["x"]})[0]
        yy = ev["labels"]
        return {
            "samples": len(yy),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "fp32_accuracy": float((a.argmax(1) == yy).mean()),
            "int8_accuracy": float((b.argmax(1) == yy).mean()),
            "max_abs_prob_diff": float(np.abs(a - b).max()),
        }

    name = "rapidocr cls (mobile v2.0)" if fixed is None else "rapidocr cls (H,W fixed 48x192)"
    return Case(
        name,
        "rapidocr-onnxruntime",
        version,
        model,
        cal,
        ev,
        note,
        check,
        budget="p95<=20ms,drop<=1%",
        labels="0,180",
        bench_shapes=["x=1,3,48,192"] if fixed is None else [],
        extra=[("optimize, eval without labels", {"x": ev["x"]}, "p95<=20ms,drop<=1%")],
    )


def build_ocr_det(
    pkg: Path,
    version: str,
    n_cal: int,
    n_eval: int,
    side: int,
    seed: int,
    fixed: Path | None = None,
) -> Case:
    shipped = pkg / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not shipped.exists():
        raise FileNotFoundError(shipped)
    model = (
        shipped
        if fixed is None
        else fix_dims(shipped, fixed / f"det_{side}.onnx", "x", {2: side, 3: side})
    )
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = _fonts()
    xs = []
    for i in range(n_cal + n_eval):
        bg = tuple(int(v) for v in rng.integers(190, 256, 3))
        img = Image.new("RGB", (side, side), bg)
        d = ImageDraw.Draw(img)
        y = int(rng.integers(4, 20))
        while y < side - 20:
            size = int(rng.integers(12, 28))
            font = (
                ImageFont.truetype(str(fonts[(i + y) % len(fonts)]), size)
                if fonts
                else ImageFont.load_default()
            )
            d.text(
                (int(rng.integers(4, side // 4)), y),
                random_text(rng, 1, 4),
                font=font,
                fill=tuple(int(v) for v in rng.integers(0, 80, 3)),
            )
            y += size + int(rng.integers(6, 30))
        arr = np.asarray(img, np.float32)[:, :, ::-1] + rng.normal(0, 3, (side, side, 3))
        arr = np.clip(arr, 0, 255) / 255.0
        xs.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
    x = np.asarray(xs, np.float32)
    cal = {"x": x[:n_cal]}
    ev = {"x": x[n_cal:]}
    note = (
        f"{n_cal} calibration + {n_eval} eval {side}x{side} pages of rendered text lines "
        "(DBNet pre-processing: BGR, (x/255-0.5)/0.5, CHW)"
    )

    def check(fp32: Path, q: Path) -> dict[str, Any]:
        a = run_batched(fp32, ev, batch=4)[0]
        b = run_batched(q, ev, batch=4)[0]
        ma, mb = a > 0.3, b > 0.3  # rapidocr's det thresh
        inter = np.logical_and(ma, mb).sum()
        union = np.logical_or(ma, mb).sum()
        return {
            "pages": len(a),
            "mask_iou@0.3": float(inter / max(1, union)),
            "text_pixels_fp32": int(ma.sum()),
            "text_pixels_int8": int(mb.sum()),
            "prob_mean_abs_diff": float(np.abs(a - b).mean()),
            "prob_max_abs_diff": float(np.abs(a - b).max()),
        }

    name = (
        f"rapidocr det (PP-OCRv4, {side}x{side} data)"
        if fixed is None
        else f"rapidocr det (H,W fixed {side}x{side})"
    )
    return Case(
        name,
        "rapidocr-onnxruntime",
        version,
        model,
        cal,
        ev,
        note,
        check,
        budget="p95<=200ms,drop<=1%",
        extra=[] if fixed is None else [("optimize, no eval", None, "p95<=200ms")],
        bench_shapes=[f"x=1,3,{side},{side}"] if fixed is None else [],
    )


# --------------------------------------------------------------------------------------------
# the exercise


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_case(case: Case, work: Path, target: str, runs: int, seconds: float) -> dict[str, Any]:
    d = work / slug(case.name)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    cal = d / "cal.npz"
    ev = d / "eval.npz"
    np.savez(cal, **case.cal)
    np.savez(ev, **case.eval)
    print(f"\n=== {case.name}: {case.model}", flush=True)
    print(f"  data: {case.data_note}", flush=True)
    res: dict[str, Any] = {
        "name": case.name,
        "package": f"{case.package} {case.version}",
        "model": str(case.model),
        "model_bytes": case.model.stat().st_size,
        "inputs": describe_inputs(case.model),
        "outputs": describe_outputs(case.model),
        "data": case.data_note,
        "data_shapes": {
            "calibration": {k: [str(v.dtype), list(v.shape)] for k, v in case.cal.items()},
            "eval": {k: [str(v.dtype), list(v.shape)] for k, v in case.eval.items()},
        },
        "budget": case.budget,
        "notes": list(case.notes),
    }
    timing = ["--runs", str(runs), "--seconds", str(seconds)]
    steps = []
    m = str(case.model)
    shapes = [a for s in case.bench_shapes for a in ("--shape", s)]
    steps.append(
        edgeship(
            "bench",
            ["bench", m, "--target", target, *shapes, *timing, "--json", str(d / "bench.json")],
            json_out=d / "bench.json",
        )
    )
    q_static = d / "model.static-int8.onnx"
    q_dynamic = d / "model.dynamic-int8.onnx"
    steps.append(
        edgeship("quantize static", ["quantize", m, "--calibration", str(cal), "-o", str(q_static)])
    )
    steps.append(
        edgeship("quantize dynamic", ["quantize", m, "--mode", "dynamic", "-o", str(q_dynamic)])
    )
    bundle = d / "bundle"
    opt_args = [
        "optimize",
        m,
        "--calibration",
        str(cal),
        "--eval",
        str(ev),
        "--target",
        target,
        "--budget",
        case.budget,
        "-o",
        str(bundle),
        "--json",
        str(d / "optimize.json"),
        *timing,
    ]
    if case.labels:
        opt_args += ["--labels", case.labels]
    steps.append(edgeship("optimize", opt_args, json_out=d / "optimize.json"))
    bundles = {"optimize": bundle}
    for i, (label, data, budget) in enumerate(case.extra, 1):
        extra_bundle = d / f"bundle-extra{i}"
        args = [
            "optimize",
            m,
            "--calibration",
            str(cal),
            "--target",
            target,
            "--budget",
            budget,
            "-o",
            str(extra_bundle),
            "--json",
            str(d / f"optimize-extra{i}.json"),
            *timing,
        ]
        if data is not None:
            np.savez(d / f"eval-extra{i}.npz", **data)
            args[4:4] = ["--eval", str(d / f"eval-extra{i}.npz")]
        steps.append(edgeship(label, args, json_out=d / f"optimize-extra{i}.json"))
        bundles[label] = extra_bundle
    for label, b in bundles.items():
        if (b / "manifest.json").exists():
            steps.append(edgeship(f"inspect ({label})", ["inspect", str(b)]))
    res["steps"] = [s.to_dict() for s in steps]

    # independent check of every int8 model edgeship produced
    produced = {"quantize static": q_static, "quantize dynamic": q_dynamic}
    for label, b in bundles.items():
        cands = b.with_name(b.name + "-candidates")
        for p in sorted(cands.glob("*.onnx")) if cands.is_dir() else []:
            if p.stem != "fp32":
                produced[f"{label}: {p.stem}"] = p
        chosen = b / "manifest.json"
        if chosen.exists():
            mf = json.loads(chosen.read_text())
            res.setdefault("bundles", {})[label] = {
                "dir": str(b),
                "recipe": mf.get("model", {}).get("recipe"),
                "precision": mf.get("model", {}).get("precision"),
            }
    probes = {}
    for label, kwargs in case.probes:
        probes[f"probe: {label}"] = _probe(case, cal, d / f"probe-{slug(label)}.onnx", kwargs)
        if probes[f"probe: {label}"].get("path"):
            produced[f"probe: {label}"] = Path(probes[f"probe: {label}"]["path"])
    res["probes"] = probes
    checks: dict[str, Any] = {"fp32 (self)": _safe_check(case, case.model, case.model)}
    for label, path in produced.items():
        if path.exists():
            checks[label] = {
                "size_bytes": path.stat().st_size,
                **_safe_check(case, case.model, path),
            }
    res["checks"] = checks
    for label, c in checks.items():
        print(f"  check {label}: {json.dumps({k: v for k, v in c.items() if k != 'examples'})}")
    return res


def _probe(case: Case, cal: Path, out: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Quantize through the Python API with settings the CLI has no flag for."""
    from sdk.quantize import QuantizeConfig, quantize

    kw = dict(kwargs)
    use_cal = kw.pop("_calibration", False) or kw.get("mode", "static") == "static"
    try:
        art = quantize(case.model, cal if use_cal else None, out=out, config=QuantizeConfig(**kw))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    print(f"  [probe {kwargs}] {art.size_bytes / 1024:.0f} KiB, check {art.details.get('check')}")
    return {
        "path": str(art.path),
        "size_bytes": art.size_bytes,
        "edgeship_check": art.details.get("check"),
    }


def _safe_check(case: Case, fp32: Path, q: Path) -> dict[str, Any]:
    try:
        return case.check(fp32, q)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def table(results: list[dict[str, Any]]) -> str:
    rows = [f"{'model':<34}{'step':<18}{'rc':>3}  result"]
    for r in results:
        if "error" in r:
            rows.append(f"{r['name']:<34}{'(setup)':<18}{'-':>3}  {r['error']}")
            continue
        for s in r["steps"]:
            rows.append(f"{r['name'][:33]:<34}{s['step']:<18}{s['rc']:>3}  {_outcome(s)}")
        for step in r["steps"]:
            rep = step["report"] if step["step"].startswith("optimize") else None
            if not rep:
                continue
            rows.append(f"{'':<34}{step['step']}:")
            if rep.get("quality_gate"):
                rows.append(f"{'':<36}quality gate: {rep['quality_gate'][:110]}")
            for c in rep["candidates"]:
                mark = "*" if c["name"] == rep["chosen"] else " "
                if c.get("error"):
                    rows.append(f"{'':<36}{mark}{c['name'][:24]:<25} failed: {c['error'][:80]}")
                    continue
                lat = c.get("latency_ms") or {}
                drop = c.get("accuracy_drop")
                basis = {"agreement": " agr", "cosine": " cos", "accuracy": " acc"}.get(
                    c.get("drop_basis") or "", ""
                )
                p50, p95 = lat.get("p50", math.nan), lat.get("p95", math.nan)
                rows.append(
                    f"{'':<36}{mark}{c['name'][:24]:<25}{(c['size_bytes'] or 0) / 1024:>7.0f} KiB"
                    f"  p50 {p50:7.2f}  p95 {p95:7.2f} ms"
                    f"  drop {'-' if drop is None else f'{drop * 100:.2f}pt{basis}'}"
                    f"  {'ok' if c['meets_budget'] else 'MISS'}"
                )
        for label, c in r.get("checks", {}).items():
            if label == "fp32 (self)":
                continue
            short = {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in c.items()
                if k != "examples"
            }
            rows.append(f"{'':<34}check {label}: {short}")
    return "\n".join(rows)


def _outcome(step: dict[str, Any]) -> str:
    text = (step["stderr"] or "").strip().splitlines()
    errs = [ln for ln in text if "error" in ln.lower()]
    if step["rc"] != 0 and errs:
        return errs[-1][:160]
    out = (step["stdout"] or "").strip().splitlines()
    if step["step"].startswith("quantize") and out:
        check = next((ln for ln in out if ln.startswith("check vs fp32")), "")
        return out[0][:150] + ("\n" + " " * 57 + check[:150] if check else "")
    if step["step"] == "bench" and step["report"]:
        lat = step["report"]["latency_ms"]
        return f"p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms (generated inputs)"
    if step["step"].startswith("optimize") and step["report"]:
        return f"chosen {step['report']['chosen']}, meets budget {step['report']['meets_budget']}"
    return (out[-1] if out else (text[-1] if text else ""))[:160]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--packages",
        type=Path,
        action="append",
        default=[],
        help="folder of unzipped wheels (repeatable); else the installed packages",
    )
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgeship-pretrained"
    )
    ap.add_argument("--target", default="rpi4")
    ap.add_argument("--runs", type=int, default=50, help="benchmark runs per model (default 50)")
    ap.add_argument("--seconds", type=float, default=1.0, help="benchmark seconds per model")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated subset: magika, silero, "
        "silero-workaround, ocr-rec, ocr-rec-workaround, ocr-cls, "
        "ocr-cls-workaround, ocr-det, ocr-det-workaround",
    )
    ap.add_argument("--det-side", type=int, default=320, help="text-detection page size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    wanted = [w.strip() for w in args.only.split(",") if w.strip()] or [
        "magika",
        "silero",
        "silero-workaround",
        "ocr-rec",
        "ocr-rec-workaround",
        "ocr-cls",
        "ocr-cls-workaround",
        "ocr-det",
        "ocr-det-workaround",
    ]
    args.workdir.mkdir(parents=True, exist_ok=True)
    search = [p.resolve() for p in args.packages]

    builders: dict[str, Callable[[], Case]] = {}

    def pkg(package: str, dist: str) -> tuple[Path, str]:
        d = find_package_dir(package, search)
        if d is None:
            raise FileNotFoundError(
                f"package {package!r} not found (pip download --no-deps "
                f"{dist} and unzip it into a --packages folder)"
            )
        return d, dist_version(d, dist)

    builders["magika"] = lambda: build_magika(*pkg("magika", "magika"), per_type=45, seed=args.seed)
    builders["silero"] = lambda: build_silero(
        *pkg("silero_vad", "silero-vad"), "as-shipped", args.workdir, args.seed
    )
    builders["silero-workaround"] = lambda: build_silero(
        *pkg("silero_vad", "silero-vad"),
        "workaround: state batch-first, sr fixed",
        args.workdir,
        args.seed,
    )
    builders["ocr-rec"] = lambda: build_ocr_rec(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"), 64, 160, args.seed
    )
    builders["ocr-cls"] = lambda: build_ocr_cls(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"), 64, 200, args.seed
    )
    builders["ocr-det"] = lambda: build_ocr_det(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"), 16, 16, args.det_side, args.seed
    )
    builders["ocr-rec-workaround"] = lambda: build_ocr_rec(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"), 64, 160, args.seed, fixed=args.workdir
    )
    builders["ocr-cls-workaround"] = lambda: build_ocr_cls(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"), 64, 200, args.seed, fixed=args.workdir
    )
    builders["ocr-det-workaround"] = lambda: build_ocr_det(
        *pkg("rapidocr_onnxruntime", "rapidocr-onnxruntime"),
        16,
        16,
        args.det_side,
        args.seed,
        fixed=args.workdir,
    )

    results: list[dict[str, Any]] = []
    for key in wanted:
        if key not in builders:
            ap.error(f"--only: unknown case {key!r}; choose from {sorted(builders)}")
        try:
            case = builders[key]()
        except Exception as exc:
            print(f"\n=== {key}: cannot set up: {type(exc).__name__}: {exc}", flush=True)
            results.append({"name": key, "error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append(run_case(case, args.workdir, args.target, args.runs, args.seconds))
        if args.json:
            _write(args.json, results, args)

    print("\n" + table(results))
    if args.json:
        _write(args.json, results, args)
        print(f"\nresults written to {args.json}")
    return 0


def _write(path: Path, results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import onnxruntime

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "target": args.target,
        "runs": args.runs,
        "seconds": args.seconds,
        "python": sys.version.split()[0],
        "onnxruntime": onnxruntime.__version__,
        "host_cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
