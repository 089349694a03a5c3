"""The embedded Python API: ``edgespec.load(path)`` → :class:`Engine`.

An Engine owns one backend (and so one KV cache), a drafter per draft method (their
memories persist across generations, as Token Recycling intends) and the speculation
policy with the device's measured cost curve. Generations are serialised by a lock, so an
Engine can be shared between threads; :meth:`Engine.cancel` stops the running one, and a
generation given its own ``cancel`` event stops when that is set (a server cancels one
request's generation without touching the others waiting for the engine).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import runtimes  # module import: runtimes imports edgespec.errors, so no from-import
from edgespec import memory, profile_store
from edgespec.autotune import CostCurve, SpeculationPolicy
from edgespec.chat import ChatTemplate, Message
from edgespec.device import device_key
from edgespec.drafting import EARLY_EXIT, Drafter, ModelDrafter, SecondEngine, make_drafter
from edgespec.engine import DecodeLoop, GenerationStats
from edgespec.errors import UserError
from edgespec.models import open_backend, resolve_model
from edgespec.profiler import BackendProfile, probe_verify_cost, profile
from edgespec.textstream import TextStream
from edgespec.verify import PositionDraws, SamplingParams
from runtimes.base import Backend, default_threads

DEFAULT_TREE_SIZE = 16
DEFAULT_RECYCLING_K = 4  # Token Recycling's successors per token


@dataclass
class GenerationResult:
    """The text, its token ids and what producing them cost."""

    text: str
    token_ids: list[int]
    stats: GenerationStats

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


class Engine:
    """A loaded model ready to generate, speculatively or not."""

    def __init__(
        self,
        backend: Backend,
        *,
        draft: str = "fused",
        tree_size: int | None = None,
        adaptive: bool = True,
        model: Path | None = None,
        govern_threads: bool = False,
        recycling_k: int = DEFAULT_RECYCLING_K,
        draft_backend: Backend | None = None,
    ) -> None:
        """``model``: the file or export ``backend`` loaded, to find its saved device profile
        (``edgespec profile``); without one (or ``model=None``), the first speculative
        generation probes.
        ``govern_threads``: use one thread fewer while another process holds a core
        (:mod:`edgespec.threads`); :func:`load` sets it unless the caller chose ``threads``.
        ``draft_backend``: a draft model of the same vocabulary, loaded; the engine owns it
        (``draft="model"`` drafts with it alone, ``"fused"`` with lookup and recycling)."""
        tree_size = DEFAULT_TREE_SIZE if tree_size is None else tree_size
        if tree_size < 1:
            raise UserError(f"--tree-size must be at least 1 (got {tree_size})")
        self.backend = backend
        self.draft = draft
        self.tree_size = min(tree_size, backend.max_tree_nodes)
        self.adaptive = adaptive
        self._drafters: dict[str, Drafter | None] = {}
        self._recycling_k = recycling_k
        self._model_drafter = None if draft_backend is None else ModelDrafter(
            SecondEngine(draft_backend), self._token_seconds)
        self.plan: memory.Plan | None = None  # set by load() under a memory budget
        self._drafter(draft)  # validate the name now, not at the first generation
        self.model = model
        self.govern_threads = govern_threads
        self.profile: BackendProfile | None = None  # the saved one in use, if any
        self._policy: SpeculationPolicy | None = None
        self._loop: DecodeLoop | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    # -- public --------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        draft: str | None = None,
        stop: Sequence[str] = (),
        stream: bool = False,
        cancel: threading.Event | None = None,
    ) -> GenerationResult | TextIterator:
        """Complete ``prompt`` as given (no chat template). ``stream=True`` yields text pieces.

        ``cancel``: an event that stops this generation (with ``Cancelled``) when set, used
        instead of the engine's own; :meth:`cancel` then does not reach it.
        """
        ids = self.tokenize(prompt)
        stats = GenerationStats(backend=self.backend.name, draft=draft or self.draft)
        run = TextIterator(
            self._run(ids, max_tokens, SamplingParams(temperature, top_k, top_p), seed, stats,
                      stop, cancel), stats
        )
        if stream:
            return run
        for _ in run:
            pass
        assert run.result is not None
        return run.result

    def stream(self, prompt: str | Sequence[int], **kwargs) -> TextIterator:
        """Text pieces of :meth:`generate` as they are produced."""
        return self.generate(prompt, stream=True, **kwargs)

    def chat(self, messages: Sequence[Message], *, max_tokens: int = 256,
             **kwargs) -> GenerationResult | TextIterator:
        """Reply to ``messages`` using the model's chat template; same options as generate.

        Across calls the cache of the conversation so far is reused (prefix reuse). A
        conversation that outgrows the context loses its oldest exchanges first
        (:meth:`fit_conversation`) and the rest is prefilled again, instead of an error.
        """
        kept = self.fit_conversation(messages, max_tokens)
        return self.generate(self.render_chat(kept), max_tokens=max_tokens, **kwargs)

    def fit_conversation(self, messages: Sequence[Message], max_tokens: int) -> list[Message]:
        """``messages`` less the oldest exchanges, until they and ``max_tokens`` of answer
        fit the context: system messages and the last message are always kept."""
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        limit = self.backend.n_ctx - max_tokens
        while len(turns) > 1 and len(self.tokenize(self.render_chat([*system, *turns]))) > limit:
            del turns[:2 if len(turns) > 2 else 1]
        return [*system, *turns]

    def render_chat(self, messages: Sequence[Message]) -> str:
        info = self.backend.tokenizer
        if not info.chat_template:
            raise UserError("this model has no chat template; use --raw (plain completion)")
        names = info.special_texts
        template = ChatTemplate(
            info.chat_template,
            bos_token=names.get(info.bos_id, "") if info.bos_id is not None else "",
            eos_token=next((names[t] for t in sorted(info.eos_ids) if t in names), ""),
        )
        return template.render(messages)

    def next_token_logits(self, prompt: str | Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """The target's logits after ``prompt`` + ``tokens``, evaluated as plain decoding would.

        For diagnostics, e.g. the top-2 margin where two runs' outputs diverge.
        """
        ids = [*self.tokenize(prompt), *tokens]
        with self._lock:
            self._decode_loop(speculative=False).forget()
            self.backend.truncate(0)
            return self.backend.prefill(ids)

    def measure_verify_cost(self, sizes: Sequence[int], *, context: int = 300,
                            repeats: int = 1) -> dict[int, float]:
        """Seconds one verify call of each of ``sizes`` tokens takes after ``context`` cached
        tokens, in a run of calls of that size, on this engine's backend (the cache is
        emptied: the next prompt is prefilled)."""
        with self._lock:
            self._decode_loop(speculative=False).forget()
            return probe_verify_cost(self.backend, sizes=tuple(sizes), context=context,
                                     repeats=repeats, warm=True)

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """The ids :meth:`generate` feeds the model for ``prompt``: special tokens parsed,
        BOS added where the model wants it; a sequence of ids passes through."""
        if not isinstance(prompt, str):
            return list(prompt)
        info = self.backend.tokenizer
        ids = self.backend.tokenize(prompt, special=True)
        if info.add_bos and info.bos_id is not None and ids[:1] != [info.bos_id]:
            ids.insert(0, info.bos_id)
        if not ids:
            raise UserError("the prompt is empty")
        return ids

    def cancel(self) -> None:
        """Stop the generation in progress (from any thread); it ends with ``Cancelled``."""
        self._cancel.set()

    def close(self) -> None:
        for drafter in {id(d): d for d in [*self._drafters.values(), self._model_drafter]
                        if d is not None}.values():
            drafter.close()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _drafter(self, name: str) -> Drafter | None:
        if name not in self._drafters:
            self._drafters[name] = make_drafter(name, self.backend,
                                                recycling_k=self._recycling_k,
                                                model=self._model_drafter,
                                                token_seconds=self._token_seconds)
        return self._drafters[name]

    def _token_seconds(self) -> float:
        """What verifying one token costs now: a draft model prices its passes in it (not
        adaptive: nothing is priced, every tree is drafted)."""
        if not self.adaptive:
            return math.inf
        return self._policy.cost(1) if self._policy is not None else 1.0

    def _decode_loop(self, speculative: bool) -> DecodeLoop:
        """The loop, with the cost curve of this device's saved profile, or one measured on
        first speculative use (~0.5 s), and trees capped at the largest size the engine
        verifies bit-exactly (lossless output)."""
        if self._loop is None:
            self._loop = DecodeLoop(self.backend, SpeculationPolicy(CostCurve({1: 1.0}), 1),
                                    govern_threads=self.govern_threads)
        if speculative and self._policy is None:
            self._loop.forget()
            self.profile = self.saved_profile()
            exact, cost = ((self.profile.exact, self.profile.curve()) if self.profile
                           else profile(self.backend))
            self.tree_size = min(self.tree_size, exact)
            curve = CostCurve(cost)
            self._policy = SpeculationPolicy(curve, self.tree_size, adaptive=self.adaptive)
            self._loop.policy = self._policy
        return self._loop

    def saved_profile(self) -> BackendProfile | None:
        """This device's saved profile for this model, backend, build and thread count."""
        if self.model is None:
            return None
        b = self.backend
        return profile_store.load(device_key(), self.model, b.name, b.build, b.threads)

    def _run(
        self,
        ids: list[int],
        max_tokens: int,
        params: SamplingParams,
        seed: int | None,
        stats: GenerationStats,
        stop: Sequence[str],
        cancel: threading.Event | None = None,
    ) -> Iterator[str | GenerationResult]:
        """Yield text pieces, then the final :class:`GenerationResult` as the last item;
        ``stats`` (naming the drafter) is filled in step by step."""
        if max_tokens < 0:
            raise UserError(f"max tokens must be 0 or more (got {max_tokens})")
        drafter = self._drafter(stats.draft)
        with self._lock:
            self._cancel.clear()
            loop = self._decode_loop(drafter is not None and self.tree_size > 1)
            text = TextStream(self.backend.detokenize, stop)
            tokens: list[int] = []
            steps = loop.generate(ids, drafter=drafter, params=params, max_tokens=max_tokens,
                                  draws=PositionDraws(seed), stats=stats,
                                  cancel=self._cancel if cancel is None else cancel)
            try:
                for token in steps:
                    tokens.append(token)
                    piece = text.push(token)
                    if piece:
                        yield piece
                    if text.stopped:
                        stats.finish_reason = "stop"
                        break
            finally:
                steps.close()
            tail = text.finish()
            if tail:
                yield tail
            yield GenerationResult(text.text, tokens, stats)


