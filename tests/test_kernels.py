"""llama.cpp's batched dot kernels are bit-identical to one column at a time, on every CPU family.

tests/kernels/batched_dot.c multiplies each weight type the models use by 1..16 (and up to 63)
columns in one call and compares every value with the column alone, with rows of an even and
(for 32-blocks) an odd number of blocks. Lossless speculative decoding rests on this: a draft
tree verified in one batch must give plain decoding's logits.
It runs against the installed wheel (this CPU, e.g. AVX-512), and against the kernels `make
kernels` builds from the same patched source for the CPUs users have and this machine is not:
x86 with AVX2 only, and aarch64 with NEON, +dotprod and +i8mm, run under qemu-user (exactness
only: qemu says nothing about speed).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).with_name("kernels") / "batched_dot.c"
KERNELS = Path(sys.prefix) / "kernels"
TYPES = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_K", "q5_K", "q6_K", "f16",
         # rows of an odd number of 32-blocks (kernels' tails), and f16 leftovers
         "q4_0/odd", "q4_1/odd", "q5_0/odd", "q8_0/odd", "f16/odd")
COUNTS = (*range(1, 17), 24, 32, 48, 63)
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max"]


def _build(variant: str) -> tuple[list[str], Path, Path]:
    """(compiler and runner prefix, include dir, lib dir) of one kernel build, or a skip."""
    if variant == "native":
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None:
            pytest.skip("llama-cpp-python not installed")
        package = Path(spec.origin).parent
        return ["cc"], package.parent / "include", package / "lib"
    if not (KERNELS / variant).is_dir():
        pytest.skip(f"no {variant} kernels: `make kernels` builds them")
    if variant == "x86-avx2" and " avx2 " not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2")
    if variant.startswith("arm-"):
        if not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")):
            pytest.skip("needs gcc-aarch64-linux-gnu and qemu-user")
        return ["aarch64-linux-gnu-gcc", *QEMU], KERNELS / "include", KERNELS / variant
    return ["cc"], KERNELS / "include", KERNELS / variant


@pytest.mark.parametrize("variant", ["native", "x86-avx2", "arm-neon", "arm-dotprod", "arm-i8mm"])
def test_every_batched_count_is_bit_identical_to_one_column(variant: str, tmp_path: Path) -> None:
    (compiler, *runner), include, lib = _build(variant)
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler}")
    exe = tmp_path / "batched_dot"
    subprocess.run([compiler, "-O2", "-Wall", "-Werror", "-o", str(exe), str(HARNESS),
                    f"-I{include}", f"-L{lib}", "-lggml", "-lggml-base", "-lggml-cpu",
                    f"-Wl,-rpath,{lib}"], check=True)
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    verdicts = {tuple(line.split()[:2]): line for line in run.stdout.splitlines()}
    assert set(verdicts) == {(t, str(n)) for t in TYPES for n in COUNTS}, run.stdout + run.stderr
    differing = [line for line in verdicts.values() if line.split()[2] != "exact"]
    assert not differing and run.returncode == 0, "\n".join(differing) + run.stderr
