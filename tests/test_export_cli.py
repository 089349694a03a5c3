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
                 "--draft", "early-exit:1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    draft = tmp_path / "model-q8.draft-exit1.gguf"
    assert {p.name for p in tmp_path.iterdir()} == {out.name, draft.name}
    assert "total" in r.stderr and draft.name in r.stderr
    meta = read_gguf(draft).metadata
    assert meta[KEY_EXIT] == 1 and meta[KEY_VOCAB] == check_same_vocab(out, draft)
    assert meta["llama.block_count"] == 1 and read_gguf(out).metadata["llama.block_count"] == 2
    run = edgespec("run", "-m", str(out), "--raw", "-p", "Hello", "-n", "4", "--quiet")
    assert run.returncode == 0, run.stderr


def test_onnx_export_directory_runs(tiny_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny-onnx"
    r = edgespec("export", str(tiny_gguf), "--to", "onnx", "--quant", "int8",
                 "--draft", "early-exit:1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.onnx").is_file() and (out / "exit1.onnx").is_file()
    run = edgespec("run", str(out), "--raw", "-p", "Hello", "-n", "4", "--quiet")  # the dir
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("args, message", [
    (("--to", "tflite"), "unknown export format 'tflite'"),
    (("--to", "onnx", "--quant", "q4_0"), "onnx exports take --quant"),
    (("--to", "gguf", "--quant", "q2_k"), "q2_k"),
    (("--to", "gguf", "--draft", "early-exit:7"), "needs an exit layer in 1..1"),
    (("--to", "gguf", "--draft", "medusa"), "unknown draft 'medusa'"),
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
    proc = subprocess.Popen([sys.executable, "-m", "edgespec", "export", str(tiny_gguf),
                             "--to", "onnx", "--quant", "int4", "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)  # the temporary directory appears once the export has started
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the export finished before the interrupt arrived")
    assert proc.returncode == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []
