"""Hostile GGUF files: every mutant is either refused in one line or survives llama.cpp.

Structure-aware mutations (lengths and counts set huge, bytes flipped, truncation at
section boundaries, duplicated keys, wrong value and tensor types) of a small Llama and of
the packaged SmolLM2's header go through the validator in-process; the ones it accepts
are loaded, tokenized and decoded by llama.cpp in a worker process (tests/gguf_fuzz.py).
A bounded number runs here, and 300 of libFuzzer's coverage-guided mutants
(tests/gguf_atheris.py); `make fuzz` runs 10,000 of each.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgespec.errors import UserError
from edgespec.models import default_model_path
from exporters.gguf import copy_gguf
from runtimes.ggufinfo import read_gguf
from tests.gguf_fuzz import Campaign, Layout, NativeWorker, bases
from tests.test_sampling import write_small_vocab_llama

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed")


class HypothesisChoose:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def pick(self, options: list):
        return self.data.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


@pytest.fixture(scope="module")
def fuzzing(tmp_path_factory: pytest.TempPathFactory):
    scratch = tmp_path_factory.mktemp("fuzz")
    worker = NativeWorker()
    yield bases(scratch), worker, Campaign(scratch / "findings"), scratch
    worker.close()


# derandomized: the same 150 mutants every run, so CI is reproducible; `make fuzz` explores
@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutant_is_refused_in_one_line_or_survives_llama_cpp(fuzzing, data) -> None:
    targets, worker, campaign, scratch = fuzzing
    layout, size = data.draw(st.sampled_from(targets))
    verdict = campaign.case(layout, size, HypothesisChoose(data), worker, scratch)
    assert verdict in ("refused", "ok", "error"), campaign.found[-1]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_coverage_guided_mutants_are_refused_in_one_line_or_survive_llama_cpp(tmp_path) -> None:
    """300 of libFuzzer's byte mutations of the small Llama, kept where they reach new lines
    of the validator (tests/gguf_atheris.py): nothing crashes, and some reach llama.cpp."""
    run = subprocess.run([sys.executable, "-m", "tests.gguf_atheris", "-n", "300",
                          "--findings", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    counts = dict(re.findall(r"(\w+) (\d+)", run.stdout.splitlines()[-1].split(":", 1)[1]))
    assert int(counts["refused"]) > 0 and int(counts.get("ok", 0)) > 0, run.stdout


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_vocab_llama(tmp_path_factory.mktemp("small") / "small.gguf")


def _norm_as(qtype: int, name: str = "") -> Callable[[Path, Path], None]:
    """The first norm weight named ``name…`` typed F32 → ``qtype`` (I32: the same size;
    F16: half, the rest of the file unchanged), so the file is otherwise whole."""
    def make(small: Path, bad: Path) -> None:
        layout = Layout.of(small)
        norm = next(i for i, t in enumerate(gguf.GGUFReader(small).tensors)
                    if len(t.shape) == 1 and t.name.startswith(name))
        data = bytearray(small.read_bytes())
        data[layout.tensor_types[norm]:layout.tensor_types[norm] + 4] = qtype.to_bytes(4, "little")
        bad.write_bytes(data)
    return make


def _twice(small: Path, bad: Path) -> None:
    tokens = read_gguf(small).tokens
    copy_gguf(small, bad, metadata={"tokenizer.ggml.tokens": [tokens[0], *tokens[:-1]]})


@pytest.mark.parametrize(("make", "message"), [  # found by: 400 cases, then 10,000
    (lambda s, b: copy_gguf(s, b, metadata={"llama.block_count": 600}),
     "block_count = 600; llama.cpp runs at most 512 layers"),
    (lambda s, b: copy_gguf(s, b, metadata={"llama.attention.layer_norm_rms_epsilon": -1.0}),
     "layer_norm_rms_epsilon = -1.0"),
    (_norm_as(26), "has type I32, which no model file uses"),
    (_twice, "the vocabulary has the token 'a' twice"),
    # a CI run's 258th case (a layer's F16 norm, or the small model's, fails cleanly)
    (lambda s, b: _norm_as(1, "output_norm")(default_model_path(), b),
     "is a vector in F16; norms and biases are F32"),
], ids=["layers", "epsilon", "i32-norm", "token-twice", "f16-norm"])
def test_what_the_fuzzer_found_aborts_llama_cpp_and_is_refused(
        small: Path, tmp_path: Path, make, message: str) -> None:
    """Each rule the fuzzer taught: llama.cpp aborts the process on the file (GGML_ASSERT),
    and the validator refuses it first."""
    bad = tmp_path / "bad.gguf"
    make(small, bad)
    worker = NativeWorker()
    try:
        assert worker.run(bad).startswith("crash")
        assert worker.run(small) == "ok"
    finally:
        worker.close()
    with pytest.raises(UserError, match=message):
        read_gguf(bad)
