"""Worker adapter: OpenVINO GenAI's ``LLMPipeline`` on CPU, plain or with prompt lookup
(see ``peer_edgespec`` for the adapter contract).

The model is the IR that ``optimum-cli export openvino`` made, tokenizer included. The
prompt goes through the pipeline's own tokenizer (as ``generate(text)`` would) so the
token ids can be reported; timings other than tokenization come from the library's
``perf_metrics``, which counts one entry per model inference in ``token_infer_durations``.
"""

from __future__ import annotations

import time

import openvino_genai


def version() -> str:
    return f"openvino-genai {openvino_genai.__version__}"


class Peer:
    def __init__(self, model: str, threads: int | None, stop_ids: list[int], *,
                 num_assistant_tokens: int | None = None, max_ngram_size: int = 3) -> None:
        lookup = num_assistant_tokens is not None
        properties = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if lookup:
            properties["prompt_lookup"] = True
        self.pipe = openvino_genai.LLMPipeline(model, "CPU", **properties)
        self.tokenizer = self.pipe.get_tokenizer()
        self.config = self.pipe.get_generation_config()
        self.config.do_sample = False
        self.config.stop_token_ids = set(stop_ids)
        if lookup:
            self.config.num_assistant_tokens = num_assistant_tokens
            self.config.max_ngram_size = max_ngram_size

    def generate(self, prompt: str, max_tokens: int) -> dict:
        start = time.perf_counter()
        inputs = self.tokenizer.encode(prompt)
        tokenized = time.perf_counter() - start
        self.config.max_new_tokens = max_tokens
        result = self.pipe.generate(inputs, self.config)
        e2e = time.perf_counter() - start
        metrics = result.perf_metrics
        token_ids = [int(t) for t in result.tokens[0]]
        return {
            "prompt_ids": [int(t) for t in inputs.input_ids.data[0]],
            "token_ids": token_ids, "text": self.tokenizer.decode(token_ids),
            "ttft_s": tokenized + metrics.get_ttft().mean / 1000, "e2e_s": e2e,
            "steps": len(metrics.raw_metrics.token_infer_durations) - 1, "draft_tokens": None,
        }
