"""How much of a drafted tree to verify, from what verifying costs on *this* device.

Verifying n tokens in one call costs c(n) seconds; a tree whose nodes have acceptance
estimates s_i yields, in expectation, 1 + Σ s_i tokens (the root is certain). Among the
top-n nodes by score (an ancestor-closed set, since a path's score never exceeds its
parent's) the policy picks the n with the highest expected tokens per second, and n = 0
— plain decoding — unless speculating beats it by a margin. On a CPU where two tokens cost
1.8× one, that turns speculation off for weak drafts instead of paying for them.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from edgespec.tree import TokenTree

OUTLIER = 2.0  # a verify time beyond this factor of the estimate is a stall, not the cost


class CostCurve:
    """Seconds per verify call of n tokens: c(n) = scale × shape(n).

    The scale, what one token costs now, is learned from plain steps; the shape, c(n) /
    c(1), from speculative ones, but not from a step that ran 2× off its estimate
    (``OUTLIER``): when another process takes the cores every step slows, by up to 100×
    with llama.cpp's spinning threads, and learning that as the cost of speculation made
    trees look dear for good (the policy stops verifying them, so nothing measured them
    again). A slowdown of the machine moves the scale, which plain steps bring back.
    """

    def __init__(self, probe: Mapping[int, float], smoothing: float = 0.1) -> None:
        if 1 not in probe:
            raise ValueError("a cost curve needs the cost of one token")
        self._sizes = sorted(probe)
        self._scale = float(probe[1])
        self._shape = {n: float(probe[n]) / self._scale for n in self._sizes}
        self._smoothing = smoothing

    def __call__(self, n: int) -> float:
        """Cost of verifying ``n`` tokens, interpolated between measured sizes."""
        return self._scale * self._shape_at(n)

    def _shape_at(self, n: int) -> float:
        sizes, shape = self._sizes, self._shape
        if n in shape:
            return shape[n]
        i = bisect.bisect_left(sizes, n)
        if i == len(sizes):
            lo, hi = sizes[-2:] if len(sizes) > 1 else (sizes[-1], sizes[-1])
        else:
            lo, hi = sizes[max(i - 1, 0)], sizes[i]
        if lo == hi:
            return shape[lo] * n / lo
        return shape[lo] + (shape[hi] - shape[lo]) / (hi - lo) * (n - lo)

    def update(self, n: int, seconds: float) -> None:
        """Blend a measured step into the curve (sizes never seen are added as measured).

        A sample is first held within a factor ``OUTLIER`` of the current estimate, so one
        stalled call moves the scale as a 2× step would; a lasting change still arrives, a
        tenth of the way per step.
        """
        if n not in self._shape:
            self._shape[n] = self._shape_at(n)
            bisect.insort(self._sizes, n)
        expected = self(n)
        held = min(max(seconds, expected / OUTLIER), expected * OUTLIER)
        if n == 1:
            self._scale += self._smoothing * (held - self._scale)
        elif held == seconds:
            self._shape[n] += self._smoothing * (held / self._scale - self._shape[n])

    def as_dict(self) -> dict[int, float]:
        return {n: self._scale * s for n, s in self._shape.items()}


class Calibration:
    """Realised / predicted accepted drafts of the chosen trees, per kind of tree.

    The policy verifies the trees whose estimates came out highest, so the estimates of
    chosen trees are biased upward, by an amount that depends on the kind of draft (the
    source of its best node, e.g. ``lookup/m4/u``) and on the text. A single correction let
    summaries' long copies, which deliver more than predicted, inflate the next prompt's
    short matches, which deliver less; per kind, each is corrected by its own record.
    """

    def __init__(self, rate: float = 0.05) -> None:
        self._rate = rate
        self._plain_steps = 0
        # kind -> [predicted EMA, realised EMA, plain steps counted when last recorded]
        self._evidence: dict[str, list[float]] = {}

    def factor(self, kind: str) -> float:
        """The correction for ``kind``'s scores (1.0 before any evidence)."""
        ev = self._evidence.get(kind)
        if ev is None:
            return 1.0
        return min(1.5, max(0.3, self._realised(ev) / max(ev[0], 1e-6)))

    def best(self) -> float:
        """The largest correction any tree may get (a kind never seen gets 1.0)."""
        return max([1.0, *(self.factor(kind) for kind in self._evidence)])

    def record(self, kind: str, predicted: float, realised: int) -> None:
        ev = self._evidence.setdefault(kind, [1.0, 1.0, self._plain_steps])
        ev[1], ev[2] = self._realised(ev), self._plain_steps
        ev[0] += self._rate * (predicted - ev[0])
        ev[1] += self._rate * (realised - ev[1])

    def relax(self) -> None:
        """A step without speculation brings no evidence: slowly trust the drafts again."""
        self._plain_steps += 1

    def _realised(self, ev: list[float]) -> float:
        """The realised EMA, drawn towards the predicted one by every plain step since it
        was recorded (counted, not applied step by step: plain steps are most steps)."""
        predicted, realised, since = ev
        keep = (1.0 - 0.1 * self._rate) ** (self._plain_steps - since)
        return predicted + (realised - predicted) * keep


