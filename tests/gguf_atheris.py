"""Coverage-guided GGUF fuzzing with atheris (libFuzzer), beside tests/gguf_fuzz.py.

There the mutations know the format; here the input *is* the file: libFuzzer starts from the
tests' small Llama and keeps the byte mutations that reach new lines of the validator
(instrumented), so it finds the paths structure-aware mutation does not think of. What the
validator accepts goes to llama.cpp in the same worker process, a crash or hang is a finding.
``python -m tests.gguf_atheris -n 10000`` (``make fuzz``, where atheris installs).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["runtimes.ggufinfo"]):
    import runtimes.ggufinfo  # noqa: F401 - the validator Campaign calls, instrumented

from tests.gguf_fuzz import Campaign, NativeWorker, campaign_arguments  # noqa: E402
from tests.test_sampling import write_small_vocab_llama  # noqa: E402


def main() -> None:
    args = campaign_arguments(__doc__, seed=1)
    scratch = Path(tempfile.mkdtemp(prefix="gguf-atheris-"))
    corpus = scratch / "corpus"
    corpus.mkdir()
    seed = write_small_vocab_llama(scratch / "small.gguf")
    (corpus / "small.gguf").write_bytes(seed.read_bytes())
    worker, campaign, start = NativeWorker(), Campaign(args.findings), time.perf_counter()

    def one_input(data: bytes) -> None:
        campaign.judge(data, f"atheris input of {len(data)} bytes", worker, scratch)
        if campaign.counts["cases"] >= args.cases:  # libFuzzer's own exit skips our report
            worker.close()
            status = campaign.report(time.perf_counter() - start)
            shutil.rmtree(scratch, ignore_errors=True)  # os._exit runs no cleanup
            os._exit(status)

    atheris.Setup([sys.argv[0], f"-seed={args.seed}", f"-max_len={2 * seed.stat().st_size}",
                   "-rss_limit_mb=4096", str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
