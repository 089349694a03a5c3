"""Worker adapter: onnxruntime-genai's ``Generator`` loop, plain or with its n-gram
(prompt lookup) speculative decoding (see ``peer_edgespec`` for the adapter contract).

The model folder is what onnxruntime-genai's model builder wrote. Tokens are pulled one
``generate_next_token`` at a time, as the library's examples do; with speculation the
library verifies drafts internally and reports its model calls in
``get_speculative_stats`` (verify + re-anchor passes, plus plain fallback steps).
"""

from __future__ import annotations

import json
import time

import onnxruntime_genai as og


def version() -> str:
    return f"onnxruntime-genai {og.__version__}"


class Peer:
    def __init__(self, model: str, threads: int | None, stop_ids: list[int], *,
                 ngram_size: int | None = None, max_draft_tokens: int = 4) -> None:
        config = og.Config(model)
        if threads:
            config.overlay(json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.stop_ids = set(stop_ids)
        self.speculative = ({"ngram_size": ngram_size, "max_draft_tokens": max_draft_tokens}
                            if ngram_size else None)

    def generate(self, prompt: str, max_tokens: int) -> dict:
        start = time.perf_counter()
        prompt_ids = self.tokenizer.encode(prompt)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt_ids) + max_tokens, do_sample=False)
        if self.speculative:
            params.set_speculative_options(**self.speculative)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt_ids)
        token_ids: list[int] = []
        first = 0.0
        while not generator.is_done() and len(token_ids) < max_tokens:
            generator.generate_next_token()
            token_ids.extend(int(t) for t in generator.get_next_tokens())
            first = first or time.perf_counter()
            if token_ids[-1] in self.stop_ids:
                break
        e2e = time.perf_counter() - start
        return {
            "prompt_ids": [int(t) for t in prompt_ids],
            "token_ids": token_ids, "text": self.tokenizer.decode(token_ids),
            "ttft_s": first - start, "e2e_s": e2e, **self._steps(generator, len(token_ids)),
        }

    def _steps(self, generator: og.Generator, n_tokens: int) -> dict:
        if not self.speculative:
            return {"steps": max(n_tokens - 1, 0), "draft_tokens": 0}
        stats = generator.get_speculative_stats()
        return {"steps": int(stats["target_forward_passes"] + stats["standard_fallback_steps"]),
                "draft_tokens": int(stats["draft_tokens_evaluated"])}
