"""The device probe: verify cost per tree size, and up to which size verifying is exact."""

from __future__ import annotations

import importlib.util
from contextlib import closing
from pathlib import Path

import pytest

from edgespec.profiler import PROBE_SIZES, probe_verify_cost, profile
from runtimes import open_backend


def test_llamacpp_without_llamafile_is_exact_at_every_probed_size(tiny_gguf: Path) -> None:
    with closing(open_backend(tiny_gguf, "llamacpp", n_ctx=512, threads=2)) as b:
        exact, cost = profile(b, repeats=1)
        assert exact == max(PROBE_SIZES)
        assert sorted(cost) == list(PROBE_SIZES)
        assert b.n_past == 0  # the probe leaves the cache empty


def test_llamacpp_batches_of_every_size_are_exact_on_the_shipped_q4_1_model(
        smollm_path: Path) -> None:
    """SmolLM2's Q4_1 layers and Q8_0 head take the 2x4 dot kernel of runtimes/patches for
    each four of a batch's tokens (and for three, the third given twice), the 2x2 one for two
    and the one-column kernel for a last single one, its f16 attention the 2x2 one; every
    batch size must still give the logits of one token at a time."""
    with closing(open_backend(smollm_path, "llamacpp", n_ctx=512, threads=2)) as b:
        assert profile(b, sizes=tuple(range(1, 17)), repeats=1)[0] == 16


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                    reason="onnxruntime not installed")
def test_a_lone_row_evaluated_differently_is_caught(tiny_gguf: Path, tmp_path: Path) -> None:
    """ONNX Runtime's quantized matmul treats a lone row unlike a batch; without the padding
    that hides it, the probe must find that some batch size is not exact."""
    from exporters.onnx import export_onnx

    export = export_onnx(tiny_gguf, tmp_path / "int8", quant="int8")
    with closing(open_backend(export, "onnx", n_ctx=512, batch_invariant=False)) as fast:
        assert profile(fast, repeats=1)[0] < max(PROBE_SIZES)
    with closing(open_backend(export, "onnx", n_ctx=512)) as exact:
        assert profile(exact, repeats=1)[0] == max(PROBE_SIZES)


def test_cost_probe_measures_every_size(tiny_gguf: Path) -> None:
    with closing(open_backend(tiny_gguf, "llamacpp", n_ctx=512, threads=2)) as b:
        cost = probe_verify_cost(b, repeats=2)
    assert sorted(cost) == list(PROBE_SIZES) and all(c > 0 for c in cost.values())


@pytest.mark.parametrize(("warm", "calls_per_size"), [(False, 1), (True, 2)])
def test_a_warm_probe_times_each_size_after_a_call_of_that_size(
        tiny_gguf: Path, warm: bool, calls_per_size: int) -> None:
    """A warm probe leaves out what a backend pays when a call's shape changes: each timed
    call follows an untimed one of the same size."""
    with closing(open_backend(tiny_gguf, "llamacpp", n_ctx=512, threads=2)) as b:
        sizes = []
        verify = b.verify
        b.verify = lambda tree: sizes.append(len(tree)) or verify(tree)
        probe_verify_cost(b, sizes=(1, 4), repeats=2, warm=warm)
    assert sizes == [n for _ in range(2) for n in (1, 4) for _ in range(calls_per_size)]
