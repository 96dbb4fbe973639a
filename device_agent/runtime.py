"""Model sessions: one small interface over ONNX Runtime and LiteRT (or tflite-runtime).

The SDK uses the same sessions to evaluate and benchmark candidates, so what is measured on
the workstation is the code that runs on the board. Runtimes are imported only when a session
of that kind is opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_agent.contracts.bundle import Dim, IOSpec, TensorSpec
from device_agent.errors import ConfigError, InputError, RuntimeLoadError

__all__ = [
    "FeedChecker",
    "LiteRTSession",
    "ModelSession",
    "OnnxSession",
    "check_feed",
    "litert_interpreter_class",
    "open_session",
    "runtime_for_path",
]

Feed = Mapping[str, np.ndarray]

# Below /dev/null nothing can exist (it is not a folder).
_NO_FOLDER = "/dev/null/edgeship-models-hold-their-weights"

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class ModelSession(Protocol):
    """A loaded model that maps named numpy inputs to its outputs, in output order."""

    @property
    def io(self) -> IOSpec: ...

    @property
    def runtime(self) -> str: ...

    @property
    def runtime_version(self) -> str: ...

    def run(self, feed: Feed) -> list[np.ndarray]: ...


def runtime_for_path(path: Path) -> str:
    """The runtime that reads a model file, from its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix == ".tflite":
        return "litert"
    raise ConfigError(f"{path.name}: unknown model format {suffix!r}; expected .onnx or .tflite")


