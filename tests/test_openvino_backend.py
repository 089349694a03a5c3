"""The OpenVINO backend beyond what it shares with ONNX Runtime: f16 KV, options, SmolLM2.

The contract tests (tests/test_backend_contract.py) prove tree verification, commit and
rewind on the tiny model; tests/test_slot_backends.py covers, on this backend and on ONNX
Runtime, what it opens and refuses, trees on an empty cache, drafts written after a
pending tree and chunked prefill. These cover what is particular to OpenVINO — f16 KV,
its devices and options, chains exact at every cached length — and, on the packaged
SmolLM2 (slow), the claims that need a real model:

* exactness: with ``batch_invariant`` a token's logits are *bit-identical* alone, in a
  chain and on the best-scored branch of a tree (calls of any size; keys padded to whole
  blocks), and after an accepted non-best branch (recomputed), so speculative
  greedy decoding emits exactly plain greedy decoding;
* GGUF → ONNX → OpenVINO gives llama.cpp's greedy tokens (first 16, three dev prompts).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

import edgespec  # noqa: E402
from edgespec.errors import UserError  # noqa: E402
from edgespec.tree import TokenTree  # noqa: E402
from runtimes.openvino import OpenVinoBackend  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from tests.slot_engines import PROMPT, check_speculation_is_bit_exact  # noqa: E402


@pytest.fixture(scope="module")
def exported(slot_export) -> Path:
    return slot_export("openvino")


@pytest.fixture(scope="module")
def backend(exported: Path) -> OpenVinoBackend:
    b = OpenVinoBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16)
    yield b
    b.close()


@pytest.fixture
def ids(backend: OpenVinoBackend) -> list[int]:
    return backend.tokenize(PROMPT, special=False)


def test_f16_kv_buffers_stay_close_and_take_half_the_memory(exported: Path, backend,
                                                            ids) -> None:
    half = OpenVinoBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16,
                           kv_type="f16")
    results = []
    for b in (backend, half):
        b.truncate(0)
        results.append(b.prefill(ids))
    assert half.memory().kv_cache * 2 == backend.memory().kv_cache
    half.close()
    np.testing.assert_allclose(results[1], results[0], atol=1e-2 * np.abs(results[0]).max())


@pytest.mark.parametrize("device", ["AUTO", "auto", "AUTO:CPU", "HETERO:CPU", "MULTI:CPU"])
def test_virtual_devices_run_and_stay_exact(exported: Path, backend: OpenVinoBackend, ids,
                                            device: str) -> None:
    """OpenVINO's automatic device choice (the usual one on laptops with an NPU or GPU)
    and its split/multi devices, with f32 on whatever device they pick: the CPU's logits."""
    auto = OpenVinoBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16, device=device)
    try:
        backend.truncate(0)
        np.testing.assert_array_equal(auto.prefill(ids), backend.prefill(ids))
    finally:
        auto.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": "NPU9"}, "device NPU9 is not available; present: .*CPU"),
    ({"device": "AUTO:GPU,CPU"}, "device GPU is not available"),
    ({"device": "HETERO"}, "HETERO needs its devices"),
    ({"kv_type": "u8"}, "unknown KV precision 'u8'"),
])
def test_bad_options_are_user_errors(exported: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        OpenVinoBackend(exported, **kwargs)


# -- SmolLM2 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_chain(smollm_exports) -> Path:
    """SmolLM2 GGUF → ONNX (fp32: the Q4_1 weights dequantized) → OpenVINO fp16 IR."""
    pytest.importorskip("onnxruntime")
    return smollm_exports("openvino")


@pytest.mark.slow
def test_lone_tokens_chains_and_the_best_branch_are_bit_exact(smollm_chain: Path) -> None:
    b = OpenVinoBackend(smollm_chain, n_ctx=64, threads=2)
    try:
        check_speculation_is_bit_exact(b, chain=True)
    finally:
        b.close()


def _greedy(engine: edgespec.Engine, prompts: list[dict], n: int, draft: str) -> list[list[int]]:
    return [engine.chat([{"role": "user", "content": p["turns"][0]}], max_tokens=n,
                        draft=draft).token_ids for p in prompts]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed")
def test_the_onnx_chain_decodes_like_llamacpp(smollm_chain: Path, smollm_path: Path,
                                              dev_prompts: list[dict]) -> None:
    """First 16 greedy tokens of three dev prompts, as llama.cpp's — or as the exact model's.

    llama.cpp rounds activations to 8 bits for its Q4_1 products; where that flips a near
    tie (prompt 0, token 8, on this machine) the float32 numpy oracle must side with
    OpenVINO, whose fp16 IR of the dequantized weights computes in float32 (OpenVINO
    matches the oracle on all 48 tokens; checked here at the departure only, for speed).
    """
    prompts = dev_prompts[:3]
    with edgespec.load(smollm_path, backend="llamacpp", ctx=512, threads=1) as engine:
        want = _greedy(engine, prompts, 16, "none")
    with edgespec.load(smollm_chain / "openvino_model.xml", ctx=512) as engine:
        got = _greedy(engine, prompts, 16, "none")
    departed = [i for i in range(len(prompts)) if got[i] != want[i]]
    assert len(departed) <= 1, f"OpenVINO differs from llama.cpp on prompts {departed}"
    oracle = edgespec.Engine(ReferenceBackend(smollm_path, n_ctx=512, batch_invariant=False))
    for i in departed:
        k = next(j for j, (a, b) in enumerate(zip(got[i], want[i])) if a != b)
        messages = [{"role": "user", "content": prompts[i]["turns"][0]}]
        logits = oracle.next_token_logits(oracle.render_chat(messages), got[i][:k])
        assert int(np.argmax(logits)) == got[i][k], f"prompt {i}, token {k}"
    oracle.close()


@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy(smollm_chain: Path,
                                                dev_prompts: list[dict]) -> None:
    prompts = dev_prompts[:3]
    with edgespec.load(smollm_chain / "openvino_model.xml", backend="openvino", ctx=512,
                       tree_size=8, adaptive=False) as engine:
        plain = _greedy(engine, prompts, 32, "none")
        results = [engine.chat([{"role": "user", "content": p["turns"][0]}], max_tokens=32,
                               draft="fused") for p in prompts]
    assert sum(r.stats.draft_nodes for r in results) > 0, "no draft was verified"
    assert [r.token_ids for r in results] == plain


def test_chains_are_exact_at_every_cached_length(backend, ids) -> None:
    """A 4-token chain verified in one call equals the same tokens stepped one by one, after
    any cached length: OpenVINO's attention sums in blocks of 16 slots, so without widening
    every call's keys to whole blocks this broke whenever the single steps crossed a block
    edge."""
    context = (ids * 40)[:200]
    for cached in range(24, 60, 3):
        prefix, tail = context[:cached], context[cached:cached + 4]
        backend.truncate(0)
        backend.prefill(prefix)
        singles = []
        for token in tail:
            singles.append(backend.verify(TokenTree.root(token))[0].copy())
            backend.commit([0])
        backend.truncate(cached)
        chain = backend.verify(TokenTree.chain(tail[0], tail[1:]))
        backend.commit([0])
        assert np.array_equal(chain, np.asarray(singles)), f"after {cached} cached tokens"
    backend.truncate(0)


@pytest.mark.parametrize("tree_graph", [True, False])
def test_trees_run_on_a_second_compilation_that_memory_counts(exported: Path, ids,
                                                              tree_graph: bool) -> None:
    """Plain decoding keeps one compiled model; the first tree adds the copy that spares
    single-token steps the CPU plugin's re-preparation for a new row count, unless the
    caller chose memory over speed."""
    b = OpenVinoBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16,
                        tree_graph=tree_graph)
    b.prefill(ids[:8])
    b.verify(TokenTree.root(ids[8]))
    b.commit([0])
    single = b.memory().weights
    b.verify(TokenTree.chain(ids[9], ids[10:12]))
    b.commit([0, 1, 2])
    grown = b.memory().weights - single  # measured: what compiling the copy made resident
    assert grown > 0 if tree_graph else grown == 0
    b.close()


