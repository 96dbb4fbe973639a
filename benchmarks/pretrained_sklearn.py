"""A pretrained scikit-learn estimator from a PyPI wheel, for ``pretrained_path.py``.

``alt-profanity-check`` ships a fitted ``CalibratedClassifierCV(LinearSVC)`` and its
``TfidfVectorizer`` as joblib files inside its wheel (``profanity_check/data/``); the package's
version follows the scikit-learn it was pickled with, so both are pinned together here. The
estimator is converted with skl2onnx's defaults (``to_onnx(clf, X[:1])``: ``output_label`` and a
ZipMap of probabilities) on the vectorizer's output: the bundle takes the TF-IDF vector (15,442
features) and the vectorizer runs before it, as in the package's own ``predict``.

Real inputs, all from text that ships with Python and inside packages: sentences of Python's
own reference manual (``pydoc_data.topics``, the text ``help()`` shows) and of scikit-learn's
bundled dataset descriptions (``sklearn/datasets/descr/*.rst``), every other one with one word
replaced by a word of ``better-profanity``'s word list (its wheel's ``profanity_wordlist.txt``). The
labels are the pretrained estimator's own answers (``clf.predict`` in scikit-learn), so the task
metric is "answers as the pretrained model does", conversion and optimization together.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pretrained_inputs as inputs

SKLEARN_VERSION = "1.9.1"
WHEELS = (f"alt-profanity-check=={SKLEARN_VERSION}", "better-profanity==0.7.0")
MODEL = "profanity_check/data/model.joblib"
VECTORIZER = "profanity_check/data/vectorizer.joblib"
WORDLIST = "better_profanity/profanity_wordlist.txt"

# Runs in the tools venv (scikit-learn pinned to .venv's, skl2onnx): argv = model.joblib,
# vectorizer.joblib, word list, out.onnx, out.npz.
SCRIPT = """
import re, sys
from importlib import resources
import joblib, numpy as np, skl2onnx, sklearn

want = sys.argv[6]
if sklearn.__version__ != want:
    sys.exit(f"alt-profanity-check {want} was pickled with scikit-learn {want}; "
             f"this venv has {sklearn.__version__}")
clf, vec = joblib.load(sys.argv[1]), joblib.load(sys.argv[2])
words = [w.strip() for w in open(sys.argv[3], encoding="utf-8") if w.strip().isalpha()]
from pydoc_data.topics import topics
descr = sorted(resources.files("sklearn.datasets.descr").iterdir(), key=lambda f: f.name)
text = " ".join([topics[k] for k in sorted(topics)]
                + [f.read_text(encoding="utf-8") for f in descr if f.name.endswith(".rst")])
sentences = []
for s in re.split(r"(?<=[.!?])\\s+", re.sub(r"\\s+", " ", text)):
    toks = s.split()
    words_in = sum(t.strip(".,;:()'\\"!?").isalpha() for t in toks)
    if 6 <= len(toks) <= 30 and words_in >= 0.9 * len(toks):
        sentences.append(toks)
rng = np.random.default_rng(0)
rng.shuffle(sentences)
sentences = sentences[:600]
texts = []
for i, toks in enumerate(sentences):
    toks = list(toks)
    if i % 2:
        toks[int(rng.integers(len(toks)))] = words[int(rng.integers(len(words)))]
    texts.append(" ".join(toks))
x = vec.transform(texts).toarray().astype(np.float32)
y = clf.predict(x).astype(np.int64)
onx = skl2onnx.to_onnx(clf, x[:1])
open(sys.argv[4], "wb").write(onx.SerializeToString())
np.savez(sys.argv[5], cal=x[:200], x=x[200:], y=y[200:], texts=np.array(texts),
         sentences=np.int64(len(sentences)), words=np.int64(len(words)))
print(f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}: "
      f"{type(clf).__name__}({type(clf.estimator).__name__}), {x.shape[1]} TF-IDF features")
"""


Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


def build_profanity(src: inputs.Source, tools: Path, work: Path, run: Run) -> inputs.ModelCase:
    d = work / "models"
    d.mkdir(parents=True, exist_ok=True)
    files = [src.extract(m, d / "profanity") for m in (MODEL, VECTORIZER, WORDLIST)]
    model, data = d / "profanity_check_skl2onnx.onnx", d / "profanity_inputs.npz"
    argv = [*map(str, files), str(model), str(data), SKLEARN_VERSION]
    proc = run([str(tools), "-c", SCRIPT, *argv])
    if proc.returncode:
        raise SystemExit(f"profanity-check conversion failed: {proc.stderr.strip()[-400:]}")
    z = np.load(data)
    y = z["y"]
    return inputs.ModelCase(
        "profanity",
        "alt-profanity-check (skl2onnx defaults)",
        f"alt-profanity-check {src.version('alt_profanity_check')}; {proc.stdout.strip()}",
        model,
        {"X": z["cal"]},
        {"X": z["x"], "labels": y},
        f"{len(z['texts'])} sentences of Python's reference manual (pydoc_data) and scikit-learn's "
        "bundled dataset descriptions, every "
        f"other one with a word of better-profanity {src.version('better_profanity')}'s list "
        f"({int(z['words'])} words) put in; TF-IDF by the wheel's vectorizer; "
        f"{len(z['cal'])} calibrate, {len(y)} evaluate ({int(y.sum())} called profane by "
        "the pretrained estimator)",
        "top-1 vs the pretrained estimator's own answers",
        inputs.score_top1,
        "top1",
        labels=y,
        class_names=["clean", "profane"],
    )