def open_session(
    path: str | Path,
    *,
    runtime: str | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    content: bytes | None = None,
    hidden_outputs: Sequence[str] = (),
) -> ModelSession:
    """Open ``path`` with ONNX Runtime or LiteRT. ``threads=None`` lets the runtime decide.

    ``content`` is the model itself, already in memory (a decrypted model): the runtime loads
    it from there and ``path`` only names it in messages. ``hidden_outputs`` (ONNX only) are
    outputs left out of the session's ``io`` and ``run`` (see :class:`OnnxSession`).
    """
    model = Path(path)
    if content is None and not model.is_file():
        raise ConfigError(f"model file not found: {model}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    kind = runtime or runtime_for_path(model)
    if kind == "onnxruntime":
        return OnnxSession(
            model,
            threads=threads,
            providers=providers,
            content=content,
            hidden_outputs=hidden_outputs,
        )
    if kind == "litert":
        return LiteRTSession(model, threads=threads, content=content)
    raise ConfigError(f"unknown runtime {kind!r}; expected 'onnxruntime' or 'litert'")


def check_feed(io: IOSpec, feed: Feed) -> dict[str, np.ndarray]:
    """Validate inputs against the spec and return them as contiguous arrays.

    Values of the same kind are cast (float64 to float32, int32 to int64); anything else that
    does not match (a missing or unknown name, a float for an integer input, a wrong rank or
    fixed dimension) raises :class:`InputError` naming the input and what it expected.
    For repeated calls on one model, :class:`FeedChecker` does the same with less overhead.
    """
    return FeedChecker(io)(feed)


class FeedChecker:
    """:func:`check_feed` for one model, with the spec digested once.

    The agent calls it on every inference, so the common case (the right names, dtypes and
    shapes) is a handful of attribute reads per input; only a mismatch builds a message.
    """

    def __init__(self, io: IOSpec) -> None:
        self.io = io
        self._names = io.input_names
        self._name_set = frozenset(self._names)
        # The happy path: (name, dtype, rank, first checked axis, the fixed sizes from there)
        # per input, for inputs whose dims past the first are all fixed; anything that misses
        # it (a cast, a copy, an error) takes the full check below.
        self._fast: tuple[tuple[str, np.dtype[Any], int, int, tuple[int, ...]], ...] | None = None
        fast = []
        for t in io.inputs:
            skip = 0 if t.shape and isinstance(t.shape[0], int) else 1
            tail = t.shape[skip:]
            if not all(isinstance(d, int) for d in tail):
                break
            dims = tuple(d for d in tail if isinstance(d, int))
            fast.append((t.name, np.dtype(t.dtype), len(t.shape), skip, dims))
        else:
            self._fast = tuple(fast)
        self._specs = tuple(
            (
                t.name,
                np.dtype(t.dtype),
                len(t.shape),
                tuple((i, d) for i, d in enumerate(t.shape) if isinstance(d, int)),
                t,
            )
            for t in io.inputs
        )

    def __call__(self, feed: Feed) -> dict[str, np.ndarray]:
        fast = self._fast
        if fast is not None and type(feed) is dict and len(feed) == len(fast):
            out: dict[str, np.ndarray] = {}
            for name, want, rank, skip, dims in fast:
                value = feed.get(name)
                if (
                    type(value) is not np.ndarray
                    or value.dtype is not want
                    or value.ndim != rank
                    or value.shape[skip:] != dims
                    or not value.flags.c_contiguous
                ):
                    break
                out[name] = value
            else:
                return out
        return self._check(feed)

    def _check(self, feed: Feed) -> dict[str, np.ndarray]:
        if not isinstance(feed, Mapping):
            raise InputError(
                f"inputs must be a mapping of input name to array, got {type(feed).__name__}; "
                f"this model takes {list(self._names)}"
            )
        if len(feed) != len(self._names) or not self._name_set.issuperset(feed):
            self._names_error(feed)
        out: dict[str, np.ndarray] = {}
        for name, want, rank, fixed, spec in self._specs:
            if name not in feed:
                self._names_error(feed)
            value = feed[name]
            if type(value) is not np.ndarray:
                try:
                    value = np.asarray(value)
                except Exception as exc:  # ragged lists and the like
                    raise InputError(f"input {name!r}: cannot be read as an array ({exc})") from exc
            arr: np.ndarray = value
            if arr.dtype != want:
                kind = arr.dtype.kind
                if kind != want.kind and not (kind in "iu" and want.kind in "iu"):
                    raise InputError(
                        f"input {name!r}: dtype {arr.dtype} does not fit the model's "
                        f"{spec.dtype}; convert it with .astype(np.{spec.dtype})"
                    )
                arr = arr.astype(want)
            shape = arr.shape
            if len(shape) != rank or any(shape[i] != d for i, d in fixed):
                raise InputError(
                    f"input {name!r}: shape {tuple(shape)} does not match the model's "
                    f"{_fmt_shape(spec.shape)}"
                )
            out[name] = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
        return out

    def _names_error(self, feed: Feed) -> None:
        missing = [n for n in self._names if n not in feed]
        unknown = [n for n in feed if n not in self._name_set]
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise InputError(
            f"input names do not match the model: {', '.join(parts)}; expected {list(self._names)}"
        )


def _fmt_shape(shape: Sequence[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class OnnxSession:
    """An ONNX Runtime ``InferenceSession`` behind the :class:`ModelSession` interface."""

    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        content: bytes | None = None,
        hidden_outputs: Sequence[str] = (),
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError(
                "onnxruntime is not installed; install it with: pip install 'edgeship[agent]'"
            ) from exc
        self._ort = ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if content is not None:
            # A model given as bytes was verified as bytes; ONNX Runtime would look for any
            # external data file it names in the current directory. Point it at a folder
            # that cannot exist (bundle.py refuses such models first; this is the backstop).
            opts.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", _NO_FOLDER
            )
        available = ort.get_available_providers()
        chosen = list(providers) if providers else ["CPUExecutionProvider"]
        absent = [p for p in chosen if p not in available]
        if absent:
            raise ConfigError(
                f"execution providers {absent} are not available in this onnxruntime build "
                f"(available: {available})"
            )
        try:
            self._session = ort.InferenceSession(
                str(path) if content is None else content, sess_options=opts, providers=chosen
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(
                f"ONNX Runtime cannot load {path.name}: {_first_line(exc)}"
            ) from exc
        outputs = self._session.get_outputs()
        present = {o.name for o in outputs}
        # Outputs the bundle added for itself (the detector's score): not part of io or run(),
        # returned after the model's own outputs by run_with_hidden().
        self.hidden_outputs = tuple(n for n in hidden_outputs if n in present)
        self._io = IOSpec(
            inputs=tuple(_ort_spec(a) for a in self._session.get_inputs()),
            outputs=tuple(_ort_spec(a) for a in outputs if a.name not in self.hidden_outputs),
        )
        self._output_names = [o.name for o in self._io.outputs]
        self._all_names = [*self._output_names, *self.hidden_outputs]

    @property
    def io(self) -> IOSpec:
        return self._io

    @property
    def runtime_version(self) -> str:
        return str(self._ort.__version__)

    def run(self, feed: Feed) -> list[np.ndarray]:
        return self._run(self._output_names, feed)

    def run_with_hidden(self, feed: Feed) -> list[np.ndarray]:
        """The model's outputs followed by the :attr:`hidden_outputs`, from one run."""
        return self._run(self._all_names, feed)

    def runner(self, *, hidden: bool = False) -> Callable[[Feed], list[np.ndarray]]:
        """``run`` (or ``run_with_hidden``) for feeds already checked by :class:`FeedChecker`.

        It calls the ONNX Runtime session's core directly: the Python ``InferenceSession.run``
        first re-validates the input names, about 0.8 us per call at batch size 1, which the
        agent's own check has done. Falls back to :meth:`run` where the core is not reachable.
        """
        names = self._all_names if hidden else self._output_names
        core = getattr(getattr(self._session, "_sess", None), "run", None)
        if not callable(core):
            return self.run_with_hidden if hidden else self.run

        def run(feed: Feed) -> list[np.ndarray]:
            try:
                result: list[np.ndarray] = core(names, feed, None)
            except Exception as exc:
                raise RuntimeLoadError(
                    f"ONNX Runtime failed to run the model: {_first_line(exc)}"
                ) from exc
            return result

        return run

    def _run(self, names: list[str], feed: Feed) -> list[np.ndarray]:
        try:
            # ORT returns numpy arrays for tensor outputs (the only kind io admits).
            result: list[np.ndarray] = self._session.run(
                names, feed if type(feed) is dict else dict(feed)
            )
        except Exception as exc:
            raise RuntimeLoadError(
                f"ONNX Runtime failed to run the model: {_first_line(exc)}"
            ) from exc
        return result


def _ort_spec(arg: Any) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise RuntimeLoadError(
            f"tensor {arg.name!r} has type {arg.type}, which edgeship does not support"
        )
    shape: list[Dim] = []
    for i, d in enumerate(arg.shape):
        if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d and d != "?"):
            shape.append(d)
        else:
            # ORT reports an unnamed dynamic axis as None, "" or "?": a shared placeholder
            # would make unrelated axes look like one symbolic dimension, so each gets its own.
            shape.append(f"{arg.name}_dim{i}")
    return TensorSpec(name=arg.name, dtype=dtype, shape=tuple(shape))


def litert_interpreter_class() -> tuple[Any, str, str]:
    """The LiteRT ``Interpreter`` class: ai-edge-litert first, then tflite-runtime.

    Returns ``(Interpreter, package_name, version)``.
    """
    try:
        from ai_edge_litert import interpreter as litert_interp

        version = _package_version("ai-edge-litert")
        return litert_interp.Interpreter, "ai-edge-litert", version
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tfl_interp

        return tfl_interp.Interpreter, "tflite-runtime", _package_version("tflite-runtime")
    except ImportError as exc:
        raise RuntimeLoadError(
            "no LiteRT runtime is installed; install one with: pip install 'edgeship[litert]' "
            "(or tflite-runtime on boards whose numpy is older than 2)"
        ) from exc


def _package_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class LiteRTSession:
    """A LiteRT/TFLite interpreter behind the :class:`ModelSession` interface.

    Integer-quantized inputs and outputs (with scale and zero point) are presented as
    float32: inputs are quantized and outputs dequantized here, so callers feed the same
    arrays as to the float model.
    """

    runtime = "litert"

    def __init__(
        self, path: Path, *, threads: int | None = None, content: bytes | None = None
    ) -> None:
        interpreter_cls, self._package, self._version = litert_interpreter_class()
        source = {"model_path": str(path)} if content is None else {"model_content": content}
        try:
            self._interp = interpreter_cls(**source, num_threads=threads or os.cpu_count())
            self._interp.allocate_tensors()
        except Exception as exc:
            raise RuntimeLoadError(f"LiteRT cannot load {path.name}: {_first_line(exc)}") from exc
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self._io = IOSpec(
            inputs=tuple(_litert_spec(d) for d in self._inputs),
            outputs=tuple(_litert_spec(d) for d in self._outputs),
        )
        self._shapes: dict[int, tuple[int, ...]] = {
            d["index"]: tuple(int(s) for s in d["shape"]) for d in self._inputs
        }

    @property
    def io(self) -> IOSpec:
        return self._io

    @property
    def runtime_version(self) -> str:
        return f"{self._package} {self._version}"

    def run(self, feed: Feed) -> list[np.ndarray]:
        try:
            resized = False
            for detail in self._inputs:
                arr = np.asarray(feed[_clean_name(detail["name"])])
                if tuple(arr.shape) != self._shapes[detail["index"]]:
                    self._interp.resize_tensor_input(detail["index"], list(arr.shape))
                    self._shapes[detail["index"]] = tuple(arr.shape)
                    resized = True
            if resized:
                self._interp.allocate_tensors()
            for detail in self._inputs:
                arr = np.asarray(feed[_clean_name(detail["name"])])
                self._interp.set_tensor(detail["index"], _quantize(arr, detail))
            self._interp.invoke()
            return [_dequantize(self._interp.get_tensor(d["index"]), d) for d in self._outputs]
        except KeyError as exc:
            raise InputError(f"missing input {exc}") from exc
        except Exception as exc:
            raise RuntimeLoadError(f"LiteRT failed to run the model: {_first_line(exc)}") from exc


def _clean_name(name: str) -> str:
    """TFLite signature tensors are named like ``serving_default_x:0``; keep the short name."""
    base = name.split(":")[0]
    return base.removeprefix("serving_default_")


def _is_quantized(detail: Mapping[str, Any]) -> bool:
    scale, _zero = detail.get("quantization", (0.0, 0))
    return bool(scale) and np.dtype(detail["dtype"]).kind in "iu"


def _litert_spec(detail: Mapping[str, Any]) -> TensorSpec:
    sig = detail.get("shape_signature")
    dims = sig if sig is not None and len(sig) else detail["shape"]
    shape: list[Dim] = [
        int(d) if d >= 0 else ("batch" if i == 0 else f"dim{i}") for i, d in enumerate(dims)
    ]
    dtype = "float32" if _is_quantized(detail) else np.dtype(detail["dtype"]).name
    return TensorSpec(name=_clean_name(detail["name"]), dtype=dtype, shape=tuple(shape))


def _quantize(arr: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if not _is_quantized(detail):
        return arr.astype(detail["dtype"], copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    q = np.round(arr / scale + zero)
    out: np.ndarray = np.clip(q, info.min, info.max).astype(detail["dtype"])
    return out


def _dequantize(arr: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if not _is_quantized(detail):
        return np.array(arr)
    scale, zero = detail["quantization"]
    out: np.ndarray = ((arr.astype(np.float32) - zero) * scale).astype(np.float32)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:500] if lines else type(exc).__name__
