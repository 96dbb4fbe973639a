"""The bundle manifest: what a bundle contains, encoded as ``manifest.json``.

A bundle is a directory holding ``manifest.json``, the model file and optional detector and
reference-statistics files. The manifest records the SHA-256 of every other file, so a
verified manifest vouches for the whole bundle; ``signature.json`` (not listed in the
manifest) may sign the manifest's bytes (:mod:`device_agent.signing`). This module owns the
schema: encode with :meth:`Manifest.to_json`, decode and validate with
:meth:`Manifest.from_json`. Decoding rejects anything it does not understand with a
:class:`~device_agent.errors.BundleError` that names the offending field. The schema is
documented in ``docs/bundle.md``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from device_agent.contracts.errors import BundleError
from device_agent.contracts.shapes import (
    MAX_TENSOR_ELEMENTS,
    parse_sample_shape,
    parse_shape,
)

__all__ = [
    "DTYPES",
    "ENCRYPTED_FORMAT_VERSION",
    "ENCRYPTION_ALGORITHMS",
    "FORMAT_ID",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_TENSOR_ELEMENTS",
    "READABLE_FORMAT_VERSION",
    "RESERVED_NAMES",
    "RUNTIMES",
    "DetectorSpec",
    "Dim",
    "IOSpec",
    "Manifest",
    "ModelEncryption",
    "ModelInfo",
    "TensorSpec",
]

FORMAT_ID = "edgeship.bundle"
# Plain bundles are written as version 1. A bundle whose model is encrypted is version 2, so
# that an agent from before encryption refuses it with "upgrade edgeship" instead of handing
# ciphertext to its runtime. This code reads both.
FORMAT_VERSION = 1
ENCRYPTED_FORMAT_VERSION = 2
READABLE_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
# Files in a bundle directory that the manifest must not list: the manifest itself, and the
# signature file, which signs the manifest and so cannot be hashed inside it.
RESERVED_NAMES = frozenset({MANIFEST_NAME, "signature.json"})
ENCRYPTION_ALGORITHMS = ("aes-256-gcm",)
GCM_NONCE_BYTES = 12

# Limits the decoder enforces, so that a manifest cannot make a reader run out of memory or
# write text that the wire (docs/protocol.md) refuses. The model's name and version and the
# class labels travel in every telemetry message: they obey the messages' limits.
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_NAME_LEN = 128  # model.name, labels: the messages' label limit
MAX_VERSION_LEN = 64  # model.version: the messages' model_version limit
MAX_TEXT_LEN = 1024  # any other string field
MAX_PATH_LEN = 1024
MAX_FILES = 1000
MAX_TENSORS = 1024  # inputs, and outputs
MAX_LABELS = 65536
MAX_NESTING = 64  # JSON depth anywhere in the manifest (free-form blocks included)
# Control characters (C0, DEL, C1) and lone surrogates: a name or label holding one could not be
# printed, logged on one line or encoded as UTF-8.
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

Runtime = Literal["onnxruntime", "litert"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "litert")

# numpy dtype names the contract accepts for tensors.
DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)

# A dimension is a fixed size, or a symbolic name (for example "batch") for a dynamic one.
Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, numpy dtype name and shape; for an input with a
    symbolic dimension past the batch axis, maybe the concrete shape of one sample
    (:mod:`device_agent.contracts.shapes`)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    labels: tuple[str, ...] | None = None
    sample_shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.sample_shape is not None:
            out["sample_shape"] = list(self.sample_shape)
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        obj = _mapping(data, where)
        name = _str(obj.get("name"), f"{where}.name")
        dtype = _str(obj.get("dtype"), f"{where}.dtype")
        if dtype not in DTYPES:
            raise BundleError(f"{where}.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        shape = parse_shape(obj.get("shape"), f"{where}.shape", _str)
        sample_raw = obj.get("sample_shape")
        sample = None
        if sample_raw is not None:
            sample = parse_sample_shape(sample_raw, shape, f"{where}.sample_shape")
        labels_raw = obj.get("labels")
        labels = None
        if labels_raw is not None:
            raw = _list(labels_raw, f"{where}.labels")
            if len(raw) > MAX_LABELS:
                raise BundleError(f"{where}.labels: {len(raw)} labels; at most {MAX_LABELS}")
            labels = tuple(
                _str(v, f"{where}.labels[{i}]", max_len=MAX_NAME_LEN) for i, v in enumerate(raw)
            )
        return cls(name=name, dtype=dtype, shape=shape, labels=labels, sample_shape=sample)

    @property
    def fixed_elements(self) -> int:
        """How many elements the fixed dimensions hold (symbolic ones count as 1), or the
        sample shape when there is one: what the agent's self-test builds."""
        if self.sample_shape is not None:
            return math.prod(self.sample_shape)
        return math.prod(d for d in self.shape if isinstance(d, int))

    def matches_shape(self, shape: Sequence[int]) -> bool:
        """Whether a concrete shape fits this spec (symbolic dims match any size)."""
        if len(shape) != len(self.shape):
            return False
        return all(isinstance(d, str) or d == s for d, s in zip(self.shape, shape, strict=True))


