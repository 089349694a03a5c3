"""``edgespec chat``: a multi-turn conversation in the terminal, as ollama's ``run`` has it.

Each turn re-renders the whole conversation with the model's template; the engine reuses
the KV cache of everything before the new turn (prefix reuse), so a turn costs its own
tokens, not the history's. Slash commands: /reset, /stats, /help, /exit. Ctrl-C stops
the answer being written and keeps the conversation; Ctrl-D (end of input) leaves.
Input is read line by line from stdin, so a script or a test can drive it.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from edgespec.api import Engine, GenerationResult
from edgespec.chat import Message
from edgespec.engine import peak_rss_bytes

HELP = "/reset forget the conversation · /stats last answer's speed · /exit leave"


class ChatSession:
    """The conversation and its last statistics; one answer at a time."""

    def __init__(self, engine: Engine, *, system: str | None, max_tokens: int,
                 out: TextIO = sys.stdout, **sampling) -> None:
        self.engine, self.max_tokens, self.out, self.sampling = engine, max_tokens, out, sampling
        self.system: list[Message] = [{"role": "system", "content": system}] if system else []
        self.turns: list[Message] = []
        self.last: GenerationResult | None = None

    def command(self, line: str) -> bool:
        """Run a slash command; False for /exit."""
        name = line.split()[0].lower()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/reset":
            self.turns.clear()
            self._say("(conversation cleared)")
        elif name == "/stats":
            self._say(self.stats())
        else:
            self._say(HELP if name == "/help" else f"unknown command {name}; {HELP}")
        return True

    def ask(self, text: str) -> None:
        """Stream the reply to ``text``; Ctrl-C stops it and keeps what was said."""
        self.turns.append({"role": "user", "content": text})
        self._fit()
        cancel = threading.Event()
        pieces = self.engine.chat([*self.system, *self.turns], stream=True, cancel=cancel,
                                  max_tokens=self.max_tokens, **self.sampling)
        said = []
        try:
            for piece in pieces:
                said.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            cancel.set()
            pieces.close()
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.turns.append({"role": "assistant", "content": "".join(said)})
        self.last = pieces.result or self.last

    def stats(self) -> str:
        if self.last is None:
            return "(no answer yet)"
        s = self.last.stats
        return (f"{s.new_tokens} tokens at {s.tokens_per_s:.1f} tok/s, "
                f"{s.accepted_per_step:.2f} tokens/step, {s.draft_nodes_per_step:.1f} draft "
                f"nodes/step, prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s, "
                f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")

    def _fit(self) -> None:
        """Forget the exchanges the engine would drop to fit the context, and say so."""
        kept = self.engine.fit_conversation([*self.system, *self.turns], self.max_tokens)
        dropped = len(self.system) + len(self.turns) - len(kept)
        if dropped:
            del self.turns[:dropped]
            self._say(f"(the oldest {dropped} messages were dropped to fit the context)")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def chat_loop(session: ChatSession, lines: TextIO = sys.stdin) -> None:
    """Read questions and commands until /exit or end of input."""
    interactive = lines.isatty()
    while True:
        if interactive:
            session.out.write(">>> ")
            session.out.flush()
        try:
            line = lines.readline()
        except KeyboardInterrupt:  # at the prompt: say how to leave, as ollama does
            session.out.write("\n(use /exit or Ctrl-D to leave)\n")
            continue
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
        else:
            session.ask(line)
