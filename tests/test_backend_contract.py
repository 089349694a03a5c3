"""The Backend contract, run against every installed engine on a real (generated) GGUF.

The same tests must pass unchanged for each backend: tree verification in one call with
the tree mask, commit of one path, rewind, tokenizer round trip, memory report.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgespec.models import open_backend
from edgespec.tree import TokenTree
from runtimes.base import Backend

BACKENDS = [
    pytest.param("llamacpp", marks=pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")),
    pytest.param("reference", marks=pytest.mark.skipif(
        importlib.util.find_spec("runtimes.reference") is None, reason="no reference backend")),
    pytest.param("onnx", marks=pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
        reason="onnxruntime or onnx not installed")),
    pytest.param("openvino", marks=pytest.mark.skipif(
        importlib.util.find_spec("openvino") is None, reason="openvino not installed")),
]
PROMPT = "The lighthouse keeper climbed the stairs every evening to light the lamp."
# llama.cpp evaluates a batch with other kernels than one token; the tiny model is F16,
# where logits agree to well within this (the SmolLM2 lossless test checks argmaxes).
ATOL = 2e-3


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tiny_gguf: Path) -> Iterator[Backend]:
    b = open_backend(tiny_gguf, request.param, n_ctx=512)
    yield b
    b.close()


@pytest.fixture
def fresh(backend: Backend) -> Backend:
    backend.truncate(0)
    return backend


def _sequential(backend: Backend, ids: list[int]) -> np.ndarray:
    """Logits of each of ``ids`` fed one at a time (the plain-decoding reference)."""
    rows = []
    for t in ids:
        rows.append(backend.verify(TokenTree.root(t))[0].copy())
        backend.commit([0])
    return np.stack(rows)


def test_protocol_and_tokenizer(fresh: Backend) -> None:
    assert isinstance(fresh, Backend)
    ids = fresh.tokenize(PROMPT, special=False)
    assert fresh.detokenize(ids).decode() == PROMPT
    assert fresh.tokenize("<|im_end|>", special=True) == [2]
    assert 2 in fresh.tokenizer.eos_ids
    assert fresh.vocab_size == 49152


def test_prefill_returns_the_last_logits_and_advances(fresh: Backend) -> None:
    ids = fresh.tokenize(PROMPT, special=False)
    last = fresh.prefill(ids)
    assert last.shape == (fresh.vocab_size,) and fresh.n_past == len(ids)
    fresh.truncate(0)
    fresh.prefill(ids[:-1])
    np.testing.assert_allclose(_sequential(fresh, ids[-1:])[0], last, atol=ATOL)


def test_chain_verify_equals_sequential_steps(fresh: Backend) -> None:
    ids = fresh.tokenize(PROMPT, special=False)
    fresh.prefill(ids[:5])
    chain = ids[5:12]
    logits = fresh.verify(TokenTree.chain(chain[0], chain[1:]))
    fresh.commit([0])
    fresh.truncate(5)
    np.testing.assert_allclose(logits, _sequential(fresh, chain), atol=ATOL)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_tree_nodes_see_only_their_ancestors(fresh: Backend, data: st.DataObject) -> None:
    fresh.truncate(0)
    ids = fresh.tokenize(PROMPT, special=False)
    fresh.prefill(ids[:4])
    n = data.draw(st.integers(2, 10))
    parents = [-1] + [data.draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = [data.draw(st.sampled_from(ids)) for _ in range(n)]
    tree = TokenTree(tokens, parents)
    logits = fresh.verify(tree)
    fresh.commit([0])
    for leaf in tree.leaves():
        path = tree.path_to(leaf)
        fresh.truncate(4)
        expected = _sequential(fresh, [tokens[i] for i in path])
        np.testing.assert_allclose(logits[path], expected, atol=ATOL)


def test_commit_keeps_exactly_the_accepted_branch(fresh: Backend) -> None:
    ids = fresh.tokenize(PROMPT, special=False)
    fresh.prefill(ids[:4])
    a, b, c, d = ids[4:8]
    tree = TokenTree([a, b, c, d, b], [-1, 0, 0, 2, 3])  # two branches: a-b and a-c-d-b
    fresh.verify(tree)
    fresh.commit([0, 2, 3])
    assert fresh.n_past == 7
    after = _sequential(fresh, [ids[9]])[0]
    fresh.truncate(0)
    fresh.prefill([*ids[:4], a, c, d])
    np.testing.assert_allclose(_sequential(fresh, [ids[9]])[0], after, atol=ATOL)


def test_truncate_rewinds(fresh: Backend) -> None:
    ids = fresh.tokenize(PROMPT, special=False)
    first = fresh.prefill(ids[:6])
    fresh.prefill(ids[6:10])
    fresh.truncate(5)
    assert fresh.n_past == 5
    np.testing.assert_allclose(_sequential(fresh, ids[5:6])[0], first, atol=ATOL)


def test_memory_report_counts_weights_and_cache(fresh: Backend) -> None:
    fresh.prefill(fresh.tokenize(PROMPT, special=False))
    m = fresh.memory()
    assert m.weights > 1_000_000  # 49152 x 64 embedding alone is 6 MB in F16
    assert m.kv_cache > 0 and m.total >= m.weights + m.kv_cache