@dataclass(frozen=True)
class IOSpec:
    """A model's inputs and outputs, in the model's own order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the inputs fix (the smallest fixed first axis: a model exported at
        batch N takes N samples a run), or None when every input's first axis is free."""
        sizes = [t.shape[0] for t in self.inputs if t.shape and isinstance(t.shape[0], int)]
        return min(sizes) if sizes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "io") -> IOSpec:
        obj = _mapping(data, where)
        specs: dict[str, tuple[TensorSpec, ...]] = {}
        for side in ("inputs", "outputs"):
            raw = _list(obj.get(side), f"{where}.{side}")
            if len(raw) > MAX_TENSORS:
                raise BundleError(f"{where}.{side}: {len(raw)} tensors; at most {MAX_TENSORS}")
            specs[side] = tuple(
                TensorSpec.from_dict(t, f"{where}.{side}[{i}]") for i, t in enumerate(raw)
            )
            extra = next((i for i, t in enumerate(specs[side]) if t.sample_shape is not None), None)
            if side == "outputs" and extra is not None:
                raise BundleError(f"{where}.outputs[{extra}].sample_shape: only inputs have one")
            names = [t.name for t in specs[side]]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise BundleError(f"{where}.{side}: the names {twice} are given more than once")
        inputs, outputs = specs["inputs"], specs["outputs"]
        if not inputs:
            raise BundleError(f"{where}.inputs: a model needs at least one input")
        if not outputs:
            raise BundleError(f"{where}.outputs: a model needs at least one output")
        total = sum(t.fixed_elements for t in inputs)
        if total > MAX_TENSOR_ELEMENTS:
            raise BundleError(
                f"{where}.inputs: the inputs hold {total} elements together, over the limit "
                f"of {MAX_TENSOR_ELEMENTS}; check their shapes"
            )
        return cls(inputs=inputs, outputs=outputs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class ModelEncryption:
    """How the model file is encrypted at rest: AES-256-GCM under the key whose id is
    ``key_id`` (``sha256:`` + hex SHA-256 of ``b"edgeship-model-key\\0" + key``), with ``nonce``
    (12 bytes). The file on disk is the ciphertext followed by the 16-byte tag; the agent
    decrypts it in memory only."""

    algorithm: str
    key_id: str
    nonce: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "model.encryption") -> ModelEncryption:
        obj = _mapping(data, where)
        algorithm = _str(obj.get("algorithm"), f"{where}.algorithm")
        if algorithm not in ENCRYPTION_ALGORITHMS:
            raise BundleError(
                f"{where}.algorithm: {algorithm!r} is not one of {list(ENCRYPTION_ALGORITHMS)}"
            )
        key_id = _str(obj.get("key_id"), f"{where}.key_id")
        if not (key_id.startswith("sha256:") and _is_hex(key_id[7:])):
            raise BundleError(f"{where}.key_id: expected 'sha256:<64 hex digits>', got {key_id!r}")
        nonce_text = _str(obj.get("nonce"), f"{where}.nonce")
        try:
            nonce = base64.b64decode(nonce_text, validate=True)
        except ValueError as exc:
            raise BundleError(f"{where}.nonce: not base64") from exc
        if len(nonce) != GCM_NONCE_BYTES:
            raise BundleError(f"{where}.nonce: expected {GCM_NONCE_BYTES} bytes, got {len(nonce)}")
        return cls(algorithm=algorithm, key_id=key_id, nonce=nonce)


@dataclass(frozen=True)
class ModelInfo:
    """Which model the bundle holds and how it was made.

    ``encryption`` is None for a plain model file (written without the key, so plain manifests
    are unchanged).
    """

    name: str
    version: str
    file: str
    runtime: Runtime
    precision: str  # "fp32", "int8", ...
    recipe: str  # how it was produced, e.g. "ort-static-int8-qdq-minmax"
    encryption: ModelEncryption | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "file": self.file,
            "runtime": self.runtime,
            "precision": self.precision,
            "recipe": self.recipe,
        }
        if self.encryption is not None:
            out["encryption"] = self.encryption.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> ModelInfo:
        obj = _mapping(data, where)
        runtime = _str(obj.get("runtime"), f"{where}.runtime")
        if runtime not in RUNTIMES:
            raise BundleError(f"{where}.runtime: {runtime!r} is not one of {list(RUNTIMES)}")
        encryption = obj.get("encryption")
        return cls(
            name=_str(obj.get("name"), f"{where}.name", max_len=MAX_NAME_LEN),
            version=_str(obj.get("version"), f"{where}.version", max_len=MAX_VERSION_LEN),
            file=_relpath(obj.get("file"), f"{where}.file"),
            runtime=runtime,
            precision=_str(obj.get("precision"), f"{where}.precision"),
            recipe=_str(obj.get("recipe"), f"{where}.recipe"),
            encryption=None
            if encryption is None
            else ModelEncryption.from_dict(encryption, f"{where}.encryption"),
        )


