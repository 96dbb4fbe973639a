"""scikit-learn models as skl2onnx writes them, made into models with tensor outputs.

skl2onnx's default classifier graph ends in two outputs: ``output_label`` (the predicted class,
int64 or string) and ``output_probability``, a ZipMap node's ``seq(map(class, float))``: one
dictionary per sample. Neither ONNX Runtime's quantizer, evaluation, the outlier detector nor
the agent's telemetry can use a sequence of maps, so a model that has a ZipMap output is
rewritten once, where it is read (:func:`sdk.artifact.read_artifact`):

* each ZipMap feeding a graph output is removed and its input, the ``(N, classes)`` float
  probability tensor, becomes that output under the same name (columns in the ZipMap's class
  order, which is ``estimator.classes_``);
* the other outputs that are not floating-point tensors (the labels) are dropped, with the
  nodes only they used: the predicted class is the probability tensor's argmax, and everything
  downstream scores output 0 as a float tensor (evaluation's top-1, the outlier detector's
  energy, the agent's reference statistics). A model skl2onnx converted with
  ``options={id(estimator): {"zipmap": False}}`` has no ZipMap but the same int64 label
  before its probabilities: it loses that label the same way.

Each change is said in one note line. The rewritten model is written under the cache directory
(``$EDGESHIP_CACHE_DIR/converted``, else ``$XDG_CACHE_HOME/edgeship/converted``, else
``~/.cache/edgeship/converted``), keyed by the original file's SHA-256, under the original file
name; the user's file is never changed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdk.cache_dirs import edgeship_cache
from sdk.errors import ModelFormatError

__all__ = ["TensorOutputs", "converted_cache", "tensor_outputs", "unzip_outputs"]

# Bump when the rewrite changes, so older cached conversions are not reused.
_REWRITE_VERSION = "1"
_ML_DOMAIN = "ai.onnx.ml"


@dataclass(frozen=True)
class TensorOutputs:
    """A rewritten model: its proto, one note per change, and the probability columns' class
    labels (the ZipMap's, in column order; None without a ZipMap that names them)."""

    model: Any
    notes: tuple[str, ...]
    class_labels: tuple[str, ...] | None

    def details(self, source: Path) -> dict[str, Any]:
        """What :func:`~sdk.artifact.read_artifact` records in the artifact's ``details``."""
        return {
            "converted_from": str(source),
            "notes": list(self.notes),
            "class_labels": None if self.class_labels is None else list(self.class_labels),
        }


# Ops whose float output is class probabilities (or scores): skl2onnx classifiers.
_CLASSIFIER_OPS = frozenset(
    {"TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier", "Softmax"}
)


def converted_cache() -> Path:
    """Where rewritten models are kept (module docstring)."""
    return edgeship_cache("converted")


def tensor_outputs(path: Path, model: Any) -> tuple[Path, TensorOutputs] | None:
    """The rewritten copy of ``path`` (whose parsed proto is ``model``) and what was changed,
    or None when the model has no ZipMap output (it is used as it is)."""
    rewritten = unzip_outputs(model)
    if rewritten is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(_REWRITE_VERSION.encode())
    target = converted_cache() / digest.hexdigest()[:32] / path.name
    # Written every time, never reused: the rewrite is cheap, and a file found in a shared
    # cache is not to be trusted with what gets optimized, signed and deployed.
    _save_atomically(rewritten.model, target)
    return target, rewritten


def _save_atomically(model: Any, target: Path) -> None:
    import onnx

    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        os.close(fd)
        try:
            onnx.save(model, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(
            f"cannot write the model with its ZipMap output removed to {target.parent}: {exc}; "
            "set EDGESHIP_CACHE_DIR to a writable directory, or convert the model with "
            "skl2onnx's options={id(model): {'zipmap': False}}"
        ) from exc


def unzip_outputs(model: Any) -> TensorOutputs | None:
    """``model`` with its ZipMap outputs made probability tensors and its label outputs
    dropped (module docstring), or None when there is nothing to change: no graph output comes
    from a ZipMap, and the model is not a skl2onnx classifier with a label output beside its
    float ones (``zipmap=False``)."""
    import onnx

    outputs = {o.name for o in model.graph.output}
    zipmaps = [
        n
        for n in model.graph.node
        if n.op_type == "ZipMap" and n.domain == _ML_DOMAIN and n.output[0] in outputs
    ]
    if not zipmaps and not (
        model.producer_name == "skl2onnx"
        and _label_outputs(model.graph)
        and any(n.op_type in _CLASSIFIER_OPS for n in model.graph.node)
    ):
        # A label beside float outputs is a classifier's only when the graph classifies: for
        # KMeans the floats are distances, for IsolationForest the label is the answer.
        return None
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    notes: list[str] = []
    labels: tuple[str, ...] | None = None
    for node in zipmaps:
        classes = _class_labels(node)
        labels = labels or classes
        _unzip(graph, node, classes)
        columns = "?" if classes is None else str(len(classes))
        notes.append(
            f"{node.output[0]}: ZipMap removed, the output is the (N, {columns}) probability "
            f"tensor{_column_order(classes)}"
        )
    dropped = _label_outputs(graph)
    kept = [o for o in graph.output if o.name not in dropped]
    del graph.output[:]
    graph.output.extend(kept)
    for name in dropped:
        notes.append(
            f"{name}: dropped (the predicted class is {kept[0].name}'s argmax; edgeship scores "
            "float outputs)"
        )
    _prune(graph)
    return TensorOutputs(model=rewritten, notes=tuple(notes), class_labels=labels)


def _class_labels(node: Any) -> tuple[str, ...] | None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name in ("classlabels_int64s", "classlabels_strings"):
            values = helper.get_attribute_value(attr)
            return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)
    return None


def _column_order(classes: tuple[str, ...] | None) -> str:
    if classes is None:
        return ""
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return f", columns in class order {shown}"


def _unzip(graph: Any, zipmap: Any, classes: tuple[str, ...] | None) -> None:
    """Remove ``zipmap`` and have its input tensor produced under the ZipMap's output name."""
    from onnx import TensorProto, helper

    source, name = zipmap.input[0], zipmap.output[0]
    index = list(graph.node).index(zipmap)
    graph.node.remove(zipmap)
    produced = any(source in n.output for n in graph.node)
    if produced and source not in {o.name for o in graph.output}:
        _rename(graph, source, name)
    else:  # a graph input, an initializer or another output: keep it, copy it out
        graph.node.insert(index, helper.make_node("Identity", [source], [name], name=name))
    position = [o.name for o in graph.output].index(name)
    batch = _batch_dim(graph)
    dims: list[int | str | None] = [batch, None if classes is None else len(classes)]
    graph.output[position].CopyFrom(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))


