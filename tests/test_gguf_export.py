"""The GGUF exporter: llama.cpp computes and tokenizes an export as its source does.

Logits. A random Llama (17-token vocabulary, rows of 256 so K-quants really apply,
weights at the scale of real models) is written as a Hugging Face folder; each export is
run by llama.cpp and compared with the numpy reference backend on that folder.
Tolerances are fractions of the reference's largest |logit| (measured on three seeds):

* f32, llama.cpp's KV cache in F32: 1e-5 (measured 4–6e-7): the same arithmetic, which
  proves tensor names, shapes, the q/k RoPE permutation, norms and the (tied) LM head.
* f16: 3e-3 (measured 0.8–1.5e-3); bf16: 2e-2 (measured 7–8e-3): activations rounded.
* q8_0: 6e-2 (measured 1.8–2.9e-2): weights and activations at 8 bits.
* q4_0, q4_1, q4_k_m: 0.5 (measured 0.18–0.32). Four bits lose ~8% (RMS) of every random
  Gaussian weight; through two blocks and a 17-token head that is a quarter of the
  largest logit. Such a bound proves little, so quantized exports are also checked tensor
  by tensor — Q8_0/Q4_0/Q4_1 bytes are exactly gguf-py's reference quantization of the
  f32 export's weights, every other tensor is within its type's RMS error — and llama.cpp
  must agree within 6e-2 with the reference run on the export's own dequantized weights
  (llama.cpp quantizes activations to 8 bits; cf. tests/test_reference_llamacpp.py).

Where transformers is installed, folders it saves itself (untied and tied heads, linear
and llama3 RoPE scaling) export to f32 GGUFs whose llama.cpp logits match transformers'
float32 ones within the same 1e-5 (measured 1.1–2.8e-6). Without torch, the folders are
written here with runtimes/safetensors_io.py (tests/test_reference_loading.py).

Tokenization. SmolLM2's tokenizer goes GGUF → HF folder → GGUF; llama.cpp must tokenize
every development prompt with the new file exactly as with the original GGUF and as
Hugging Face ``tokenizers`` does. The pre-tokenizer lookup is exercised with gpt-2 and
llama-bpe variants of the same vocabulary, whose digit and space rules differ.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from edgespec.errors import UserError
from exporters import gguf as gguf_export
from exporters.gguf import QUANTS, copy_gguf, export_gguf
from runtimes.ggufinfo import read_gguf
from runtimes.reference import ReferenceBackend
from runtimes.reference_tokenizer import hf_tokenizer
from tests.test_reference_loading import export_hf_folder, requantize
from tests.test_sampling import write_small_vocab_llama

pytest.importorskip("llama_cpp")

from runtimes.llamacpp import LlamaCppBackend  # noqa: E402
from tests.test_reference_llamacpp import (  # noqa: E402
    IDS,
    assert_same_top1,
    llamacpp_logits,
    reference_logits,
)

Q = gguf.GGMLQuantizationType
VS_SOURCE = {"f32": 1e-5, "f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2, "q4_0": 0.5, "q4_1": 0.5,
             "q4_k_m": 0.5}  # fmt: skip
VS_OWN_WEIGHTS = 6e-2
# relative RMS error of a tensor stored as this type (measured: F16 3e-4, BF16 2.3e-3,
# Q8_0 5.5e-3, Q6_K 1.8e-2, Q5_0 4e-2, Q4_K 7.1e-2, Q4_1 7.8e-2, Q4_0 8.6e-2)
WEIGHT_RMS = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 5e-3, Q.Q8_0: 1e-2, Q.Q6_K: 3e-2, Q.Q5_0: 6e-2,
              Q.Q4_K: 0.1, Q.Q4_1: 0.11, Q.Q4_0: 0.12}  # fmt: skip
EXACT = {Q.Q8_0, Q.Q4_0, Q.Q4_1}  # gguf-py implements llama.cpp's reference quantizers
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gguf-src")
    source = write_small_vocab_llama(tmp / "letters.gguf", n_embd=256, n_ff=256, weight_scale=0.5)
    return export_hf_folder(ReferenceBackend(source, n_ctx=64), tmp / "hf", "F32")


@pytest.fixture(scope="module")
def exports(hf_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-exports")
    return {q: export_gguf(hf_folder, out / f"{q}.gguf", quant=q) for q in QUANTS}


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("quant", list(QUANTS))
def test_logits_match_the_source_within_the_stated_tolerance(
    quant: str, exports: dict[str, Path], hf_folder: Path
) -> None:
    want = reference_logits(hf_folder, IDS)
    got = llamacpp_logits(exports[quant], IDS, f32_cache=quant == "f32")
    error = _rel_error(got, want)
    print(f"{quant}: max |logit error| / max |logit| = {error:.2e}")
    assert error <= VS_SOURCE[quant]
    if quant in ("f32", "f16"):
        assert_same_top1(want, got, VS_SOURCE[quant] * np.abs(want).max())


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q4_k_m"])
def test_quantized_exports_hold_the_quantized_source_weights(
    quant: str, exports: dict[str, Path]
) -> None:
    source = {t.name: np.array(t.data) for t in gguf.GGUFReader(exports["f32"]).tensors}
    tensors = gguf.GGUFReader(exports[quant]).tensors
    assert sorted(t.name for t in tensors) == sorted(source)
    for t in tensors:
        w, stored = source[t.name], quants.dequantize(t.data, t.tensor_type)
        rms = np.sqrt(np.mean((stored - w) ** 2) / np.mean(w**2))
        assert rms <= WEIGHT_RMS[t.tensor_type], (t.name, t.tensor_type.name, rms)
        if t.tensor_type in EXACT:
            assert np.array_equal(t.data, quants.quantize(w, t.tensor_type)), t.name
    want = reference_logits(exports[quant], IDS)  # the export's own weights, in float32
    assert _rel_error(llamacpp_logits(exports[quant], IDS), want) <= VS_OWN_WEIGHTS


def _folder_with(hf_folder: Path, tmp_path: Path, config: dict) -> Path:
    """A copy of ``hf_folder`` with another config.json."""
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_tied_head_is_written_once(hf_folder: Path, tmp_path: Path) -> None:
    config = json.loads((hf_folder / "config.json").read_text()) | {"tie_word_embeddings": True}
    folder = _folder_with(hf_folder, tmp_path, config)
    out = export_gguf(folder, tmp_path / "tied.gguf", quant="f32")
    assert "output.weight" not in read_gguf(out).tensors
    got = llamacpp_logits(out, IDS, f32_cache=True)
    assert _rel_error(got, reference_logits(folder, IDS)) <= VS_SOURCE["f32"]


def test_a_gguf_source_is_requantized_with_its_metadata(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    out = export_gguf(exports["q8_0"], tmp_path / "q4_0.gguf", quant="q4_0")
    src, new = read_gguf(exports["q8_0"]), read_gguf(out)
    assert new.metadata["general.file_type"] == QUANTS["q4_0"][0]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "llama.block_count"):
        assert new.metadata[key] == src.metadata[key]
    assert {t for _, t, _ in new.tensors.values()} >= {Q.Q4_0}
    want = reference_logits(out, IDS)
    assert _rel_error(llamacpp_logits(out, IDS), want) <= VS_OWN_WEIGHTS


# --- atomic output, bad input -------------------------------------------------------------


@pytest.mark.parametrize(("quant", "stage", "at"), [("f16", "write", 5), ("q4_0", "quantize", 1)])
def test_an_interrupted_export_leaves_nothing(
    hf_folder: Path, tmp_path: Path, quant: str, stage: str, at: int
) -> None:
    """Ctrl-C while tensors are written, or after llama.cpp quantized but before the rename."""
    seen = []

    def progress(name: str, done: int, total: int) -> None:
        seen.append((name, done))
        if (name, done) == (stage, at):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_gguf(hf_folder, tmp_path / "out.gguf", quant=quant, progress=progress)
    assert seen[-1] == (stage, at)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_unless_forced(hf_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        export_gguf(hf_folder, out)
    assert out.read_text() == "mine"
    export_gguf(hf_folder, out, force=True)
    assert read_gguf(out).metadata["general.file_type"] == QUANTS["f16"][0]
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert out.stat().st_mode & 0o777 == 0o644


def test_too_little_disk_space_is_refused_before_writing(
    hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("exporters.atomic.shutil.disk_usage", lambda _: usage(1, 1, 10_000))
    with pytest.raises(UserError, match="not enough disk space .* needs about"):
        export_gguf(hf_folder, tmp_path / "out.gguf", quant="q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_tokenizer_model_is_refused_before_llamacpp_sees_it(
    exports: dict[str, Path], hf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte-level vocabulary declared as SentencePiece ("llama") aborts llama.cpp."""
    bad = tmp_path / "bad.gguf"
    copy_gguf(exports["f32"], bad, metadata={"tokenizer.ggml.model": "llama"})
    with pytest.raises(UserError, match="cannot encode .* byte values"):
        export_gguf(bad, tmp_path / "out.gguf")
    # and the exporter's own output goes through the same check before it is in place
    monkeypatch.setattr(gguf_export, "TOKENIZER_MODEL", "llama")
    with pytest.raises(UserError, match="refusing to write .*cannot encode .* byte values"):
        export_gguf(hf_folder, tmp_path / "out.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda hf, tmp: tmp, "has no config.json; pass a Hugging Face model folder"),
        (lambda hf, tmp: _folder_with(hf, tmp, {"architectures": ["GPT2LMHeadModel"]}),
         r"cannot export GPT2LMHeadModel to GGUF; supported architectures are LlamaForCausalLM"),
        (lambda hf, tmp: tmp / "missing.gguf", "model not found"),
    ],
)
def test_bad_folders_are_user_errors(hf_folder: Path, tmp_path: Path, make, message: str) -> None:
    src = make(hf_folder, tmp_path)
    with pytest.raises(UserError, match=message):
        export_gguf(src, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_bad_ggufs_and_options_are_user_errors(exports: dict[str, Path], tmp_path: Path) -> None:
    qwen = requantize(exports["f32"], tmp_path / "qwen.gguf", Q.F32, arch="qwen2")
    with pytest.raises(UserError, match="architecture 'qwen2'; supported architectures are llama"):
        export_gguf(qwen, tmp_path / "out.gguf")
    ternary = requantize(exports["f32"], tmp_path / "tq.gguf", Q.TQ2_0)
    with pytest.raises(UserError, match="is TQ2_0, a type this exporter cannot convert from"):
        export_gguf(ternary, tmp_path / "out.gguf")
    with pytest.raises(UserError, match="unknown GGUF type 'q3_k'; choose one of f32, f16"):
        export_gguf(exports["f32"], tmp_path / "out.gguf", quant="q3_k")
    assert not (tmp_path / "out.gguf").exists()


# --- tokenizer round trip ---------------------------------------------------------------


def _texts(dev_prompts: list[dict]) -> list[str]:
    return [turn for prompt in dev_prompts for turn in prompt["turns"]]


def _tokenizer_config(original: Path) -> dict:
    """What a Hub folder's tokenizer_config.json says, rebuilt from a GGUF's metadata."""
    meta = read_gguf(original).metadata
    tokens = meta["tokenizer.ggml.tokens"]
    name = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    return {
        "add_bos_token": meta["tokenizer.ggml.add_bos_token"],
        "chat_template": meta["tokenizer.chat_template"],
        **{f"{k}_token": tokens[meta[f"tokenizer.ggml.{v}_token_id"]] for k, v in name.items()},
    }


@pytest.fixture(scope="module")
def smol_tokenizer_folder(
    tiny_gguf: Path, smollm_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """SmolLM2's tokenizer in an HF folder (tiny random weights: tokenizing does not read them)."""
    folder = export_hf_folder(ReferenceBackend(tiny_gguf, n_ctx=64),
                              tmp_path_factory.mktemp("smol-tok") / "hf", "F32")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(smollm_path)))
    return folder


