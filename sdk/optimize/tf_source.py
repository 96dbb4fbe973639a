"""A Keras model or a TensorFlow SavedModel given to :func:`sdk.optimize.optimize`: converted
once, in the search's ``<out>-source`` folder, to a float TFLite (TensorFlow's converter) and to
ONNX (tf2onnx), and then searched like a PyTorch model (:mod:`sdk.optimize.runtimes`): ONNX
Runtime candidates from ``model.onnx``, LiteRT ones from ``model.tflite``, within the runtimes
:attr:`~sdk.optimize.OptimizeConfig.runtime` and the target allow.

The model is a ``keras.Model`` (a subclassed one of one input takes its input spec from the
calibration data), a ``.keras`` or ``.h5`` file, or a SavedModel directory (``saved_model.pb``
inside; its ``serving_default`` signature, else its only one). Both converters are handed the
same function: the model called on its inputs in order, with the calibration data's names (a
single input takes whatever its key; several are matched by name, and a missing or unknown name
is a one-line error).

The batch is kept as the PyTorch path keeps it: the ONNX model takes any batch unless the model
was built at batch 1; the TFLite is converted at batch 1, the batch a board runs; a model built
with a fixed batch of more than one is refused. Both files name their inputs after the
calibration data and their outputs after the model's (a Keras model's ``output_names``, a
signature's output keys), so every candidate takes the same feed.

Needs the ``tf`` extra (``pip install 'edgeship[tf]'``: TensorFlow, tf2onnx, LiteRT); without
TensorFlow the search stops with one line saying so. Without tf2onnx alone only the float TFLite
is made and only LiteRT candidates are searched, with a note.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdk.artifact import ModelArtifact, read_artifact
from sdk.data import DataSource
from sdk.errors import ConfigError

__all__ = ["TF_INSTALL", "is_saved_model_dir", "is_tf_model", "tf_source_model"]

TF_INSTALL = "pip install 'edgeship[tf]'"
_KERAS_SUFFIXES = (".keras", ".h5")
#: ONNX opset of the tf2onnx conversion: ONNX Runtime 1.17 (the oldest the agent extra allows)
#: runs it.
ONNX_OPSET = 17


def is_saved_model_dir(path: Path) -> bool:
    """Whether ``path`` is a SavedModel directory (it holds ``saved_model.pb``)."""
    return path.is_dir() and (path / "saved_model.pb").is_file()


def is_tf_model(model: Any) -> bool:
    """Whether ``model`` is a Keras model, a ``.keras``/``.h5`` file or a SavedModel directory
    (decided without importing TensorFlow for a path)."""
    if isinstance(model, str | Path):
        path = Path(model)
        return path.suffix.lower() in _KERAS_SUFFIXES or is_saved_model_dir(path)
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(model, keras.Model)


@dataclass(frozen=True)
class _Model:
    """The model as one function of its inputs, in order, returning a list of outputs."""

    what: str  # "the Keras model" / "SavedModel dir/": how errors and notes name it
    call: Any  # a function of the inputs, in order, returning a list (tf.function it)
    inputs: list[tuple[str, tuple[int | None, ...], Any]]  # (name, shape, tf dtype)
    outputs: list[str]  # the function's outputs, in order (a signature's keys)
    names: list[str]  # what the converted files call them (a Keras model's output_names)
    trackable: Any  # holds the variables the function reads


def tf_source_model(
    model: Any, calibration: DataSource | None, folder: Path, runtime: str
) -> ModelArtifact:
    """``model`` converted in ``folder``: the ONNX artifact (``details["tflite_source"]`` the
    float TFLite beside it), or, with ``runtime="litert"`` or without tf2onnx, the float TFLite
    artifact alone. ``runtime="onnxruntime"`` makes the ONNX model alone."""
    from sdk.optimize.runtimes import make_source_folder, refuse_existing

    refuse_existing(folder)
    tf = _import_tf()
    make_source_folder(folder)
    loaded = _load(tf, model, folder, calibration)
    arrays = _input_arrays(calibration, loaded.what)
    keys = _match_inputs(loaded, arrays)
    fixed = _fixed_batch(loaded)
    want_onnx = runtime != "litert"
    missing_onnx = _tf2onnx_missing() if want_onnx else None
    if missing_onnx is not None and runtime == "onnxruntime":
        raise ConfigError(f"{loaded.what} to ONNX (--runtime onnxruntime): {missing_onnx}")
    notes = []
    onnx_path = tflite_path = None
    failed: dict[str, ConfigError] = {}
    if want_onnx and missing_onnx is None:
        try:
            onnx_path = _to_onnx(tf, loaded, keys, arrays, fixed, folder / "model.onnx")
        except ConfigError as exc:
            failed["ONNX Runtime"] = exc
    elif missing_onnx is not None:
        notes.append(f"no ONNX Runtime candidates: {missing_onnx}")
    if runtime != "onnxruntime":
        try:
            tflite_path = _to_tflite(tf, loaded, keys, arrays, folder / "model.tflite")
        except ConfigError as exc:
            failed["LiteRT"] = exc
    if onnx_path is None and tflite_path is None:
        raise ConfigError("; ".join(str(e) for e in failed.values())) from None
    notes += [f"no {name} candidates: {exc}" for name, exc in failed.items()]
    notes += _fixed_dims(loaded, keys, arrays)
    made = " and ".join(str(p) for p in (onnx_path, tflite_path) if p is not None)
    notes.insert(0, f"{loaded.what} converted to {made} (TensorFlow {tf.__version__})")
    details: dict[str, Any] = {"made_from": loaded.what, "notes": notes}
    if onnx_path is None:
        assert tflite_path is not None  # runtime is "litert", or ONNX was not made
        details["litert_only"] = runtime == "litert"
        return read_artifact(tflite_path, recipe="fp32").with_details(**details)
    if tflite_path is not None:
        details["tflite_source"] = str(tflite_path)
    return read_artifact(onnx_path, recipe="fp32").with_details(**details)


def _import_tf() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ConfigError(
            f"a Keras model or SavedModel is converted with TensorFlow, which is not "
            f"installed ({exc}): {TF_INSTALL}"
        ) from None
    return tf


def _tf2onnx_missing() -> str | None:
    from importlib.util import find_spec

    if find_spec("tf2onnx") is None:
        return f"converting to ONNX needs tf2onnx: {TF_INSTALL}"
    return None


def _load(tf: Any, model: Any, folder: Path, calibration: DataSource | None) -> _Model:
    """The model as one function; a Keras model is exported to a SavedModel in ``folder``
    first (called directly, TensorFlow's converter would keep its weights as variables)."""
    import keras

    if isinstance(model, keras.Model):
        return _from_keras(tf, model, f"the Keras model {model.name!r}", folder, calibration)
    path = Path(model)
    if is_saved_model_dir(path):
        return _from_saved_model(tf, path, f"SavedModel {path.name}/")
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        with _quiet_tf():
            loaded = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ConfigError(f"{path.name}: Keras cannot load it ({_one_line(exc)})") from None
    return _from_keras(tf, loaded, path.name, folder, calibration)


def _from_keras(
    tf: Any, model: Any, what: str, folder: Path, calibration: DataSource | None
) -> _Model:
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    signature = None if inputs else _subclassed_signature(tf, model, what, calibration)
    saved = folder / "saved_model"
    try:
        with _quiet_tf(), contextlib.redirect_stdout(None):
            model.export(
                str(saved), format="tf_saved_model", verbose=False, input_signature=signature
            )
    except Exception as exc:
        raise ConfigError(f"{what}: Keras cannot export it ({_one_line(exc)})") from None
    order = [str(t.name) for t in inputs] or [str(s.name) for s in signature or []]
    loaded = _from_saved_model(tf, saved, what, order)
    shapes = {str(t.name): tuple(t.shape) for t in inputs}  # the export frees a fixed batch
    loaded = replace(loaded, inputs=[(n, shapes.get(n, s), d) for n, s, d in loaded.inputs])
    names = [str(n) for n in getattr(model, "output_names", None) or []]
    if len(names) == len(loaded.outputs) and len(set(names)) == len(names):
        loaded = replace(loaded, names=names)  # the export names them output_0, output_1, ...
    return loaded


def _subclassed_signature(
    tf: Any, model: Any, what: str, calibration: DataSource | None
) -> list[Any]:
    """A model without known inputs (a subclassed ``keras.Model``) of one input: its input
    spec taken from the calibration data (any batch; a float array as float32), the model
    called on one sample first if it was never called."""
    arrays = _input_arrays(calibration, what)
    advice = (
        "wrap it in a functional model (x = keras.Input(shape); keras.Model(x, model(x))) or "
        "give its SavedModel (model.export(dir))"
    )
    if len(arrays) != 1:
        raise ConfigError(
            f"{what} has no known inputs (a subclassed model) and the calibration data has "
            f"{len(arrays)}, which cannot be matched to its call's arguments: {advice}"
        )
    key, array = next(iter(arrays.items()))
    dtype = tf.float32 if array.dtype.kind == "f" else tf.as_dtype(array.dtype)
    spec = tf.TensorSpec([None, *array.shape[1:]], dtype, name=key)
    if not model.built:
        try:
            with _quiet_tf():
                model(tf.constant(array[:1], dtype=dtype))
        except Exception as exc:
            raise ConfigError(
                f"{what} has no known inputs and does not run on calibration data's {key!r} "
                f"{tuple(array.shape)} ({_one_line(exc)}): {advice}"
            ) from None
    return [spec]


def _from_saved_model(tf: Any, path: Path, what: str, order: list[str] | None = None) -> _Model:
    """The signature's function; its inputs in ``order`` (a Keras model's) when given."""
    try:
        with _quiet_tf():
            loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise ConfigError(f"{what}: TensorFlow cannot load it ({_one_line(exc)})") from None
    signatures = dict(loaded.signatures)
    if "serving_default" in signatures:
        signature = signatures["serving_default"]
    elif len(signatures) == 1:
        signature = next(iter(signatures.values()))
    else:
        raise ConfigError(
            f"{what} has no serving_default signature and {len(signatures)} others "
            f"({', '.join(sorted(signatures)) or 'none'}): save it with one"
        )
    args, kwargs = signature.structured_input_signature
    if args:
        raise ConfigError(f"{what}: its signature takes positional inputs; save named ones")
    names = order if order is not None and sorted(order) == sorted(kwargs) else list(kwargs)
    outputs = sorted(signature.structured_outputs, key=_natural)

    def call(*xs: Any) -> list[Any]:
        result = signature(**dict(zip(names, xs, strict=True)))
        return [result[k] for k in outputs]

    specs = [(n, tuple(kwargs[n].shape.as_list()), kwargs[n].dtype) for n in names]
    return _Model(what, call, specs, outputs, list(outputs), loaded)


def _natural(name: str) -> tuple[str, int]:
    """``output_2`` before ``output_10``."""
    stem, _, number = name.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (name, -1)


def _input_arrays(calibration: DataSource | None, what: str) -> dict[str, np.ndarray]:
    from sdk.optimize.runtimes import source_arrays

    return source_arrays(calibration, f"{what} is converted", "a Keras model or SavedModel")


def _match_inputs(model: _Model, arrays: dict[str, np.ndarray]) -> list[str]:
    """The calibration key for each of the model's inputs, in order: a single input takes
    whatever its key; several are matched by name. Shapes (past the batch) are checked too."""
    names = [name for name, _, _ in model.inputs]
    if len(names) == 1 and len(arrays) == 1:
        keys = list(arrays)
    else:
        from sdk.optimize.runtimes import check_input_names

        check_input_names(arrays, names, f"{model.what}'s inputs")
        keys = names
    for key, (name, shape, _) in zip(keys, model.inputs, strict=True):
        got = arrays[key].shape
        if len(got) != len(shape) or any(
            d is not None and d != g for d, g in zip(shape[1:], got[1:], strict=True)
        ):
            raise ConfigError(
                f"{model.what}'s input {name!r} takes {_shape_text(shape)}; calibration data's "
                f"{key!r} is {tuple(got)}"
            )
    return keys


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("batch" if d is None else str(d) for d in shape) + ")"


def _fixed_batch(model: _Model) -> bool:
    """Whether the model was built at batch 1 (a fixed batch of more is refused)."""
    batches = {shape[0] if shape else None for _, shape, _ in model.inputs}
    fixed = [b for b in batches if b is not None]
    if any(b != 1 for b in fixed):
        raise ConfigError(
            f"{model.what} was built with a fixed batch of {fixed[0]}: build it with batch 1 "
            "or a free batch (keras.Input(shape) without batch_size)"
        )
    return bool(fixed)


def _fixed_dims(model: _Model, keys: list[str], arrays: dict[str, np.ndarray]) -> list[str]:
    """A note for each input dimension past the batch the model leaves free: the converted
    files take the calibration data's (TFLite needs static shapes; the ONNX keeps to them)."""
    notes = []
    for key, (name, shape, _) in zip(keys, model.inputs, strict=True):
        got = arrays[key].shape
        free = [f"{i} at {got[i]}" for i, d in enumerate(shape) if i > 0 and d is None]
        if free:
            notes.append(
                f"{model.what}'s input {name!r} has free dimension(s) past the batch, fixed "
                f"from the calibration data's {key!r} {tuple(got)}: dimension "
                f"{', '.join(free)} (a TFLite model has static shapes, and the ONNX is "
                "converted at the same ones); eval data and the board must use them"
            )
    return notes


def _specs(
    tf: Any, model: _Model, keys: list[str], arrays: dict[str, np.ndarray], batch: int | None
) -> list[Any]:
    """Input specs named after the calibration keys, with ``batch`` (None: any); other unknown
    dimensions take the calibration data's."""
    specs = []
    for key, (_, shape, dtype) in zip(keys, model.inputs, strict=True):
        got = arrays[key].shape
        dims = [batch, *(g if d is None else d for d, g in zip(shape[1:], got[1:], strict=True))]
        specs.append(tf.TensorSpec(dims, dtype, name=key))
    return specs


def _to_onnx(
    tf: Any,
    model: _Model,
    keys: list[str],
    arrays: dict[str, np.ndarray],
    fixed: bool,
    path: Path,
) -> Path:
    import onnx
    import tf2onnx

    specs = _specs(tf, model, keys, arrays, 1 if fixed else None)
    try:
        with _quiet_tf():
            proto, _ = tf2onnx.convert.from_function(
                _function(tf, model), input_signature=specs, opset=ONNX_OPSET
            )
    except Exception as exc:
        raise ConfigError(f"tf2onnx cannot convert {model.what}: {_one_line(exc)}") from None
    _check_onnx(proto, model.what)
    outputs = [o.name for o in proto.graph.output]
    _rename_onnx(proto, dict(zip(outputs, model.names, strict=True)))
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:  # tf2onnx calls it unk__<n>, the PyTorch path "batch"
            dims[0].dim_param = "batch"
    onnx.save(proto, str(path))
    return path


def _check_onnx(proto: Any, what: str) -> None:
    """tf2onnx logs an op it cannot convert and leaves the TensorFlow op in the graph: name
    those ops (or what else ONNX's checker finds) in one line."""
    import onnx

    unknown = sorted(
        {n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")}
        - {s.name for s in onnx.defs.get_all_schemas()}
    )
    if unknown:
        raise ConfigError(
            f"tf2onnx cannot convert {what}: ONNX has no op for TensorFlow's {', '.join(unknown)}"
        )
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ConfigError(
            f"tf2onnx cannot convert {what}: its ONNX fails ONNX's model check ({_one_line(exc)})"
        ) from None


def _function(tf: Any, model: _Model) -> Any:
    """A fresh tf.function of the model for each conversion: one traced at any batch would be
    reused for batch 1 (TensorFlow picks a more general trace over a new one)."""
    return tf.function(model.call, autograph=False)


def _rename_onnx(proto: Any, names: dict[str, str]) -> None:
    """Rename the graph's tensors ``names`` maps, wherever they appear."""
    graph = proto.graph
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = names.get(value.name, value.name)


def _to_tflite(
    tf: Any, model: _Model, keys: list[str], arrays: dict[str, np.ndarray], path: Path
) -> Path:
    specs = _specs(tf, model, keys, arrays, 1)
    try:
        with _quiet_tf():
            concrete = _function(tf, model).get_concrete_function(*specs)
            converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], model.trackable)
            path.write_bytes(converter.convert())
    except Exception as exc:
        ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op", str(exc))))
        why = f"LiteRT has no builtin op for TensorFlow's {', '.join(ops)}" if ops else None
        raise ConfigError(
            f"TensorFlow's TFLite converter cannot convert {model.what}: "
            f"{why or _converter_text(exc)}"
        ) from None
    _name_tflite(path, keys, model.names)
    return path


