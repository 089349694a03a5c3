"""The desktop chat app in a real window under Xvfb: type a question, watch the answer
stream, stop it, and keep a screenshot (set EDGESPEC_SCREENSHOT=path.png to keep it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "desktop" / "edgespec_desktop.py"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("Xvfb") is None,
                       reason="Xvfb missing: `make install-test` installs it"),
]


@pytest.fixture
def display():
    for tool in ("xdotool", "import"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: `make install-test` installs it")
    number = next(n for n in range(90, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "800x600x24", "-nolisten",
                               "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not Path(f"/tmp/.X11-unix/X{number}").exists():
        assert time.monotonic() < deadline and server.poll() is None, "Xvfb did not start"
        time.sleep(0.05)
    yield f":{number}"
    server.terminate()
    server.wait(timeout=10)


def _wait_for(proc: subprocess.Popen, event: str, timeout: float = 120) -> list[str]:
    """Lines the app logged up to and including ``event``."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the app ended before {event!r}: {seen}")
        seen.append(line.strip())
        if event in line:
            return seen
    raise AssertionError(f"no {event!r} within {timeout} s: {seen}")


def test_type_a_question_watch_it_stream_stop_it_and_screenshot(display, smollm_path,
                                                               tmp_path: Path) -> None:
    env = {**os.environ, "DISPLAY": display}
    app = subprocess.Popen([sys.executable, str(APP), str(smollm_path)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    xdo = ["xdotool"]
    try:
        _wait_for(app, "loaded")
        window = subprocess.run([*xdo, "search", "--sync", "--name", "edgespec chat"],
                                env=env, capture_output=True, text=True, timeout=30,
                                check=True).stdout.split()[0]
        subprocess.run([*xdo, "windowfocus", "--sync", window], env=env, check=True)
        subprocess.run([*xdo, "type", "--delay", "20", "Write a long story about a dragon."],
                       env=env, check=True)
        subprocess.run([*xdo, "key", "Return"], env=env, check=True)
        _wait_for(app, "answer streaming")
        time.sleep(1.5)  # let more text stream into the window
        shot = tmp_path / "desktop.png"
        subprocess.run(["import", "-window", "root", str(shot)], env=env, check=True,
                       timeout=30)
        # press the Stop button itself: Tab from the entry skips the disabled Send button
        subprocess.run([*xdo, "key", "Tab", "space"], env=env, check=True)
        events = _wait_for(app, "answer ")
        assert events[-1].endswith("answer stopped"), events
        colours = subprocess.run(["identify", "-format", "%k", str(shot)], capture_output=True,
                                 text=True, check=True).stdout
        assert int(colours) > 20, "the screenshot shows no text"
        if os.environ.get("EDGESPEC_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EDGESPEC_SCREENSHOT"])
        subprocess.run([*xdo, "key", "ctrl+q"], env=env, check=True)
        assert app.wait(timeout=30) == 0, app.stderr.read()
    finally:
        if app.poll() is None:
            app.kill()
