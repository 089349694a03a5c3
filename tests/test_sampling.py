"""Speculative sampling is lossless: the tokens it emits are distributed as the target's.

For a target with a small effective vocabulary (top-k / top-p), the exact distribution of
the first K emitted tokens is a finite table; 20,000 speculative generations with a fixed
seed must fit it (chi-square), and a deliberately broken acceptance rule must not. Drafts are
one-hot (a draft model's argmax), sampled from q (multi-candidate rule) or the winners of the
target's own races (what the model drafter proposes when sampling). The
target is either a fixed logits table per context (fast, any shape of q vs p) or the
reference backend itself, with a q drafter that is its own early exit after layer 1.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgespec.tree import TokenTree
from edgespec.verify import (
    Acceptance,
    Draws,
    PositionDraws,
    SamplingParams,
    accept,
    multi_candidate,
    pick,
    probabilities,
    race,
)
from runtimes.reference import ReferenceBackend

N_SAMPLES = 20_000
K = 3  # tokens compared per generation
VOCAB = 10
Context = tuple[int, ...]
Acceptor = Callable[[TokenTree, np.ndarray, SamplingParams, Draws], Acceptance]


# --- statistics ---------------------------------------------------------------------------


def chi_square_pvalue(samples: Counter, exact: dict[Context, float]) -> float:
    """P(χ² ≥ observed) for ``samples`` against ``exact`` (cells expecting < 5 pooled).

    The tail uses the Wilson–Hilferty cube-root normal approximation (no scipy needed),
    within ~10% of the exact p-value from 3 degrees of freedom up — plenty for the
    thresholds here, which are orders of magnitude apart.
    """
    n = sum(samples.values())
    assert set(samples) <= set(exact), "a sequence the target cannot produce was emitted"
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for seq, prob in exact.items():
        if n * prob < 5:
            pooled_obs, pooled_exp = pooled_obs + samples[seq], pooled_exp + n * prob
        else:
            cells.append((samples[seq], n * prob))
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- targets and drafters ----------------------------------------------------------------


class TableTarget:
    """Logits per context from a seeded hash: a language model reduced to a lookup."""

    def __init__(self, seed: int, scale: float = 2.0) -> None:
        self.seed, self.scale = seed, scale
        self._memo: dict[Context, np.ndarray] = {}

    def logits(self, context: Context) -> np.ndarray:
        if context not in self._memo:
            key = zlib.crc32(np.asarray((self.seed, *context), np.int64).tobytes())
            self._memo[context] = np.random.default_rng(key).normal(0, self.scale, VOCAB)
        return self._memo[context]

    def rows(self, context: Context, tree: TokenTree) -> np.ndarray:
        """What a backend's verify returns: one row per node, each after its root path."""
        paths = [tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))]
        return np.stack([self.logits(context + p) for p in paths])


class BackendTarget:
    """The reference backend after a fixed prompt, memoised per (context, tree).

    Batch invariance makes a node's logits a function of its context alone, so replaying a
    cached verification is exactly what calling the backend again would return.
    """

    def __init__(self, backend: ReferenceBackend, prompt: list[int]) -> None:
        self.backend, self.prompt = backend, prompt
        self._rows: dict[tuple, np.ndarray] = {}
        self._logits: dict[Context, np.ndarray] = {}
        self._early: dict[Context, np.ndarray] = {}

    def _position(self, context: Context) -> None:
        """Cache holds prompt + context minus its last token (the tree's root)."""
        self.backend.truncate(0)
        self.backend.prefill([*self.prompt, *context[:-1]])

    def logits(self, context: Context) -> np.ndarray:
        if context not in self._logits:
            self.backend.truncate(0)
            self._logits[context] = self.backend.prefill([*self.prompt, *context])
        return self._logits[context]

    def rows(self, context: Context, tree: TokenTree) -> np.ndarray:
        key = (context, tuple(tree.tokens), tuple(tree.parents))
        if key not in self._rows:
            self._position(context)
            self._rows[key] = self.backend.verify(tree)
        return self._rows[key]

    def early_exit(self, context: Context) -> np.ndarray:
        """The layer-1 early exit's logits after ``context``: the q drafter's model."""
        if context not in self._early:
            self._position(context)
            self._early[context] = self.backend.draft_logits([context[-1]], 1)[0]
        return self._early[context]


