"""The benchmark harness: edgespec's configurations and peer engines, interleaved in one run.

Absolute speed on a shared 2-core machine is noise; ratios measured back to back are
not. Every configuration — edgespec with a (backend, draft) pair, or a peer engine such as
llama-cpp-python or OpenVINO GenAI — runs in a worker process of its own
(:mod:`edgespec.peers`), warmed up, and every prompt turn goes to every configuration in
turn, the order reversed on every other repetition. Each repetition starts the workers
afresh (a worker lives for one pass over the prompts): a process's speed depends on where
its model and cache landed in memory (two llama.cpp contexts of one model differed by up to
5% on identical calls; one 5-repetition run's math ratio moved 0.95–0.99 between runs with
long-lived workers), so repetitions must be independent draws of that; and no drafter
carries what it learned from one repetition's prompts into the next.

All configurations get the same text: each turn is rendered once with the model's chat
template (a plain transcript for models without one), multi-turn prompts carrying the
baseline's earlier answers, and each engine tokenizes it as its users' code would. Token
counts are normalised (the stop token is not a new token), so speeds compare like for like.
Prompts are Spec-Bench question files: ``{"id" | "question_id", "category", "turns"}``.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

import runtimes
from edgespec import bench_report
from edgespec.api import Engine, load
from edgespec.bench_tables import Measurement, divergences, memory_table, summarize
from edgespec.chat import ChatTemplate, turns_to_messages
from edgespec.drafting import MODEL_DRAFTS
from edgespec.errors import UserError
from edgespec.models import resolve_model
from edgespec.peers import (
    RATIO_REFERENCE,
    Config,
    edgespec_config,
    missing,
    peer_config,
    select_peers,
)
from edgespec.peers.client import Worker, WorkerError
from edgespec.peers.exports import PRECISION, model_for

WARMUP_TOKENS = 16
VERIFY_SIZES = (1, 2, 4, 8, 16, 32)  # tokens per verify call, for the cost table
VERIFY_CONTEXT = 300  # cached tokens before each probed call
# models without a chat template (base models such as Gemma-3-270M) get a plain transcript
TRANSCRIPT_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    turns: list[str]


@dataclass(frozen=True)
class Request:
    """One turn of one prompt, rendered once and sent to every configuration."""

    prompt: Prompt
    turn: int
    text: str


@dataclass
class BenchOptions:
    model: Path | None = None
    prompts: Path = Path("../shared/prompts/dev.jsonl")
    drafts: list[str] = field(default_factory=lambda: ["fused"])
    backends: list[str] = field(default_factory=lambda: ["auto"])
    peers: str = "all"
    max_tokens: int = 128
    categories: list[str] | None = None
    limit: int | None = None
    repeat: int = 1
    threads: int | None = None
    ctx: int = 4096
    tree_size: int | None = None
    profile: str = "saved"  # speculative configs with the saved device profile, probing, both
    budgets: list[str] = field(default_factory=list)  # memory budgets, each a set of configs
    kv_types: list[str] = field(default_factory=list)  # KV precisions, each a set of configs
    draft_models: list[Path] = field(default_factory=list)  # each: the drafts that use one
    out: Path = Path("bench-out")


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


def render(engine: Engine, turns: Sequence[str], answers: Sequence[str]) -> str:
    """The prompt text for ``turns`` so far: the model's chat template, else a transcript."""
    messages = turns_to_messages(turns, answers)
    if engine.backend.tokenizer.chat_template:
        return engine.render_chat(messages)
    return ChatTemplate(TRANSCRIPT_TEMPLATE).render(messages)


def prepare_requests(engine: Engine, prompts: list[Prompt], max_tokens: int) -> list[Request]:
    """Every turn's text; a later turn carries plain decoding's answers to the earlier ones."""
    requests = []
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(len(prompt.turns)):
            text = render(engine, prompt.turns[: turn + 1], answers)
            requests.append(Request(prompt, turn, text))
            if turn + 1 < len(prompt.turns):
                answers.append(engine.generate(text, max_tokens=max_tokens, draft="none").text)
    return requests


def to_measurement(reply: dict, request: Request, repeat: int, config: str,
                   stop_ids: frozenset[int]) -> Measurement:
    """A worker's reply, counted the same way for every engine."""
    generated = reply["token_ids"]
    end = next((i for i, t in enumerate(generated) if t in stop_ids), len(generated))
    steps, drafts = reply["steps"], reply["draft_tokens"]
    return Measurement(
        request.prompt.id, request.prompt.category, request.turn, repeat, config,
        new_tokens=end, decode_s=reply["e2e_s"] - reply["ttft_s"], ttft_s=reply["ttft_s"],
        e2e_s=reply["e2e_s"], steps=steps,
        accepted_per_step=max(len(generated) - 1, 0) / steps if steps else 1.0,
        draft_nodes_per_step=drafts / steps if drafts is not None and steps else None,
        peak_rss_bytes=reply["peak_rss_bytes"], token_ids=generated[:end],
        prompt_text=request.text, prompt_ids=reply["prompt_ids"], text=reply["text"],
    )


