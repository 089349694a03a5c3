"""The memory planner: under a budget on the process's peak memory, the fastest configuration.

Edge apps are killed, not slowed, when they go over, so ``--memory-budget`` is a promise
about peak RSS, not a hint. Everything a generation allocates is planned before anything
is loaded (SpecMemo's point: speculation's memory is model-able, and rejected candidates
need none of their own): the process as it stands, the weights, the KV cache, the
engine's compute and logits buffers (sized for the largest tree, reused every step), the
loop's copies of a tree's logits and the drafter's tables. The engine's part comes from
the backend (:func:`runtimes.estimate_memory`): llama.cpp sizes its buffers in a dry run
that allocates none of them; ONNX Runtime and OpenVINO, which size theirs inside the
runtime, are measured once in a child process (:mod:`runtimes.footprint`).

What is given up, in order, keeps the most decode speed: tree nodes no verify could pay
for on this device or none verifies exactly (from its saved profile) are never planned;
then a draft model the caller gave (a second engine whose every token costs a pass), context
beyond what the caller needs (a smaller cache is, if anything, faster), the prefill batch
(only the first token waits longer), the recycling table, tree size, and last speculation
itself. The KV cache's precision is not given up: a leaner cache changes
the text, and a budget never does. It is the caller's choice (``kv_type``), and a budget
too small for it names what a leaner one would need.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

import runtimes
from edgespec.errors import UserError
from edgespec.profiler import BackendProfile
from runtimes.base import MemoryReport, Sizing

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TREE_SIZES = (64, 32, 16, 8, 4, 2)  # the largest trees the plan may give the engine
PREFILL_CHUNKS = (64, 32, 16)  # tokens per prefill call, most first
RECYCLING_K = (4, 2)  # Token Recycling's successors per token, most first
CTX_STEP = 256  # llama.cpp pads contexts to this; plans move in these steps


def parse_size(text: str | int) -> int:
    """Bytes in ``400MB``, ``1.5GiB`` or ``300000000``: KB/MB/GB powers of 10, KiB/MiB/GiB of 2."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise UserError(f"memory budget {text!r} is not a size; write e.g. 400MB, 1.5GiB "
                            "or a number of bytes (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UserError(f"the memory budget must be positive (got {text!r})")
    return value


@dataclass(frozen=True)
class Component:
    """One line of a plan: what holds memory, how much, and why that much."""

    name: str
    bytes: int
    why: str


@dataclass(frozen=True)
class Plan:
    """The knobs a budget sets, and the memory they add up to."""

    budget: int
    ctx: int
    max_tree_nodes: int  # 1: plain decoding (no drafter)
    prefill_chunk: int  # tokens per prefill call: the engine's batch buffers scale with it
    kv_type: str  # the KV cache's precision, as the caller chose it
    recycling_k: int  # 0: no recycling table
    draft: str
    components: tuple[Component, ...]
    minimum: int | None  # the least budget that runs the model at all (plain, smallest
    # context); None where a measurement stopped at this budget: more than it
    speculation_minimum: int | None  # the least budget at which a drafted tree still fits
    draft_model: bool = False  # whether the draft model the caller gave fits and is loaded

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def backend_options(self) -> dict:
        """What :func:`runtimes.open_backend` takes from the plan."""
        return {"n_ctx": self.ctx, "max_tree_nodes": self.max_tree_nodes,
                "prefill_chunk": self.prefill_chunk, "kv_type": self.kv_type}


@dataclass(frozen=True)
class _Option:
    """One configuration the planner may choose, before its context is fitted."""

    nodes: int
    chunk: int
    kv: str
    k: int
    draft: str
    model: bool = False  # with the draft model

    def sizing(self, n_ctx: int) -> Sizing:
        return Sizing(n_ctx, self.nodes, self.chunk, self.kv)

    def draft_sizing(self, n_ctx: int) -> Sizing:
        """The draft model's engine: the target's context, one token a pass."""
        return Sizing(n_ctx, 1, self.chunk, self.kv)


def useful_tree_size(profile: BackendProfile | None) -> int:
    """The largest tree worth room: one the engine verifies bit-exactly and that could beat
    plain decoding (n nodes yield at most n tokens, so c(n) ≥ n·c(1) never pays)."""
    if profile is None:
        return TREE_SIZES[0]
    cost = profile.curve()
    paying = [n for n in cost if n == 1 or cost[n] < n * cost[1]]
    return max(1, min(profile.exact, max(paying)))


