"""The README's examples run as written: every command that needs no user file, peer,
server, display or phone, with the packaged SmolLM2 in place of `model.gguf` and a Hugging
Face folder made from it in place of `hf-folder/`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtimes.reference import ReferenceBackend
from tests.test_reference_loading import export_hf_folder

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# what runs elsewhere: the harness itself, long-running servers, the peers' bench, a window
# and a phone (tests/test_server.py, test_bench.py, test_desktop.py, test_termux.py)
ELSEWHERE = re.compile(r"^(make |curl |edgespec profile$)|edgespec (serve|bench)"
                       r"|apps/(desktop|termux)")
pytestmark = pytest.mark.slow


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands() -> list[str]:
    lines = [line.split("  #")[0].strip() for block in readme_blocks("sh")
             for line in block.splitlines()]
    return [line for line in lines if line and not ELSEWHERE.search(line)]


def test_the_readme_has_the_examples_this_test_runs() -> None:
    ran = commands()
    assert len(ran) >= 10 and any("export hf-folder/" in c for c in ran), ran


@pytest.fixture(scope="module")
def workdir(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with model.gguf (the packaged model) and hf-folder/ made from it."""
    work = tmp_path_factory.mktemp("readme")
    (work / "model.gguf").symlink_to(smollm_path)
    export_hf_folder(ReferenceBackend(smollm_path, n_ctx=64), work / "hf-folder", "F16")
    return work


def test_every_shell_example_runs(workdir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH":
           f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    failures = []
    for command in commands():
        shell = command.replace(".venv/bin/", f"{VENV_BIN}/")
        stdin = "Name a planet.\n/exit\n" if command.endswith("chat") else ""
        r = subprocess.run(["bash", "-c", shell], cwd=workdir, env=env, input=stdin,
                           capture_output=True, text=True, timeout=900)
        speaks = re.search(r"edgespec (run|chat|check|profile)", command)
        if r.returncode != 0 or (speaks and not r.stdout.strip()):
            failures.append(f"{command}\n  exit {r.returncode}: {r.stderr.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_the_python_example_runs(tmp_path: Path) -> None:
    (code,) = readme_blocks("python")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
