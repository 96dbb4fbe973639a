"""The candidate actions' arguments (``candidate_begin``, ``candidate_chunk``,
``candidate_remove``) and ``benchmark``'s ``candidate``/``threads``/``inputs``: any JSON-like
value is parsed into an object within its limits that round-trips through ``to_args``, or
refused with a ConfigError naming the argument; never another exception. They cross the
command boundary (issue 16)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.contracts.commands import (
    CANDIDATE_FORMATS,
    MAX_BENCH_THREADS,
    MAX_CHUNK_BYTES,
    MAX_INPUT_ELEMENTS,
    BenchmarkArgs,
    CandidateBegin,
    CandidateChunk,
    CandidateRef,
    candidate_id,
)
from device_agent.errors import ConfigError

SHA = hashlib.sha256(b"model").hexdigest()
CAND = candidate_id(SHA)
MAX_BYTES = 1 << 20

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, 10**30, -(10**4000), math.nan, math.inf]),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from([SHA, CAND, "onnx", "tflite", "ed25519", "\ud800", "\x00"]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


def _begin_args() -> st.SearchStrategy[dict[str, Any]]:
    good_sig = st.fixed_dictionaries(
        {
            "key_id": st.one_of(st.just("sha256:" + SHA), junk),
            "algorithm": st.one_of(st.just("ed25519"), junk),
            "signature": st.one_of(st.text(min_size=1, max_size=300), junk),
        }
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "candidate": st.one_of(st.just(CAND), junk),
            "size": st.one_of(st.integers(-1, MAX_BYTES + 1), junk),
            "sha256": st.one_of(st.just(SHA), junk),
            "chunks": st.one_of(st.integers(0, 20), junk),
            "chunk_bytes": st.one_of(st.integers(0, MAX_CHUNK_BYTES + 1), junk),
            "format": st.one_of(st.sampled_from(CANDIDATE_FORMATS), junk),
            "signature": st.one_of(good_sig, junk),
        },
    )


@settings(max_examples=400, deadline=None, database=None)
@given(_begin_args())
def test_fuzz_candidate_begin_is_parsed_within_limits_or_refused_by_name(args: Any) -> None:
    try:
        begin = CandidateBegin.parse(args, max_bytes=MAX_BYTES)
    except ConfigError as exc:
        assert str(exc)
        return
    assert begin.candidate == candidate_id(begin.sha256)
    assert 1 <= begin.size <= MAX_BYTES and begin.format in CANDIDATE_FORMATS
    assert begin.chunks == -(-begin.size // begin.chunk_bytes)
    assert CandidateBegin.parse(begin.to_args(), max_bytes=MAX_BYTES) == begin


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "candidate": st.one_of(st.just(CAND), junk),
            "index": st.one_of(st.integers(-1, 5), junk),
            "data": st.one_of(st.text(max_size=8), junk),
            "sha256": st.one_of(st.just(SHA), junk),
        },
    )
)
def test_fuzz_candidate_chunk_and_remove_are_parsed_or_refused_by_name(args: Any) -> None:
    try:
        chunk = CandidateChunk.parse(args, chunks_of=lambda _: 4)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert 0 <= chunk.index < 4
        assert CandidateChunk.parse(chunk.to_args(), chunks_of=lambda _: 4) == chunk
    try:
        ref = CandidateRef.parse(args)
    except ConfigError as exc:
        assert str(exc)
    else:
        assert ref.candidate == CAND and CandidateRef.parse(ref.to_args()) == ref


def _inputs() -> st.SearchStrategy[Any]:
    spec = st.fixed_dictionaries(
        {
            "shape": st.one_of(st.lists(st.integers(-1, 300), max_size=9), junk),
            "dtype": st.one_of(st.sampled_from(["float32", "int64", "bool", "str"]), junk),
        }
    )
    return st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(spec, junk), max_size=3), junk)


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "candidate": st.one_of(st.just(CAND), junk),
            "threads": st.one_of(st.integers(-1, MAX_BENCH_THREADS + 1), junk),
            "inputs": _inputs(),
            "min_runs": st.one_of(st.integers(0, 5), junk),
        },
    )
)
def test_fuzz_benchmark_candidate_arguments_are_parsed_or_refused_by_name(args: Any) -> None:
    try:
        parsed = BenchmarkArgs.parse(args)
    except ConfigError as exc:
        assert str(exc)
        return
    if parsed.candidate is None:
        assert parsed.threads is None and parsed.inputs is None
    else:
        assert parsed.threads is not None and 1 <= parsed.threads <= MAX_BENCH_THREADS
    for spec in parsed.inputs or ():
        assert math.prod(spec.shape) <= MAX_INPUT_ELEMENTS and all(d >= 1 for d in spec.shape)
    assert BenchmarkArgs.parse(parsed.to_args()) == parsed


def test_refusals_name_the_argument() -> None:
    begin = {
        "candidate": CAND,
        "size": 100,
        "sha256": SHA,
        "chunks": 1,
        "chunk_bytes": 100,
        "format": "onnx",
    }
    assert CandidateBegin.parse(begin, max_bytes=MAX_BYTES).signature is None
    with pytest.raises(ConfigError, match="is not the id of a file"):
        CandidateBegin.parse({**begin, "candidate": "c" + "0" * 32}, max_bytes=MAX_BYTES)
    with pytest.raises(ConfigError, match=r"argument 'size': expected an integer in \[1, 50\]"):
        CandidateBegin.parse(begin, max_bytes=50)
    with pytest.raises(ConfigError, match="argument 'format'"):
        CandidateBegin.parse({**begin, "format": "pt"}, max_bytes=MAX_BYTES)
    with pytest.raises(ConfigError, match="apply to a candidate only"):
        BenchmarkArgs.parse({"threads": 2})
    with pytest.raises(ConfigError, match="more than 16777216 elements"):
        BenchmarkArgs.parse(
            {"candidate": CAND, "inputs": {"x": {"shape": [4096, 4096, 2], "dtype": "float32"}}}
        )
    # The wire form of a bundle benchmark is what hosts have always sent.
    assert BenchmarkArgs().to_args() == {"min_runs": 200, "min_seconds": 3.0}