class TextIterator:
    """Text pieces of a generation; ``stats`` fills in as it runs (for a live status line),
    ``result`` holds the full result once it is exhausted."""

    def __init__(self, run: Iterator[str | GenerationResult], stats: GenerationStats) -> None:
        self._run = run
        self.stats = stats
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._run:
            if isinstance(item, GenerationResult):
                self.result = item
            else:
                yield item

    def close(self) -> None:
        """Stop early and release the engine."""
        self._run.close()


def load(
    model: str | Path | None = None,
    *,
    backend: str = "auto",
    draft: str = "fused",
    threads: int | None = None,
    ctx: int = 4096,
    tree_size: int | None = None,
    adaptive: bool = True,
    device: str | None = None,
    saved_profile: bool = True,
    memory_budget: str | int | None = None,
    min_ctx: int = 512,
    kv_type: str | None = None,
    draft_model: str | Path | None = None,
) -> Engine:
    """Load ``model`` (default: the packaged SmolLM2-135M-Instruct) into an :class:`Engine`.

    ``adaptive=False`` verifies every drafted tree in full instead of only what the measured
    cost curve says pays off: slower, but it exercises speculation on every step.
    ``saved_profile=False`` ignores this device's saved profile and probes, as on a device
    never profiled (the bench compares the two).
    ``memory_budget`` (``"400MB"``, ``"1GiB"`` or bytes) caps the process's peak memory:
    the planner (:mod:`edgespec.memory`) sets the context (at least ``min_ctx`` tokens, at
    most ``ctx``), the tree size and the drafter's table to fit it, fastest first, and
    ``Engine.plan`` says what it chose.
    ``kv_type``: the KV cache's precision (llama.cpp: ``f16``, or ``q8_0`` for a K cache
    23% smaller, still exact for speculation; default: the backend's first ``kv_types``).
    Unlike the planned knobs it changes the text, so a budget never picks it.
    ``draft_model``: a smaller model with the target's vocabulary (``edgespec export
    --with-draft``), loaded beside it on the same backend for ``draft="model"`` or ``"fused"``.
    """
    if ctx < 16:
        raise UserError(f"the context size must be at least 16 tokens (got {ctx})")
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1 (got {threads})")
    path = resolve_model(model)
    name = runtimes.backend_for(path, backend)
    tree_size = DEFAULT_TREE_SIZE if tree_size is None else tree_size
    saved = _saved_profile(path, name, threads) if saved_profile else None
    exact_kv = runtimes.backend_class(name).kv_types
    kv_type = exact_kv[0] if kv_type is None else kv_type
    drafts = None if draft_model is None else _draft_source(path, draft_model)
    if draft == "model" and drafts is None:
        raise UserError("--draft model needs a draft model: give --draft-model PATH")
    if draft.startswith(EARLY_EXIT) and memory_budget is not None:
        raise UserError(f"a memory budget does not plan --draft {draft} yet; drop "
                        "--memory-budget, or export the exit as a draft model")
    plan = None if memory_budget is None else memory.plan(
        memory.parse_size(memory_budget), path, name, draft=draft, ctx=ctx,
        min_ctx=min(min_ctx, ctx), tree_size=tree_size, kv_type=kv_type,
        other_kv_types=tuple(kv for kv in exact_kv if kv != kv_type), profile=saved,
        draft_model=drafts)
    options = {"n_ctx": ctx, "threads": threads, "kv_type": kv_type}
    if plan is not None:
        options.update(plan.backend_options, **runtimes.backend_class(name).budget_options)
        draft, tree_size = plan.draft, plan.max_tree_nodes
        drafts = drafts if plan.draft_model else None  # it did not fit: given up first
    if device is not None:  # CPU, GPU, NPU or AUTO: each backend says what it can run on
        options["device"] = device
    target = open_backend(path, name, **options)
    try:  # the draft: the target's context and prefill calls, a token a pass
        draft_backend = None if drafts is None else open_backend(
            drafts, name, **{**options, "n_ctx": target.n_ctx, "max_tree_nodes": 1,
                             "prefill_chunk": target.prefill_chunk, "threads": target.threads})
    except BaseException:
        target.close()
        raise
    engine = Engine(target, draft=draft, tree_size=tree_size, adaptive=adaptive,
                    model=path if saved_profile else None, govern_threads=threads is None,
                    recycling_k=plan.recycling_k if plan else DEFAULT_RECYCLING_K,
                    draft_backend=draft_backend)
    engine.plan = plan
    return engine


def _draft_source(target: Path, draft_model: str | Path) -> Path:
    """The draft model's file, once it is known to share the target's vocabulary."""
    from exporters.drafts import check_same_vocab  # the exporters' own identity check

    path = Path(draft_model)
    if not path.exists():
        raise UserError(f"draft model not found: {path}")
    check_same_vocab(target, path)
    return path


def _saved_profile(path: Path, backend: str, threads: int | None) -> BackendProfile | None:
    """The saved profile a backend loaded with ``threads`` will use, found before loading."""
    return profile_store.load(device_key(), path, backend, runtimes.backend_class(backend).build,
                              threads or default_threads())
