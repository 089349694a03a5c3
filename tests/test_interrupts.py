"""Ctrl-C inside an import is delivered after the import, not inside it (where a native
module's initialisation can crash on it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, time
from edgespec import interrupts
interrupts.install()
sys.path.insert(0, sys.argv[1])
try:
    import interrupted_module
    time.sleep(5)
except KeyboardInterrupt:
    print("stopped after", interrupted_module.__name__ if "interrupted_module" in globals()
          else "nothing")
"""

MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGINT)
for _ in range(20):
    time.sleep(0.01)  # bytecode keeps running: the interrupt had its chances to land here
print("imported whole")
"""


def test_ctrl_c_in_an_import_lands_after_it(tmp_path: Path) -> None:
    (tmp_path / "interrupted_module.py").write_text(MODULE)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["imported whole", "stopped after interrupted_module"]


def test_someone_elses_handler_is_kept() -> None:
    code = ("import signal; from edgespec import interrupts; "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); interrupts.install(); "
            "print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "True", r.stderr
