"""The llama.cpp build never executes an instruction this CPU refuses.

The Makefile compiles llama.cpp for the CPU it builds on (-march=native) minus AMX, and
names the wheel after what the compiler targets there. An AMD machine cannot reproduce the
AMX crash seen on Intel, so these tests read the machine code itself: they disassemble
every library the loader may use and check it against this CPU's flags, on any CPU.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed")

AMX = re.compile(r"^(tile\w+|ldtilecfg|sttilecfg|tdp\w+|tcmm\w+)$")
LEGACY_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "66", "67", "f2", "f3"}


def _make(target: str) -> str:
    return subprocess.run(["make", "-s", "-C", str(ROOT), target], capture_output=True,
                          text=True, check=True).stdout.strip()


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("no CPU flags in /proc/cpuinfo")


def _libraries() -> list[Path]:
    import llama_cpp

    libs = sorted({p.resolve() for p in (Path(llama_cpp.__file__).parent / "lib").glob("*.so*")})
    assert libs, "llama_cpp ships no libraries to check"
    return libs


@cache
def _instruction_kinds(lib: Path) -> Counter:
    """How many instructions of ``lib`` are AMX, EVEX-encoded (AVX-512) or use ymm registers."""
    if shutil.which("objdump") is None:
        pytest.fail("objdump is missing: `make install-test` installs binutils")
    kinds: Counter = Counter()
    with subprocess.Popen(["objdump", "-d", "-w", str(lib)], stdout=subprocess.PIPE,
                          text=True) as dump:
        for line in dump.stdout:
            fields = line.split("\t")
            if len(fields) < 3 or not fields[0].strip().endswith(":"):
                continue
            code = fields[1].split()
            insn = fields[2].split(None, 1)
            if not insn:
                continue
            operands = insn[1] if len(insn) > 1 else ""
            opcode = next((b for b in code if b not in LEGACY_PREFIXES), "")
            kinds["amx"] += bool(AMX.match(insn[0]))
            kinds["evex"] += opcode == "62" or "%zmm" in operands
            kinds["ymm"] += "%ymm" in operands
    assert dump.returncode == 0, f"objdump failed on {lib}"
    return kinds


@pytest.mark.parametrize("lib", _libraries() if importlib.util.find_spec("llama_cpp") else [],
                         ids=lambda p: p.name)
def test_no_library_uses_an_instruction_this_cpu_lacks(lib: Path) -> None:
    kinds, flags = _instruction_kinds(lib), _cpu_flags()
    assert kinds["amx"] == 0, f"{lib.name} has {kinds['amx']} AMX tile instructions"
    assert kinds["evex"] == 0 or "avx512f" in flags, (
        f"{lib.name} has {kinds['evex']} AVX-512 instructions but this CPU lacks avx512f: "
        "its wheel was built on another CPU")
    assert kinds["ymm"] == 0 or "avx2" in flags, (
        f"{lib.name} has {kinds['ymm']} ymm instructions but this CPU lacks avx2")


def test_the_checker_finds_each_kind_of_instruction(tmp_path: Path) -> None:
    """A test that can fail: assembled AMX, AVX-512 (zmm, and EVEX on xmm16) and AVX2 code."""
    source = tmp_path / "kinds.s"
    source.write_text("tilezero %tmm0\nvaddps %zmm1, %zmm2, %zmm3\n"
                      "vaddps %xmm17, %xmm1, %xmm2\nvaddps %ymm1, %ymm2, %ymm3\nret\n")
    subprocess.run(["as", "-o", str(tmp_path / "kinds.o"), str(source)], check=True)
    kinds = _instruction_kinds(tmp_path / "kinds.o")
    assert (kinds["amx"], kinds["evex"], kinds["ymm"]) == (1, 2, 1), kinds


def test_the_checker_sees_the_instructions_the_build_compiles() -> None:
    """A test that can fail: the CPU kernels of an -march=native build use the widest
    vectors the CPU has, so the disassembly must find them."""
    cpu = next(lib for lib in _libraries() if lib.name.startswith("libggml-cpu"))
    flags, kinds = _cpu_flags(), _instruction_kinds(cpu)
    if "avx512f" in flags:
        assert kinds["evex"] > 1000, kinds
    if "avx2" in flags:
        assert kinds["ymm"] > 1000, kinds


def test_the_build_flags_keep_amx_out_on_an_amx_cpu() -> None:
    """What a build on Sapphire Rapids compiles, asked of the compiler on any CPU: no AMX."""
    flags = _make("llama-cflags").split()
    macros = subprocess.run(["cc", "-march=sapphirerapids", *flags, "-dM", "-E", "-x", "c",
                             "/dev/null"], capture_output=True, text=True, check=True).stdout
    assert "__AVX512F__" in macros
    assert "__AMX" not in macros, [m for m in macros.splitlines() if "__AMX" in m]


def test_the_installed_wheel_was_built_for_this_cpu() -> None:
    """The wheel's version carries the hash of what the compiler targets here: a venv or
    cache carried to another CPU fails this test instead of crashing mid-suite."""
    import llama_cpp

    assert llama_cpp.__version__ == _make("llama-version"), (
        "llama-cpp-python was built for another CPU or patch: run `make install`")
