"""The embedded Python API: results, streaming, cancel and sharing an engine across threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import edgespec


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path):
    with edgespec.load(tiny_gguf, ctx=512) as e:
        yield e


def test_generate_and_stream_agree(engine) -> None:
    result = engine.generate("Once upon a time", max_tokens=12)
    assert len(result.token_ids) == result.stats.new_tokens <= 12
    stream = engine.stream("Once upon a time", max_tokens=12)
    assert "".join(stream) == result.text
    assert stream.result is not None and stream.result.token_ids == result.token_ids


def test_a_streams_stats_fill_in_as_it_runs(engine) -> None:
    """What a live status line reads: the stats count tokens and steps while text arrives."""
    stream = engine.stream("Once upon a time", max_tokens=24)
    seen = [(stream.stats.new_tokens, stream.stats.steps) for _ in stream]
    assert seen == sorted(seen) and 0 < seen[0][0] < seen[-1][0] <= 24
    assert stream.result is not None and stream.result.stats is stream.stats


def test_cancel_from_another_thread_then_reuse(engine) -> None:
    pieces = engine.stream("Once upon a time", max_tokens=400)
    first = next(iter(pieces))
    assert isinstance(first, str)
    threading.Thread(target=engine.cancel).start()
    with pytest.raises(edgespec.Cancelled):
        for _ in pieces:
            pass
    assert engine.generate("Hello", max_tokens=4).stats.new_tokens > 0


def test_threads_share_an_engine_safely(engine) -> None:
    prompts = ["The sea", "A mountain", "In the city", "Under the bridge"]
    expected = {p: engine.generate(p, max_tokens=10).token_ids for p in prompts}
    got: dict[str, list[int]] = {}

    def run(p: str) -> None:
        got[p] = engine.generate(p, max_tokens=10).token_ids

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_stop_strings_end_generation(engine) -> None:
    full = engine.generate("Once upon a time", max_tokens=20, draft="none").text
    if len(full) < 6:
        pytest.skip("the random model produced too little text")
    stop = full[3:6]
    cut = engine.generate("Once upon a time", max_tokens=20, draft="none", stop=[stop])
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_tokenize_gives_the_ids_generate_feeds_the_model(engine) -> None:
    ids = engine.tokenize("Once upon a time")
    info = engine.backend.tokenizer
    text_ids = engine.backend.tokenize("Once upon a time", special=True)
    assert ids == ([info.bos_id, *text_ids] if info.add_bos else text_ids)
    assert engine.tokenize(ids) == ids  # ids pass through
    result = engine.generate(ids, max_tokens=4)
    assert result.stats.prompt_tokens == len(ids)
    assert engine.generate("Once upon a time", max_tokens=4).token_ids == result.token_ids
