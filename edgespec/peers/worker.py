"""A benchmark worker: one engine, loaded once, answering generation requests as JSON lines.

Peers whose dependencies conflict with edgespec's run in their own virtualenvs, so this
script imports nothing from edgespec: it runs under any Python, and the engine adapter is a
sibling module ``peer_<name>.py`` (found because Python puts this script's folder first on
``sys.path``). A worker per configuration (and repetition) pays model loading once and
measures each prompt as one request, interleaved with the other configurations' workers.

Protocol: ``worker.py NAME OPTIONS_JSON``. The worker answers ``{"ready": true, "version"}``
(or ``{"error"}``) once loaded, then one line per request line ``{"prompt", "max_tokens"}``:
the adapter's result plus the process's peak RSS. A request's ``"op"`` names another
adapter method to call with its other fields (``verify_cost`` on edgespec). stdout carries
only the protocol; whatever an engine prints goes to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import traceback
from typing import IO


def _protocol_stream() -> IO[str]:
    """A private copy of stdout for the protocol; fd 1 itself is pointed at stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _send(out: IO[str], message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _error(e: BaseException) -> dict:
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"}


def _peak_rss_bytes() -> int:
    """Peak RSS of this process image: ``VmHWM``, since ``ru_maxrss`` survives ``exec``
    and would report the bench's own peak (as edgespec.engine.peak_rss_bytes does)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    out = _protocol_stream()
    name, options = sys.argv[1], json.loads(sys.argv[2])
    try:
        adapter = importlib.import_module(f"peer_{name}")
        engine = adapter.Peer(**options)
    except Exception as e:  # noqa: BLE001 - the parent reports any load failure as a skip
        _send(out, _error(e))
        return 1
    _send(out, {"ready": True, "version": adapter.version()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = getattr(engine, request.pop("op", "generate"))(**request)
            result["peak_rss_bytes"] = _peak_rss_bytes()
        except Exception as e:  # noqa: BLE001 - one failed prompt must not end the run
            result = _error(e)
        _send(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
