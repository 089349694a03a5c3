"""The benchmark's side of a worker: start it, send prompts, read results (JSON lines)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from edgespec.errors import UserError
from edgespec.peers import Config

WORKER = Path(__file__).with_name("worker.py")


class WorkerError(UserError):
    """A worker failed to load or to answer; its configuration is dropped from the run."""


class Worker:
    """A long-lived worker subprocess running one configuration; its stderr goes to ``log``."""

    def __init__(self, config: Config, model: Path, *, threads: int | None,
                 stop_ids: list[int], log: Path) -> None:
        self.config, self.log = config, log
        options = {"model": str(model), "threads": threads, "stop_ids": stop_ids,
                   **config.options}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as err:
            self._proc = subprocess.Popen(
                [str(config.python), str(WORKER), config.adapter, json.dumps(options)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                encoding="utf-8")

    def wait_ready(self) -> str:
        """Block until the model is loaded; the engine's name and version."""
        return self._read()["version"]

    def generate(self, prompt: str, max_tokens: int) -> dict:
        return self.call("generate", prompt=prompt, max_tokens=max_tokens)

    def call(self, op: str, **fields: object) -> dict:
        """Ask the worker's adapter to run method ``op`` with ``fields``; its reply."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(self._failure("exited")) from None
        return self._read()

    def close(self) -> None:
        """End the worker: closing stdin ends its request loop."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _read(self) -> dict:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerError(self._failure("exited"))
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(self._failure(reply["error"]))
        return reply

    def _failure(self, what: str) -> str:
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"{self.config.label}: {what} (log {self.log}: {' | '.join(tail)})"
