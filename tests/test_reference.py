"""The reference backend honours the Backend contract, bit for bit where it promises to.

Everything runs on a random 3-layer F32 Llama with SmolLM2's tokenizer. Exact equality
(``np.array_equal``) is asserted wherever batch invariance promises it; a tolerance only
where the batched (non-invariant) mode legitimately reorders float32 sums.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from runtimes.base import Backend
from runtimes.reference import ReferenceBackend
from runtimes.weights import LlamaWeights
from tests.tinymodel import TinyConfig, write_tiny_llama

N_LAYER = 3
PROMPT = [504, 3458, 282, 260, 1345, 28, 2144]  # arbitrary in-vocabulary ids


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> ReferenceBackend:
    path = tmp_path_factory.mktemp("ref") / "tiny-f32.gguf"
    write_tiny_llama(path, TinyConfig(n_layer=N_LAYER, dtype="F32", seed=3))
    return ReferenceBackend(path, n_ctx=256, threads=1)


@pytest.fixture
def fresh(backend: ReferenceBackend) -> ReferenceBackend:
    """The shared backend with an empty cache (loading costs seconds; rewinding costs nothing)."""
    backend.truncate(0)
    return backend


def step(backend: ReferenceBackend, token: int) -> np.ndarray:
    """One plain decoding step: evaluate ``token`` alone and keep it."""
    logits = backend.verify(TokenTree.root(token))[0]
    backend.commit([0])
    return logits


@st.composite
def trees(draw: st.DrawFn, max_nodes: int = 9) -> TokenTree:
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, 49151), min_size=n, max_size=n))
    return TokenTree(tokens, parents)


def test_is_a_backend(backend: ReferenceBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.vocab_size == 49152 and backend.tokenizer.eos_ids == {2}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees(), n_prompt=st.integers(1, len(PROMPT)))
def test_tree_rows_equal_plain_decoding_bit_for_bit(
    fresh: ReferenceBackend, tree: TokenTree, n_prompt: int
) -> None:
    """Each node's logits are exactly what decoding its root path one token at a time gives."""
    fresh.truncate(0)
    fresh.prefill(PROMPT[:n_prompt])
    rows = fresh.verify(tree)
    for node in range(len(tree)):
        fresh.truncate(n_prompt)
        for i in tree.path_to(node):
            sequential = step(fresh, tree.tokens[i])
        assert np.array_equal(rows[node], sequential), f"node {node} of {tree}"


def test_prefill_equals_single_steps(fresh: ReferenceBackend) -> None:
    batched = fresh.prefill(PROMPT)
    fresh.truncate(0)
    for token in PROMPT:
        single = step(fresh, token)
    assert np.array_equal(batched, single)


def test_commit_keeps_exactly_the_accepted_path(fresh: ReferenceBackend) -> None:
    """After verify + commit(path), the cache is the one prefilling the path would build."""
    fresh.prefill(PROMPT)
    tree = TokenTree([11, 12, 13, 14, 15, 16], [-1, 0, 0, 2, 2, 4])
    fresh.verify(tree)
    fresh.commit([0, 2, 4])
    assert fresh.n_past == len(PROMPT) + 3
    after_commit = step(fresh, 99)
    fresh.truncate(0)
    fresh.prefill([*PROMPT, 11, 13, 15])
    assert np.array_equal(after_commit, step(fresh, 99))


def test_truncate_rewinds_to_an_earlier_context(fresh: ReferenceBackend) -> None:
    fresh.prefill(PROMPT)
    fresh.truncate(3)
    rewound = fresh.prefill([7, 8])
    fresh.truncate(0)
    assert np.array_equal(rewound, fresh.prefill([*PROMPT[:3], 7, 8]))


def test_batched_mode_agrees_within_float32_rounding(backend: ReferenceBackend) -> None:
    """Without batch invariance the whole tree is one masked matmul per weight: same math,
    other summation order, so equal up to float32 rounding (measured ~1e-6; bound 1e-4)."""
    batched = ReferenceBackend.from_weights(
        backend.weights, backend.encoder, backend.tokenizer, batch_invariant=False
    )
    tree = TokenTree([11, 12, 13, 14, 15, 16, 17], [-1, 0, 0, 1, 2, 2, 5])
    backend.truncate(0)
    backend.prefill(PROMPT)
    batched.prefill(PROMPT)
    expected, got = backend.verify(tree), batched.verify(tree)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert not np.array_equal(got[:, :8], -got[:, :8])  # logits are not degenerate


