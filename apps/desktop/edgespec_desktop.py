"""A desktop chat window on the embedded API: Tk from the standard library, no other GUI kit.

Tk is not thread-safe, so the model loads and generates on one engine thread that hands
text to the window through a queue the window polls; the window never waits on the engine.
One thread, not one per answer: llama.cpp's OpenMP gives every calling thread its own
team, and with more threads than cores libgomp stops spinning at barriers (half speed).
Stop (or Escape) sets the answer's cancel event. The status line shows live tokens/s,
tokens per step and this process's memory. Events also go to stdout, one line each, so a
script or a test can follow the window from outside.

    python apps/desktop/edgespec_desktop.py [MODEL.gguf]
"""

from __future__ import annotations

import queue
import sys
import threading
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk

import edgespec
from edgespec.engine import peak_rss_bytes
from edgespec.errors import Cancelled, UserError

POLL_MS = 30


class ChatWindow:
    def __init__(self, root: tk.Tk, model: Path | None) -> None:
        self.root, self.engine = root, None
        self.messages: list[dict] = []
        self.events: queue.Queue = queue.Queue()  # engine thread → window
        self.jobs: queue.Queue = queue.Queue()  # window → engine thread
        threading.Thread(target=self._engine_thread, daemon=True).start()
        self.cancel: threading.Event | None = None
        self.live: edgespec.GenerationStats | None = None  # the answer's, filled as it runs
        self.pieces = 0
        root.title("edgespec chat")
        root.geometry("720x480")
        bar = ttk.Frame(root)
        bar.pack(fill="x", padx=6, pady=4)
        self.model_label = ttk.Label(bar, text="no model")
        self.model_label.pack(side="left")
        ttk.Button(bar, text="Open model…", command=self.pick_model).pack(side="right")
        self.status = ttk.Label(root, text="", anchor="w")  # packed before the text so a
        self.status.pack(side="bottom", fill="x", padx=6, pady=(0, 4))  # small window keeps it
        entry_bar = ttk.Frame(root)
        entry_bar.pack(side="bottom", fill="x", padx=6, pady=4)
        self.text = tk.Text(root, wrap="word", state="disabled", height=10)
        self.text.pack(fill="both", expand=True, padx=6)
        self.entry = ttk.Entry(entry_bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda _: self.send())
        self.send_button = ttk.Button(entry_bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=4)
        self.stop_button = ttk.Button(entry_bar, text="Stop", command=self.stop, state="disabled")
        self.stop_button.pack(side="left")
        root.bind("<Escape>", lambda _: self.stop())
        root.bind("<Control-q>", lambda _: root.destroy())
        self.entry.focus_set()
        self.load(model)
        root.after(POLL_MS, self.poll)

    # -- actions (Tk thread) ---------------------------------------------------------------

    def pick_model(self) -> None:
        path = filedialog.askopenfilename(title="Choose a model",
                                          filetypes=[("GGUF models", "*.gguf"), ("all", "*")])
        if path:
            self.load(Path(path))

    def load(self, model: Path | None) -> None:
        self.model_label.config(text="loading…")
        self.jobs.put(lambda: self._load(model))

    def send(self) -> None:
        text = self.entry.get().strip()
        if not text or self.engine is None or self.cancel is not None:
            return
        self.entry.delete(0, "end")
        self.messages.append({"role": "user", "content": text})
        self._append(f"\nYou: {text}\nModel: ")
        self.cancel, self.pieces = threading.Event(), 0
        self.stop_button.config(state="normal")
        self.send_button.config(state="disabled")
        messages, cancel = list(self.messages), self.cancel
        self.jobs.put(lambda: self._answer(messages, cancel))
        log("answer started")

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    def poll(self) -> None:
        """Apply what the workers sent since the last poll."""
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                break
            getattr(self, f"_on_{kind}")(value)
        live = self.live
        if self.cancel is not None and live is not None and live.new_tokens > 1:
            self.status.config(text=f"{live.tokens_per_s:.0f} tok/s · {live.accepted_per_step:.2f}"
                                    f" tokens/step so far · memory {_memory()}")
        self.root.after(POLL_MS, self.poll)

    # -- events from the workers (applied on the Tk thread) --------------------------------

    def _on_loaded(self, engine: edgespec.Engine) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.messages = engine, []
        self.model_label.config(text=Path(engine.model).name if engine.model else "model")
        self.status.config(text=f"ready · memory {_memory()}")
        log(f"loaded {engine.model}")

    def _on_live(self, stats: edgespec.GenerationStats) -> None:
        self.live = stats

    def _on_piece(self, piece: str) -> None:
        self.pieces += 1
        if self.pieces == 1:
            log("answer streaming")
        self._append(piece)

    def _on_done(self, result) -> None:
        said = result.text if result is not None else self._current_answer()
        self.messages.append({"role": "assistant", "content": said})
        if result is None:
            self._append(" [stopped]")
            log("answer stopped")
        else:
            s = result.stats
            self.status.config(text=f"{s.tokens_per_s:.1f} tok/s · {s.accepted_per_step:.2f} "
                                    f"tokens/step · {s.draft_nodes_per_step:.1f} draft nodes/step"
                                    f" · memory {_memory()}")
            log(f"answer finished: {s.new_tokens} tokens")
        self._append("\n")
        self.cancel = None
        self.stop_button.config(state="disabled")
        self.send_button.config(state="normal")

    def _on_error(self, message: str) -> None:
        self.status.config(text=f"error: {message}")
        if self.engine is None:
            self.model_label.config(text="no model")
        log(f"error: {message}")

    # -- the engine thread -----------------------------------------------------------------

    def _engine_thread(self) -> None:
        while True:
            self.jobs.get()()

    def _load(self, model: Path | None) -> None:
        try:
            self.events.put(("loaded", edgespec.load(model)))
        except UserError as e:
            self.events.put(("error", str(e)))

    def _answer(self, messages: list[dict], cancel: threading.Event) -> None:
        pieces = self.engine.chat(messages, stream=True, cancel=cancel, max_tokens=512)
        self.events.put(("live", pieces.stats))
        try:
            for piece in pieces:
                self.events.put(("piece", piece))
        except Cancelled:
            pass
        except UserError as e:
            self.events.put(("error", str(e)))
        self.events.put(("done", pieces.result))

    # -- helpers ---------------------------------------------------------------------------

    def _append(self, text: str) -> None:
        self.text.config(state="normal")
        self.text.insert("end", text)
        self.text.see("end")
        self.text.config(state="disabled")

    def _current_answer(self) -> str:
        body = self.text.get("1.0", "end-1c")
        return body.rsplit("Model: ", 1)[-1]


def _memory() -> str:
    return f"{peak_rss_bytes() / 2**20:.0f} MiB peak"


def log(event: str) -> None:
    print(f"edgespec-desktop: {event}", flush=True)


def main() -> None:
    root = tk.Tk()
    ChatWindow(root, Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    root.mainloop()


if __name__ == "__main__":
    main()
