"""Self-derived drafts: an early-exit GGUF is the target's first layers, a quant draft its
lower-bit copy, and both carry the target's vocabulary and say so.

The early-exit draft is checked against the reference backend's own early exit
(``draft_logits``) on the target: with F32 weights and llama.cpp's KV cache in F32 the
same arithmetic, so within 1e-5 of the largest |logit|, while the full model's logits
differ from the exit's by far more than that. Quantized drafts run in llama.cpp within
6e-2 of the reference on the draft's own dequantized weights (as in
tests/test_gguf_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgespec.errors import UserError
from edgespec.tree import TokenTree
from exporters.drafts import (
    KEY_EXIT,
    KEY_KIND,
    KEY_VOCAB,
    check_same_vocab,
    export_draft,
    vocab_sha256,
)
from exporters.gguf import copy_gguf, export_gguf
from runtimes.ggufinfo import read_gguf
from runtimes.reference import ReferenceBackend
from tests.test_reference_loading import export_hf_folder
from tests.test_sampling import write_small_vocab_llama

pytest.importorskip("llama_cpp")

from tests.test_reference_llamacpp import IDS, llamacpp_logits, reference_logits  # noqa: E402

Q = gguf.GGMLQuantizationType
N_PREFIX = 8  # ids prefilled before the draft runs on the rest
EXACT, QUANTIZED = 1e-5, 6e-2


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer F32 Llama with a 17-token vocabulary."""
    path = tmp_path_factory.mktemp("draft-target") / "target.gguf"
    return write_small_vocab_llama(path, n_layer=3, n_embd=64, n_ff=128, weight_scale=0.5)


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _reference_exit(target: Path, exit_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's exit logits on IDS after a prefix, and the full model's there."""
    reference = ReferenceBackend(target, n_ctx=64)
    reference.prefill(IDS[:N_PREFIX])
    rest = IDS[N_PREFIX:]
    full = reference.verify(TokenTree.chain(rest[0], rest[1:]))
    return reference.draft_logits(rest, exit_layer), full


def _layers(info) -> set[int]:
    return {int(name.split(".")[1]) for name in info.tensors if name.startswith("blk.")}


def test_an_early_exit_gguf_draft_computes_the_targets_exit(target: Path, tmp_path: Path) -> None:
    out = export_draft(target, tmp_path / "exit2.gguf", exit_layer=2)
    info = read_gguf(out)
    assert info.arch_value("block_count") == 2 and _layers(info) == {0, 1}
    assert info.metadata[KEY_KIND] == "early-exit" and info.metadata[KEY_EXIT] == 2
    assert info.metadata[KEY_VOCAB] == vocab_sha256(read_gguf(target).tokens)
    assert check_same_vocab(target, out) == info.metadata[KEY_VOCAB]
    want, full = _reference_exit(target, 2)
    got = llamacpp_logits(out, IDS, f32_cache=True)[N_PREFIX:]
    print(f"early exit after 2 of 3 layers: {_rel_error(got, want):.2e} "
          f"(the full model is {_rel_error(full, want):.2e} away)")
    assert _rel_error(got, want) <= EXACT
    assert _rel_error(full, want) > 100 * EXACT


def test_an_hf_target_gives_the_same_draft(target: Path, tmp_path: Path) -> None:
    folder = export_hf_folder(ReferenceBackend(target, n_ctx=64), tmp_path / "hf", "F32")
    out = export_draft(folder, tmp_path / "exit1.gguf", exit_layer=1, quant="f32")
    info = read_gguf(out)
    assert info.arch_value("block_count") == 1 and _layers(info) == {0}
    digest = info.metadata[KEY_VOCAB]
    assert digest == check_same_vocab(target, out) == check_same_vocab(folder, out)
    want, _ = _reference_exit(target, 1)
    got = llamacpp_logits(out, IDS, f32_cache=True)[N_PREFIX:]
    assert _rel_error(got, want) <= EXACT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit1.gguf", "hf"]


def test_a_quant_draft_is_the_target_at_fewer_bits(target: Path, tmp_path: Path) -> None:
    q8 = export_gguf(target, tmp_path / "target-q8_0.gguf", quant="q8_0")
    out = export_draft(q8, tmp_path / "draft.gguf", kind="quant")  # q4_0 by default
    info = read_gguf(out)
    assert info.metadata[KEY_KIND] == "quant" and KEY_EXIT not in info.metadata
    assert Q.Q4_0 in {t for _, t, _ in info.tensors.values()}
    assert info.arch_value("block_count") == 3
    assert info.metadata[KEY_VOCAB] == check_same_vocab(q8, out)
    assert out.stat().st_size < q8.stat().st_size
    want = reference_logits(out, IDS)
    assert _rel_error(llamacpp_logits(out, IDS), want) <= QUANTIZED


def test_an_early_exit_draft_can_be_quantized_too(target: Path, tmp_path: Path) -> None:
    out = export_draft(target, tmp_path / "exit1-q8.gguf", exit_layer=1, quant="q8_0")
    info = read_gguf(out)
    assert info.arch_value("block_count") == 1 and _layers(info) == {0}
    assert info.metadata[KEY_EXIT] == 1
    assert {t for _, t, _ in info.tensors.values()} == {Q.Q8_0, Q.F32}
    want = reference_logits(out, IDS)
    assert _rel_error(llamacpp_logits(out, IDS), want) <= QUANTIZED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exit1-q8.gguf"]  # no staging left


def test_a_draft_with_another_vocabulary_is_refused(target: Path, tmp_path: Path) -> None:
    tokens = read_gguf(target).tokens
    copy_gguf(target, tmp_path / "other.gguf",
              metadata={"tokenizer.ggml.tokens": tokens[:3] + ["D"] + tokens[4:]})
    with pytest.raises(UserError, match="draft vocabulary differs from the target's: token 3 "
                                        "is 'D' in the draft and 'd' in the target"):
        check_same_vocab(target, tmp_path / "other.gguf")
    bigger = write_small_vocab_llama(tmp_path / "bigger.gguf", n_layer=3, n_embd=64, n_ff=128,
                                     extra_pieces=("zz",))
    with pytest.raises(UserError, match="the draft has 18 tokens, the target 17"):
        check_same_vocab(target, bigger)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"this 3-layer model needs an exit layer in 1\.\.2, got None"),
        ({"exit_layer": 3}, r"needs an exit layer in 1\.\.2, got 3"),
        ({"kind": "lora"}, "unknown draft kind 'lora'; choose one of early-exit, quant"),
        ({"fmt": "tflite"}, "unknown draft format 'tflite'; choose one of gguf, onnx"),
    ],
)
def test_bad_options_are_user_errors(
    target: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message):
        export_draft(target, tmp_path / "draft.gguf", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_draft_is_refused_unless_forced(target: Path, tmp_path: Path) -> None:
    out = tmp_path / "draft.gguf"
    out.write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_draft(target, out, exit_layer=1)
    assert out.read_text() == "mine"
    export_draft(target, out, exit_layer=1, force=True)
    assert read_gguf(out).metadata[KEY_EXIT] == 1


def test_an_onnx_early_exit_draft_records_the_vocabulary(target: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from runtimes.formats import MANIFEST

    out = export_draft(target, tmp_path / "onnx", fmt="onnx", exit_layer=1)
    meta = json.loads((out / MANIFEST).read_text())
    assert meta["early_exit"] == {"1": "exit1.onnx"} and (out / "exit1.onnx").is_file()
    digest = vocab_sha256(read_gguf(target).tokens)
    assert meta["draft"] == {"kind": "early-exit", "target_vocab_sha256": digest, "exit_layer": 1}
    assert check_same_vocab(target, out) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
