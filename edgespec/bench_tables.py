"""The benchmark's tables, from its raw measurements: speeds and their ratios with paired
bootstrap intervals, agreement with plain decoding, the memory table and where outputs
diverged. Kept apart from :mod:`edgespec.bench`, which runs the workers that measure.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from edgespec.api import Engine
from edgespec.peers import PLAIN, RATIO_REFERENCE, plain_of

BASELINE = f"edgespec-llamacpp:{PLAIN}"
ALL = "ALL"


@dataclass
class Measurement:
    """One turn of one prompt under one configuration."""

    prompt_id: str
    category: str
    turn: int
    repeat: int
    config: str
    new_tokens: int  # up to, not counting, the stop token
    decode_s: float  # first token → last token
    ttft_s: float  # request → first token (tokenize, prefill, first pick)
    e2e_s: float
    steps: int  # model calls after the first token
    accepted_per_step: float
    draft_nodes_per_step: float | None  # None: the engine does not report its drafts
    peak_rss_bytes: int  # of this configuration's worker process
    token_ids: list[int]
    prompt_text: str
    prompt_ids: list[int] = field(default_factory=list)
    text: str = ""


def _speeds(ms: list[Measurement]) -> tuple[float, float]:
    """Decode tokens/s (after the first token) and end-to-end tokens/s over ``ms``."""
    decode = sum(max(m.new_tokens - 1, 0) for m in ms) / max(sum(m.decode_s for m in ms), 1e-9)
    e2e = sum(m.new_tokens for m in ms) / max(sum(m.e2e_s for m in ms), 1e-9)
    return decode, e2e


def _agreement(ms: list[Measurement], index: dict, other: str, attr: str) -> float | None:
    """Fraction of ``ms`` whose ``attr`` equals configuration ``other``'s on the same turn."""
    pairs = [(m, index.get((other, m.prompt_id, m.turn, m.repeat))) for m in ms]
    same = [getattr(m, attr) == getattr(o, attr) for m, o in pairs if o is not None]
    return sum(same) / len(same) if same else None


def _paired_interval(ms: list[Measurement], index: dict, other: str,
                     draws: int = 2000) -> list[float] | None:
    """95% bootstrap interval of the decode-speed ratio to configuration ``other``.

    Turns are resampled as pairs: both configurations ran the same turn back to back, so
    drift of the shared machine mostly cancels within a pair, and the interval says whether
    a ratio near 1.0 is a real difference or the noise of this run.
    """
    pairs = [(m, index.get((other, m.prompt_id, m.turn, m.repeat))) for m in ms]
    return speed_ratio_interval([(max(m.new_tokens - 1, 0), m.decode_s,
                                  max(o.new_tokens - 1, 0), o.decode_s)
                                 for m, o in pairs if o is not None and m is not o], draws)


