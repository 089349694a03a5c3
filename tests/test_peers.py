"""Benchmark workers on real engines: edgespec, llama-cpp-python and, where their
virtualenvs exist (``make peers``), OpenVINO GenAI and onnxruntime-genai.

A peer that is not installed is skipped. llama.cpp through llama-cpp-python and through
edgespec is one engine on one GGUF: their plain decodings must give the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import edgespec
from edgespec.peers import edgespec_config, missing, peer_config
from edgespec.peers.client import Worker, WorkerError
from edgespec.peers.exports import EXPORTERS, model_for

PROMPT = "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n"


@contextmanager
def _worker(config, model: Path, tmp_path: Path) -> Iterator[Worker]:  # noqa: ANN001
    worker = Worker(config, model, threads=2, stop_ids=[2], log=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.close()


def _plain_tokens(model: Path, n: int) -> list[int]:
    with edgespec.load(model, ctx=512, draft="none") as engine:
        return engine.generate(PROMPT, max_tokens=n).token_ids


def test_llama_cpp_python_plain_matches_edgespec_plain(tiny_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    with _worker(peer_config("llama-cpp-python", "plain", {"ctx": 512}), tiny_gguf,
                 tmp_path) as worker:
        reply = worker.generate(PROMPT, 12)
    assert reply["token_ids"][:12] == _plain_tokens(tiny_gguf, 12)
    assert reply["prompt_ids"][:2] == [1, 4093]  # <|im_start|> parsed as a special token
    assert reply["steps"] == len(reply["token_ids"]) - 1 and reply["peak_rss_bytes"] > 0


def test_llama_cpp_python_prompt_lookup_runs(tiny_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    with _worker(peer_config("llama-cpp-python", "lookup", {"ctx": 512}), tiny_gguf,
                 tmp_path) as worker:
        reply = worker.generate(PROMPT * 3, 16)
    assert 1 <= len(reply["token_ids"]) <= 17 and reply["draft_tokens"] >= 0
    assert 0 < reply["ttft_s"] <= reply["e2e_s"]


def test_edgespec_worker_is_lossless(tiny_gguf: Path, tmp_path: Path) -> None:
    config = edgespec_config("llamacpp", "fused", ctx=512, tree_size=None)
    with _worker(config, tiny_gguf, tmp_path) as worker:
        replies = [worker.generate(PROMPT, 12) for _ in range(2)]
    assert all(r["token_ids"] == _plain_tokens(tiny_gguf, 12) for r in replies)


def test_an_edgespec_worker_measures_its_verify_cost_and_keeps_generating(
        tiny_gguf: Path, tmp_path: Path) -> None:
    config = edgespec_config("llamacpp", "none", ctx=512, tree_size=None)
    with _worker(config, tiny_gguf, tmp_path) as worker:
        before = worker.generate(PROMPT, 8)
        seconds = worker.call("verify_cost", sizes=[1, 2, 4], context=32)["seconds"]
        after = worker.generate(PROMPT, 8)  # the probe emptied the cache it had filled
    assert sorted(seconds) == ["1", "2", "4"] and all(t > 0 for t in seconds.values())
    assert after["token_ids"] == before["token_ids"]


def test_a_worker_that_cannot_load_reports_why(tmp_path: Path) -> None:
    config = edgespec_config("llamacpp", "none", ctx=512, tree_size=None)
    worker = Worker(config, tmp_path / "absent.gguf", threads=1, stop_ids=[],
                    log=tmp_path / "w.log")
    with pytest.raises(WorkerError, match="model not found"):
        worker.wait_ready()
    worker.close()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["openvino-genai", "ort-genai"])
def test_venv_peers_generate_from_their_own_export(engine: str, smollm_path: Path,
                                                   tmp_path: Path) -> None:
    """Exports SmolLM2 with the peer's own tool the first time (cached, about a minute)."""
    if missing(engine):
        pytest.skip(missing(engine))
    config = peer_config(engine, "lookup", {})
    with _worker(config, model_for(config.model_format, smollm_path), tmp_path) as worker:
        reply = worker.generate(PROMPT, 8)
    assert reply["prompt_ids"] == _prompt_ids(smollm_path)
    assert len(reply["token_ids"]) >= 1 and reply["steps"] >= 0


def _prompt_ids(model: Path) -> list[int]:
    with edgespec.load(model, ctx=512, draft="none") as engine:
        return engine.backend.tokenize(PROMPT, special=True)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_an_edgespec_export_in_an_older_format_is_made_again(tiny_gguf: Path,
                                                             tmp_path: Path) -> None:
    export = EXPORTERS["edgespec-openvino"]
    out = export(tiny_gguf, tmp_path)
    manifest = out / "edgespec.json"
    current = json.loads(manifest.read_text())["version"]
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"version": current - 1}))
    assert export(tiny_gguf, tmp_path) == out
    assert json.loads(manifest.read_text())["version"] == current


def test_every_repetition_gets_fresh_workers(tiny_gguf: Path, tmp_path: Path) -> None:
    """A restart replaces each worker's process (a new draw of where its model and cache
    sit in memory) and keeps the earlier round's log."""
    from rich.console import Console

    from edgespec.bench import Workers

    workers = Workers({}, Console(stderr=True))
    config = edgespec_config("llamacpp", "fused", ctx=512, tree_size=None)
    try:
        workers.start([config], tiny_gguf, threads=2, stop_ids=[2], logs=tmp_path)
        first = workers.running[config.label]
        assert workers.ask(config.label, PROMPT, 4) is not None
        workers.restart()
        second = workers.running[config.label]
        assert second is not first and second._proc.pid != first._proc.pid
        assert workers.ask(config.label, PROMPT, 4) is not None
        assert first._proc.poll() is not None  # the old process has ended
    finally:
        workers.close()
    logs = sorted(p.name for p in tmp_path.iterdir())
    assert logs == ["edgespec-llamacpp-fused.log", "edgespec-llamacpp-fused.r1.log"]