class Workers:
    """The running workers, by label; a configuration that fails is dropped with a note."""

    def __init__(self, skipped: dict[str, str], console: Console) -> None:
        self.running: dict[str, Worker] = {}
        self.versions: dict[str, str] = {}
        self.skipped = skipped
        self.console = console
        self._launch: dict = {}  # how start() was called, for restart()
        self._round = 0

    def start(self, configs: list[Config], model: Path, *, threads: int | None,
              stop_ids: list[int], logs: Path) -> None:
        """Export what peers need, then load every configuration concurrently."""
        self._launch = {"model": model, "threads": threads, "stop_ids": stop_ids, "logs": logs}
        suffix = f".r{self._round}" if self._round else ""
        for config in configs:
            log = logs / f"{config.label.replace(':', '-')}{suffix}.log"
            try:
                path = model_for(config.model_format, model)
                self.running[config.label] = Worker(config, path, threads=threads,
                                                    stop_ids=stop_ids, log=log)
            except UserError as e:
                self.drop(config.label, str(e))
        for label, worker in list(self.running.items()):
            try:
                self.versions[label] = worker.wait_ready()
            except WorkerError as e:
                self.drop(label, str(e))

    def restart(self) -> None:
        """New worker processes for the configurations still running (their logs get the
        round's suffix, so the earlier ones stay)."""
        configs = [worker.config for worker in self.running.values()]
        self.close()
        self.running.clear()
        self._round += 1
        self.start(configs, **self._launch)

    def ask(self, label: str, prompt: str, max_tokens: int) -> dict | None:
        try:
            return self.running[label].generate(prompt, max_tokens)
        except WorkerError as e:
            self.drop(label, str(e))
            return None

    def verify_cost(self, label: str, sizes: Sequence[int], context: int) -> dict | None:
        """Seconds per verify call of each size on an edgespec worker's backend."""
        try:
            reply = self.running[label].call("verify_cost", sizes=list(sizes), context=context)
        except WorkerError as e:
            self.drop(label, str(e))
            return None
        return {int(n): seconds for n, seconds in reply["seconds"].items()}

    def memory(self, label: str) -> dict | None:
        """An edgespec worker's memory before loading, its weights and its plan."""
        try:
            return self.running[label].call("memory")
        except WorkerError as e:
            self.drop(label, str(e))
            return None

    def drop(self, label: str, reason: str) -> None:
        self.console.print(f"[yellow]skipping {label}[/]: {reason}")
        self.skipped[label] = reason
        worker = self.running.pop(label, None)
        if worker is not None:
            worker.close()

    def close(self) -> None:
        for worker in self.running.values():
            worker.close()


def measure(workers: Workers, requests: list[Request], warmup: str, max_tokens: int,
            repeat: int, stop_ids: frozenset[int]) -> list[Measurement]:
    """Interleave configurations turn by turn; reverse their order every other repetition,
    and give every repetition fresh worker processes (module docstring)."""
    rows: list[Measurement] = []
    for r in range(repeat):
        if r:
            workers.restart()
        for label in list(workers.running):  # warm-up: caches, cost probe, drafter memory
            workers.ask(label, warmup, WARMUP_TOKENS)
        for i, request in enumerate(requests, start=1):
            workers.console.log(f"repeat {r + 1}/{repeat} turn {i}/{len(requests)} "
                                f"({request.prompt.category})")
            order = list(workers.running)
            for label in order if r % 2 == 0 else order[::-1]:
                reply = workers.ask(label, request.text, max_tokens)
                if reply is not None:
                    rows.append(to_measurement(reply, request, r, label, stop_ids))
    return rows


def measure_verify_cost(workers: Workers, labels: list[str], rounds: int = 5) -> dict:
    """Median seconds per verify size for each labelled worker (``seconds``), probed
    round-robin so the machine's drift falls on every backend alike."""
    samples: dict[str, dict[int, list[float]]] = {label: defaultdict(list) for label in labels}
    for _ in range(rounds):
        for label in labels:
            if label in workers.running:
                cost = workers.verify_cost(label, VERIFY_SIZES, VERIFY_CONTEXT) or {}
                for n, seconds in cost.items():
                    samples[label][n].append(seconds)
    seconds = {label: {n: statistics.median(t) for n, t in sorted(by_size.items())}
               for label, by_size in samples.items() if by_size}
    return {"context": VERIFY_CONTEXT, "rounds": rounds, "seconds": seconds}


