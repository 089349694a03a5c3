"""The thread governor: every core while that is fastest, one fewer while another process
takes a core, and output that does not depend on which."""

from __future__ import annotations

import importlib.util

import pytest

import edgespec
from edgespec.threads import EXPLORE_EVERY, MAX_EXPLORE_EVERY, ThreadGovernor


def run(governor: ThreadGovernor, steps: int, seconds: dict[int, float]) -> list[int]:
    """The thread count of each step when a step at t threads takes ``seconds[t]``."""
    used = []
    for _ in range(steps):
        used.append(governor.current)
        governor.observe(1, seconds[governor.current])
    return used


def test_an_idle_machine_keeps_every_core_and_checks_ever_less_often() -> None:
    governor = ThreadGovernor(2, lambda n: 1.0)
    used = run(governor, 4000, {2: 0.008, 1: 0.0125})
    assert used[0] == 2 and used.count(1) < 0.02 * len(used)
    late = used[-2 * MAX_EXPLORE_EVERY:]
    assert 0 < late.count(1) <= 2 * 4  # one 4-step check per MAX_EXPLORE_EVERY steps


def test_a_busy_process_moves_it_to_one_fewer_and_back_when_it_ends() -> None:
    governor = ThreadGovernor(2, lambda n: 1.0)
    run(governor, 200, {2: 0.008, 1: 0.0125})
    busy = run(governor, 400, {2: 0.037, 1: 0.013})  # measured beside one busy process
    switched = busy.index(1)
    assert switched <= 6, "the jump is noticed within a few steps"
    assert busy[switched:].count(2) < 0.05 * len(busy)
    idle = run(governor, 2 * MAX_EXPLORE_EVERY, {2: 0.008, 1: 0.0125})
    assert idle[-EXPLORE_EVERY:].count(2) == EXPLORE_EVERY


def test_tree_steps_compare_as_one_token_steps() -> None:
    """A 16-token verify at 2 threads costs 6x a 1-token one: not contention."""
    governor = ThreadGovernor(2, lambda n: {1: 1.0, 16: 6.0}[n])
    for step in range(300):
        n = 16 if step % 2 else 1
        t = governor.current
        governor.observe(n, (0.008 if t == 2 else 0.0125) * (6.0 if n == 16 else 1.0))
    assert governor.current == 2


def test_one_core_leaves_nothing_to_choose() -> None:
    governor = ThreadGovernor(1, lambda n: 1.0)
    assert run(governor, 100, {1: 0.01}) == [1] * 100


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed")
def test_switching_threads_every_step_keeps_the_output_exact(smollm_path) -> None:
    """Which thread sums a row does not change the sum: speculative output with the thread
    count changing every step is token for token the plain output."""

    class EveryStep(ThreadGovernor):
        def observe(self, n: int, verify_s: float) -> int:
            self.current = 3 - self.current
            return self.current

    with edgespec.load(smollm_path, threads=2, ctx=1024, tree_size=8, adaptive=False) as e:
        prompt = "Explain why the sky is blue in three sentences."
        messages = [{"role": "user", "content": prompt}]
        plain = e.chat(messages, max_tokens=48, draft="none").token_ids
        e._loop.threads = EveryStep(2, lambda n: 1.0)
        switching = e.chat(messages, max_tokens=48)
        assert switching.token_ids == plain and switching.stats.draft_nodes > 0
        assert e.backend.threads in (1, 2)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python not installed")
def test_threads_the_user_chose_are_kept(smollm_path) -> None:
    with edgespec.load(smollm_path, threads=2, ctx=256) as chosen, \
            edgespec.load(smollm_path, ctx=256) as default:
        for e in (chosen, default):
            e.generate("Hello", max_tokens=2)
        assert chosen._loop.threads is None and default._loop.threads is not None
