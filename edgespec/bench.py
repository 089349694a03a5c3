"""The benchmark harness: plain decoding and each drafter, interleaved, in one process.

Absolute speed on a shared 2-core machine is noise; ratios measured back to back are
not. Every prompt is run by every configuration in turn (the order alternates between
repetitions), each through the same engine and the same KV cache, after a warm-up.
Prompts are Spec-Bench question files: ``{"id" | "question_id", "category", "turns"}``.
"""

from __future__ import annotations

import json
import platform
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgespec.api import Engine, load
from edgespec.chat import turns_to_messages
from edgespec.errors import UserError

BASELINE = "none"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: list[str]


@dataclass
class BenchOptions:
    model: Path | None = None
    prompts: Path = Path("../shared/prompts/dev.jsonl")
    drafts: list[str] = field(default_factory=lambda: ["fused"])
    max_tokens: int = 128
    categories: list[str] | None = None
    limit: int | None = None
    repeat: int = 1
    threads: int | None = None
    ctx: int = 4096
    tree_size: int | None = None
    backend: str = "auto"
    out: Path = Path("bench-out")


@dataclass
class Measurement:
    """One turn of one prompt under one configuration."""

    prompt_id: str
    category: str
    turn: int
    repeat: int
    config: str
    new_tokens: int
    decode_s: float
    prefill_s: float
    steps: int
    accepted_per_step: float
    draft_nodes_per_step: float
    peak_rss_bytes: int
    token_ids: list[int]
    prompt_text: str


def read_prompts(path: Path, categories: list[str] | None = None,
                 limit: int | None = None) -> list[Prompt]:
    """Spec-Bench style JSONL; ``limit`` keeps the first N prompts of each category."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read prompts {path}: {e.strerror or e}") from None
    prompts, per_category = [], defaultdict(int)
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Prompt(str(row.get("id", row.get("question_id"))), row["category"],
                            [str(t) for t in row["turns"]])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n} is not a Spec-Bench prompt "
                            '({"id", "category", "turns": [...]})') from None
        if categories and prompt.category not in categories:
            continue
        if limit is not None and per_category[prompt.category] >= limit:
            continue
        per_category[prompt.category] += 1
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"no prompts selected from {path}")
    return prompts


def _run_prompt(engine: Engine, prompt: Prompt, config: str, max_tokens: int,
                repeat: int) -> list[Measurement]:
    """All turns of ``prompt``; later turns see this configuration's own earlier answers."""
    answers: list[str] = []
    rows = []
    for turn in range(len(prompt.turns)):
        text = engine.render_chat(turns_to_messages(prompt.turns[: turn + 1], answers))
        result = engine.generate(text, max_tokens=max_tokens, draft=config)
        answers.append(result.text)
        s = result.stats.as_dict()
        rows.append(Measurement(
            prompt.id, prompt.category, turn, repeat, config, s["new_tokens"], s["decode_s"],
            s["prefill_s"], s["steps"], s["accepted_per_step"], s["draft_nodes_per_step"],
            s["peak_rss_bytes"], result.token_ids, text,
        ))
    return rows


def measure(engine: Engine, prompts: list[Prompt], configs: list[str], max_tokens: int,
            repeat: int, console: Console) -> list[Measurement]:
    """Interleave configurations prompt by prompt; alternate their order every repetition."""
    for config in configs:  # warm-up: caches, cost probe, drafter memory of the chat format
        engine.chat([{"role": "user", "content": "Say hello."}], max_tokens=16, draft=config)
    rows: list[Measurement] = []
    for r in range(repeat):
        order = configs if r % 2 == 0 else configs[::-1]
        for i, prompt in enumerate(prompts, start=1):
            console.log(f"repeat {r + 1}/{repeat} prompt {i}/{len(prompts)} ({prompt.category})")
            for config in order:
                rows.extend(_run_prompt(engine, prompt, config, max_tokens, r))
    return rows