def test_stale_rows_past_the_cache_change_nothing(exported: Path, backend, ids) -> None:
    """The K/V windows stay bound across calls and reach past the cache into slots a
    rejected tree or a rewind left behind; masked, they must not move a logit."""
    fresh = OpenVinoBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16)
    ids = (ids * 8)[:30]
    try:
        steps = []
        for b, litter in ((fresh, False), (backend, True)):
            b.truncate(0)
            b.prefill(ids[:8])
            if litter:  # fill the slots after the cache with rows nobody keeps
                b.verify(TokenTree.chain(ids[20], ids[21:30]))
                b.commit([0])
                b.truncate(8)
            logits = []
            for token in ids[8:12]:
                logits.append(b.verify(TokenTree.root(token))[0].copy())
                b.commit([0])
            steps.append(np.asarray(logits))
        assert np.array_equal(steps[0], steps[1])
    finally:
        fresh.close()
        backend.truncate(0)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_cache_costs_memory_only_for_the_slots_written() -> None:
    """The KV array holds every layer's and head's rows back to back; writing the first
    slot of 96 slabs of 1 MiB must not map a 2 MiB huge page each (as numpy's zeros may)."""
    from runtimes.openvino import _lazy_zeros

    kv = _lazy_zeros((2, 16, 3, 4096, 64), np.float32)  # 2 x 16 x 3 slabs of 1 MiB
    before = _rss_bytes()
    kv[:, :, :, 0] = 1.0
    assert _rss_bytes() - before < 8 * 2**20
    assert kv.sum() == 2 * 16 * 3 * 64 and not kv[:, :, :, 1:].any()