def _assert_tokenizes_like_hf(gguf_path: Path, folder: Path, texts: list[str]) -> LlamaCppBackend:
    hf, _ = hf_tokenizer(folder, json.loads((folder / "config.json").read_text()))
    backend = LlamaCppBackend(gguf_path, n_ctx=256, threads=1)
    for text in texts:
        assert backend.tokenize(text, special=False) == hf.encode(text, special=False), text
        chat = CHAT.format(text)
        assert backend.tokenize(chat, special=True) == hf.encode(chat, special=True), chat
    return backend


TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]  # fmt: skip


def test_smollm2_tokenizer_round_trips_through_an_hf_folder(
    smol_tokenizer_folder: Path, smollm_path: Path, dev_prompts: list[dict], tmp_path: Path
) -> None:
    out = export_gguf(smol_tokenizer_folder, tmp_path / "smol-tok.gguf", quant="f16")
    new, original = read_gguf(out).metadata, read_gguf(smollm_path).metadata
    for key in TOKENIZER_KEYS:
        assert new[key] == original[key], key
    texts = _texts(dev_prompts)
    exported = _assert_tokenizes_like_hf(out, smol_tokenizer_folder, texts)
    reference = LlamaCppBackend(smollm_path, n_ctx=256, threads=1)
    for text in texts:
        assert exported.tokenize(text, special=False) == reference.tokenize(text, special=False)
    exported.close()
    reference.close()