def plan(budget: int, model: Path, backend: str, *, draft: str, ctx: int, min_ctx: int,
         tree_size: int, kv_type: str, other_kv_types: tuple[str, ...] = (),
         profile: BackendProfile | None = None, baseline: int | None = None,
         draft_model: Path | None = None) -> Plan:
    """The fastest configuration of ``model`` on ``backend`` whose peak RSS stays within
    ``budget``: context between ``min_ctx`` and ``ctx`` tokens, trees of at most
    ``tree_size`` nodes, the KV cache in ``kv_type``. ``baseline``: the process's memory
    before loading (now, if None). A budget that cannot hold the model is refused, naming
    the least that can, and what the KV precisions in ``other_kv_types`` would need if
    less. ``draft_model``: a draft model the caller gave, planned in as a second engine
    while it fits, and given up first (each of its tokens costs a pass, so it pays least).

    The engine's own part comes from the backend's estimate at the smallest and the
    largest context; in between it is interpolated (its buffers grow linearly or, where
    attention scores dominate, convexly with the context, so the chord never underestimates)
    and the choice is then estimated exactly.
    """
    low, high = _round_ctx(min(min_ctx, ctx)), _round_ctx(ctx)
    options = _options(draft, min(tree_size, useful_tree_size(profile)), kv_type,
                       with_model=draft_model is not None)
    alternatives = [replace(options[-1], kv=kv) for kv in other_kv_types]  # named if refused
    sizings = sorted({o.sizing(c) for o in [*options, *alternatives] for c in (low, high)},
                     key=lambda z: (z.n_ctx, z.max_tree_nodes, z.prefill_chunk, z.kv_type))
    baseline = psutil.Process().memory_info().rss if baseline is None else baseline
    limit = budget - baseline  # what an estimate that runs the engine may hold
    # first: a backend that cannot plan says so; its libraries count in the process below
    reports = runtimes.estimate_memory(model, backend, sizings, limit)
    vocab = runtimes.model_vocab_size(model, backend)
    weights = reports[0].weights  # the host tables in it are measured: once, for every plan
    engine = {z: weights + r.kv_cache + r.scratch for z, r in zip(sizings, reports)}
    over = {z for z, r in zip(sizings, reports) if r.at_least}  # beyond the budget anyway
    drafting = sorted({o.draft_sizing(c) for o in options if o.model for c in (low, high)},
                      key=lambda z: (z.n_ctx, z.prefill_chunk))
    draft_reports = runtimes.estimate_memory(draft_model, backend, drafting, limit) \
        if drafting else []
    draft_engine = {z: draft_reports[0].weights + r.kv_cache + r.scratch
                    for z, r in zip(drafting, draft_reports)}
    over |= {z for z, r in zip(drafting, draft_reports) if r.at_least}

    def chord(bytes_at: dict[Sizing, int], sizing: Callable[[int], Sizing], n_ctx: int) -> int:
        lo, hi = bytes_at[sizing(low)], bytes_at[sizing(high)]
        return lo + (hi - lo) * (n_ctx - low) // max(high - low, 1)

    def cost(o: _Option, n_ctx: int, engine_bytes: int | None = None) -> int:
        if engine_bytes is None:
            engine_bytes = chord(engine, o.sizing, n_ctx) + (
                chord(draft_engine, o.draft_sizing, n_ctx) if o.model else 0)
        known = baseline + engine_bytes + _loop_bytes(o.nodes, vocab) + _drafter_bytes(o.k, vocab)
        return known + _headroom(known)

    def exact(o: _Option, n_ctx: int) -> tuple[MemoryReport, MemoryReport | None]:
        """The estimates at ``n_ctx`` itself, of the target and of a planned draft model."""
        target = replace(runtimes.estimate_memory(model, backend, [o.sizing(n_ctx)], limit)[0],
                         weights=weights)
        if not o.model:
            return target, None
        drafts = runtimes.estimate_memory(draft_model, backend, [o.draft_sizing(n_ctx)], limit)
        return target, replace(drafts[0], weights=draft_reports[0].weights)

    def least(chosen: list[_Option]) -> int | None:
        """The least budget for any of ``chosen`` at the smallest context (None: more than
        this one, as far as a measurement stopped at it can tell)."""
        known = [cost(o, low) for o in chosen if o.sizing(low) not in over
                 and not (o.model and o.draft_sizing(low) in over)]
        return min(known, default=None)

    minimum = least(options[-1:])
    speculation_minimum = least([o for o in options if o.nodes > 1])
    for option in options:
        shortest = high if option.model else low  # the model goes before any context
        fitted = [c for c in range(high, shortest - 1, -CTX_STEP) if cost(option, c) <= budget]
        for n_ctx in fitted:  # the chord bounds the exact cost where it grows convexly; check
            report, drafts = exact(option, n_ctx)
            reports_over = report.at_least or (drafts is not None and drafts.at_least)
            total = report.total + (drafts.total if drafts else 0)
            if not reports_over and cost(option, n_ctx, total) <= budget:
                used = min(ctx, n_ctx)
                return Plan(budget, used, option.nodes, option.chunk, option.kv, option.k,
                            option.draft,
                            _components(baseline, report, used, option, vocab, drafts),
                            minimum, speculation_minimum, option.model)
    least_text = f"the least is {_mb(minimum)}" if minimum else "it needs more"
    for alternative in alternatives:
        need = least([alternative])
        if need is not None and (minimum is None or need < minimum):
            least_text += f", or {_mb(need)} with --kv-type {alternative.kv}"
    raise UserError(f"a memory budget of {_mb(budget)} cannot hold {model.name} with a "
                    f"{low}-token context on {backend}; {least_text} (--memory-budget)")


