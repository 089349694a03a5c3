"""Ctrl-C is held back while a module is being imported, then delivered.

The CLI imports its engines lazily, so Ctrl-C often lands inside an import. A KeyboardInterrupt
raised inside a C extension's initialisation can kill the interpreter instead of stopping it:
onnx's pybind11 module segfaults, onnxruntime reports "import numpy failed". A SIGINT that
lands in an import is therefore sent again a moment later, until it lands outside one.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

RETRY_S = 0.05


def install() -> None:
    """Take over SIGINT from Python's default handler (and leave anyone else's alone)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):
        retry = threading.Timer(RETRY_S, os.kill, (os.getpid(), signal.SIGINT))
        retry.daemon = True
        retry.start()
        return
    raise KeyboardInterrupt


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False
