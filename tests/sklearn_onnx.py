"""Fitted scikit-learn classifiers written as ONNX graphs shaped like skl2onnx's defaults.

skl2onnx is not installed in the dev venv, so the tests build the same graphs it writes with
``onnx.helper``, from the fitted estimator's own numbers (the ONNX model predicts what the
estimator predicts): input ``X`` (float, ``[N, features]``), output ``output_label`` (int64,
``[N]``, through a Cast) and output ``output_probability`` (a ZipMap: ``seq(map(int64,
tensor(float)))``), ai.onnx.ml operators for trees and linear models, MatMul/Add/Relu/Softmax
for an MLP, element-wise distances, TopK and ArrayFeatureExtractor for k nearest neighbours.
The layouts follow skl2onnx's converters (GradientBoosting.py, LinearClassifier.py,
multilayer_perceptron.py, zip_map.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "calibrated_linear_onnx",
    "gradient_boosting_onnx",
    "logistic_regression_onnx",
    "mlp_onnx",
    "nearest_neighbors_onnx",
]

_OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]


def _outputs(
    probabilities: str, label: str, classes: list[int], zipmap: bool
) -> tuple[list[Any], list[Any]]:
    """skl2onnx's tail: label cast to int64, probabilities zipped into a map per sample (with
    ``zipmap=False``: the two tensors as they are, named ``label`` and ``probabilities``)."""
    if not zipmap:
        return [
            helper.make_node("Cast", [label], ["label_int64"], to=TensorProto.INT64),
            helper.make_node("Identity", [probabilities], ["probabilities_out"]),
        ], [
            helper.make_tensor_value_info("label_int64", TensorProto.INT64, [None]),
            helper.make_tensor_value_info(
                "probabilities_out", TensorProto.FLOAT, [None, len(classes)]
            ),
        ]
    nodes = [
        helper.make_node("Cast", [label], ["output_label"], to=TensorProto.INT64),
        helper.make_node(
            "ZipMap",
            [probabilities],
            ["output_probability"],
            domain="ai.onnx.ml",
            classlabels_int64s=classes,
        ),
    ]
    zipped = helper.make_sequence_type_proto(
        helper.make_map_type_proto(
            TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
        )
    )
    outputs = [
        helper.make_tensor_value_info("output_label", TensorProto.INT64, [None]),
        helper.make_value_info("output_probability", zipped),
    ]
    return nodes, outputs


def _save(
    nodes: list[Any],
    features: int,
    outputs: list[Any],
    path: Path,
    initializers: list[Any] | None = None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "sklearn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, features])],
        outputs,
        initializer=initializers or [],
    )
    model = helper.make_model(graph, opset_imports=_OPSETS, producer_name="skl2onnx")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def gradient_boosting_onnx(model: Any, path: Path, *, zipmap: bool = True) -> Path:
    """A fitted multiclass ``GradientBoostingClassifier`` as TreeEnsembleClassifier + ZipMap."""
    features = int(model.n_features_in_)
    classes = [int(c) for c in model.classes_]
    keys = [
        "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_values", "nodes_modes",
        "nodes_truenodeids", "nodes_falsenodeids", "class_treeids", "class_nodeids", "class_ids",
        "class_weights",
    ]  # fmt: skip
    attrs: dict[str, list[Any]] = {key: [] for key in keys}
    for i, stage in enumerate(model.estimators_):
        for c, estimator in enumerate(stage):
            _add_tree(attrs, estimator.tree_, i * len(classes) + c, c, model.learning_rate)
    base = model._raw_predict_init(np.zeros((1, features))).ravel()
    tree = helper.make_node(
        "TreeEnsembleClassifier",
        ["X"],
        ["label", "probabilities"],
        domain="ai.onnx.ml",
        classlabels_int64s=classes,
        post_transform="SOFTMAX",
        base_values=[float(v) for v in base],
        **attrs,
    )
    nodes, outputs = _outputs("probabilities", "label", classes, zipmap)
    return _save([tree, *nodes], features, outputs, path)


def _add_tree(
    attrs: dict[str, list[Any]], tree: Any, tree_id: int, cls: int, weight: float
) -> None:
    for node in range(tree.node_count):
        left, right = int(tree.children_left[node]), int(tree.children_right[node])
        leaf = left == -1
        attrs["nodes_treeids"].append(tree_id)
        attrs["nodes_nodeids"].append(node)
        attrs["nodes_featureids"].append(0 if leaf else int(tree.feature[node]))
        attrs["nodes_values"].append(0.0 if leaf else float(tree.threshold[node]))
        attrs["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
        attrs["nodes_truenodeids"].append(0 if leaf else left)
        attrs["nodes_falsenodeids"].append(0 if leaf else right)
        if leaf:
            attrs["class_treeids"].append(tree_id)
            attrs["class_nodeids"].append(node)
            attrs["class_ids"].append(cls)
            attrs["class_weights"].append(float(tree.value[node].ravel()[0]) * weight)


def logistic_regression_onnx(model: Any, path: Path, *, zipmap: bool = True) -> Path:
    """A fitted multinomial ``LogisticRegression`` as LinearClassifier + Normalizer + ZipMap."""
    classes = [int(c) for c in model.classes_]
    linear = helper.make_node(
        "LinearClassifier",
        ["X"],
        ["label", "scores"],
        domain="ai.onnx.ml",
        classlabels_ints=classes,
        coefficients=[float(v) for v in model.coef_.ravel()],
        intercepts=[float(v) for v in model.intercept_],
        multi_class=1,
        post_transform="SOFTMAX",
    )
    normalizer = helper.make_node(
        "Normalizer", ["scores"], ["probabilities"], domain="ai.onnx.ml", norm="L1"
    )
    nodes, outputs = _outputs("probabilities", "label", classes, zipmap)
    return _save([linear, normalizer, *nodes], int(model.n_features_in_), outputs, path)


def mlp_onnx(model: Any, path: Path, *, zipmap: bool = True) -> Path:
    """A fitted ``MLPClassifier`` (ReLU, multiclass) as MatMul/Add/Relu/Softmax, then ArgMax ->
    ArrayFeatureExtractor over the classes for the label, and a ZipMap."""
    classes = [int(c) for c in model.classes_]
    nodes: list[Any] = []
    inits: list[Any] = []
    x = "X"
    last = len(model.coefs_) - 1
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"coefficient{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"intercepts{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"coefficient{i}"], [f"mul_result{i}"]),
            helper.make_node("Add", [f"mul_result{i}", f"intercepts{i}"], [f"add_result{i}"]),
        ]
        x = f"add_result{i}"
        if i < last:
            nodes.append(helper.make_node("Relu", [x], [f"next_activations{i}"]))
            x = f"next_activations{i}"
    inits.append(numpy_helper.from_array(np.array(classes, dtype=np.int64), "classes"))
    nodes += [
        helper.make_node("Softmax", [x], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["argmax_output"], axis=1),
        helper.make_node(
            "ArrayFeatureExtractor",
            ["classes", "argmax_output"],
            ["array_feature_extractor_result"],
            domain="ai.onnx.ml",
        ),
        helper.make_node("Reshape", ["array_feature_extractor_result", "shape"], ["label"]),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "shape"))
    tail, outputs = _outputs("probabilities", "label", classes, zipmap)
    return _save([*nodes, *tail], int(model.n_features_in_), outputs, path, inits)


def calibrated_linear_onnx(model: Any, path: Path, *, zipmap: bool = True) -> Path:
    """A fitted binary ``CalibratedClassifierCV(LinearSVC(), ensemble=False)`` (sigmoid) as
    skl2onnx lays it out: the SVM's decision value from an ai.onnx.ml operator, then Platt's
    sigmoid ``1 / (1 + exp(a * f + b))`` in plain arithmetic (Mul, Add, Exp, Div, Sub, Concat),
    then ArgMax over the two probabilities for the label."""
    (calibrated,) = model.calibrated_classifiers_
    svm, (platt,) = calibrated.estimator, calibrated.calibrators
    classes = [int(c) for c in model.classes_]
    linear = helper.make_node(
        "LinearRegressor",
        ["X"],
        ["decision"],
        domain="ai.onnx.ml",
        coefficients=[float(v) for v in svm.coef_.ravel()],
        intercepts=[float(v) for v in svm.intercept_],
    )
    consts = {"a": platt.a_, "b": platt.b_, "one": 1.0}
    inits = [numpy_helper.from_array(np.array([v], np.float32), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.array(classes, dtype=np.int64), "classes"))
    nodes = [
        linear,
        helper.make_node("Mul", ["decision", "a"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["expd"]),
        helper.make_node("Add", ["expd", "one"], ["denominator"]),
        helper.make_node("Div", ["one", "denominator"], ["positive"]),
        helper.make_node("Sub", ["one", "positive"], ["negative"]),
        helper.make_node("Concat", ["negative", "positive"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["argmax_output"], axis=1),
        helper.make_node(
            "ArrayFeatureExtractor", ["classes", "argmax_output"], ["label"], domain="ai.onnx.ml"
        ),
    ]
    tail, outputs = _outputs("probabilities", "label", classes, zipmap)
    return _save([*nodes, *tail], int(svm.n_features_in_), outputs, path, inits)


def nearest_neighbors_onnx(model: Any, path: Path, *, zipmap: bool = True) -> Path:
    """A fitted uniform-weight ``KNeighborsClassifier`` (Euclidean) laid out as skl2onnx's
    converter does, with no operator of ONNX Runtime's default int8 types: squared distances to
    every training point (element-wise; skl2onnx computes them in a Scan), TopK of their
    negation, the neighbours' classes through ArrayFeatureExtractor, and votes counted with
    Equal/Cast/ReduceSum, divided by k."""
    classes = [int(c) for c in model.classes_]
    k = int(model.n_neighbors)
    points = np.asarray(model._fit_X, np.float32)
    labels = np.asarray(model._y, np.int64).reshape(1, -1)  # class indices, as skl2onnx keeps
    consts = [
        numpy_helper.from_array(points[None], "points"),
        numpy_helper.from_array(labels, "point_classes"),
        numpy_helper.from_array(np.arange(len(classes), dtype=np.int64)[None, None], "class_ids"),
        numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
        numpy_helper.from_array(np.array([2], np.int64), "last_axis"),
        numpy_helper.from_array(np.array([k], np.int64), "k"),
        numpy_helper.from_array(np.array([-1, k], np.int64), "by_k"),
        numpy_helper.from_array(np.array(float(k), np.float32), "k_float"),
    ]
    node = helper.make_node
    nodes = [
        node("Unsqueeze", ["X", "one_axis"], ["x3"]),
        node("Sub", ["x3", "points"], ["diff"]),
        node("Mul", ["diff", "diff"], ["squares"]),
        node("ReduceSum", ["squares", "last_axis"], ["dist"], keepdims=0),
        node("Neg", ["dist"], ["closeness"]),
        node("TopK", ["closeness", "k"], ["_top", "neighbours"]),
        node("Flatten", ["neighbours"], ["flat"], axis=0),
        node(
            "ArrayFeatureExtractor", ["point_classes", "flat"], ["votes_flat"], domain="ai.onnx.ml"
        ),
        node("Reshape", ["votes_flat", "by_k"], ["votes"]),
        node("Unsqueeze", ["votes", "last_axis"], ["votes3"]),
        node("Equal", ["votes3", "class_ids"], ["hits"]),
        node("Cast", ["hits"], ["hits_f"], to=TensorProto.FLOAT),
        node("ReduceSum", ["hits_f", "one_axis"], ["counts"], keepdims=0),
        node("Div", ["counts", "k_float"], ["probabilities"]),
        node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    tail, outputs = _outputs("probabilities", "label", classes, zipmap)
    return _save([*nodes, *tail], int(model.n_features_in_), outputs, path, consts)
