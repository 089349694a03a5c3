"""The ONNX Runtime backend beyond what it shares with OpenVINO: int8 exactness, providers.

The contract tests (tests/test_backend_contract.py) prove tree verification, commit and
rewind; tests/test_slot_backends.py covers, on this backend and on OpenVINO, what it
accepts and refuses, the GroupQueryAttention cases a plain decode never reaches (a tree at
an empty cache, an early-exit draft written after a pending tree) and chunked prefill.
These cover what is particular to ONNX Runtime: bit-exact speculation with its int8
kernels and its execution providers. The last test is a measurement on SmolLM2
(EDGESPEC_ONNX_BENCH=1 to run it), not an assertion about speed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from edgespec.errors import UserError  # noqa: E402
from edgespec.tree import TokenTree  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from runtimes.onnxrt import OnnxBackend  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from tests.slot_engines import PROMPT, check_speculation_is_bit_exact  # noqa: E402


def test_a_lone_token_gets_the_logits_it_gets_inside_a_tree(slot_export) -> None:
    """Bit-exact speculation: int8 kernels treat one row apart unless it is padded."""
    b = OnnxBackend(slot_export("onnx", "int8"), n_ctx=64, threads=1)
    ids = b.tokenize(PROMPT, special=False)
    b.prefill(ids[:5])
    together = b.verify(TokenTree.chain(ids[5], ids[6:9]))
    b.truncate(5)
    alone = []
    for t in ids[5:9]:
        alone.append(b.verify(TokenTree.root(t))[0])
        b.commit([0])
    b.close()
    assert np.array_equal(np.stack(alone), together)


@pytest.mark.slow
def test_the_best_scored_branch_is_bit_exact_on_smollm2_int8(
    smollm_path: Path, tmp_path: Path
) -> None:
    """Its nodes take consecutive slots, so GQA sums them as sequential decoding does.

    Placed after six sibling slots instead, the same path's logits move by ~0.5 here; if
    such a path is accepted, commit recomputes its KV, so the next step is exact again.
    """
    b = OnnxBackend(export_onnx(smollm_path, tmp_path / "int8", quant="int8"), n_ctx=64,
                    threads=1)
    try:
        check_speculation_is_bit_exact(b, chain=False)
    finally:
        b.close()


def test_a_missing_execution_provider_lists_the_present_ones(slot_export) -> None:
    with pytest.raises(UserError, match="NoSuchExecutionProvider is not available.*CPU"):
        OnnxBackend(slot_export("onnx"), provider="NoSuchExecutionProvider")


def _decode_tokens_per_s(backend, ids: list[int], n: int = 64) -> float:
    """Plain greedy decoding speed after ``ids``: one verify of one token per step."""
    backend.truncate(0)
    token = int(np.argmax(backend.prefill(ids)))
    start = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(backend.verify(TokenTree.root(token))[0]))
        backend.commit([0])
    return n / (time.perf_counter() - start)


def _all_logits(backend, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids`` (one chain verify after the first token)."""
    backend.truncate(0)
    backend.prefill(ids[:1])
    logits = backend.verify(TokenTree.chain(ids[1], ids[2:]))
    backend.truncate(0)
    return logits


# (quant, block size): int4 with blocks of 128 takes onnxruntime's faster one-row kernel,
# but its results depend on the row count, so speculation with it is not bit-exact
BENCH_EXPORTS = (("int8", 32), ("int4", 32), ("int4", 128))


@pytest.mark.skipif(not os.environ.get("EDGESPEC_ONNX_BENCH"),
                    reason="a measurement; set EDGESPEC_ONNX_BENCH=1 (takes ~3 min)")
def test_measure_smollm2_against_llamacpp(tmp_path: Path, smollm_path: Path) -> None:
    """Print size, logit error, c(n)/c(1) and decode tokens/s per export and for llama.cpp.

    ``EDGESPEC_BENCH_THREADS`` sets the thread count of every engine (default: cores).
    """
    from edgespec.profiler import probe_verify_cost
    from runtimes.llamacpp import LlamaCppBackend

    threads = int(os.environ.get("EDGESPEC_BENCH_THREADS", "0")) or None
    reference = ReferenceBackend(smollm_path, n_ctx=256, batch_invariant=False)
    ids = reference.tokenize(PROMPT * 4, special=False)
    want = _all_logits(reference, ids)
    engines = {"llamacpp": lambda: LlamaCppBackend(smollm_path, n_ctx=1024, threads=threads)}
    for quant, block in BENCH_EXPORTS:
        start = time.perf_counter()
        out = export_onnx(smollm_path, tmp_path / f"{quant}-{block}", quant=quant,
                          block_size=block)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        backend = OnnxBackend(out, n_ctx=256, threads=threads)
        got = _all_logits(backend, ids)
        backend.close()
        print(f"\nexport {quant}/{block}: {time.perf_counter() - start:.1f} s, {size:.0f} MiB, "
              f"max|err|/max|logit| {np.abs(got - want).max() / np.abs(want).max():.3f}, "
              f"top-1 agreement {(got.argmax(-1) == want.argmax(-1)).mean():.2f}")
        engines[f"onnx-{quant}/{block}"] = lambda out=out: OnnxBackend(out, n_ctx=1024,
                                                                      threads=threads)
    for name, make in engines.items():
        backend = make()
        cost = probe_verify_cost(backend, sizes=(1, 2, 4, 8, 16), context=300, repeats=7)
        speed = statistics.median(_decode_tokens_per_s(backend, ids) for _ in range(3))
        curve = " ".join(f"{n}:{c / cost[1]:.2f}" for n, c in cost.items())
        print(f"{name}: c(1)={cost[1] * 1e3:.1f} ms  c(n)/c(1) {curve}  decode {speed:.1f} tok/s")
        backend.close()
