"""``edgespec export`` end to end: the files it writes load in their runtimes; bad input fails
in one line with nothing written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.drafts import KEY_EXIT, KEY_VOCAB, check_same_vocab
from runtimes.ggufinfo import read_gguf


def edgespec(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_gguf_export_with_early_exit_draft(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "model-q8.gguf"
    r = edgespec("export", str(tiny_gguf), "--to", "gguf", "--quant", "q8_0",
                 "--with-draft", "early-exit:1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    draft = tmp_path / "model-q8.draft-exit1.gguf"
    assert {p.name for p in tmp_path.iterdir()} == {out.name, draft.name}
    assert "total" in r.stderr and draft.name in r.stderr
    meta = read_gguf(draft).metadata
    assert meta[KEY_EXIT] == 1 and meta[KEY_VOCAB] == check_same_vocab(out, draft)
    assert meta["llama.block_count"] == 1 and read_gguf(out).metadata["llama.block_count"] == 2
    run = edgespec("run", "-m", str(out), "--raw", "-p", "Hello", "-n", "4", "--quiet",
                   "--draft-model", str(draft), "--draft", "model")
    assert run.returncode == 0, run.stderr


def test_onnx_export_directory_runs(tiny_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny-onnx"
    r = edgespec("export", str(tiny_gguf), "--to", "onnx", "--quant", "int8",
                 "--draft", "early-exit:1", "-o", str(out))  # the old spelling still works
    assert r.returncode == 0, r.stderr
    assert "export --draft is deprecated; use --with-draft" in r.stderr
    assert (out / "model.onnx").is_file() and (out / "exit1.onnx").is_file()
    run = edgespec("run", str(out), "--raw", "-p", "Hello", "-n", "4", "--quiet")  # the dir
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("args, message", [
    (("--to", "tflite"), "unknown export format 'tflite'"),
    (("--to", "onnx", "--quant", "q4_0"), "onnx exports take --quant"),
    (("--to", "gguf", "--quant", "q2_k"), "q2_k"),
    (("--to", "gguf", "--with-draft", "early-exit:7"), "needs an exit layer in 1..1"),
    (("--to", "gguf", "--with-draft", "medusa"), "unknown draft 'medusa'"),
    (("--draft", "quant", "--with-draft", "quant"), "give the draft once, with --with-draft"),
])
def test_bad_options_fail_in_one_line(tiny_gguf: Path, tmp_path: Path, args: tuple,
                                      message: str) -> None:
    r = edgespec("export", str(tiny_gguf), *args, "-o", str(tmp_path / "out.gguf"))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_folder_without_config_and_existing_output(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "hf").mkdir()
    r = edgespec("export", str(tmp_path / "hf"), "--to", "gguf", "-o", str(tmp_path / "a.gguf"))
    assert r.returncode == 2 and "config.json" in r.stderr
    existing = tmp_path / "b.gguf"
    existing.write_bytes(b"keep me")
    r = edgespec("export", str(tiny_gguf), "--to", "gguf", "-o", str(existing))
    assert r.returncode == 2 and "--force" in r.stderr
    assert existing.read_bytes() == b"keep me"


def test_ctrl_c_leaves_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    """SIGINT while the export runs: exit 130 and no file or temporary left behind."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "edgespec", "export",
                             str(tiny_gguf),
                             "--to", "onnx", "--quant", "int4", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the temporary directory appears once the export has started
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the export finished before the interrupt arrived")
    assert proc.returncode == 130 and "interrupted" in err, err  # faulthandler: any abort's stacks
    assert list(tmp_path.iterdir()) == []


def _started(proc: subprocess.Popen, folder: Path) -> float:
    """Wait until ``proc`` has created its temporary output in ``folder``; the time it took."""
    start = time.monotonic()
    while not list(folder.glob(".model.gguf.*")) and proc.poll() is None:
        time.sleep(0.005)
    return time.monotonic() - start


def test_sigkill_at_any_moment_leaves_the_old_file_or_the_new_one(tiny_gguf: Path,
                                                                   tmp_path: Path) -> None:
    """SIGKILL (no handler runs) at 12 moments spread over the writing of an export that
    replaces an existing output: the output path always holds a whole model, old or new,
    and the next export removes the killed ones' temporaries."""
    out = tmp_path / "model.gguf"
    args = [sys.executable, "-m", "edgespec", "export", str(tiny_gguf), "--to", "gguf", "-o",
            str(out), "--force", "--quant"]
    subprocess.run([*args, "q8_0"], check=True, capture_output=True, timeout=300)
    old = out.read_bytes()
    proc = subprocess.Popen([*args, "q4_0"], stderr=subprocess.DEVNULL)
    _started(proc, tmp_path)
    start = time.monotonic()
    proc.wait(timeout=300)
    writing, fresh = time.monotonic() - start, out.read_bytes()
    outcomes = []
    for i in range(12):
        out.write_bytes(old)
        proc = subprocess.Popen([*args, "q4_0"], stderr=subprocess.DEVNULL)
        _started(proc, tmp_path)
        time.sleep(writing * i / 11)
        proc.kill()
        proc.wait()
        now = out.read_bytes()
        assert now in (old, fresh), f"kill {i}: a partial file at the output path"
        read_gguf(out)
        outcomes.append("new" if now == fresh else "old")
    left = len(list(tmp_path.glob(".model.gguf.*")))
    subprocess.run([*args, "q4_0"], check=True, capture_output=True, timeout=300)
    assert out.read_bytes() == fresh
    assert list(tmp_path.glob(".model.gguf.*")) == [], "the next export removes leftovers"
    assert left > 0, "no kill landed while the export was writing: the test proved nothing"
    print(f"12 kills: {outcomes.count('old')} left the old file, {outcomes.count('new')} the "
          f"new one, {left} temporaries, removed by the next export")
