"""Worker adapter: edgespec itself, one (backend, draft) configuration per worker.

Every adapter (``peer_*.py``) has ``version()`` and ``Peer(model, threads, stop_ids, **variant)``
whose ``generate(prompt, max_tokens)`` returns ``prompt_ids``, ``token_ids`` (as generated,
stop token included), ``text``, ``ttft_s`` and ``e2e_s`` (request → first token, → last
token), ``steps`` (model calls after the first token) and ``draft_tokens`` (None if the
engine does not say). Running edgespec in a worker like the peers gives every
configuration its own process: its own peak RSS and its own KV cache, so no configuration
reuses another's prefill.
"""

from __future__ import annotations

import time
from importlib.metadata import version as package_version

import psutil

import edgespec


def version() -> str:
    return f"edgespec {package_version('edgespec')}"


class Peer:
    def __init__(self, model: str, threads: int | None, stop_ids: list[int], *, backend: str,
                 draft: str, ctx: int, tree_size: int | None, saved_profile: bool,
                 memory_budget: str | None = None, min_ctx: int = 512,
                 kv_type: str | None = None, draft_model: str | None = None) -> None:
        self.base_rss = psutil.Process().memory_info().rss  # before the model: the process
        self.engine = edgespec.load(model, backend=backend, draft=draft, threads=threads,
                                    ctx=ctx, tree_size=tree_size, saved_profile=saved_profile,
                                    memory_budget=memory_budget, min_ctx=min_ctx,
                                    kv_type=kv_type, draft_model=draft_model)

    def memory(self) -> dict:
        """What the process held before loading, the weights, and the plan if budgeted."""
        plan = self.engine.plan
        return {"base_rss": self.base_rss, "weights": self.engine.backend.memory().weights,
                "plan": None if plan is None else {
                    "budget": plan.budget, "ctx": plan.ctx, "tree": plan.max_tree_nodes,
                    "recycling_k": plan.recycling_k, "draft": plan.draft,
                    "planned": plan.total}}

    def verify_cost(self, sizes: list[int], context: int) -> dict:
        """Seconds of verifying each of ``sizes`` tokens after ``context`` cached ones."""
        cost = self.engine.measure_verify_cost(tuple(sizes), context=context)
        return {"seconds": {str(n): s for n, s in cost.items()}}

    def generate(self, prompt: str, max_tokens: int) -> dict:
        start = time.perf_counter()
        result = self.engine.generate(prompt, max_tokens=max_tokens)
        e2e = time.perf_counter() - start
        stats = result.stats
        return {
            # the ids generate() fed the model: the text, plus BOS where the model wants it
            "prompt_ids": self.engine.tokenize(prompt),
            "token_ids": result.token_ids, "text": result.text,
            "ttft_s": e2e - stats.decode_s, "e2e_s": e2e,
            "steps": stats.steps, "draft_tokens": stats.draft_nodes,
        }