def _name_tflite(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Name the TFLite's input tensors after the calibration keys (its signature's already are)
    and its outputs ``output_<i>`` after the model's outputs, in the model's order."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    sig = model.signatureDefs[0]
    subgraph = model.subgraphs[sig.subgraphIndex]
    by_name = {_text(e.name): e for e in sig.inputs}
    for key in inputs:
        subgraph.tensors[by_name[key].tensorIndex].name = key.encode()
    order = {f"output_{i}": name for i, name in enumerate(outputs)}
    found = sorted(_text(e.name) for e in sig.outputs)
    if found != sorted(order):
        raise ConfigError(f"the TFLite conversion's outputs {found} are not {sorted(order)}")
    entries = sorted(sig.outputs, key=lambda e: list(order).index(_text(e.name)))
    for entry in entries:
        name = order[_text(entry.name)]
        entry.name = name.encode()
        subgraph.tensors[entry.tensorIndex].name = name.encode()
    subgraph.outputs = np.array([e.tensorIndex for e in entries], dtype=np.int32)
    flatbuffer_utils.write_model(model, str(path))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _converter_text(exc: BaseException) -> str:
    """The converter's message without the MLIR source locations it prints (the caller's
    script, ``/path/to/edgeship:6:1:``, ``loc(...)``)."""
    text = _one_line(exc)
    text = re.sub(r"(?:<unknown>|(?:/[^\s:\"]+)+):\d+(?::\d+)?:\s*", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _one_line(exc: BaseException) -> str:
    from sdk.export_common import one_line

    return one_line(exc)


@contextlib.contextmanager
def _quiet_tf() -> Iterator[None]:
    """tf2onnx and TensorFlow log each step at INFO (and warnings a user cannot act on)."""
    loggers = [logging.getLogger(n) for n in ("tf2onnx", "tensorflow", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # tf2onnx's errors (an op it cannot convert) are raised as one line
        lg.setLevel(logging.CRITICAL if lg.name == "tf2onnx" else logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
