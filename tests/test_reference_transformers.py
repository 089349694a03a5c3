"""The numpy reference backend computes what ``transformers`` computes on the same HF folder.

Every other reference test checks the backend against itself or against llama.cpp, which
reads GGUF. A Hugging Face safetensors folder is a second way in (``runtimes/weights.py``
re-lays q/k rows for RoPE, reads ``config.json`` for RoPE base and scaling, ties or unties
the LM head), and only the library that defines that format can say whether we read it
right. So a tiny random ``LlamaForCausalLM`` is saved by ``transformers`` itself, loaded by
``ReferenceBackend``, and both engines' float32 logits are compared on a prefill, on every
root path of a verified tree, and on a prefill after committing one of those paths.

Needs the ``export`` extra (torch, transformers); skipped cleanly without it.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgespec.models import default_model_path  # noqa: E402
from edgespec.tree import TokenTree  # noqa: E402
from runtimes.reference import ReferenceBackend  # noqa: E402
from runtimes.reference_tokenizer import gguf_tokenizer  # noqa: E402

# Relative tolerance on the logits: max |ref - hf| <= RTOL * max |hf|. Both engines are
# float32 over a 3-layer model with logits of order 10; the observed error is ~1e-6
# relative, so 1e-4 leaves room for BLAS reduction order while a wrong RoPE layout, base or
# scaling (errors of order 1, see the module docstring) is far outside it.
RTOL = 1e-4
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 30, 2, 198, 1]  # 12 ids, SmolLM2 vocab
# A tree of 7 nodes after the prompt: root 28 with two drafted children, one of which
# branches again, so root paths have 3 and 4 nodes and siblings share ancestors.
TREE = TokenTree([28, 314, 2016, 17, 6399, 905, 64], [-1, 0, 0, 1, 1, 2, 5])
AFTER_COMMIT = [411, 3172]  # prefilled after committing the tree's first root path

CASES = {
    # name: (tie_word_embeddings, rope_scaling); rope_theta is never the 10000 default
    "untied": (False, None),
    "tied": (True, None),
    "linear": (False, {"rope_type": "linear", "factor": 2.0}),
    # original_max_position_embeddings 64 puts head_dim 16's frequencies in all three
    # llama3 bands (kept, smoothly interpolated, divided by factor) with rope_theta 5e5
    "llama3": (
        True,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """SmolLM2's real tokenizer as ``tokenizer.json``, which ``hf_tokenizer`` requires.

    Rebuilt from the packaged GGUF so the folder's vocabulary is a real 49152-token one,
    which also makes the LM head the size a real small model has.
    """
    encoder, _ = gguf_tokenizer(gguf.GGUFReader(default_model_path()))
    return encoder.to_hf_json()


def _random_llama(tie: bool, rope_scaling: dict | None, seed: int) -> torch.nn.Module:
    """A 3-layer GQA Llama with weights large enough that attention is far from uniform.

    transformers' default init (std 0.02) makes every attention score ~0, so q/k layout
    and RoPE would barely change the logits and the comparison could not fail. Matrices
    here get std 1/sqrt(fan_in) (q and k 2/sqrt(fan_in)), norms random around 1.
    """
    rope = {"rope_theta": 5.0e5, "rope_type": "default"} | (rope_scaling or {})
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        # transformers 5 reads rope_parameters, 4.x rope_theta + rope_scaling: both given,
        # so the model is the intended one under either (the folder records what it used)
        rope_theta=rope["rope_theta"],
        rope_scaling=rope_scaling,
        rope_parameters=rope,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.normal_(0.0, gain / math.sqrt(p.shape[1]))
    return model


def _hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """transformers' logits ``[len(ids), vocab]`` for one causal sequence from position 0."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(max abs diff, that divided by max |theirs|) — the quantities the tolerance bounds."""
    diff = float(np.max(np.abs(ours - theirs)))
    return diff, diff / float(np.max(np.abs(theirs)))


@pytest.fixture(scope="module", params=list(CASES))
def hf_model(
    request: pytest.FixtureRequest, tokenizer_json: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, torch.nn.Module, Path]:
    """One case's model and the folder transformers saved it to (built once: ~2 s each)."""
    case = request.param
    tie, scaling = CASES[case]
    model = _random_llama(tie, scaling, seed=len(case))
    folder = tmp_path_factory.mktemp(case)
    model.save_pretrained(folder)  # float32 safetensors: the only format transformers 5 writes
    (folder / "tokenizer.json").write_text(tokenizer_json)
    assert list(folder.glob("*.safetensors")), "transformers should write safetensors"
    if tie:  # the tied head must come from the embedding, not a saved lm_head copy
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return case, model, folder


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "batched"])
def test_reference_matches_transformers(
    hf_model: tuple[str, torch.nn.Module, Path], batch_invariant: bool
) -> None:
    """Prefill, tree verify (per root path) and post-commit prefill agree with transformers."""
    case, model, folder = hf_model
    backend = ReferenceBackend(folder, n_ctx=64, batch_invariant=batch_invariant)
    assert backend.vocab_size == model.config.vocab_size
    errors: dict[str, tuple[float, float]] = {}

    prefill = backend.prefill(PROMPT)
    errors["prefill"] = _rel_err(prefill, _hf_logits(model, PROMPT)[-1])

    verified = backend.verify(TREE)
    paths = [TREE.path_to(leaf) for leaf in TREE.leaves()]
    for path in paths:
        tokens = [TREE.tokens[i] for i in path]
        theirs = _hf_logits(model, PROMPT + tokens)[len(PROMPT) :]
        errors[f"path {path}"] = _rel_err(verified[path], theirs)

    first = paths[0]
    backend.commit(first)
    context = PROMPT + [TREE.tokens[i] for i in first] + AFTER_COMMIT
    errors["after commit"] = _rel_err(backend.prefill(AFTER_COMMIT), _hf_logits(model, context)[-1])

    report = ", ".join(f"{k}: abs {a:.2e} rel {r:.2e}" for k, (a, r) in errors.items())
    print(f"{case}/{'invariant' if batch_invariant else 'batched'}: {report}")
    worst = max(errors, key=lambda k: errors[k][1])
    assert errors[worst][1] <= RTOL, f"{worst} differs from transformers: {report}"
