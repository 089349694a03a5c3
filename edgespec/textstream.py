"""Token ids → text pieces that are safe to show: whole UTF-8 characters, stop strings cut.

A token can end in the middle of a multi-byte character, and a stop string can straddle
tokens; the stream holds back exactly as much as could still change, and no more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Incremental detokenizer with stop-string detection."""

    def __init__(self, detokenize: Callable[[Sequence[int]], bytes], stop: Sequence[str] = ()):
        self._detokenize = detokenize
        self._stop = [s for s in stop if s]
        self._bytes = b""
        self._held = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that can be emitted now (may be empty)."""
        if self.stopped:
            return ""
        self._bytes += self._detokenize([token])
        self._held += self._decode_complete()
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back at the end of generation."""
        if not self.stopped:
            self._held += self._bytes.decode("utf-8", errors="replace")
            self._bytes = b""
        return self._release(final=True)

    def _decode_complete(self) -> str:
        try:
            text, self._bytes = self._bytes.decode("utf-8"), b""
            return text
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":
                text = self._bytes[: e.start].decode("utf-8", errors="replace")
                self._bytes = self._bytes[e.start:]
                return text
            text, self._bytes = self._bytes.decode("utf-8", errors="replace"), b""
            return text

    def _release(self, *, final: bool) -> str:
        held = self._held
        cut = min((i for i in (held.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._held = held[:cut], ""
        elif final:
            out, self._held = held, ""
        else:
            keep = self._partial_stop_suffix(held)
            out, self._held = held[: len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
