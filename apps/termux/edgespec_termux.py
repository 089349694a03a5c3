"""edgespec on a phone: a terminal chat within the memory the phone has free.

It imports only what installs on Termux (no torch, no ``tokenizers``: the vocabulary is
read from the GGUF by llama.cpp). Its memory budget is half the RAM Android reports
available (psutil may be refused there: /proc/meminfo, then 1 GiB, are the fallbacks);
the memory planner fits the context, KV precision, tree and drafter into it, since an app
over its share is killed, not slowed. After each answer a status line gives tokens/s,
tokens per step and the peak memory against the budget. Runs on Linux too.

    python apps/termux/edgespec_termux.py [MODEL.gguf] [--share 0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import edgespec
from edgespec.chat_cli import HELP, ChatSession, chat_loop
from edgespec.device import device_facts
from edgespec.engine import peak_rss_bytes
from edgespec.errors import UserError
from edgespec.memory import Plan
from edgespec.models import resolve_model

MOST_CTX = 8192  # the planner gives up context first, down to 512 tokens


def available_bytes() -> int:
    """RAM Android would let this app have; psutil, then /proc/meminfo, then 1 GiB."""
    available = device_facts(engines=False).ram_available
    if available:
        return available
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 2**30


def describe(plan: Plan) -> str:
    drafter = "plain decoding" if plan.max_tree_nodes == 1 else (
        f"{plan.draft} trees of {plan.max_tree_nodes}")
    return (f"context {plan.ctx}, {plan.kv_type} KV, {drafter}: {plan.total / 2**20:.0f} of "
            f"{plan.budget / 2**20:.0f} MiB planned")


class PhoneChat(ChatSession):
    """The terminal chat with a status line after every answer."""

    def __init__(self, *args, budget: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def ask(self, text: str) -> None:
        super().ask(text)
        if self.last is not None:
            s = self.last.stats
            self._say(f"[{s.tokens_per_s:.1f} tok/s · {s.accepted_per_step:.2f} tok/step · "
                      f"{peak_rss_bytes() / 2**20:.0f} of {self.budget / 2**20:.0f} MiB]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--share", type=float, default=0.5,
                        help="share of the available RAM to use (default 0.5)")
    args = parser.parse_args()
    try:
        if not 0 < args.share <= 1:
            raise UserError(f"--share must be in (0, 1] (got {args.share})")
        model = resolve_model(args.model)
        budget = int(available_bytes() * args.share)
        with edgespec.load(model, ctx=MOST_CTX, memory_budget=budget) as engine:
            assert engine.plan is not None
            print(f"edgespec: {model.name}, {describe(engine.plan)}", file=sys.stderr)
            if sys.stdin.isatty():
                print(HELP, file=sys.stderr)
            chat_loop(PhoneChat(engine, system=None, max_tokens=min(512, engine.plan.ctx // 4),
                                budget=budget))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
