"""The native half of tests/gguf_fuzz.py: llama.cpp loads each file named on stdin.

One line in, one verdict out ("ok" or "error"). It may crash or hang on a hostile file:
that is what the fuzzer looks for, so it runs alone in this process, its memory capped
so that a file claiming huge tensors fails an allocation instead of exhausting the machine.
"""

import ctypes
import os
import resource
import sys

os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml's abort handler would attach gdb
verdicts = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # whatever native code prints goes to stderr, not into the verdicts

import llama_cpp as llm  # noqa: E402

resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))
_quiet = llm.llama_log_callback(lambda level, text, data: None)
llm.llama_log_set(_quiet, ctypes.c_void_p(0))
TEXT = "Hello wörld ☃ <|im_end|> 123".encode()


def check(path: bytes) -> str:
    params = llm.llama_model_default_params()
    params.use_extra_bufts = False
    model = llm.llama_model_load_from_file(path, params)
    if not model:
        return "error"
    try:
        vocab = llm.llama_model_get_vocab(model)
        ids = (llm.llama_token * 256)()
        n = llm.llama_tokenize(vocab, TEXT, len(TEXT), ids, 256, True, True)
        cparams = llm.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_threads = 64, 16, 1
        ctx = llm.llama_init_from_model(model, cparams)
        if not ctx:
            return "error"
        try:
            batch = llm.llama_batch_get_one(ids, max(1, min(n, 8)))
            return "ok" if llm.llama_decode(ctx, batch) == 0 else "error"
        finally:
            llm.llama_free(ctx)
    finally:
        llm.llama_model_free(model)


for line in sys.stdin:
    print(check(line.strip().encode()), file=verdicts)