def _options(draft: str, cap: int, kv: str, with_model: bool = False) -> list[_Option]:
    """From fastest to leanest, giving up first what costs decode speed least: the draft
    model (its tokens cost a pass each, so it pays least), the prefill batch (only the
    first token waits longer), then the recycling table, then tree size; plain decoding
    last."""
    drafters = {"fused": [(k, "fused") for k in RECYCLING_K] + [(0, "lookup")],
                "recycling": [(k, "recycling") for k in RECYCLING_K],
                "lookup": [(0, "lookup")]}.get(draft, [])
    modelled = {"fused": [(RECYCLING_K[0], "fused")], "model": [(0, "model")]}.get(draft, [])
    largest = [nodes for nodes in TREE_SIZES if nodes <= cap][:1]
    shapes = [(nodes, k, name, True) for nodes in largest  # the model with nothing given up
              for k, name in (modelled if with_model else [])]
    shapes += [(nodes, k, name, False) for nodes in TREE_SIZES if nodes <= cap
               for k, name in drafters]
    return [_Option(nodes, chunk, kv, k, name, model)
            for nodes, k, name, model in [*shapes, (1, 0, "none", False)]
            for chunk in _chunks(nodes)]


def _chunks(nodes: int) -> list[int]:
    """Prefill batches worth trying with trees of ``nodes``: the engine's batch buffers hold
    the larger of the two, so a batch below the tree size saves nothing."""
    return [c for c in PREFILL_CHUNKS if c >= nodes] or [nodes]


def _round_ctx(n: int) -> int:
    return max(CTX_STEP, -(-n // CTX_STEP) * CTX_STEP)


def _headroom(known: int) -> int:
    """What no estimate covers: allocator slack, thread stacks, the Python objects of a
    generation, the command line's own output (12 MB and 3% of the rest)."""
    return 12 * 10**6 + 3 * known // 100


def _loop_bytes(nodes: int, vocab: int) -> int:
    """The loop's copies of one tree's logits (the verified rows, then their softmax)."""
    return 2 * nodes * vocab * 4 if nodes > 1 else 2 * vocab * 4


def _drafter_bytes(k: int, vocab: int) -> int:
    """Token Recycling's table (vocab × k int32); prompt lookup indexes the context only."""
    return k * vocab * 4


def _components(baseline: int, est: MemoryReport, ctx: int, option: _Option,
                vocab: int, drafts: MemoryReport | None = None) -> tuple[Component, ...]:
    parts = [Component("process", baseline, "the interpreter and libraries, measured now"),
             Component("weights", est.weights,
                       "the model's tensors as the engine holds them, its vocabulary and "
                       "metadata"),
             Component("KV cache", est.kv_cache, f"{ctx:,} tokens of context in {option.kv}"),
             Component("engine scratch", est.scratch,
                       f"compute and logits buffers (and a compiled copy for trees, on "
                       f"OpenVINO) for steps of {option.nodes} tokens and prefill calls of "
                       f"{option.chunk}, reused"),
             Component("tree logits (loop)", _loop_bytes(option.nodes, vocab),
                       f"the verified rows of a {option.nodes}-token step, and their "
                       "probabilities")]
    if drafts is not None:
        parts.append(Component("draft model", drafts.total,
                               f"its tensors, its KV for {ctx:,} tokens and its buffers"))
    if option.k:
        parts.append(Component("recycling table", _drafter_bytes(option.k, vocab),
                               f"{vocab:,} tokens × {option.k} successors"))
    parts.append(Component("headroom", _headroom(sum(p.bytes for p in parts)),
                           "allocator slack, thread stacks, a generation's Python objects"))
    parts.append(Component("drafter", 0, {"none": "none: plain decoding",
                                          "lookup": "prompt lookup: indexes the context"}
                           .get(option.draft, option.draft)
                           + (", with the draft model" if option.model else "")))
    return tuple(parts)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


__all__ = ["Component", "Plan", "parse_size", "plan", "useful_tree_size"]
