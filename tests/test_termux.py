"""The Termux demo, on Linux: it runs without what does not install on a phone (torch,
tokenizers, ONNX Runtime, OpenVINO), plans within a budget from free memory, and its installer
builds llama.cpp the way the Makefile does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "apps" / "termux" / "edgespec_termux.py"
INSTALL = ROOT / "apps" / "termux" / "install.sh"
# a module set to None in sys.modules cannot be imported: what a phone lacks
WITHOUT = ("import runpy, sys\n"
           "for name in ('torch', 'tokenizers', 'onnxruntime', 'openvino', 'transformers'):\n"
           "    sys.modules[name] = None\n"
           "sys.argv = sys.argv[1:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def demo(*args: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, str(DEMO), *args], input=script,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_demo_chats_with_a_status_line_without_phone_unfriendly_packages() -> None:
    r = demo(script="Name a planet.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "context 8192" in r.stderr and "MiB planned" in r.stderr, r.stderr
    answer, status = r.stdout.strip().splitlines()[-2:]
    assert answer and status.startswith("[") and "tok/s" in status and "MiB]" in status
    peak, budget = (int(x) for x in status.rsplit("·", 1)[1].strip(" []MiB").split(" of "))
    assert peak <= budget, status


def test_a_budget_below_the_model_is_refused_in_one_line() -> None:
    r = demo("--share", "0.000001", script="")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "the least is" in r.stderr, r.stderr


def test_the_installer_is_valid_bash_and_builds_as_the_makefile_does() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)
    text = INSTALL.read_text()
    assert "UNTESTED ON A PHONE" in text
    version = subprocess.run(["sed", "-n", r"s/^LLAMA_CPP *:= *//p", str(ROOT / "Makefile")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert (ROOT / "runtimes" / "patches" /
            f"llama-cpp-python-{version}-batched-dot.patch").is_file()
    for needed in ("LLAMA_CMAKE", "git -C", "apply -p1", "--no-deps -e"):
        assert needed in text
