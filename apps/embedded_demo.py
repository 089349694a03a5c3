"""Embedding edgespec in a desktop app: stream a reply on a worker thread, cancel it.

Run: ``.venv/bin/python apps/embedded_demo.py "Explain speculative decoding." --cancel-after 1``
The UI thread stays free while the worker streams; ``engine.cancel()`` stops generation
from any thread, which is what a Stop button calls.
"""

from __future__ import annotations

import argparse
import queue
import threading

import edgespec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--cancel-after", type=float, default=None, help="seconds")
    args = parser.parse_args()

    engine = edgespec.load()
    pieces: queue.Queue[str | None] = queue.Queue()

    def worker() -> None:
        try:
            for piece in engine.chat([{"role": "user", "content": args.prompt}], stream=True):
                pieces.put(piece)
        except edgespec.Cancelled:
            pieces.put("\n[cancelled]")
        finally:
            pieces.put(None)

    threading.Thread(target=worker, daemon=True).start()
    if args.cancel_after is not None:
        threading.Timer(args.cancel_after, engine.cancel).start()
    while (piece := pieces.get()) is not None:  # the "UI loop"
        print(piece, end="", flush=True)
    print()
    engine.close()


if __name__ == "__main__":
    main()
