"""``edgespec chat`` driven as a script would: answers, slash commands, Ctrl-C that stops one
answer and keeps the chat, and a conversation longer than the context."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform == "win32", reason="signals")]


def chat(*args: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec", "chat", *args], input=script,
                          capture_output=True, text=True, timeout=300)


def test_a_scripted_conversation_with_commands() -> None:
    r = chat("-n", "24", script="Name one primary color.\n/stats\n/reset\n/stats\n"
                               "Say hello in French.\n/nonsense\n/exit\nNever answered.\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    print(r.stdout)  # the transcript
    assert lines[0].strip() and "tok/s" in lines[1] and "tokens/step" in lines[1]
    assert lines[2] == "(conversation cleared)"
    assert "tok/s" in lines[3]  # the last answer's stats survive a reset
    assert lines[4].strip() and lines[5].startswith("unknown command /nonsense")
    assert len(lines) == 6, "nothing after /exit is answered"


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "edgespec", "chat", "-n", "2000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("Write a very long story about a dragon and a knight.\n")
    proc.stdin.flush()
    proc.stdout.read(8)  # the answer has started
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    out, err = proc.communicate("Name one primary color.\n/exit\n", timeout=120)
    assert proc.returncode == 0, err
    first, _, rest = out.partition(" [stopped]\n")
    assert rest.strip(), f"no answer after the stopped one: {out!r}"
    assert "Traceback" not in err


def test_a_conversation_longer_than_the_context_drops_its_oldest_turns() -> None:
    question = "Describe the history of the number zero in a few sentences. " * 3
    r = chat("-c", "256", "-n", "48", script=f"{question}\n" * 5 + "/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("were dropped to fit the context)") >= 2
    assert "Traceback" not in r.stderr and "error" not in r.stderr


def test_the_chat_stays_within_its_memory_budget() -> None:
    r = chat("--memory-budget", "240MB", "-n", "32",
             script="Name one primary color.\n/stats\n/exit\n")
    assert r.returncode == 0, r.stderr
    peak_mib = float(r.stdout.split("peak RSS ")[1].split(" MiB")[0])
    assert peak_mib * 2**20 < 240e6, r.stdout


def test_a_budget_below_the_least_is_refused_in_one_line() -> None:
    r = chat("--memory-budget", "100MB", script="hi\n")
    assert r.returncode == 2 and "the least is" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
