"""The speculation policy: verify only what pays for itself on the measured cost curve."""

from __future__ import annotations

import pytest

from edgespec.autotune import Calibration, CostCurve, SpeculationPolicy
from edgespec.tree import TokenTree

STEEP = {1: 9.0, 2: 16.0, 4: 25.0, 8: 35.0, 16: 60.0}  # llama.cpp on this 2-core CPU (ms)
FLAT = {1: 18.0, 2: 19.0, 4: 21.0, 8: 24.0, 16: 30.0}


def _chain(scores: list[float], source: str = "draft") -> TokenTree:
    n = len(scores)
    return TokenTree(list(range(n + 1)), list(range(-1, n)),
                     ["root"] + [f"{source}/d{d}" for d in range(1, n + 1)], [1.0, *scores])


def test_cost_curve_interpolates_and_learns() -> None:
    c = CostCurve(STEEP)
    assert c(3) == pytest.approx(20.5)
    assert c(32) == pytest.approx(110.0)  # extrapolates the last slope
    c.update(2, 26.0)
    assert 16.0 < c(2) < 26.0


def test_one_stalled_call_does_not_distort_the_curve() -> None:
    """A plain step that stalled 100x (the cores were taken) moves c(1) as a 2x sample
    would, so two tokens never look cheaper than one; a lasting change is still learned."""
    c = CostCurve(STEEP)
    c.update(1, 900.0)
    assert c(1) == pytest.approx(9.9)
    assert c(2) > c(1)
    for _ in range(40):
        c.update(1, 18.0)
    assert c(1) == pytest.approx(18.0, rel=0.05)


def test_a_stalled_step_is_not_taken_for_loop_overhead() -> None:
    policy = SpeculationPolicy(CostCurve(STEEP), max_nodes=16)
    policy.observe(1, 9.0, 9.0 + 500.0)
    assert policy.overhead_s == pytest.approx(0.1 * 9.0)


def test_weak_drafts_are_not_verified_on_a_steep_curve() -> None:
    policy = SpeculationPolicy(CostCurve(STEEP), max_nodes=16)
    assert len(policy.select(_chain([0.5, 0.25, 0.12]))) == 1


def test_strong_drafts_are_verified_as_far_as_they_pay() -> None:
    policy = SpeculationPolicy(CostCurve(STEEP), max_nodes=16)
    tree = policy.select(_chain([0.95, 0.9, 0.85, 0.8, 0.75, 0.1, 0.05]))
    assert 4 <= len(tree) <= 6


def test_a_flat_curve_makes_weak_drafts_worth_it() -> None:
    policy = SpeculationPolicy(CostCurve(FLAT), max_nodes=16)
    assert len(policy.select(_chain([0.5, 0.25, 0.12]))) > 1


def test_selection_is_ancestor_closed_even_with_unordered_scores() -> None:
    tree = TokenTree([0, 1, 2, 3], [-1, 0, 1, 0], scores=[1.0, 0.2, 0.99, 0.1])
    policy = SpeculationPolicy(CostCurve(FLAT), max_nodes=16)
    chosen = policy.select(tree)
    for i in range(1, len(chosen)):
        assert 0 <= chosen.parents[i] < i


def test_overconfident_drafts_are_discounted_by_what_they_really_deliver() -> None:
    policy = SpeculationPolicy(CostCurve(STEEP), max_nodes=16)
    promising = _chain([0.95, 0.9, 0.85, 0.8])
    assert len(policy.select(promising)) > 1
    for _ in range(100):  # the chosen trees promise ~3.5 accepted drafts and deliver none
        chosen = policy.select(promising)
        policy.observe(len(chosen), STEEP[1] * len(chosen), STEEP[1] * len(chosen), 0)
    assert policy.calibration.factor("draft") < 0.8
    assert len(policy.select(promising)) == 1



def test_plain_steps_slowly_restore_trust_in_a_discounted_kind() -> None:
    calibration = Calibration()
    for _ in range(60):
        calibration.record("short", predicted=2.0, realised=0)
    discounted = calibration.factor("short")
    for _ in range(200):
        calibration.relax()
    assert discounted < calibration.factor("short") < 1.0
    for _ in range(5000):
        calibration.relax()
    assert calibration.factor("short") == pytest.approx(1.0, abs=0.01)


def test_one_kind_of_draft_overpromising_does_not_discount_another() -> None:
    """Short matches that deliver nothing lose the policy's trust; long copies keep it."""
    policy = SpeculationPolicy(CostCurve(STEEP), max_nodes=16)
    weak, strong = _chain([0.95, 0.9, 0.85], "short"), _chain([0.95, 0.9, 0.85], "long")
    for _ in range(100):
        chosen = policy.select(weak)
        policy.observe(len(chosen), STEEP[1] * len(chosen), STEEP[1] * len(chosen), 0)
    assert len(policy.select(weak)) == 1
    assert len(policy.select(strong)) > 1
    assert policy.calibration.factor("long") == 1.0


@pytest.mark.parametrize("curve", [STEEP, FLAT])
def test_entry_score_is_the_weakest_best_node_that_can_pay(curve: dict) -> None:
    """Any tree whose best node scores just above the entry score can pay; every tree
    whose best node scores just below it cannot, whatever its size."""
    policy = SpeculationPolicy(CostCurve(curve), max_nodes=16)
    entry = policy.entry_score()
    assert len(policy.select(_chain([entry * 0.98] * 15))) == 1
    assert len(policy.select(_chain([min(entry * 1.05, 1.0)] * 15))) > 1


def test_entry_score_is_high_on_a_steep_curve_and_low_on_a_flat_one() -> None:
    steep = SpeculationPolicy(CostCurve(STEEP), max_nodes=16).entry_score()
    flat = SpeculationPolicy(CostCurve(FLAT), max_nodes=16).entry_score()
    assert 0.3 < steep < 0.8 and flat < 0.1


def test_a_long_stall_is_taken_for_the_machine_not_for_speculation() -> None:
    """Thirty steps 20x slow (another process took the cores), speculative ones among them,
    then plain steps at the old speed: the curve's shape is what it was, so trees that paid
    before pay again, though no tree is verified after the stall to re-measure it."""
    c = CostCurve(FLAT)
    for step in range(30):
        n = 4 if step % 3 else 1
        c.update(n, 20 * FLAT[n])
    assert c(1) > 2 * FLAT[1]  # the machine is slow now, all sizes alike
    for _ in range(100):  # a second and a half of plain steps
        c.update(1, FLAT[1])
    assert c(1) == pytest.approx(FLAT[1], rel=0.05)
    assert c(4) / c(1) == pytest.approx(FLAT[4] / FLAT[1], rel=0.05)
    policy = SpeculationPolicy(c, max_nodes=16)
    assert len(policy.select(_chain([0.6, 0.5, 0.4]))) > 1
