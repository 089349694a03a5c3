"""``edgespec export``: one command from a model to GGUF, ONNX or OpenVINO IR, with a draft.

Kept apart from :mod:`edgespec.cli` because it owns the progress display and the summary
table, and imports nothing heavy until an export actually runs.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from exporters import DraftSpec, export_model


class StageBars:
    """One rich progress bar per export stage, created when the stage first reports."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=max(total, 1))
        self._progress.update(self._tasks[stage], completed=done, total=max(total, 1),
                              refresh=True)


def run_export(src: Path, out: Path, *, to: str, quant: str | None, draft: str | None,
               force: bool, console: Console) -> list[Path]:
    """Export with progress bars on ``console``, then print the files written and sizes."""
    spec = DraftSpec.parse(draft) if draft else None
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    # redrawn on each report rather than by rich's refresh thread: a daemon thread that is
    # writing to stderr when Ctrl-C ends the process makes the interpreter abort at exit
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as progress:
        written = export_model(src, out, to=to, quant=quant, draft=spec, force=force,
                               progress=StageBars(progress))
    console.print(_summary(written))
    return written


def _summary(paths: list[Path]) -> Table:
    base = paths[0].parent
    table = Table(title=f"edgespec export → {base}")
    table.add_column("file")
    table.add_column("size", justify="right")
    total = 0
    for path in paths:
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                size = f.stat().st_size
                total += size
                table.add_row(str(f.relative_to(base)), _human(size))
    table.add_row("[b]total[/b]", f"[b]{_human(total)}[/b]")
    return table


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
