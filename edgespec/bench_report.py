"""Benchmark reports from the raw results: terminal tables, markdown, the speed-up plot and
the ``docs/benchmarks.md`` page (``python -m edgespec.bench_report DOCS RESULT_DIR...``).

Everything here reads the results dictionary ``edgespec bench`` writes as ``results.json``,
so a page can be regenerated from stored runs without measuring again.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ALL = "ALL"
# (header, summary key, format); None values print as "–"
COLUMNS = [
    ("config", "config", "{}"),
    ("tokens", "new_tokens", "{:.0f}"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("e2e tok/s", "e2e_tokens_per_s", "{:.1f}"),
    ("TTFT ms", "ttft_ms", "{:.0f}"),
    ("× llama.cpp", "ratio", "{:.2f}×"),  # over meta["ratio_to"]
    ("× e2e", "ratio_e2e", "{:.2f}×"),
    ("× plain", "ratio_plain", "{:.2f}×"),
    ("95% of × plain", "ratio_plain_ci", "{0[0]:.2f}–{0[1]:.2f}"),
    ("tok/step", "accepted_per_step", "{:.2f}"),
    ("drafts/step", "draft_nodes_per_step", "{:.1f}"),
    ("ms/step", "step_ms", "{:.1f}"),
    ("RSS MiB", "peak_rss_mib", "{:.0f}"),
    ("same as base", "agreement", "{:.0%}"),
    ("same as own plain", "agreement_own", "{:.0%}"),
    ("same input", "same_input", "{:.0%}"),
]
LEGEND = (
    "tok/s: decode speed after the first token; e2e: new tokens over the whole request; "
    "× llama.cpp: decode speed over llama-cpp-python plain decoding (× e2e: end to end); "
    "× plain: over edgespec plain decoding, with its 95% interval (turns resampled in "
    "pairs); tok/step: tokens per model call; ms/step: "
    "decode time per model call (the verify cost); same as base / own plain: share of turns "
    "whose tokens equal edgespec plain decoding's / this engine's plain decoding's; same "
    "input: share of turns whose prompt tokens equal edgespec's."
)


def _cell(value: object, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def machine() -> str:
    """CPU model and core count, OS: the context every number on the page depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"


def _categories(summary: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["category"] for r in summary))


def verify_cost_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each backend's one-token verify time, then c(n)/c(1) per size."""
    costs = (results.get("verify_cost") or {}).get("seconds", {})
    sizes = sorted({int(n) for cost in costs.values() for n in cost})
    rows = []
    for label, cost in costs.items():
        seconds = {int(n): t for n, t in cost.items()}
        one = seconds.get(1)
        rows.append([label, _cell(one and one * 1000, "{:.1f}"),
                     *(_cell(one and seconds.get(n) and seconds[n] / one, "{:.2f}×")
                       for n in sizes[1:])])
    return ["backend", "1 token ms", *(f"{n} tokens" for n in sizes[1:])], rows


def _verify_title(results: dict) -> str:
    cost = results["verify_cost"]
    return (f"Verify cost: one call of n tokens (a chain) after {cost['context']} cached "
            f"tokens, timed after an untimed call of the same size (a run of that size), "
            f"relative to one token; medians of {cost['rounds']} rounds, backends probed "
            "in turn")


def print_tables(results: dict, console: Console) -> None:
    """One rich table per category, the verify cost per backend, the divergences found."""
    for category in _categories(results["summary"]):
        table = Table(title=f"{results['meta']['model']}: {category}")
        for header, _, _ in COLUMNS:
            if header == "config":
                table.add_column(header, no_wrap=True)
            else:
                table.add_column(header, justify="right")
        for row in results["summary"]:
            if row["category"] == category:
                table.add_row(*(_cell(row[key], fmt) for _, key, fmt in COLUMNS))
        console.print(table)
    console.print(LEGEND)
    headers, rows = verify_cost_table(results)
    if rows:
        table = Table(title=_verify_title(results))
        for header in headers:
            table.add_column(header, justify="left" if header == "backend" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for d in results["divergences"]:
        console.print(f"prompt {d['prompt_id']} turn {d['turn']} ({d['config']}) diverged at "
                      f"token {d['index']}: plain top-2 logit margin {d['margin']:.4f}")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(headers)} |", f"|{'---|' * len(headers)}",
            *(f"| {' | '.join(r)} |" for r in rows)]


def markdown(results: dict) -> str:
    """The speed-up matrix (category × configuration), the overall table and the setup."""
    meta, summary = results["meta"], results["summary"]
    configs = list(dict.fromkeys(r["config"] for r in summary))
    ratio = {(r["category"], r["config"]): r["ratio"] for r in summary}
    lines = [f"Model `{meta['model']}`, {meta['max_tokens']} new tokens per turn (greedy), "
             f"{meta['threads']} threads, {meta['repeat']} repetition(s), prompts "
             f"`{meta['prompts']}`, {meta['date']}"
             + ("; speculation from this device's saved profile (`edgespec profile`)."
                if meta.get("saved_profile") else "."), "",
             f"Decode speed relative to `{meta['ratio_to']}`:", ""]
    lines += _md_table(["category", *configs], [
        [c, *(_cell(ratio.get((c, k)), "{:.2f}×") for k in configs)]
        for c in _categories(summary)])
    lines += ["", "All prompts:", ""]
    lines += _md_table([h for h, _, _ in COLUMNS], [
        [_cell(r[key], fmt) for _, key, fmt in COLUMNS] for r in summary if r["category"] == ALL])
    lines += ["", LEGEND, ""]
    headers, rows = verify_cost_table(results)
    if rows:
        lines += [f"{_verify_title(results)}:", "", *_md_table(headers, rows), ""]
    if results.get("memory"):
        png = results["meta"].get("memory_png", "memory.png")
        lines += [MEMORY_TITLE, "", *_md_table(*memory_rows(results)), "",
                  f"![speed against peak memory]({png})", ""]
    lines += _md_table(["configuration", "version", "weights", "options"], [
        [label, c["version"], c["weights"], f"`{json.dumps(c['options'])}`"]
        for label, c in meta["configs"].items() if c["version"]])
    if meta["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {label}: {why}" for label, why in meta["skipped"].items()]
    return "\n".join(lines) + "\n"


