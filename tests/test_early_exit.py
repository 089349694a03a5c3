"""Early exit: the target drafts for itself, cut after a layer, on the engines that can cut it.

The tiny model has two layers, so its one exit is after the first; the reference computes
it from its weights, the ONNX Runtime and OpenVINO exports carry it as a graph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import edgespec
from edgespec.api import Engine
from edgespec.errors import UserError
from runtimes.reference import ReferenceBackend

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small")


def _greedy(engine: Engine, draft: str) -> tuple[list[list[int]], int]:
    results = [engine.generate(p, max_tokens=24, draft=draft) for p in PROMPTS]
    return [r.token_ids for r in results], sum(r.stats.draft_nodes for r in results)


@pytest.mark.parametrize("engine", ["reference", "onnx", "openvino"])
def test_greedy_output_is_plain_decodings(engine: str, tiny_gguf: Path, slot_export) -> None:
    """Every drafted tree verified (not adaptive): the exit drafts every step, and the text
    is plain decoding's."""
    path = tiny_gguf if engine == "reference" else slot_export(engine)
    with edgespec.load(path, backend=engine, draft="early-exit:1", adaptive=False,
                       ctx=256) as e:
        plain, _ = _greedy(e, "none")
        drafted, nodes = _greedy(e, "early-exit:1")
    assert drafted == plain
    assert nodes > 0


def test_an_exit_the_model_does_not_have_is_refused(tiny_gguf: Path) -> None:
    backend = ReferenceBackend(tiny_gguf)
    for draft, message in (("early-exit:2", "no early exit after layer 2 in this model; it "
                                            "has exits after layers 1"),
                           ("early-exit:x", "needs the layer to exit after, e.g. early-exit:8"),
                           ("early-exit", "needs the layer to exit after")):
        with pytest.raises(UserError, match=message):
            Engine(backend, draft=draft)


def test_llamacpp_points_to_a_draft_model(smollm_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "edgespec", "run", str(smollm_path), "hi", "-n",
                        "4", "--draft", "early-exit:8"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no early exit inside the model; export one (export --with-draft early-exit:E)" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