@dataclass(frozen=True)
class DetectorSpec:
    """The outlier detector shipped with the model. Higher scores mean more anomalous.

    ``graph_output`` names an extra output of the (ONNX) model file that computes the same
    score inside the graph (``sdk.detector_graph``): the agent takes the score from it and
    hides it from the model's outputs, which ``io.outputs`` lists without it. ``None`` (and
    every bundle written before it existed) means the agent scores with ``params_file``.
    """

    kind: str
    params_file: str
    threshold: float
    target_fpr: float
    options: Mapping[str, Any] = field(default_factory=dict)
    graph_output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "params_file": self.params_file,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "options": dict(self.options),
        }
        if self.graph_output is not None:  # absent, not null, so older manifests stay as they were
            out["graph_output"] = self.graph_output
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "detector") -> DetectorSpec:
        obj = _mapping(data, where)
        fpr = _float(obj.get("target_fpr"), f"{where}.target_fpr")
        if not 0.0 < fpr < 1.0:
            raise BundleError(f"{where}.target_fpr: {fpr} is not between 0 and 1")
        return cls(
            kind=_str(obj.get("kind"), f"{where}.kind"),
            params_file=_relpath(obj.get("params_file"), f"{where}.params_file"),
            threshold=_float(obj.get("threshold"), f"{where}.threshold"),
            target_fpr=fpr,
            options=dict(_mapping(obj.get("options", {}), f"{where}.options")),
            graph_output=(
                None
                if obj.get("graph_output") is None
                else _str(obj.get("graph_output"), f"{where}.graph_output")
            ),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the agent needs to know about a bundle, and the evidence for the choice.

    ``files`` maps every bundle file except ``manifest.json`` itself to its SHA-256 (hex).
    ``budget`` and ``benchmark`` are the report that justified choosing this model; they are
    kept as plain JSON objects because the agent only displays them.
    """

    model: ModelInfo
    io: IOSpec
    files: Mapping[str, str]
    tools: Mapping[str, str] = field(default_factory=dict)
    created: str = ""
    preprocessing: Mapping[str, Any] | None = None
    detector: DetectorSpec | None = None
    reference_file: str | None = None
    budget: Mapping[str, Any] | None = None
    benchmark: Mapping[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_ID,
            "format_version": self.format_version,
            "created": self.created,
            "model": self.model.to_dict(),
            "io": self.io.to_dict(),
            "preprocessing": None if self.preprocessing is None else dict(self.preprocessing),
            "detector": None if self.detector is None else self.detector.to_dict(),
            "reference_file": self.reference_file,
            "budget": None if self.budget is None else dict(self.budget),
            "benchmark": None if self.benchmark is None else dict(self.benchmark),
            "files": dict(sorted(self.files.items())),
            "tools": dict(sorted(self.tools.items())),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        if len(text) > MAX_MANIFEST_BYTES:
            raise BundleError(
                f"{MANIFEST_NAME} is {len(text)} bytes, over the limit of {MAX_MANIFEST_BYTES}"
            )
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as exc:
            raise BundleError(
                f"{MANIFEST_NAME} gives the key {exc.key!r} twice in one object; readers would "
                "disagree on which one counts"
            ) from None
        except RecursionError:
            raise BundleError(f"{MANIFEST_NAME} is nested too deeply to be a manifest") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {_ascii(exc)}") from exc
        _check_tree(data)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        obj = _mapping(data, "manifest")
        if obj.get("format") != FORMAT_ID:
            raise BundleError(
                f"manifest.format: expected {FORMAT_ID!r}, got {_short(obj.get('format'))}; "
                "this is not an edgeship bundle"
            )
        version = obj.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BundleError(
                f"manifest.format_version: expected a positive int, got {_short(version)}"
            )
        if version > READABLE_FORMAT_VERSION:
            raise BundleError(
                f"manifest.format_version {version} is newer than this agent understands "
                f"({READABLE_FORMAT_VERSION}); upgrade edgeship on this device"
            )
        files_raw = _mapping(obj.get("files"), "manifest.files")
        if len(files_raw) > MAX_FILES:
            raise BundleError(f"manifest.files: {len(files_raw)} files; at most {MAX_FILES}")
        files: dict[str, str] = {}
        for name, digest in files_raw.items():
            _relpath(name, f"manifest.files[{name!r}]")
            if name in RESERVED_NAMES:
                raise BundleError(
                    f"manifest.files: {name!r} is reserved for the bundle's own metadata and "
                    "cannot be listed"
                )
            d = _str(digest, f"manifest.files[{name!r}]")
            if not _is_hex(d):
                raise BundleError(f"manifest.files[{name!r}]: not a lowercase SHA-256 hex digest")
            files[name] = d
        model = ModelInfo.from_dict(obj.get("model"))
        if model.encryption is not None and version < ENCRYPTED_FORMAT_VERSION:
            raise BundleError(
                f"manifest.model.encryption needs format_version {ENCRYPTED_FORMAT_VERSION} "
                f"(this manifest says {version}), so that older agents refuse it"
            )
        if model.file not in files:
            raise BundleError(f"manifest.files: the model file {model.file!r} has no hash")
        detector = None
        if obj.get("detector") is not None:
            detector = DetectorSpec.from_dict(obj["detector"])
            if detector.params_file not in files:
                raise BundleError(
                    f"manifest.files: the detector file {detector.params_file!r} has no hash"
                )
            if detector.graph_output is not None and model.runtime != "onnxruntime":
                raise BundleError(
                    "manifest.detector.graph_output: only an onnxruntime model can hold "
                    f"the detector's score, not a {model.runtime} one"
                )
        io = IOSpec.from_dict(obj.get("io"))
        if detector is not None and detector.graph_output in io.output_names:
            raise BundleError(
                f"manifest.detector.graph_output: {detector.graph_output!r} is one of the "
                "model's own outputs in io.outputs"
            )
        reference = obj.get("reference_file")
        if reference is not None:
            reference = _relpath(reference, "manifest.reference_file")
            if reference not in files:
                raise BundleError(f"manifest.files: the reference file {reference!r} has no hash")
        tools = {
            _str(k, "manifest.tools"): _str(v, f"manifest.tools[{k!r}]")
            for k, v in _mapping(obj.get("tools", {}), "manifest.tools").items()
        }
        return cls(
            model=model,
            io=io,
            files=files,
            tools=tools,
            created=_str(obj.get("created", ""), "manifest.created", allow_empty=True),
            preprocessing=_optional_mapping(obj.get("preprocessing"), "manifest.preprocessing"),
            detector=detector,
            reference_file=reference,
            budget=_optional_mapping(obj.get("budget"), "manifest.budget"),
            benchmark=_optional_mapping(obj.get("benchmark"), "manifest.benchmark"),
            format_version=version,
        )


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_tree(data: Any) -> None:
    """Refuse JSON nested deeper than :data:`MAX_NESTING` or holding a lone surrogate (JSON's
    ``"\\ud800"`` escape decodes to one) anywhere, free-form blocks included: such text cannot
    be encoded as UTF-8, so it could not be printed, logged or sent on."""
    stack: list[tuple[Any, str, int]] = [(data, "manifest", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_NESTING:
            raise BundleError(f"{where}: nested more than {MAX_NESTING} levels deep")
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise BundleError(f"{where}: a string holds a lone surrogate ({_short(node)})")
        elif isinstance(node, dict):
            for key, value in node.items():
                if _SURROGATE.search(key):
                    raise BundleError(f"{where}: a key holds a lone surrogate ({_short(key)})")
                stack.append((value, f"{where}.{_short(key, 40)}", depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, ASCII only (safe in any message)."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ascii(exc: BaseException) -> str:
    return str(exc).encode("ascii", "backslashreplace").decode("ascii")


def _is_hex(text: str, length: int = 64) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BundleError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _optional_mapping(value: Any, where: str) -> Mapping[str, Any] | None:
    return None if value is None else dict(_mapping(value, where))


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise BundleError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str, *, allow_empty: bool = False, max_len: int = MAX_TEXT_LEN) -> str:
    """A string field: non-empty (unless ``allow_empty``), at most ``max_len`` characters, and
    free of control characters and lone surrogates."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise BundleError(f"{where}: expected a non-empty string, got {_short(value)}")
    if len(value) > max_len:
        raise BundleError(f"{where}: {len(value)} characters, longer than {max_len}")
    bad = _BAD_TEXT.search(value)
    if bad is not None:
        raise BundleError(
            f"{where}: {_short(value)} holds the character {bad.group()!a}; control "
            "characters and lone surrogates cannot be printed or sent"
        )
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BundleError(f"{where}: expected a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BundleError(f"{where}: expected a finite number, got {_short(value)}")
    return number


def _relpath(value: Any, where: str) -> str:
    """A file name inside the bundle: relative, no '..', forward slashes."""
    path = _str(value, where, max_len=MAX_PATH_LEN)
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{where}: {path!r} must be a plain relative path inside the bundle")
    if any(len(p.encode()) > 255 for p in parts):
        raise BundleError(f"{where}: a part of {path!r} is longer than 255 bytes")
    return path