class SpeculationPolicy:
    """Chooses the sub-tree with the best expected tokens per second, or none at all."""

    def __init__(
        self, cost: CostCurve, max_nodes: int, margin: float = 0.05, adaptive: bool = True
    ) -> None:
        self.cost = cost
        self.max_nodes = max_nodes
        self.margin = margin
        self.adaptive = adaptive  # False: always verify the best max_nodes (tests, studies)
        self.overhead_s = 0.0
        self._recent_size = float(max_nodes)
        self.calibration = Calibration()
        self._last_choice = ("", 0.0)  # the kind and expected drafts of the last chosen tree
        self._steps = 0
        self._min_score = self._entry_score = 0.0
        self._thresholds_at = -1  # the step count they were computed at

    def draft_budget(self) -> int:
        """How many nodes to ask the drafter for: about twice what was worth verifying lately.

        Drafting a 16-node tree costs ~0.15 ms of Python; on text where speculation does not
        pay, a small budget keeps that overhead off every plain step.
        """
        if not self.adaptive:
            return self.max_nodes
        return max(4, min(self.max_nodes, round(2 * self._recent_size + 2)))

    def min_score(self) -> float:
        """Below this acceptance estimate no node can pay for itself: half the cheapest
        marginal cost of one more verified token, relative to a plain step."""
        self._refresh_thresholds()
        return self._min_score

    def entry_score(self) -> float:
        """A tree whose best node scores below this cannot pay at all, so is not worth
        drafting: n nodes yield at most 1 + n·s tokens and must beat a plain step (by the
        margin) at the cost of verifying n + 1. On a CPU where two tokens cost 1.8× one
        this is ~0.55, which idles weak drafters instead of building trees nobody verifies.
        """
        self._refresh_thresholds()
        return self._entry_score

    def _refresh_thresholds(self) -> None:
        """Recompute both thresholds every 32 steps: the curve moves slowly."""
        fresh = self._thresholds_at >= 0 and self._steps - self._thresholds_at < 32
        if not self.adaptive or fresh or self.max_nodes < 2:
            return
        self._thresholds_at = self._steps
        sizes = range(1, self.max_nodes)
        base = self.step_cost(1)
        marginal = min(self.cost(n + 1) - self.cost(n) for n in sizes)
        self._min_score = min(0.5, max(0.02, 0.5 * marginal / base))
        bar = (1.0 + self.margin) / base
        calibration = self.calibration.best()
        self._entry_score = min((bar * self.step_cost(n + 1) - 1.0) / (n * calibration)
                                for n in sizes)

    def step_cost(self, n: int) -> float:
        """Seconds of a whole loop step that verifies ``n`` tokens (drafting included)."""
        return self.cost(n) + self.overhead_s

    def observe(self, n: int, verify_s: float, step_s: float, accepted: int = 0) -> None:
        """Learn from a finished step: its verify time, the loop's own overhead and how many
        drafts were accepted against how many the chosen tree promised."""
        self.cost.update(n, verify_s)
        # the loop's own time beyond a whole plain step is a stall (GC, the OS), not overhead
        overhead = min(step_s - verify_s, self.cost(1))
        self.overhead_s += 0.1 * (overhead - self.overhead_s)
        self._steps += 1
        if n > 1:
            self.calibration.record(*self._last_choice, accepted)
        else:
            self.calibration.relax()

    def select(self, tree: TokenTree) -> TokenTree:
        """The ancestor-closed top-n nodes of ``tree`` maximising expected tokens per second."""
        if len(tree) == 1:
            return tree
        scores = list(tree.scores)
        for i in range(1, len(tree)):
            scores[i] = min(scores[i], scores[tree.parents[i]])
        order = sorted(range(1, len(tree)), key=lambda i: (-scores[i], i))
        if not self.adaptive:
            return tree.prune(order[: self.max_nodes - 1])
        kind = tree.sources[order[0]].rsplit("/", 1)[0]  # the best node's source less depth
        chosen = self._best_size(scores, order, self.calibration.factor(kind))
        self._recent_size += 0.2 * (chosen + 1 - self._recent_size)
        self._last_choice = (kind, sum(scores[i] for i in order[:chosen]))
        return tree.prune(order[:chosen])

    def _best_size(self, scores: list[float], order: list[int], calibration: float) -> int:
        """The n whose top-n nodes give the most expected tokens per second (0: none)."""
        best_n, best_rate = 0, (1.0 + self.margin) / self.step_cost(1)
        expected = 1.0
        for n, node in enumerate(order[: self.max_nodes - 1], start=1):
            expected += calibration * scores[node]
            rate = expected / self.step_cost(n + 1)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n