def speed_ratio_interval(pairs: list[tuple[float, float, float, float]],
                         draws: int = 2000) -> list[float] | None:
    """95% bootstrap interval of Σtokens/Σseconds of A over that of B, from paired runs
    ``(tokens_a, seconds_a, tokens_b, seconds_b)`` resampled together."""
    if len(pairs) < 2:
        return None
    sums = np.array(pairs, dtype=float)
    picks = sums[np.random.default_rng(0).integers(0, len(sums), (draws, len(sums)))].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (picks[:, 0] / picks[:, 1]) / (picks[:, 2] / picks[:, 3])
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(rows: list[Measurement], configs: list[str], baseline: str = BASELINE,
              reference: str = RATIO_REFERENCE) -> list[dict]:
    """Per category and configuration: speeds, ratios, acceptance, cost, memory, agreement.

    ``ratio`` is decode speed relative to ``reference`` (llama.cpp plain decoding through
    llama-cpp-python; the baseline where it did not run), ``ratio_plain`` relative to the
    baseline (edgespec plain), with its 95% interval over turns (``ratio_plain_ci``).
    ``agreement`` is the share of turns whose tokens equal the baseline's,
    ``agreement_own`` equal to the same engine's plain decoding.
    """
    index = {(m.config, m.prompt_id, m.turn, m.repeat): m for m in rows}
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in rows:
        groups[(m.category, m.config)].append(m)
        groups[(ALL, m.config)].append(m)
    speed = {k: _speeds(v) for k, v in groups.items()}
    categories = sorted({c for c, _ in groups if c != ALL}) + [ALL]
    table = []
    for category in categories:
        ref = reference if (category, reference) in speed else baseline
        for config in configs:
            ms = groups.get((category, config))
            if not ms:
                continue
            decode, e2e = speed[(category, config)]
            steps = max(sum(m.steps for m in ms), 1)
            drafts = [m.draft_nodes_per_step * m.steps for m in ms
                      if m.draft_nodes_per_step is not None]
            table.append({
                "category": category, "config": config, "turns": len(ms),
                "new_tokens": sum(m.new_tokens for m in ms) / len(ms),
                "tokens_per_s": decode, "e2e_tokens_per_s": e2e,
                "ttft_ms": 1000 * sum(m.ttft_s for m in ms) / len(ms),
                "ratio": decode / speed[(category, ref)][0],
                "ratio_e2e": e2e / speed[(category, ref)][1],
                "ratio_plain": decode / speed[(category, baseline)][0]
                if (category, baseline) in speed else None,
                "ratio_plain_ci": None if config == baseline
                else _paired_interval(ms, index, baseline),
                "accepted_per_step": sum(m.accepted_per_step * m.steps for m in ms) / steps,
                "draft_nodes_per_step": sum(drafts) / steps if drafts else None,
                "step_ms": 1000 * sum(m.decode_s for m in ms) / steps,
                "peak_rss_mib": max(m.peak_rss_bytes for m in ms) / 2**20,
                "agreement": _agreement(ms, index, baseline, "token_ids"),
                "agreement_own": None if plain_of(config) == config
                else _agreement(ms, index, plain_of(config), "token_ids"),
                "same_input": _agreement(ms, index, baseline, "prompt_ids"),
            })
    return table


def memory_table(rows: list[Measurement], memory: dict, summary: list[dict]) -> list[dict]:
    """Per edgespec configuration: its plan, peak RSS, generation memory (peak RSS less the
    process before loading and the weights) and decode speed relative to the same drafter
    without a budget, with the 95% interval over turns."""
    index = {(m.config, m.prompt_id, m.turn, m.repeat): m for m in rows}
    speed = {r["config"]: r for r in summary if r["category"] == ALL}
    table = []
    for label, mem in memory.items():
        if mem is None or label not in speed:
            continue
        unconstrained = label.split("@")[0]
        ms = [m for m in rows if m.config == label]
        peak = max(m.peak_rss_bytes for m in ms)
        table.append({
            "config": label, "plan": mem["plan"], "peak_rss": peak,
            "generation": peak - mem["base_rss"] - mem["weights"],
            "tokens_per_s": speed[label]["tokens_per_s"],
            "ratio": speed[label]["tokens_per_s"] / speed[unconstrained]["tokens_per_s"]
            if unconstrained in speed else None,
            "ratio_ci": None if unconstrained == label
            else _paired_interval(ms, index, unconstrained),
        })
    return table


def divergences(engine: Engine, rows: list[Measurement], configs: set[str] | None = None,
                baseline: str = BASELINE) -> list[dict]:
    """Where a configuration's output left plain decoding's, and how close the call was.

    The margin is plain decoding's top-1 minus top-2 logit at the first differing token:
    a numerical near-tie (a tiny margin) rather than a bug in speculation. Only meaningful
    for ``configs`` that run the baseline's weights (default: every configuration).
    """
    plain = {(m.prompt_id, m.turn, m.repeat): m for m in rows if m.config == baseline}
    found = []
    for m in rows:
        ref = plain.get((m.prompt_id, m.turn, m.repeat))
        if (m.config == baseline or ref is None or ref.token_ids == m.token_ids
                or (configs is not None and m.config not in configs)):
            continue
        i = next((k for k, (a, b) in enumerate(zip(ref.token_ids, m.token_ids)) if a != b),
                 min(len(ref.token_ids), len(m.token_ids)))
        top2 = np.sort(engine.next_token_logits(ref.prompt_text, ref.token_ids[:i]))[-2:]
        found.append({"prompt_id": m.prompt_id, "turn": m.turn, "repeat": m.repeat,
                      "config": m.config, "index": i, "margin": float(top2[1] - top2[0])})
    return found