def one_hot_drafter(draft_logits: Callable[[Context], np.ndarray]) -> Callable:
    """Deterministic: the draft model's top-2 after the root, each followed by its top-1."""

    def draft(context: Context, params: SamplingParams, rng: np.random.Generator,
              draws: PositionDraws) -> TokenTree:
        first = np.argsort(-draft_logits(context), kind="stable")[:2]
        tokens, parents = [context[-1]], [-1]
        for t in first:
            tokens += [int(t), int(np.argmax(draft_logits((*context, int(t)))))]
            parents += [0, len(tokens) - 2]
        return TokenTree(tokens, parents)

    return draft


def sampling_drafter(draft_logits: Callable[[Context], np.ndarray]) -> Callable:
    """Two children drawn without replacement from q at the root, one below each."""

    def draft(context: Context, params: SamplingParams, rng: np.random.Generator,
              draws: PositionDraws) -> TokenTree:
        q_root = probabilities(draft_logits(context), params)
        n_children = min(2, int(np.count_nonzero(q_root)))
        first = rng.choice(q_root.size, size=n_children, replace=False, p=q_root)
        tokens, parents, probs = [context[-1]], [-1], {0: q_root}
        for t in first:
            q = probabilities(draft_logits((*context, int(t))), params)
            tokens += [int(t), int(rng.choice(q.size, p=q))]
            parents += [0, len(tokens) - 2]
            probs[len(tokens) - 2] = q
        tree = TokenTree(tokens, parents)
        tree.draft_probs.update(probs)
        return tree

    return draft


def racing_drafter(draft_logits: Callable[[Context], np.ndarray]) -> Callable:
    """As the model drafter samples: the first two arrivals of q's race at the root's
    children's position, each followed by the winner of the next position's race."""

    def draft(context: Context, params: SamplingParams, rng: np.random.Generator,
              draws: PositionDraws) -> TokenTree:
        at = len(context)  # the position of the root's children
        tokens, parents = [context[-1]], [-1]
        for t in race(probabilities(draft_logits(context), params), draws.at(at), 2):
            q = probabilities(draft_logits((*context, t)), params)
            tokens += [t, race(q, draws.at(at + 1))[0]]
            parents += [0, len(tokens) - 2]
        return TokenTree(tokens, parents)

    return draft


# --- the experiment --------------------------------------------------------------------------


def generate(target, draft: Callable, acceptor: Acceptor, params, rng) -> tuple[Context, int]:
    """The decode loop in miniature: first token from the prompt, then speculative steps.

    Returns the first K tokens and how many drafted tokens were accepted on the way. The
    target's randomness is keyed by position, as in the engine (``PositionDraws``).
    """
    draws = PositionDraws(int(rng.integers(2**63)))
    context: Context = (pick(target.logits(()), params, draws.at(0)),)
    accepted = 0
    while len(context) < K:
        tree = draft(context, params, rng, draws)
        acc = acceptor(tree, target.rows(context, tree), params, after(draws, len(context)))
        context += tuple(tree.tokens[i] for i in acc.path[1:]) + (acc.next_token,)
        accepted += acc.n_accepted_drafts
    return context[:K], accepted


def after(draws: PositionDraws, at: int) -> Draws:
    """The randomness of a tree whose root's children sit at text position ``at``."""
    return lambda depth: draws.at(at + depth)


def exact_distribution(target, params: SamplingParams) -> dict[Context, float]:
    dist: dict[Context, float] = {(): 1.0}
    for _ in range(K):
        grown = {}
        for seq, prob in dist.items():
            p = probabilities(target.logits(seq), params)
            grown.update({(*seq, int(t)): prob * p[t] for t in np.flatnonzero(p)})
        dist = grown
    return dist


def pvalue(target, draft: Callable, acceptor: Acceptor, params) -> tuple[float, int]:
    """Chi-square p-value of N_SAMPLES seeded generations, and the drafts they accepted."""
    rng = np.random.default_rng(1234)
    samples, accepted = Counter(), 0
    for _ in range(N_SAMPLES):
        seq, n = generate(target, draft, acceptor, params, rng)
        samples[seq] += 1
        accepted += n
    return chi_square_pvalue(samples, exact_distribution(target, params)), accepted