LLAMA3_SPLIT = {"type": "Split", "pattern": {"Regex": gguf_export._LLAMA3_REGEX},
                "behavior": "Isolated", "invert": False}  # fmt: skip
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}


def _with_space_digit_token(spec: dict) -> dict:
    """Give the vocabulary a "Ġ1" token (space + digit), as GPT-2's has and SmolLM2's lacks.

    With SmolLM2's vocabulary the gpt-2 and smollm rules give the same tokens (it has no
    token joining a digit to anything), so a wrong choice between them could pass; only
    gpt-2's rule keeps " 1" together. The last merge's token ("ectable") makes room.
    """
    model = spec["model"]
    assert model["merges"][-1] == ["ect", "able"]  # the merge that makes the last token
    model["vocab"]["Ġ1"] = model["vocab"].pop("ectable")
    model["merges"][-1] = ["Ġ", "1"]
    return spec


@pytest.mark.parametrize(
    ("pre", "steps", "ignore_merges"),
    [
        ("gpt-2", [BYTE_LEVEL | {"use_regex": True}], False),
        ("llama-bpe", [LLAMA3_SPLIT, BYTE_LEVEL | {"use_regex": False}], True),
    ],
)
def test_the_pre_tokenizer_is_the_one_llamacpp_splits_like(
    smol_tokenizer_folder: Path, dev_prompts: list[dict], tmp_path: Path,
    pre: str, steps: list[dict], ignore_merges: bool,
) -> None:
    folder = tmp_path / pre
    shutil.copytree(smol_tokenizer_folder, folder)
    spec = _with_space_digit_token(json.loads((folder / "tokenizer.json").read_text()))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": steps}
    spec["model"]["ignore_merges"] = ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    out = export_gguf(folder, tmp_path / f"{pre}.gguf", quant="f16")
    assert read_gguf(out).metadata["tokenizer.ggml.pre"] == pre
    texts = _texts(dev_prompts) + ["In 2024, 12345 people paid $3.50 — isn't it?\n\n  x"]
    _assert_tokenizes_like_hf(out, folder, texts).close()