def _batch_dim(graph: Any) -> str | int | None:
    """The first input's first dimension (a name or a size), else None (unknown)."""
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            first = dims[0]
            if first.HasField("dim_value"):
                return int(first.dim_value)
            return first.dim_param or None
    return None


def _rename(graph: Any, old: str, new: str) -> None:
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value == old:
                node.input[i] = new
        for i, value in enumerate(node.output):
            if value == old:
                node.output[i] = new
    for info in graph.value_info:
        if info.name == old:
            info.name = new


_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _label_outputs(graph: Any) -> list[str]:
    """The outputs that are not floating-point tensors (a classifier's labels), when at least
    one output is one (else none: such a model keeps its outputs)."""
    labels = [
        o.name
        for o in graph.output
        if not o.type.HasField("tensor_type") or o.type.tensor_type.elem_type not in _FLOAT_TYPES
    ]
    return labels if len(labels) < len(graph.output) else []


def _prune(graph: Any) -> None:
    """Drop the nodes, initializers and value infos no graph output depends on."""
    needed = {o.name for o in graph.output}
    kept: list[Any] = []
    for node in reversed(graph.node):
        if any(o and o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_names(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _subgraph_names(node: Any) -> Iterable[str]:
    """Every name a node's subgraphs (If, Loop, Scan) read: outer-scope values among them."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else []
        for sub in [*graphs, *attr.graphs]:
            for inner in sub.node:
                yield from (i for i in inner.input if i)
                yield from _subgraph_names(inner)
