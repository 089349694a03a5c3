"""Shared fixtures: real model files (generated tiny ones and the packaged SmolLM2)."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from edgespec.models import default_model_path
from tests.slot_engines import SLOT_ENGINES
from tests.tinymodel import TinyConfig, write_tiny_llama

DEV_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "prompts" / "dev.jsonl"


def pytest_configure() -> None:
    """Children get Ctrl-C as a terminal gives it. A runner started in the background by a
    non-interactive shell ignores SIGINT, every child inherits that, and the tests that
    press Ctrl-C would see it ignored; a handler, unlike SIG_IGN, is reset by exec."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, F16 weights (~14 MB)."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-f16.gguf", TinyConfig())


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def dev_prompts() -> list[dict]:
    if not DEV_PROMPTS.is_file():
        pytest.skip(f"development prompts not found at {DEV_PROMPTS}")
    return [json.loads(line) for line in DEV_PROMPTS.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def slot_export(tiny_gguf: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``slot_export(engine, quant="fp32")``: the tiny model exported for "onnx" or "openvino".

    Each export is made on first use and kept for the session, so the backend and exporter
    tests of both engines share them; the options are ``SLOT_ENGINES[engine].exports[quant]``.
    """
    made: dict[tuple[str, str], Path] = {}

    def get(engine: str, quant: str = "fp32") -> Path:
        if (engine, quant) not in made:
            spec = SLOT_ENGINES[engine]
            out = tmp_path_factory.mktemp(f"{engine}-exports") / quant
            made[engine, quant] = spec.export(tiny_gguf, out, **spec.exports[quant])
        return made[engine, quant]

    return get


@pytest.fixture(scope="session")
def smollm_exports(smollm_path: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``smollm_exports(engine)``: SmolLM2 for "onnx" (fp32: the Q4_1 weights dequantized)
    or "openvino" (fp16 IR from that ONNX export), each made on first use."""
    made: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in made:
            pytest.importorskip("onnx")
            from exporters.onnx import export_onnx

            out = tmp_path_factory.mktemp("smollm-exports")
            made["onnx"] = made.get("onnx") or export_onnx(smollm_path, out / "onnx")
            if engine == "openvino":
                pytest.importorskip("openvino")
                from exporters.openvino import export_openvino

                made[engine] = export_openvino(made["onnx"], out / "ov", quant="fp16")
        return made[engine]

    return get