def test_an_unknown_pre_tokenizer_is_refused(smol_tokenizer_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ws"
    shutil.copytree(smol_tokenizer_folder, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"pre-tokenizer \(Whitespace.*no llama.cpp equivalent"):
        export_gguf(folder, tmp_path / "out.gguf")


@pytest.mark.slow
def test_smollm2_weights_round_trip_through_an_hf_folder(
    smollm_path: Path, tmp_path: Path
) -> None:
    """The real model: its dequantized weights as F16 safetensors, back to an f16 GGUF.

    F16 holds the Q4_1 weights up to rounding; llama.cpp runs Q4_1 with 8-bit activations
    and F16 with F16 ones, so the two agree to ~1e-2 of the largest logit, not exactly.
    """
    folder = export_hf_folder(ReferenceBackend(smollm_path, n_ctx=64), tmp_path / "hf", "F16")
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(smollm_path)))
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True  # as SmolLM2's own config.json says
    (folder / "config.json").write_text(json.dumps(config))
    out = export_gguf(folder, tmp_path / "smol-f16.gguf", quant="f16")
    original = LlamaCppBackend(smollm_path, n_ctx=64, threads=1)
    ids = original.tokenize(CHAT.format("Name three planets."), special=True)
    original.close()
    want = llamacpp_logits(smollm_path, ids)
    got = llamacpp_logits(out, ids)
    print(f"SmolLM2 Q4_1 → HF F16 → GGUF f16: {_rel_error(got, want):.2e}")
    assert _rel_error(got, want) <= VS_OWN_WEIGHTS
    assert np.array_equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("case", ["untied", "tied", "linear", "llama3"])
def test_a_folder_saved_by_transformers_exports_what_transformers_computes(
    case: str, smol_tokenizer_folder: Path, tmp_path: Path
) -> None:
    """The folder format as its own library writes it: tied heads, RoPE scaling kinds."""
    pytest.importorskip("transformers")
    from tests.test_reference_transformers import CASES, _hf_logits, _random_llama

    model = _random_llama(*CASES[case], seed=len(case))
    model.save_pretrained(tmp_path / "hf")
    shutil.copy(smol_tokenizer_folder / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    out = export_gguf(tmp_path / "hf", tmp_path / "model.gguf", quant="f32")
    ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2, 198, 1, 28, 314, 2016]
    got, want = llamacpp_logits(out, ids, f32_cache=True), _hf_logits(model, ids)
    print(f"{case}: llama.cpp vs transformers {_rel_error(got, want):.2e}")
    assert _rel_error(got, want) <= VS_SOURCE["f32"]