def summarize(rows: list[Measurement], configs: list[str]) -> list[dict]:
    """Per category and configuration: tokens/s, ratio to plain, acceptance, agreement."""
    plain = {(m.prompt_id, m.turn, m.repeat): m.token_ids for m in rows if m.config == BASELINE}
    groups: dict[tuple[str, str], list[Measurement]] = defaultdict(list)
    for m in rows:
        groups[(m.category, m.config)].append(m)
        groups[("ALL", m.config)].append(m)
    speed = {k: sum(m.new_tokens - 1 for m in v) / max(sum(m.decode_s for m in v), 1e-9)
             for k, v in groups.items()}
    table = []
    categories = sorted({c for c, _ in groups if c != "ALL"}) + ["ALL"]
    for category in categories:
        for config in configs:
            ms = groups.get((category, config))
            if not ms:
                continue
            steps = sum(m.steps for m in ms)
            same = [plain.get((m.prompt_id, m.turn, m.repeat)) == m.token_ids for m in ms]
            table.append({
                "category": category, "config": config,
                "tokens_per_s": speed[(category, config)],
                "ratio": speed[(category, config)] / speed[(category, BASELINE)],
                "accepted_per_step": sum(m.accepted_per_step * m.steps for m in ms) / max(steps, 1),
                "draft_nodes_per_step": sum(m.draft_nodes_per_step * m.steps for m in ms)
                / max(steps, 1),
                "agreement": sum(same) / len(same),
                "peak_rss_mib": max(m.peak_rss_bytes for m in ms) / 2**20,
            })
    return table


def divergences(engine: Engine, rows: list[Measurement]) -> list[dict]:
    """Where a configuration's output left plain decoding's, and how close the call was.

    The margin is plain decoding's top-1 minus top-2 logit at the first differing token:
    a numerical near-tie (a tiny margin) rather than a bug in speculation.
    """
    plain = {(m.prompt_id, m.turn, m.repeat): m for m in rows if m.config == BASELINE}
    found = []
    for m in rows:
        ref = plain.get((m.prompt_id, m.turn, m.repeat))
        if m.config == BASELINE or ref is None or ref.token_ids == m.token_ids:
            continue
        i = next((k for k, (a, b) in enumerate(zip(ref.token_ids, m.token_ids)) if a != b),
                 min(len(ref.token_ids), len(m.token_ids)))
        top2 = np.sort(engine.next_token_logits(ref.prompt_text, ref.token_ids[:i]))[-2:]
        found.append({"prompt_id": m.prompt_id, "turn": m.turn, "repeat": m.repeat,
                      "config": m.config, "index": i, "margin": float(top2[1] - top2[0])})
    return found


def render(summary: list[dict], console: Console) -> None:
    table = Table(title="edgespec bench: decode tokens/s, ratio to plain decoding")
    for col in ("category", "config", "tok/s", "ratio", "tok/step", "nodes/step", "same output"):
        table.add_column(col, justify="left" if col in ("category", "config") else "right")
    for row in summary:
        table.add_row(row["category"], row["config"], f"{row['tokens_per_s']:.1f}",
                      f"{row['ratio']:.2f}x", f"{row['accepted_per_step']:.2f}",
                      f"{row['draft_nodes_per_step']:.1f}", f"{row['agreement']:.0%}")
    console.print(table)


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [f"Model `{meta['model']}`, backend `{meta['backend']}`, {meta['threads']} threads, "
             f"{meta['max_tokens']} new tokens per turn, {meta['repeat']} repeat(s), "
             f"{meta['machine']}.", "",
             "| category | config | tok/s | ratio | tok/step | nodes/step | same output |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['category']} | {r['config']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}× | {r['accepted_per_step']:.2f} | "
                     f"{r['draft_nodes_per_step']:.1f} | {r['agreement']:.0%} |")
    return "\n".join(lines) + "\n"


def run_bench(options: BenchOptions) -> list[dict]:
    """Run the comparison and write ``results.json`` and ``summary.md`` into ``options.out``."""
    console = Console(stderr=True)
    prompts = read_prompts(options.prompts, options.categories, options.limit)
    configs = [BASELINE] + [d for d in options.drafts if d != BASELINE]
    with load(options.model, backend=options.backend, threads=options.threads, ctx=options.ctx,
              tree_size=options.tree_size, draft=configs[-1]) as engine:
        rows = measure(engine, prompts, configs, options.max_tokens, options.repeat, console)
        diverged = divergences(engine, rows)
        meta = {"model": str(options.model or "default (SmolLM2-135M-Instruct Q4_1)"),
                "backend": engine.backend.name,
                "threads": getattr(engine.backend, "threads", options.threads),
                "max_tokens": options.max_tokens, "repeat": options.repeat,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    summary = summarize(rows, configs)
    render(summary, Console())
    for d in diverged:
        Console().print(f"prompt {d['prompt_id']} turn {d['turn']} ({d['config']}) diverged at "
                        f"token {d['index']}: plain top-2 logit margin {d['margin']:.4f}")
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "results.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "divergences": diverged,
         "measurements": [asdict(m) for m in rows]}, indent=1))
    (options.out / "summary.md").write_text(markdown(summary, meta))
    return summary
