"""How many threads the next step computes with: every core, unless another process has one.

llama.cpp's threads spin-wait at each operation's barrier. When another process holds a
core, every barrier waits for a descheduled thread: on 2 cores beside one busy process,
two threads decoded 27–32 tok/s and one thread 77–80 (idle: 121–126 against 72–82). A
laptop app always has something beside it, so the governor measures both counts as it
decodes and keeps the faster, re-checking the other now and then. Which thread sums a row
does not change the sum, so switching keeps the output exact.
"""

from __future__ import annotations

from collections.abc import Callable

EXPLORE_EVERY = 48  # steps between re-measuring the thread count not in use (at first)
MAX_EXPLORE_EVERY = 8 * EXPLORE_EVERY  # each fruitless measurement doubles the wait up to here
EXPLORE_STEPS = 4  # steps each such measurement takes
SMOOTHING = 0.3


class ThreadGovernor:
    """Chooses between all ``threads`` and one fewer from measured seconds per step."""

    def __init__(self, threads: int, relative_cost: Callable[[int], float]) -> None:
        """``relative_cost(n)``: verifying n tokens ÷ one token (the policy's curve), so
        steps of different tree sizes compare as one-token steps."""
        self.options = sorted({threads, max(1, threads - 1)}, reverse=True)
        self.current = self.options[0]
        self._relative = relative_cost
        self._time: dict[int, float] = {}  # thread count -> EMA of one-token-equivalent s
        self._next_explore = EXPLORE_EVERY
        self._interval = EXPLORE_EVERY
        self._steps = 0
        self._exploring = 0  # steps left measuring the other option
        self._before = self.current  # the count in use when that measurement began

    def observe(self, n: int, verify_s: float) -> int:
        """Record a step that verified ``n`` tokens; the thread count for the next one."""
        if len(self.options) == 1:
            return self.current
        one_token = verify_s / max(self._relative(n), 1e-9)
        old = self._time.get(self.current)
        self._time[self.current] = one_token if old is None else (
            old + SMOOTHING * (one_token - old))
        self._steps += 1
        if self._exploring:
            self._exploring -= 1
            if self._exploring == 0:
                self.current = min(self._time, key=self._time.__getitem__)
                fruitless = self.current == self._before
                self._interval = min(2 * self._interval, MAX_EXPLORE_EVERY) if fruitless \
                    else EXPLORE_EVERY
                self._next_explore = self._steps + self._interval
        elif self._steps >= self._next_explore or self._contended():
            self._before = self.current
            self.current = next(t for t in self.options if t != self.current)
            self._time.pop(self.current, None)  # measured afresh
            self._exploring = EXPLORE_STEPS
        return self.current

    def _contended(self) -> bool:
        """All cores, 2× slower than one fewer was when last measured (idle, all cores are
        the faster): another process has appeared; try one fewer now, not at the next
        scheduled measurement."""
        if self.current != self.options[0] or len(self._time) < 2:
            return False
        return self._time[self.current] > 2 * self._time[self.options[1]]
