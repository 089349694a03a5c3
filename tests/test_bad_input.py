"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgespec.errors import UserError
from runtimes.ggufinfo import read_gguf
from tests.tinymodel import TinyConfig, write_tiny_llama


def edgespec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec", *args], capture_output=True,
                          text=True, timeout=300)


def assert_user_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture(scope="module")
def spm_mislabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE vocabulary declared as SentencePiece ("llama"), as a bad converter
    writes it: llama.cpp aborts when it needs a byte-fallback token."""
    return write_tiny_llama(tmp_path_factory.mktemp("bad") / "spm.gguf",
                            TinyConfig(tokenizer_model="llama"))


def test_missing_model() -> None:
    assert_user_error(edgespec("run", "/no/such/model.gguf", "hi"), "not found")


def test_not_a_gguf(tmp_path: Path) -> None:
    f = tmp_path / "notes.gguf"
    f.write_text("hello")
    assert_user_error(edgespec("run", str(f), "hi"), "not a GGUF")


def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    f = tmp_path / "cut.gguf"
    f.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    assert_user_error(edgespec("run", str(f), "hi"), "truncated")


def test_header_cut_short(tmp_path: Path, tiny_gguf: Path) -> None:
    f = tmp_path / "header.gguf"
    f.write_bytes(tiny_gguf.read_bytes()[:5000])
    assert_user_error(edgespec("run", str(f), "hi"), "corrupt or truncated")


def test_tokenizer_that_would_crash_llama_cpp_is_refused(spm_mislabelled: Path) -> None:
    with pytest.raises(UserError, match="cannot encode"):
        read_gguf(spm_mislabelled)
    assert_user_error(edgespec("run", str(spm_mislabelled), "héllo"), "tokenizer")


def test_the_refused_tokenizer_really_aborts_llama_cpp(spm_mislabelled: Path) -> None:
    """Why the check exists: loaded anyway, llama.cpp kills the process while tokenizing."""
    pytest.importorskip("llama_cpp")
    code = (
        "import llama_cpp as l, sys\n"
        "m = l.llama_model_load_from_file(sys.argv[1].encode(), l.llama_model_default_params())\n"
        "v = l.llama_model_get_vocab(m)\n"
        "buf = (l.llama_token * 64)()\n"
        "l.llama_tokenize(v, 'h\\u00e9llo \\u2603'.encode(), 9, buf, 64, False, False)\n"
        "print('survived')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(spm_mislabelled)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "survived" not in r.stdout


def test_prompt_longer_than_context() -> None:
    assert_user_error(edgespec("run", "-c", "64", "--raw", "-p", "word " * 200), "context")


@pytest.mark.parametrize("args", [
    ("--tree-size", "0"), ("--tree-size", "-4"), ("-n", "-1"), ("--threads", "0"),
    ("-c", "-5"), ("--draft", "telepathy"), ("--memory-budget", "lots"),
    ("--memory-budget", "-3GB"), ("--memory-budget", "10MB"), ("--explain", "--raw"),
    ("--kv-type", "q4_0"),
])
def test_bad_numbers_and_names(args: tuple[str, str]) -> None:
    assert_user_error(edgespec("run", "-p", "hi", *args))


def test_directory_as_model(tmp_path: Path) -> None:
    assert_user_error(edgespec("run", str(tmp_path), "hi"), "directory")


def test_a_device_the_backend_cannot_use_is_named(tiny_gguf: Path) -> None:
    r = edgespec("run", str(tiny_gguf), "--device", "NPU", "-p", "Hi", "-n", "2")
    assert_user_error(r, "llama.cpp", "NPU")


def test_onnx_device_maps_to_an_installed_provider_or_lists_them() -> None:
    ort = pytest.importorskip("onnxruntime")
    from runtimes.onnxrt import provider_for

    present = ort.get_available_providers()
    assert provider_for("cpu", present) == "CPUExecutionProvider"
    assert provider_for("AUTO", ["CPUExecutionProvider"]) == "CPUExecutionProvider"
    assert provider_for("GPU", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        "CUDAExecutionProvider"
    with pytest.raises(UserError, match="present: CPUExecutionProvider"):
        provider_for("NPU", ["CPUExecutionProvider"])
    with pytest.raises(UserError, match="unknown device"):
        provider_for("TPU", present)


def test_a_folder_that_is_no_export_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    r = edgespec("run", str(tmp_path), "-p", "Hi")
    assert_user_error(r, "not an edgespec export", "edgespec export")


# -- the bad-file table: each a real file, each one line and exit 2 -------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_sampling import write_small_vocab_llama

    return write_small_vocab_llama(tmp_path_factory.mktemp("small") / "small.gguf")


def _patched(src: Path, dst: Path, offset: int, width: int, value: int) -> Path:
    data = bytearray(src.read_bytes())
    data[offset:offset + width] = value.to_bytes(width, "little")
    dst.write_bytes(data)
    return dst


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").touch()
    assert_user_error(edgespec("run", str(tmp_path / "empty.gguf"), "hi"), "not a GGUF")


@pytest.mark.parametrize("fraction", [0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.3, 0.6,
                                      0.999])
def test_truncated_anywhere(small: Path, tmp_path: Path, fraction: float) -> None:
    data = small.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])
    with pytest.raises(UserError, match="truncated|corrupt"):
        read_gguf(cut)


def test_a_file_that_fails_as_any_cut_fails_in_one_line_on_the_cli(small: Path,
                                                                   tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small.read_bytes()[:300])
    assert_user_error(edgespec("run", str(cut), "hi"), "corrupt or truncated")


def test_tensor_data_beyond_the_end_of_the_file(small: Path, tmp_path: Path) -> None:
    from tests.gguf_fuzz import Layout

    at = Layout.of(small).tensor_offsets[-1]
    bad = _patched(small, tmp_path / "beyond.gguf", at, 8, 2**20)
    assert_user_error(edgespec("run", str(bad), "hi"), "truncated", "bytes")


def test_a_huge_string_length_in_a_key(small: Path, tmp_path: Path) -> None:
    bad = _patched(small, tmp_path / "huge.gguf", 24, 8, 2**40)  # the first key's length
    assert_user_error(edgespec("run", str(bad), "hi"), "claims 1,099,511,627,776 bytes")


def test_an_unknown_tensor_type(small: Path, tmp_path: Path) -> None:
    from tests.gguf_fuzz import Layout

    bad = _patched(small, tmp_path / "type.gguf", Layout.of(small).tensor_types[0], 4, 200)
    assert_user_error(edgespec("run", str(bad), "hi"), "unknown type 200")


def test_an_architecture_llama_cpp_does_not_know(small: Path, tmp_path: Path) -> None:
    import gguf

    from tests.test_reference_loading import requantize

    bad = requantize(small, tmp_path / "florp.gguf", gguf.GGMLQuantizationType.F32, arch="florp")
    assert_user_error(edgespec("run", str(bad), "hi"), "unknown model architecture", "florp")


def test_a_prompt_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_bytes(b"caf\xe9 \xff\xfe")
    r = edgespec("run", "-f", str(tmp_path / "prompt.txt"))
    assert_user_error(r, "cannot read prompt file", "utf-8")


def test_check_says_ok_or_why(small: Path, tmp_path: Path) -> None:
    ok = edgespec("check", str(small))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ") and "17 tokens" in ok.stdout
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(small.read_bytes()[:300])
    assert_user_error(edgespec("check", str(cut)), "corrupt or truncated")
    assert_user_error(edgespec("check", str(tmp_path / "none.gguf")), "not found")


def test_an_output_path_that_cannot_be_written(small: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("keep")
    r = edgespec("export", str(small), "--to", "gguf", "-o", str(tmp_path / "afile" / "m.gguf"))
    assert_user_error(r, "cannot write", "choose another output path")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert (tmp_path / "afile").read_text() == "keep"


def _file_size_limit(size: int):
    """For a child process: files may not grow past ``size`` bytes, so a write beyond fails
    with EFBIG (SIGXFSZ ignored) as one on a full disk fails with ENOSPC."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