def broken_accept(tree: TokenTree, logits: np.ndarray, params: SamplingParams, draws: Draws
                  ) -> Acceptance:
    """A plausible-looking bug: after rejecting every child, draw from p, not the residual."""
    rng = draws(0)  # one generator for the whole tree
    node, path = 0, [0]
    while True:
        p, q = probabilities(logits[node], params), tree.draft_probs.get(node)
        token = None
        for c in tree.children[node]:
            x = tree.tokens[c]
            if rng.random() * q[x] < p[x]:
                token = x
                break
        if token is None:
            token = int(rng.choice(p.size, p=p))  # the bug: p instead of the residual
        child = tree.child_with_token(node, token)
        if child is None:
            return Acceptance(path, token)
        node, path = child, [*path, child]


# --- tests ---------------------------------------------------------------------------------

PARAMS = {
    "top_k": SamplingParams(temperature=0.9, top_k=3),
    "top_p": SamplingParams(temperature=1.2, top_k=5, top_p=0.8),
}


@pytest.fixture(scope="module")
def table() -> tuple[TableTarget, Callable[[Context], np.ndarray]]:
    """A target and a draft model that agrees with it only roughly (logits + noise)."""
    target, noise = TableTarget(seed=1), TableTarget(seed=2, scale=1.5)
    return target, lambda ctx: target.logits(ctx) + noise.logits(ctx)


@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
@pytest.mark.parametrize("make_drafter", [one_hot_drafter, sampling_drafter, racing_drafter])
def test_speculative_sampling_is_exact_on_a_table(table, make_drafter, params) -> None:
    target, draft_model = table
    p, accepted = pvalue(target, make_drafter(draft_model), accept, params)
    assert accepted > 0.2 * N_SAMPLES, "drafts were rarely accepted: the test would be vacuous"
    assert p > 1e-3


