"""A draft model in the decode loop: output unchanged, passes priced, a wrong draft refused.

The draft is what ``edgespec export --with-draft early-exit:8`` writes for the packaged SmolLM2
(its first 8 of 30 layers, final norm and head), loaded as a second llama.cpp engine.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import edgespec
from edgespec.drafting import ModelDrafter, SecondEngine
from edgespec.models import resolve_model
from exporters.drafts import export_draft
from runtimes.llamacpp import LlamaCppBackend

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def early_exit(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("draft") / "smollm2-exit8.gguf"
    return export_draft(smollm_path, out, kind="early-exit", exit_layer=8)


@pytest.fixture(scope="module")
def engine(smollm_path: Path, early_exit: Path):
    """Every drafted tree verified (not adaptive), so the draft is exercised every step."""
    with edgespec.load(smollm_path, draft_model=early_exit, adaptive=False, ctx=1024) as e:
        yield e


def _chat(engine: edgespec.Engine, prompt: dict, draft: str, **sampling) -> object:
    return engine.chat([{"role": "user", "content": prompt["turns"][0]}], max_tokens=40,
                       draft=draft, **sampling)


def test_greedy_output_is_plain_decodings(engine: edgespec.Engine,
                                          dev_prompts: list[dict]) -> None:
    firsts = {p["category"]: p for p in reversed(dev_prompts)}
    drafted = accepted = 0
    for category in ("writing", "code", "summarization"):
        plain = _chat(engine, firsts[category], "none")
        for draft in ("model", "fused"):
            result = _chat(engine, firsts[category], draft)
            assert result.token_ids == plain.token_ids, (category, draft)
            drafted += result.stats.draft_nodes
            accepted += result.stats.accepted_drafts
    assert drafted > 0 and accepted > 0  # the draft model really drafted, and was right


def test_sampling_with_a_seed_gives_plain_decodings_text(engine: edgespec.Engine,
                                                         dev_prompts: list[dict]) -> None:
    for prompt in dev_prompts[:3]:
        plain = _chat(engine, prompt, "none", temperature=0.8, seed=7)
        assert _chat(engine, prompt, "model", temperature=0.8, seed=7).token_ids == \
            plain.token_ids


def test_passes_that_cannot_pay_are_not_made(early_exit: Path) -> None:
    """Priced against a target token that costs nothing, a pass is never worth it: after
    the first call (nothing measured yet) the drafter stands idle, and probes within 5% of
    those (free) steps' time, that is once; with nothing priced it drafts every call."""
    context = [1, 504, 3250, 314, 253, 1345, 28]
    for token_seconds, drafted in ((1e-9, range(0, 2)), (math.inf, range(32, 33))):
        drafter = ModelDrafter(SecondEngine(LlamaCppBackend(early_exit, n_ctx=256,
                                                            max_tree_nodes=1)),
                               lambda s=token_seconds: s)
        trees = []
        try:
            for step in range(32):
                trees.append(drafter.draft([*context, 100 + step], budget=4))
                context.append(100 + step)
        finally:
            drafter.close()
        assert sum(len(t) > 1 for t in trees) in drafted, [len(t) for t in trees]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec", "run", *args, "-n", "4"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["--draft", "model"], "--draft model needs a draft model: give --draft-model PATH"),
    (["--draft-model", "/nonexistent/draft.gguf"], "draft model not found"),
    (["--draft", "model", "--memory-budget", "1GB"],
     "--draft model needs a draft model: give --draft-model PATH"),
    (["--draft-model", "{gemma}"], "draft vocabulary differs from the target's: token "),
])
def test_a_draft_model_that_cannot_serve_is_refused_in_one_line(
        args: list[str], message: str, smollm_path: Path) -> None:
    files = {"{gemma}": str(resolve_model("gemma3-270m"))} if "{gemma}" in args else {}
    r = _run(str(smollm_path), "hi", *[files.get(a, a) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_draft_model_runs_on_the_reference_backend(tiny_gguf: Path, tmp_path: Path) -> None:
    """The draft opens on the target's backend with the target's tree and chunk sizes."""
    draft = export_draft(tiny_gguf, tmp_path / "exit1.gguf", kind="early-exit", exit_layer=1)
    with edgespec.load(tiny_gguf, backend="reference", draft_model=draft, adaptive=False,
                       ctx=256) as engine:
        plain = engine.generate("Once upon a time", max_tokens=24, draft="none")
        drafted = engine.generate("Once upon a time", max_tokens=24, draft="model")
    assert drafted.token_ids == plain.token_ids
    assert drafted.stats.draft_nodes > 0


def test_sampling_a_draft_identical_to_the_target_proposes_the_targets_draws(
        tiny_gguf: Path) -> None:
    """Sampling, the drafter proposes the winners of the races the target runs at those
    positions: a draft that is the target itself is then right at every depth, where its
    argmax would rarely be (a random model's distributions are flat)."""
    with edgespec.load(tiny_gguf, draft_model=tiny_gguf, adaptive=False, ctx=256) as engine:
        args = dict(max_tokens=48, temperature=0.8, seed=3)
        plain = engine.generate("Once upon a time", draft="none", **args)
        drafted = engine.generate("Once upon a time", draft="model", **args)
    assert drafted.token_ids == plain.token_ids
    assert drafted.stats.accepted_per_step > 4, drafted.stats