@pytest.mark.parametrize(("to", "name"), [("gguf", "m.gguf"), ("onnx", "m"), ("openvino", "m")])
def test_an_export_whose_writes_fail_midway_leaves_nothing(small: Path, tmp_path: Path, to: str,
                                                           name: str) -> None:
    """The writes of each exporter's writer (llama.cpp's quantizer, Python's, OpenVINO's)
    fail once the output passes 8 kB: one line, exit 2, no file or temporary left."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "edgespec", "export", str(small), "--to", to,
                        "-o", str(out / name)], capture_output=True, text=True, timeout=300,
                       preexec_fn=_file_size_limit(8000))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing ") and "nothing was written" in last, r.stderr
    assert list(out.iterdir()) == []


def test_a_quantizer_failure_that_is_no_write_failure_says_so(small: Path, tmp_path: Path) -> None:
    """llama.cpp's quantizer refusing its input is not a full disk: no advice to free space."""
    import gguf

    from exporters.gguf import quantize_gguf
    from tests.test_reference_loading import requantize

    bad = requantize(small, tmp_path / "florp.gguf", gguf.GGMLQuantizationType.F32, arch="florp")
    with pytest.raises(UserError, match="cannot quantize florp.gguf to q8_0: .*florp") as e:
        quantize_gguf(bad, tmp_path / "out.gguf", "q8_0")
    assert "free some space" not in str(e.value)
