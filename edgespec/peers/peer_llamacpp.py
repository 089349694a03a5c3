"""Worker adapter: llama-cpp-python's ``Llama.create_completion``, plain or with its
``LlamaPromptLookupDecoding`` draft model (see ``peer_edgespec`` for the adapter contract).

``create_completion`` returns text only, so a subclass records what the library itself
does — every token it samples (with the time of the first) and every ``eval`` call — to
give token ids, time to first token and model calls per step without changing its path.
Prompt lookup needs ``logits_all=True``: without it llama-cpp-python reads logits of draft
positions that were never computed and crashes.
"""

from __future__ import annotations

import time

import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding


def version() -> str:
    return f"llama-cpp-python {llama_cpp.__version__}"


class _RecordingLlama(llama_cpp.Llama):
    """A ``Llama`` that notes sampled tokens and eval calls of the current request."""

    def start(self) -> None:
        self.sampled: list[int] = []
        self.first_token_at = 0.0
        self.eval_sizes: list[int] = []

    def eval(self, tokens) -> None:  # noqa: ANN001 - llama-cpp-python's own signature
        self.eval_sizes.append(len(tokens))
        super().eval(tokens)

    def sample(self, *args, **kwargs) -> int:
        token = super().sample(*args, **kwargs)
        if not self.sampled:
            self.first_token_at = time.perf_counter()
        self.sampled.append(int(token))
        return token


class Peer:
    def __init__(self, model: str, threads: int | None, stop_ids: list[int], *, ctx: int,
                 num_pred_tokens: int | None = None, max_ngram_size: int = 2) -> None:
        lookup = num_pred_tokens is not None
        draft = (LlamaPromptLookupDecoding(max_ngram_size=max_ngram_size,
                                           num_pred_tokens=num_pred_tokens) if lookup else None)
        self.llm = _RecordingLlama(model, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                                   draft_model=draft, logits_all=lookup, verbose=False)

    def generate(self, prompt: str, max_tokens: int) -> dict:
        self.llm.start()
        start = time.perf_counter()
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        e2e = time.perf_counter() - start
        n_prompt, n_new = out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]
        # the sampled token that ended the completion (EOS) is not in completion_tokens
        token_ids = self.llm.sampled[: n_new + 1]
        decode_evals = self.llm.eval_sizes[1:]  # the first eval is the (uncached) prompt
        return {
            "prompt_ids": [int(t) for t in self.llm.input_ids[:n_prompt]],
            "token_ids": token_ids, "text": out["choices"][0]["text"],
            "ttft_s": self.llm.first_token_at - start, "e2e_s": e2e,
            "steps": len(decode_evals), "draft_tokens": sum(n - 1 for n in decode_evals),
        }
