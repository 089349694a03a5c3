"""The numpy oracle and llama.cpp compute the same model (skipped without llama-cpp-python).

Tolerances, as a fraction of the largest |logit| (measured on 2-layer random models):

* F32 weights with llama.cpp's KV cache in F32: ≤ 1e-5 absolute (measured ~1e-6): the
  same arithmetic up to summation order, which proves RoPE layout, GQA, norms and MLP.
* F16 weights: ≤ 3e-3 (measured 7e-4): llama.cpp rounds activations to F16 for the matmul.
* BF16: ≤ 2e-2 (measured 5e-3), activations rounded to BF16.
* Q8_0/Q4_0/Q4_1/Q4_K/Q6_K: ≤ 6e-2 (measured 1.8–3e-2): llama.cpp quantizes activations to
  8 bits for its integer dot products; the reference multiplies exact dequantized weights.

Top-1 tokens must agree wherever llama.cpp's top-2 margin exceeds twice the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from edgespec.models import default_model_path
from edgespec.tree import TokenTree
from runtimes.reference import ReferenceBackend
from runtimes.reference_tokenizer import gguf_tokenizer
from tests.test_reference_loading import requantize
from tests.test_sampling import write_small_vocab_llama

llama_cpp = pytest.importorskip("llama_cpp")

Q = gguf.GGMLQuantizationType
GGML_TYPE_F32 = 0
IDS = [1, 2, 3, 16, 5, 9, 11, 0, 4, 4, 8, 13, 15, 6, 7, 16, 10, 12, 14, 3]
RELATIVE_TOLERANCE = {
    Q.F16: 3e-3, Q.BF16: 2e-2, Q.Q8_0: 6e-2, Q.Q4_0: 6e-2, Q.Q4_1: 6e-2, Q.Q4_K: 6e-2,
    Q.Q6_K: 6e-2,
}  # fmt: skip


def llamacpp_logits(path: Path, ids: list[int], f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one thread: the machine is shared)."""
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False, **kv)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    return ReferenceBackend(path, n_ctx=64).verify(TokenTree.chain(ids[0], ids[1:]))


def assert_same_top1(expected: np.ndarray, got: np.ndarray, tolerance: float) -> None:
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * tolerance
    assert np.array_equal(expected.argmax(1)[clear], got.argmax(1)[clear])


@pytest.fixture(scope="module")
def letters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vs-llamacpp") / "letters.gguf"
    return write_small_vocab_llama(path, n_embd=64, n_ff=128, weight_scale=0.5)


@pytest.fixture(scope="module")
def letters_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 so K-quant blocks fit."""
    path = tmp_path_factory.mktemp("vs-llamacpp") / "wide.gguf"
    return write_small_vocab_llama(path, n_embd=256, n_ff=256, weight_scale=0.5)


def test_f32_logits_match_llamacpp(letters: Path) -> None:
    expected = llamacpp_logits(letters, IDS, f32_cache=True)
    got = reference_logits(letters, IDS)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize(
    "qtype",
    [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
    ids=lambda q: q.name,
)
def test_dequantized_logits_match_llamacpp(letters, letters_wide, tmp_path, qtype) -> None:
    src = letters_wide if qtype in (Q.Q4_K, Q.Q6_K) else letters
    path = requantize(src, tmp_path / f"{qtype.name}.gguf", qtype)
    expected, got = llamacpp_logits(path, IDS), reference_logits(path, IDS)
    tolerance = RELATIVE_TOLERANCE[qtype] * np.abs(expected).max()
    assert np.abs(got - expected).max() <= tolerance
    assert_same_top1(expected, got, tolerance)


TEXTS = [
    "Hello world, 12345 and 3.14!",
    "  déjà vu 🤖\n\n\tx  y",
    "def f(x):\n    return x**2  # it's <b>bold</b>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé ÅÆØ 日本語のテキスト 한국어",
]


@pytest.fixture(scope="module")
def smollm2_vocab() -> tuple:
    path = default_model_path()
    ours, _ = gguf_tokenizer(gguf.GGUFReader(path))
    return ours, llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_matches_llamacpp(smollm2_vocab, text: str, special: bool) -> None:
    ours, llm = smollm2_vocab
    ids = llm.tokenize(text.encode(), add_bos=False, special=special)
    assert ours.encode(text, special=special) == ids
    assert ours.decode(ids) == llm.detokenize(ids)


@pytest.mark.slow
def test_smollm2_q4_1_agrees_with_llamacpp() -> None:
    """The shipped model: total-variation distance of next-token distributions ≤ 0.15
    (measured 0.064) and ≥ 80% top-1 agreement (measured 14/16) over a chat prompt."""
    path = default_model_path()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    backend = ReferenceBackend(path, n_ctx=64)
    ids = backend.tokenize(prompt, special=True)
    expected = llamacpp_logits(path, ids)
    got = backend.verify(TokenTree.chain(ids[0], ids[1:]))

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    assert 0.5 * np.abs(softmax(expected) - softmax(got)).sum(axis=1).max() <= 0.15
    assert (expected.argmax(1) == got.argmax(1)).mean() >= 0.8
