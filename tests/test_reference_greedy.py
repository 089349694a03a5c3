"""Speculative greedy decoding on the reference backend is plain greedy decoding, bit for bit.

Batch invariance makes every verified node's logits identical to a lone decoding step's,
so whatever a drafter proposes, the emitted tokens cannot change. Checked through the real
engine for every drafter it ships, and through a minimal loop with a drafter that knows
the answer (so long paths are accepted and committed on every step).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgespec.api import Engine
from edgespec.drafting import DRAFTERS, EARLY_EXIT
from edgespec.models import default_model_path
from edgespec.tree import TokenTree
from edgespec.verify import SamplingParams, accept
from runtimes.reference import ReferenceBackend
from tests.test_sampling import write_small_vocab_llama

N_TOKENS = 32
REPETITIVE = "abcdefabcdefabcdefabc"


@pytest.fixture(scope="module")
def letters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 17-letter model: its greedy output wanders but repeats itself, so lookup and
    recycling drafts do get accepted (a 49k-token random model never repeats)."""
    return write_small_vocab_llama(tmp_path_factory.mktemp("greedy") / "letters.gguf", seed=1)


@pytest.fixture(scope="module")
def backend(letters: Path) -> ReferenceBackend:
    return ReferenceBackend(letters, n_ctx=512, threads=1)


# every drafter, the ones that run a model made concrete: the model's own first layer, and
# the model as its own draft model (a second engine, so long drafts are accepted)
DRAFTS = [d for d in DRAFTERS if d not in ("none", "model", f"{EARLY_EXIT}:E")]
DRAFTS += [f"{EARLY_EXIT}:1", "model"]


def greedy_ids(backend: ReferenceBackend, prompt: str, draft: str,
               draft_backend: ReferenceBackend | None = None) -> tuple[list[int], int]:
    """Token ids of a greedy generation and how many drafted tokens were accepted."""
    engine = Engine(backend, draft=draft, adaptive=False, draft_backend=draft_backend)
    result = engine.generate(prompt, max_tokens=N_TOKENS, temperature=0.0)
    return result.token_ids, result.stats.accepted_drafts


@pytest.mark.parametrize("draft", DRAFTS)
def test_every_drafter_leaves_greedy_output_unchanged(backend, letters: Path, draft: str) -> None:
    plain, _ = greedy_ids(backend, REPETITIVE, "none")
    second = ReferenceBackend(letters, n_ctx=512, threads=1) if draft == "model" else None
    speculative, accepted = greedy_ids(backend, REPETITIVE, draft, second)
    assert speculative == plain
    assert accepted >= 5, "no drafts accepted: the comparison would prove nothing"


def test_accepted_paths_of_every_shape_leave_output_unchanged(backend) -> None:
    """A drafter that knows plain greedy's continuation, hides it among random siblings and
    cuts it at random depths: every step accepts 0–5 drafts, and the output is identical."""
    rng = np.random.default_rng(0)
    prompt = backend.tokenize(REPETITIVE, special=False)
    plain = _plain(backend, prompt)
    emitted, accepted = [], 0
    backend.truncate(0)
    token = int(np.argmax(backend.prefill(prompt)))
    while len(emitted) < N_TOKENS:
        emitted.append(token)
        tree = _tree_around(plain[len(emitted) :], token, backend.vocab_size, rng)
        logits = backend.verify(tree)
        acc = accept(tree, logits, SamplingParams(), lambda depth: rng)
        backend.commit(acc.path)
        emitted += [tree.tokens[i] for i in acc.path[1:]]
        accepted += acc.n_accepted_drafts
        token = acc.next_token
    assert emitted[:N_TOKENS] == plain[:N_TOKENS]
    assert accepted >= N_TOKENS // 3


def _plain(backend: ReferenceBackend, prompt: list[int]) -> list[int]:
    backend.truncate(0)
    out = [int(np.argmax(backend.prefill(prompt)))]
    while len(out) < 2 * N_TOKENS:
        out.append(int(np.argmax(backend.verify(TokenTree.root(out[-1]))[0])))
        backend.commit([0])
    return out


def _tree_around(truth: list[int], root: int, vocab: int, rng: np.random.Generator) -> TokenTree:
    """The true continuation cut at a random depth, with a random sibling at each level."""
    tokens, parents, node = [root], [-1], 0
    for t in truth[: rng.integers(0, 6)]:
        tokens += [int(rng.integers(0, vocab)), t]
        parents += [node, node]
        node = len(tokens) - 1
    return TokenTree(tokens, parents)


@pytest.mark.slow
def test_smollm2_speculative_greedy_is_plain_greedy(dev_prompts: list[dict]) -> None:
    """The shipped SmolLM2 on the reference backend, 32 tokens of two dev prompts, every
    drafter that needs no model (the letters model above runs those: numpy re-runs an
    exit's whole chain every pass). One engine, so the prompt's KV is reused across the
    generations."""
    engine = Engine(ReferenceBackend(default_model_path(), n_ctx=2048, threads=1), adaptive=False)
    for row in dev_prompts[:2]:
        prompt = engine.render_chat([{"role": "user", "content": row["turns"][0]}])
        plain = engine.generate(prompt, max_tokens=N_TOKENS, draft="none").token_ids
        for draft in DRAFTS[:-2]:
            result = engine.generate(prompt, max_tokens=N_TOKENS, draft=draft)
            assert result.token_ids == plain, (row["id"], draft)