def build_configs(options: BenchOptions, backends: list[str],
                  min_ctx: int = 512) -> tuple[list[Config], dict]:
    """edgespec's (backend, draft) pairs, baseline first, then each fixed KV precision's,
    each memory budget's (every plan holding ``min_ctx`` tokens), each draft model's
    (the drafts that can use one), then the installed peers."""
    with_model = [d for d in options.drafts if d in MODEL_DRAFTS]
    drafts = ["none", *(d for d in options.drafts if d not in ("none", "model"))]
    saved = {"saved": [True], "probe": [False], "both": [True, False]}[options.profile]
    configs = [edgespec_config(b, d, ctx=options.ctx, tree_size=options.tree_size,
                               saved_profile=use)
               for b in backends for d in drafts for use in (saved if d != "none" else [True])]
    configs += [edgespec_config(b, d, ctx=options.ctx, tree_size=options.tree_size,
                                kv_type=kv_type)
                for kv_type in options.kv_types for b in backends for d in drafts]
    configs += [edgespec_config(b, d, ctx=options.ctx, tree_size=options.tree_size,
                                memory_budget=budget, min_ctx=min_ctx)
                for budget in options.budgets for b in backends for d in drafts]
    configs += [edgespec_config(b, d, ctx=options.ctx, tree_size=options.tree_size,
                                draft_model=model)
                for model in options.draft_models for b in backends for d in with_model]
    skipped = {}
    for engine, variant in select_peers(options.peers):
        reason = missing(engine)
        if reason:
            skipped[f"{engine}:{variant}"] = reason
        else:
            configs.append(peer_config(engine, variant, {"ctx": options.ctx}))
    return configs, skipped


def _meta(options: BenchOptions, model: Path, configs: list[Config], workers: Workers,
          threads: int | None, ratio_to: str) -> dict:
    return {
        "model": model.name, "prompts": str(options.prompts), "threads": threads,
        "ratio_to": ratio_to,
        "max_tokens": options.max_tokens, "repeat": options.repeat,
        "command": " ".join(["edgespec", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
        "machine": bench_report.machine(),
        "configs": {c.label: {"version": workers.versions.get(c.label),
                              "weights": PRECISION[c.model_format],
                              "options": c.options} for c in configs},
        "skipped": workers.skipped,
    }


def run_bench(options: BenchOptions) -> list[dict]:
    """Run the comparison; write ``results.json``, ``summary.md`` and ``speedup.png``."""
    console = Console(stderr=True)
    prompts = read_prompts(options.prompts, options.categories, options.limit)
    model = resolve_model(options.model)
    backends = list(dict.fromkeys(runtimes.backend_for(model, b) for b in options.backends))
    with load(model, backend=backends[0], threads=options.threads, ctx=options.ctx,
              draft="none") as engine:
        console.log(f"rendering {len(prompts)} prompts (multi-turn: plain decoding's answers)")
        requests = prepare_requests(engine, prompts, options.max_tokens)
        longest = max(len(engine.tokenize(r.text)) for r in requests) + options.max_tokens
        configs, skipped = build_configs(options, backends, min_ctx=longest)
        baseline = configs[0].label
        warmup = render(engine, ["Say hello."], [])
        stop_ids = engine.backend.tokenizer.eos_ids
        threads = options.threads or engine.backend.threads
        profiled = engine.saved_profile() is not None
        if not profiled and options.profile != "probe":
            console.log(f"[yellow]no saved profile for {model.name} on this device: the "
                        f"speculative configurations probe (run `edgespec profile {model}`)")
        workers = Workers(skipped, console)
        try:
            workers.start(configs, model, threads=threads, stop_ids=sorted(stop_ids),
                          logs=options.out / "logs")
            rows = measure(workers, requests, warmup, options.max_tokens, options.repeat,
                           stop_ids)
            console.log("verify cost per backend")
            verify_cost = measure_verify_cost(
                workers, [c.label for c in configs if c.adapter == "edgespec"
                          and c.options["draft"] == "none" and not c.options["memory_budget"]])
            memory = {c.label: workers.memory(c.label) for c in configs
                      if c.adapter == "edgespec" and c.label in workers.running}
        finally:
            workers.close()
        diverged = divergences(engine, rows, {c.label for c in configs if c.same_engine},
                               baseline)
    labels = [c.label for c in configs if any(m.config == c.label for m in rows)]
    summary = summarize(rows, labels, baseline=baseline)
    ratio_to = RATIO_REFERENCE if RATIO_REFERENCE in labels else baseline
    results = {"meta": {**_meta(options, model, configs, workers, threads, ratio_to),
                        "saved_profile": profiled},
               "summary": summary, "verify_cost": verify_cost,
               "memory": memory_table(rows, memory, summary) if options.budgets else [],
               "divergences": diverged, "measurements": [asdict(m) for m in rows]}
    bench_report.write(results, options.out, Console(width=max(Console().width, 180)))
    return summary
