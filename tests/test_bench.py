"""The benchmark harness: prompt files, summaries and the divergence report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgespec
from edgespec.bench import BASELINE, Measurement, divergences, read_prompts, summarize
from edgespec.errors import UserError


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_reads_spec_bench_format_with_limits(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["a", "b"]},
        {"id": 2, "category": "math", "turns": ["c"]},
        {"id": 3, "category": "math", "turns": ["d"]},
    ])
    prompts = read_prompts(f, limit=1)
    assert [(p.id, p.category, p.turns) for p in prompts] == [
        ("81", "writing", ["a", "b"]), ("2", "math", ["c"])]
    assert [p.id for p in read_prompts(f, categories=["math"])] == ["2", "3"]


def test_rejects_malformed_lines(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": 1, "turns": ["no category"]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        read_prompts(f)


def _m(config: str, ids: list[int], seconds: float, text: str = "x") -> Measurement:
    return Measurement("1", "cat", 0, 0, config, len(ids), seconds, 0.1, len(ids), 1.0, 0.0,
                       1, ids, text)


def test_summary_ratios_and_agreement() -> None:
    rows = [_m(BASELINE, [1, 2, 3, 4, 5], 1.0), _m("fused", [1, 2, 3, 4, 5], 0.5),
            _m("lookup", [1, 2, 9], 1.0)]
    table = {(r["category"], r["config"]): r for r in summarize(rows, [BASELINE, "fused",
                                                                      "lookup"])}
    assert table[("cat", "fused")]["ratio"] == pytest.approx(2.0)
    assert table[("cat", "fused")]["agreement"] == 1.0
    assert table[("ALL", "lookup")]["agreement"] == 0.0


def test_divergence_report_gives_plain_top2_margin(tiny_gguf: Path) -> None:
    with edgespec.load(tiny_gguf, ctx=256, draft="none") as engine:
        plain = engine.generate("Once upon a time", max_tokens=6)
        other = [*plain.token_ids[:3], (plain.token_ids[3] + 1) % 1000]
        rows = [_m(BASELINE, plain.token_ids, 1.0, "Once upon a time"),
                _m("fused", other, 1.0, "Once upon a time")]
        found = divergences(engine, rows)
    assert len(found) == 1 and found[0]["index"] == 3 and found[0]["margin"] >= 0.0