MEMORY_TITLE = (
    "Under a memory budget (`--memory-budget`): peak RSS of the worker process, generation "
    "memory (peak RSS less the process before loading and the weights), and decode speed "
    "relative to the same drafter without a budget (95% interval over turns)")


def memory_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    rows = results["memory"]
    free = {r["config"]: r["generation"] for r in rows if r["plan"] is None}
    headers = ["config", "context", "tree", "recycling k", "peak RSS MB", "generation MB",
               "of unconstrained", "tok/s", "× unconstrained", "95%"]
    table = []
    for r in rows:
        plan, base = r["plan"] or {}, free.get(r["config"].split("@")[0])
        ci = r["ratio_ci"]
        table.append([r["config"], _cell(plan.get("ctx"), "{:,}"), _cell(plan.get("tree"), "{}"),
                      _cell(plan.get("recycling_k"), "{}"), f"{r['peak_rss'] / 1e6:,.0f}",
                      f"{r['generation'] / 1e6:,.1f}",
                      _cell(r["generation"] / base if base else None, "{:.0%}"),
                      f"{r['tokens_per_s']:.1f}", _cell(r["ratio"], "{:.2f}×"),
                      f"{ci[0]:.2f}–{ci[1]:.2f}" if ci else "–"])
    return headers, table


def plot_memory(results: dict, path: Path) -> bool:
    """Decode speed against peak RSS, one line per drafter from the unconstrained plan down
    to the smallest budget; False without matplotlib or budgets."""
    try:
        import matplotlib
    except ImportError:
        return False
    if not results.get("memory"):
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for r in results["memory"]:
        lines.setdefault(r["config"].split("@")[0], []).append(
            (r["peak_rss"] / 1e6, r["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, points in lines.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("peak RSS of the process, MB")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{results['meta']['model']}: speed under a memory budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(results: dict, path: Path) -> bool:
    """Grouped bars: decode speed-up over llama.cpp plain decoding (``ratio_to``), per category
    and configuration.

    Drawn with the Agg backend (no display needed); False if matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    categories = _categories(summary)
    configs = list(dict.fromkeys(r["config"] for r in summary))
    ratio = {(r["category"], r["config"]): r["ratio"] for r in summary}
    width = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(categories)), 5.5))
    for i, config in enumerate(configs):
        xs = [c + (i - (len(configs) - 1) / 2) * width for c in range(len(categories))]
        ax.bar(xs, [ratio.get((cat, config), 0.0) for cat in categories], width, label=config)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_ylabel(f"decode speed ÷ {results['meta']['ratio_to']}")
    ax.set_title(f"{results['meta']['model']}: speed-up per category")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, out: Path, console: Console) -> None:
    """Print the tables and write ``results.json``, ``summary.md`` and ``speedup.png``."""
    print_tables(results, console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    if not plot(results, out / "speedup.png"):
        console.print("no plot: matplotlib is not installed (pip install -e '.\\[bench]')")
    plot_memory(results, out / "memory.png")
    console.print(f"results in {out}/: results.json, summary.md, speedup.png"
                  + (", memory.png" if results.get("memory") else ""))


def docs_page(docs: Path, result_dirs: list[Path], title: str = "Benchmarks") -> str:
    """``docs/benchmarks.md`` from stored runs; each run's plot is copied next to it."""
    runs = [json.loads((d / "results.json").read_text()) for d in result_dirs]
    lines = [f"# {title}", "",
             "Generated from the raw measurements by `python -m edgespec.bench_report` "
             "(`make bench` for docs/benchmarks.md); do not edit by hand.", "",
             f"Machine: {runs[0]['meta']['machine']}; Python {runs[0]['meta']['python']}.", "",
             "Every configuration runs in its own worker process, warmed up; every prompt "
             "turn goes to every configuration in turn (order reversed on alternate "
             "repetitions), with the same rendered prompt text and greedy decoding. Peers run "
             "the same model, exported by their own tools.", ""]
    for d, run in zip(result_dirs, runs):
        image = f"benchmarks-{d.name}.png"
        if (d / "speedup.png").exists():
            shutil.copyfile(d / "speedup.png", docs.parent / image)
        if (d / "memory.png").exists():
            run["meta"]["memory_png"] = f"benchmarks-{d.name}-memory.png"
            shutil.copyfile(d / "memory.png", docs.parent / run["meta"]["memory_png"])
        lines += [f"## {run['meta']['model']}", "", f"`{run['meta']['command']}`", "",
                  f"![speed-up per category]({image})", "", markdown(run)]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """``DOCS.md [--title TITLE] RESULT_DIR…``"""
    title = "Benchmarks"
    if len(argv) > 2 and argv[1] == "--title":
        title, argv = argv[2], [argv[0], *argv[3:]]
    docs, dirs = Path(argv[0]), [Path(a) for a in argv[1:]]
    docs.write_text(docs_page(docs, dirs, title))


if __name__ == "__main__":
    main(sys.argv[1:])
