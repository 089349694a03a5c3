"""The edgespec command end to end, as a user runs it, on the packaged SmolLM2 model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
STATS = {"new_tokens", "prefill_s", "decode_s", "tokens_per_s", "steps", "accepted_per_step",
         "draft_nodes_per_step", "peak_rss_bytes", "backend", "draft"}


def edgespec(*args: str, stdin: str | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "edgespec", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_run_json_reports_text_ids_and_stats() -> None:
    r = edgespec("run", "-p", "Name three colours.", "-n", "16", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] and len(out["token_ids"]) == out["stats"]["new_tokens"] <= 16
    assert set(out["stats"]) >= STATS
    assert out["stats"]["backend"] == "llamacpp" and out["stats"]["draft"] == "fused"


def test_positional_model_and_prompt_stream_text_and_summary(smollm_path: Path) -> None:
    r = edgespec("run", str(smollm_path), "Say hi.", "-n", "8", "--draft", "none")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "draft=none" in r.stderr


def test_a_long_positional_prompt_is_a_prompt_not_a_path(smollm_path: Path) -> None:
    """Text too long to be a file name (the OS says ENAMETOOLONG) is the prompt."""
    long = "Summarize: the quick brown fox jumps over the lazy dog. " * 8
    for args in (("-m", str(smollm_path), long), (long,)):
        r = edgespec("run", *args, "-n", "2", "-q")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = edgespec("run", "-m", "x" * 5000, "hi")
    assert r.returncode == 2 and "model not found" in r.stderr and len(r.stderr) < 400


def test_prompt_from_stdin_and_raw_completion() -> None:
    r = edgespec("run", "--raw", "-n", "8", "--quiet", stdin="The capital of France is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""


def test_draft_none_and_fused_agree(smollm_path: Path) -> None:
    args = ("run", "-m", str(smollm_path), "-p", "Count from one to ten.", "-n", "32", "--json")
    plain = json.loads(edgespec(*args, "--draft", "none").stdout)
    fused = json.loads(edgespec(*args, "--draft", "fused").stdout)
    assert plain["token_ids"] == fused["token_ids"]


def test_sampling_is_reproducible_with_a_seed() -> None:
    args = ("run", "-p", "Tell me a story.", "-n", "16", "--temp", "0.9", "--seed", "7", "--json")
    a, b = json.loads(edgespec(*args).stdout), json.loads(edgespec(*args).stdout)
    assert a["token_ids"] == b["token_ids"]


def test_ctrl_c_stops_cleanly() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "edgespec", "run", "-p", "Write a long essay.",
                             "-n", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    proc.stdout.read(1)  # generation has started
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err


def test_peak_rss_is_this_process_s_not_the_parent_s() -> None:
    """ru_maxrss survives exec: a bench worker spawned after the bench grew would report
    the bench's peak as its own."""
    ballast = bytearray(b"x" * (400 * 2**20))  # the parent's peak: >= 400 MiB more
    code = "from edgespec.engine import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout)
    assert child < len(ballast), f"the child reports {child / 2**20:.0f} MiB"


def test_ctrl_c_during_prefill_stops_cleanly(tmp_path: Path) -> None:
    """SIGINT while a ~3,000-token prompt is prefilled (seconds on 2 cores), before any
    token: exit 130, one line, nothing generated."""
    prompt = tmp_path / "long.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    proc = subprocess.Popen([sys.executable, "-m", "edgespec", "run", "--raw", "-f",
                             str(prompt), "-n", "8", "-c", "4096"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # imported and loaded (~1 s); the prefill takes several seconds more
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the prefill finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["error: interrupted"]
    assert out.strip() == ""