def test_early_exit_at_full_depth_is_the_full_model(fresh: ReferenceBackend) -> None:
    fresh.prefill(PROMPT)
    tree = TokenTree([11, 12, 13, 14], [-1, 0, 0, 1])
    full = fresh.verify(tree)
    assert np.array_equal(fresh.draft_logits(tree, N_LAYER), full)
    assert np.array_equal(fresh.draft_logits([11, 12, 14], N_LAYER), full[[0, 1, 3]])
    fresh.commit([0, 1, 3])  # drafting left the pending verification untouched
    assert fresh.n_past == len(PROMPT) + 3


def truncated(backend: ReferenceBackend, n_layers: int) -> ReferenceBackend:
    """The same model cut after ``n_layers`` blocks: what an early exit must compute."""
    w = backend.weights
    cut = LlamaWeights(
        replace(w.config, n_layer=n_layers), w.embed, w.layers[:n_layers], w.out_norm, w.lm_head
    )
    return ReferenceBackend.from_weights(cut, backend.encoder, backend.tokenizer)


@pytest.mark.parametrize("exit_layer", [1, 2])
def test_early_exit_reuses_the_full_models_cache(fresh: ReferenceBackend, exit_layer: int) -> None:
    """Layers below the exit read the KV the full model cached, and that equals what a
    model cut at the exit would have cached itself, so the logits match it bit for bit."""
    cut = truncated(fresh, exit_layer)
    fresh.prefill(PROMPT)
    cut.prefill(PROMPT)
    tree = TokenTree([11, 12, 13, 14], [-1, 0, 0, 2])
    early = fresh.draft_logits(tree, exit_layer)
    assert np.array_equal(early, cut.verify(tree))
    assert not np.allclose(early, fresh.verify(tree), atol=1e-3)


def test_misuse_is_refused(fresh: ReferenceBackend) -> None:
    with pytest.raises(ValueError, match="without a preceding verify"):
        fresh.commit([0])
    fresh.prefill(PROMPT)
    fresh.verify(TokenTree([1, 2, 3], [-1, 0, 0]))
    with pytest.raises(ValueError, match="not a root path"):
        fresh.commit([0, 2, 1])
    with pytest.raises(ValueError, match="cannot truncate"):
        fresh.truncate(len(PROMPT) + 1)
    with pytest.raises(ValueError, match="exit_layer"):
        fresh.draft_logits([1], N_LAYER + 1)
    with pytest.raises(UserError, match="context is full"):
        fresh.prefill([5] * (fresh.n_ctx - len(PROMPT) + 1))
    assert fresh.n_past == len(PROMPT)


def test_memory_report_counts_the_cached_context(fresh: ReferenceBackend) -> None:
    cfg = fresh.cfg
    fresh.prefill(PROMPT)
    report = fresh.memory()
    per_token = 2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * 4
    assert report.kv_cache >= len(PROMPT) * per_token and report.kv_cache % per_token == 0
    assert report.weights == fresh.weights.nbytes > fresh.weights.embed.nbytes
    assert report.scratch >= 0


@pytest.mark.parametrize(
    "text", ["Hello world 123!", "  déjà vu 🤖\n\n\tx", "def f(x):\n    return x**2  # ok"]
)
def test_tokenizer_round_trips_bytes(backend: ReferenceBackend, text: str) -> None:
    ids = backend.tokenize(text, special=False)
    assert backend.detokenize(ids) == text.encode()


def test_special_tokens_parse_only_when_asked(backend: ReferenceBackend) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    special = backend.tokenize(text, special=True)
    assert special[0] == 1 and special[-1] == 2 and len(special) == 5
    plain = backend.tokenize(text, special=False)
    assert 1 not in plain and 2 not in plain
    assert backend.detokenize(special) == b"user\nHi"  # control tokens render as nothing
    assert backend.tokenize("12", special=False) == [33, 34]  # SmolLM2 splits digits
