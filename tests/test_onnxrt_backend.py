"""The ONNX Runtime backend beyond the shared contract: loading, bad input, slots vs positions.

The contract tests (tests/test_backend_contract.py) prove tree verification, commit and
rewind. These cover what is particular to this backend: what it accepts and refuses, the
GroupQueryAttention cases a plain decode never reaches (a tree at an empty cache, an
early-exit draft written after a pending tree) and chunked prefill. The last test is a
measurement on SmolLM2 (EDGESPEC_ONNX_BENCH=1 to run it), not an assertion about speed.
"""

from __future__ import annotations

import os
import shutil
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
from runtimes import backend_for, open_backend  # noqa: E402
from runtimes.onnxrt import OnnxBackend  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402

PROMPT = "The lighthouse keeper climbed the stairs every evening to light the lamp."
ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tiny_gguf, tmp_path_factory.mktemp("onnxrt") / "tiny", early_exit=1)


@pytest.fixture(scope="module")
def backend(exported: Path) -> OnnxBackend:
    b = OnnxBackend(exported, n_ctx=128, threads=1, max_tree_nodes=16)
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> ReferenceBackend:
    return ReferenceBackend(tiny_gguf, n_ctx=128)


@pytest.fixture
def ids(reference: ReferenceBackend) -> list[int]:
    return reference.tokenize(PROMPT, special=False)


def test_a_tree_on_an_empty_cache_uses_its_depth_positions(backend, reference, ids) -> None:
    # GQA's "first prompt" case: without query_seqlens it would take positions 0, 1, 2…
    tree = TokenTree(ids[:5], [-1, 0, 0, 2, 1])
    for b in (backend, reference):
        b.truncate(0)
    np.testing.assert_allclose(backend.verify(tree), reference.verify(tree), atol=ATOL)


def test_a_lone_token_gets_the_logits_it_gets_inside_a_tree(tiny_gguf: Path,
                                                            tmp_path: Path) -> None:
    """Bit-exact speculation: int8 kernels treat one row apart unless it is padded."""
    b = OnnxBackend(export_onnx(tiny_gguf, tmp_path / "int8", quant="int8"), n_ctx=64,
                    threads=1)
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
    ids = b.tokenize(PROMPT * 2, special=False)
    b.prefill(ids[:12])
    sequential = []
    for t in ids[12:17]:
        sequential.append(b.verify(TokenTree.root(t))[0])
        b.commit([0])
    tokens = [ids[12], *range(100, 106), ids[13], 200, ids[14], 201, ids[15]]
    parents = [-1, 0, 0, 0, 0, 0, 0, 0, 7, 7, 9, 9]
    path = [0, 7, 9, 11]
    best, worst = [0.5] * 6 + [0.9, 0.5, 0.9, 0.5, 0.9], [0.9] * 6 + [0.1, 0.9, 0.1, 0.9, 0.1]
    b.truncate(12)
    logits = b.verify(TokenTree(tokens, parents, scores=[1.0, *best]))
    assert np.array_equal(logits[path], np.stack(sequential[:4]))
    b.truncate(12)
    b.verify(TokenTree(tokens, parents, scores=[1.0, *worst]))
    b.commit(path)
    after = b.verify(TokenTree.root(ids[16]))[0]
    b.close()
    assert np.array_equal(after, sequential[4])


def test_chunked_prefill_equals_one_pass(exported: Path, reference, ids) -> None:
    chunked = OnnxBackend(exported, n_ctx=64, threads=1, prefill_chunk=4)
    reference.truncate(0)
    np.testing.assert_allclose(chunked.prefill(ids), reference.prefill(ids), atol=ATOL)
    tree = TokenTree.chain(ids[0], ids[1:3])
    np.testing.assert_allclose(chunked.verify(tree), reference.verify(tree), atol=ATOL)
    chunked.close()


def test_a_draft_between_verify_and_commit_changes_nothing(backend, reference, ids) -> None:
    for b in (backend, reference):
        b.truncate(0)
        b.prefill(ids[:4])
        b.verify(TokenTree(ids[4:8], [-1, 0, 0, 2]))
    draft = backend.draft_logits(ids[8:11], 1)
    np.testing.assert_allclose(draft, reference.draft_logits(ids[8:11], 1), atol=ATOL)
    for b in (backend, reference):
        b.commit([0, 2, 3])
    after = TokenTree.root(ids[11])
    np.testing.assert_allclose(backend.verify(after), reference.verify(after), atol=ATOL)


def test_limits_are_errors(backend, ids) -> None:
    backend.truncate(0)
    with pytest.raises(ValueError, match="max_tree_nodes=16"):
        backend.verify(TokenTree([ids[0]] * 17, [-1] + [0] * 16))
    with pytest.raises(UserError, match="context is full"):
        backend.prefill(ids * 20)
    with pytest.raises(ValueError, match=r"no early-exit graph after layer 3.*\[1\]"):
        backend.draft_logits(ids[:2], 3)


def test_onnx_files_pick_the_onnx_backend(exported: Path, ids) -> None:
    assert backend_for(exported / "model.onnx") == "onnx"
    b = open_backend(exported / "model.onnx", n_ctx=32)
    assert b.name == "onnx" and b.tokenize(PROMPT, special=False) == ids
    b.close()


def test_a_gguf_is_exported_on_the_fly_and_cleaned_up(tiny_gguf: Path) -> None:
    b = OnnxBackend(tiny_gguf, n_ctx=32, threads=1)
    where = b.dir
    assert (where / "model.onnx").is_file()
    b.close()
    assert not where.exists()


def test_a_foreign_onnx_is_refused_with_the_export_command(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                              "foreign", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                ir_version=10), tmp_path / "foreign.onnx")
    with pytest.raises(UserError, match=r"lacks the inputs.*position_ids, attn_mask.*"
                                        r"edgespec export MODEL --to onnx -o OUT"):
        OnnxBackend(tmp_path / "foreign.onnx")


def test_a_graph_without_its_manifest_is_refused(exported: Path, tmp_path: Path) -> None:
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(exported / name, tmp_path / name)
    with pytest.raises(UserError, match=r"edgespec.json is missing.*edgespec export"):
        OnnxBackend(tmp_path / "model.onnx")


def test_a_missing_execution_provider_lists_the_present_ones(exported: Path) -> None:
    with pytest.raises(UserError, match="NoSuchExecutionProvider is not available.*CPU"):
        OnnxBackend(exported, provider="NoSuchExecutionProvider")


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