def write_small_vocab_llama(
    path: Path,
    *,
    n_embd: int = 32,
    n_ff: int = 64,
    n_layer: int = 2,
    weight_scale: float = 1.5,
    seed: int = 7,
    extra_pieces: tuple[str, ...] = (),
) -> Path:
    """A random Llama GGUF whose vocabulary is 16 letters plus one merge ("a b" → "ab")
    (and ``extra_pieces``, for a vocabulary that differs).

    SmolLM2's 49k-token vocabulary makes each sampling step cost milliseconds of softmax
    and each GGUF read seconds; with 17 tokens, 20k generations take seconds. The merge is
    there because llama.cpp refuses a BPE vocabulary without one.
    """
    rng = np.random.default_rng(seed)
    n_head, n_kv = 4, 2
    pieces = [chr(ord("a") + i) for i in range(16)] + ["ab", *extra_pieces]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(pieces)
    w.add_token_types([1] * len(pieces))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)

    def add(name: str, *shape: int) -> None:
        scale = 1.0 if len(shape) == 1 else weight_scale / np.sqrt(shape[-1])
        base = 1.0 if len(shape) == 1 else 0.0
        w.add_tensor(name, (base + scale * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", len(pieces), n_embd)
    for i in range(n_layer):
        for name, shape in [
            ("attn_norm", (n_embd,)), ("attn_q", (n_embd, n_embd)),
            ("attn_k", (n_kv * n_embd // n_head, n_embd)),
            ("attn_v", (n_kv * n_embd // n_head, n_embd)), ("attn_output", (n_embd, n_embd)),
            ("ffn_norm", (n_embd,)), ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)),
            ("ffn_down", (n_embd, n_ff)),
        ]:  # fmt: skip
            add(f"blk.{i}.{name}.weight", *shape)
    add("output_norm.weight", n_embd)
    add("output.weight", len(pieces), n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def model_target(tmp_path_factory: pytest.TempPathFactory) -> BackendTarget:
    path = write_small_vocab_llama(tmp_path_factory.mktemp("sampling") / "letters.gguf")
    return BackendTarget(ReferenceBackend(path, n_ctx=64, threads=1), prompt=[1, 2, 3])


MODEL_PARAMS = SamplingParams(temperature=1.0, top_k=4)


@pytest.mark.parametrize("make_drafter", [one_hot_drafter, sampling_drafter, racing_drafter])
def test_speculative_sampling_is_exact_on_the_reference_model(model_target, make_drafter) -> None:
    """The target is the numpy Llama; q is its own exit after layer 1 (a layer-skip draft)."""
    drafter = make_drafter(model_target.early_exit)
    p, accepted = pvalue(model_target, drafter, accept, MODEL_PARAMS)
    assert accepted > 0.2 * N_SAMPLES
    assert p > 1e-3


def test_racing_drafts_are_accepted_more_often_and_change_no_token(table) -> None:
    """Proposing the winners of the target's own races beats proposing the draft's argmax,
    and a seed still gives the text plain sampling gives: every emitted token is the target's
    draw, whoever proposed it (18-22% more accepted on these tables at 5,000 generations)."""
    target, draft_model = table
    params, runs = PARAMS["top_k"], {}
    for make in (one_hot_drafter, racing_drafter):
        rng = np.random.default_rng(99)
        runs[make] = [generate(target, make(draft_model), accept, params, rng)
                      for _ in range(2000)]
    assert [seq for seq, _ in runs[racing_drafter]] == [seq for seq, _ in runs[one_hot_drafter]]
    accepted = {make: sum(n for _, n in run) for make, run in runs.items()}
    assert accepted[racing_drafter] > 1.1 * accepted[one_hot_drafter], accepted


@pytest.mark.parametrize("target_kind", ["table", "model"])
def test_a_broken_rule_fails_the_same_test(request: pytest.FixtureRequest, target_kind: str):
    if target_kind == "table":
        target, draft_model = request.getfixturevalue("table")
        params = PARAMS["top_k"]
    else:
        target = request.getfixturevalue("model_target")
        draft_model, params = target.early_exit, MODEL_PARAMS
    p, _ = pvalue(target, sampling_drafter(draft_model), broken_accept, params)
    assert p < 1e-6


def test_greedy_ignores_the_draft_distribution() -> None:
    tree = TokenTree([0, 1, 2], [-1, 0, 1])
    tree.draft_probs[0] = np.array([0.0, 0.0, 1.0])
    logits = np.array([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 0.0]])
    acc = accept(tree, logits, SamplingParams(), lambda depth: np.random.default_rng(0))
    assert acc.path == [0, 1, 2] and acc.next_token == 0


def test_a_candidate_q_could_not_have_drawn_is_refused() -> None:
    p, q = np.array([0.5, 0.5]), np.array([1.0, 0.0])
    with pytest.raises(ValueError, match="draft probability 0"):
        multi_candidate(p, q, [1], np.random.default_rng(0))


@pytest.mark.parametrize("n_candidates", [1, 2, 3])
def test_multi_candidate_draws_exactly_from_p(n_candidates: int) -> None:
    """One node, candidates drawn from q without replacement: the output is distributed as p,
    though q over-proposes token 0 and proposes token 4, which p forbids."""
    p, q = np.array([0.1, 0.3, 0.2, 0.4, 0.0]), np.array([0.5, 0.1, 0.2, 0.1, 0.1])
    rng = np.random.default_rng(5)
    draws = Counter()
    for _ in range(N_SAMPLES):
        candidates = rng.choice(5, size=n_candidates, replace=False, p=q)
        draws[(multi_candidate(p, q, [int(c) for c in candidates], rng),)] += 1
    assert chi_square_pvalue(draws, {(t,): float(p[t]) for t in range(4)}) > 1e-3


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-12])
def test_a_tiny_temperature_is_a_distribution_on_the_argmax(temperature: float) -> None:
    """Found by the server fuzzer: logits / 5e-324 overflowed to inf - inf = nan, and the
    generation failed with a 500."""
    logits = np.array([3.0, -1e4, 7.5, 7.25, 0.0], np.float32)
    for params in (SamplingParams(temperature), SamplingParams(temperature, top_k=2, top_p=0.5)):
        p = probabilities(logits, params)
        assert np.isfinite(p).all() and p[2] == 1.0 and p.sum() == 1.0
