"""The ``edgespec`` command: run, chat and bench, with llama.cpp's flag names where they exist.

Generated text goes to stdout as it is produced; logs and statistics go to stderr. A user
error is one line on stderr and exit code 2; Ctrl-C stops cleanly with exit code 130.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgespec import interrupts
from edgespec.api import Engine, GenerationResult, load
from edgespec.drafting import DRAFTERS
from edgespec.errors import Cancelled, UserError
from edgespec.memory import Plan, parse_size
from edgespec.models import default_model_path, path_exists

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="On-device LLM generation, faster through lossless speculative decoding.")

MODEL_SUFFIXES = (".gguf", ".onnx", ".xml")

ModelOpt = Annotated[Path | None, typer.Option("-m", "--model", help="Model file (.gguf).")]
DraftOpt = Annotated[str, typer.Option("--draft", help=f"Drafter: {'|'.join(DRAFTERS)}.")]
DraftModelOpt = Annotated[Path | None, typer.Option(
    "--draft-model", help="A smaller model of the same vocabulary to draft with (edgespec "
    "export --with-draft writes one); --draft model uses it alone, fused with lookup/recycling.")]
ThreadsOpt = Annotated[int | None, typer.Option("-t", "--threads", help="CPU threads.")]
CtxOpt = Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")]
TreeOpt = Annotated[int | None, typer.Option("--tree-size", help="Most tree nodes per step.")]
BackendOpt = Annotated[str, typer.Option("--backend",
                                         help="auto|llamacpp|onnx|openvino|reference.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="CPU|GPU|NPU|AUTO.")]
BudgetOpt = Annotated[str | None, typer.Option(
    "--memory-budget", help="Peak memory to stay under: 400MB, 1.5GiB (KB/MB/GB are powers "
    "of 10, KiB/MiB/GiB of 2) or bytes.")]


@app.callback()
def _every_command() -> None:
    interrupts.install()  # before any engine is imported (no docstring: it would be the help)

KvOpt = Annotated[str | None, typer.Option(
    "--kv-type", help="KV cache precision: f16 (default) or q8_0 (K, 23% less KV memory, "
    "output slightly changed, still exact for speculation) on llamacpp; f32 elsewhere.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _split_positionals(
    first: str | None, second: str | None, model: Path | None
) -> tuple[Path | None, str | None]:
    """``run [MODEL] [PROMPT]``: a lone positional is the model only if it looks like one."""
    if first is None:
        return model, None
    if second is not None:
        if model is not None:
            raise UserError("give the model either positionally or with -m, not both")
        return Path(first), second
    looks_like_model = first.lower().endswith(MODEL_SUFFIXES) or path_exists(first)
    if model is None and looks_like_model:
        return Path(first), None
    return model, first


def _one_model(first: str | None, model: Path | None) -> str | None:
    """``COMMAND [MODEL]`` or ``-m MODEL``: the model named, if any, but not both ways."""
    if first is not None and model is not None:
        raise UserError("give the model either positionally or with -m, not both")
    return first if model is None else str(model)


def _read_prompt(prompt: str | None, file: Path | None) -> str:
    if prompt is not None and file is not None:
        raise UserError("give the prompt either with -p or with -f, not both")
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {file}: {e}") from None
    if prompt is not None:
        return prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    raise UserError('no prompt: pass -p "…", -f FILE, or pipe text on stdin')


def _summary(result: GenerationResult) -> str:
    s = result.stats
    return (
        f"edgespec: {s.new_tokens} tokens in {s.decode_s:.2f} s = {s.tokens_per_s:.1f} tok/s "
        f"(prefill {s.prompt_tokens} tok in {s.prefill_s:.2f} s), "
        f"{s.accepted_per_step:.2f} tok/step, {s.draft_nodes_per_step:.1f} draft nodes/step, "
        f"draft={s.draft}, backend={s.backend}, "
        f"peak RSS {s.as_dict()['peak_rss_bytes'] / 2**20:.0f} MiB"
    )


def _stream(
    engine: Engine, prompt: str, quiet: bool, json_out: bool, **options
) -> GenerationResult:
    """Generate, echoing text to stdout unless JSON output was asked for."""
    pieces = engine.generate(prompt, stream=True, **options)
    try:
        for piece in pieces:
            if not json_out:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        engine.cancel()
        pieces.close()
        sys.stdout.write("\n")
        raise
    assert pieces.result is not None
    if not json_out:
        sys.stdout.write("\n")
    if not quiet:
        typer.echo(_summary(pieces.result), err=True)
    return pieces.result


@app.command()
def run(
    first: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Model file.")] = None,
    second: Annotated[str | None, typer.Argument(metavar="[PROMPT]", help="Prompt.")] = None,
    model: ModelOpt = None,
    prompt: Annotated[str | None, typer.Option("-p", "--prompt", help="Prompt text.")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Read the prompt.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="New tokens.")] = 256,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Top-p (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string.")] = None,
    draft: DraftOpt = "fused",
    draft_model: DraftModelOpt = None,
    tree_size: TreeOpt = None,
    threads: ThreadsOpt = None,
    ctx_size: CtxOpt = 4096,
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    chat: Annotated[bool | None, typer.Option("--chat/--raw", help="Chat template.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No statistics line.")] = False,
    memory_budget: BudgetOpt = None,
    kv_type: KvOpt = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Print the memory plan before generating.")] = False,
) -> None:
    """Generate a completion (a chat reply for chat models, unless --raw)."""
    try:
        model_path, positional_prompt = _split_positionals(first, second, model)
        if positional_prompt is not None and prompt is not None:
            raise UserError("give the prompt either positionally or with -p, not both")
        text = _read_prompt(positional_prompt if prompt is None else prompt, file)
        _check_numbers(max_tokens=max_tokens, tree_size=tree_size, threads=threads, temp=temp)
        if explain and memory_budget is None:
            raise UserError("--explain shows a memory plan: give --memory-budget too")
        options = dict(backend=backend, draft=draft, threads=threads, ctx=ctx_size,
                       tree_size=tree_size, device=device, memory_budget=memory_budget,
                       kv_type=kv_type, min_ctx=max_tokens + 1, draft_model=draft_model)
        with contextlib.ExitStack() as stack:
            engine = stack.enter_context(load(model_path, **options))
            use_chat = chat if chat is not None else bool(engine.backend.tokenizer.chat_template)
            if use_chat:
                text = engine.render_chat([{"role": "user", "content": text}])
            needed = len(engine.tokenize(text)) + max_tokens
            if engine.plan is not None and engine.plan.ctx < needed:
                stack.close()  # the plan must hold this prompt: plan again for its length
                engine = stack.enter_context(load(model_path, **{**options, "min_ctx": needed}))
            if explain:
                Console(stderr=True).print(plan_table(engine.plan))
            result = _stream(engine, text, quiet, json_out, max_tokens=max_tokens,
                             temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
                             stop=stop or ())
        if json_out:
            payload = {"text": result.text, "token_ids": result.token_ids,
                       "stats": result.stats.as_dict()}
            sys.stdout.write(json.dumps(payload) + "\n")
    except UserError as e:
        raise _fail(str(e)) from None
    except (KeyboardInterrupt, Cancelled):
        raise _fail("interrupted", 130) from None


@app.command("chat")
def chat_cmd(
    first: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Model file.")] = None,
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens",
                                            help="New tokens per answer.")] = 512,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
    draft: DraftOpt = "fused",
    draft_model: DraftModelOpt = None,
    threads: ThreadsOpt = None,
    ctx_size: CtxOpt = 4096,
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    kv_type: KvOpt = None,
) -> None:
    """Talk with a chat model in the terminal (/reset, /stats, /exit; Ctrl-C stops an answer)."""
    from edgespec.chat_cli import HELP, ChatSession, chat_loop

    try:
        name = _one_model(first, model)
        _check_numbers(max_tokens=max_tokens, threads=threads, temp=temp)
        if max_tokens >= ctx_size:
            raise UserError(f"-n/--max-tokens ({max_tokens}) must leave room in the context "
                            f"of {ctx_size} tokens")
        with load(name, backend=backend, draft=draft, threads=threads, ctx=ctx_size,
                  device=device, memory_budget=memory_budget, kv_type=kv_type,
                  draft_model=draft_model,
                  min_ctx=max(512, max_tokens + 128)) as engine:  # room for a question
            engine.render_chat([{"role": "user", "content": "hi"}])  # a template, or say so
            if sys.stdin.isatty():
                typer.echo(HELP, err=True)
            chat_loop(ChatSession(engine, system=system, max_tokens=max_tokens,
                                  temperature=temp, seed=seed))
    except UserError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


@app.command("export")
def export_cmd(
    src: Annotated[Path, typer.Argument(metavar="MODEL", help="GGUF file or HF folder.")],
    to: Annotated[str, typer.Option("--to", help="gguf|onnx|openvino.")] = "gguf",
    quant: Annotated[str | None, typer.Option(
        "--quant", help="gguf: f16|q8_0|q4_0|q4_k_m…; onnx/openvino: fp32|fp16|int8|int4.")] = None,
    with_draft: Annotated[str | None, typer.Option(
        "--with-draft", help="Also write a draft: early-exit:E or quant[:TYPE] (run it with "
        "--draft-model).")] = None,
    draft: Annotated[str | None, typer.Option(
        "--draft", hidden=True, help="The old spelling of --with-draft.")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Output file or directory.")] = Path(
        "model-export"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Export a model (and its draft) to GGUF, ONNX or OpenVINO IR, quantized, atomically."""
    from rich.console import Console

    from edgespec.export_cli import run_export

    try:
        if draft is not None:  # run --draft names a drafter; export's draft is a file
            if with_draft is not None:
                raise UserError("give the draft once, with --with-draft")
            typer.echo("edgespec: export --draft is deprecated; use --with-draft", err=True)
            with_draft = draft
        run_export(src, out, to=to, quant=quant, draft=with_draft, force=force,
                   console=Console(stderr=True))
    except UserError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing was written", 130) from None


def plan_table(plan: Plan) -> Table:
    """The memory plan as ``--explain`` prints it: component, bytes, why."""
    table = Table(title=f"memory plan for a budget of {plan.budget / 1e6:,.0f} MB")
    table.add_column("component")
    table.add_column("MB", justify="right")
    table.add_column("why")
    for c in plan.components:
        table.add_row(c.name, f"{c.bytes / 1e6:,.1f}", c.why)
    table.add_row("[b]total (peak)[/b]", f"[b]{plan.total / 1e6:,.1f}[/b]",
                  f"context {plan.ctx:,} tokens, "
                  + (f"trees of {plan.max_tree_nodes} nodes, drafter {plan.draft}"
                     if plan.max_tree_nodes > 1 else "plain decoding"))
    def least(size: int | None) -> str:
        return f"{size / 1e6:,.0f} MB" if size else "more than this budget"

    table.caption = (f"least budget that runs: {least(plan.minimum)}; "
                     f"that still speculates: {least(plan.speculation_minimum)}")
    return table


def _check_numbers(**values: float | None) -> None:
    """Reject negative counts and sizes before anything is loaded."""
    for name, value in values.items():
        if value is None:
            continue
        smallest = 1 if name in ("tree_size", "threads") else 0
        if value < smallest:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least {smallest} (got {value})")


@app.command()
def bench(
    model: ModelOpt = None,
    prompts: Annotated[Path, typer.Option("--prompts", help="Spec-Bench style JSONL.")] = Path(
        "../shared/prompts/dev.jsonl"),
    draft: Annotated[
        list[str] | None, typer.Option("--draft", help="Drafters to compare (default fused).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens")] = 128,
    categories: Annotated[str | None, typer.Option("--categories", help="a,b,…")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Prompts per category.")] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Interleaved repetitions.")] = 1,
    threads: ThreadsOpt = None,
    ctx_size: CtxOpt = 4096,
    tree_size: TreeOpt = None,
    backend: Annotated[str, typer.Option(
        "--backend", help="edgespec backends to run, a,b,… (auto|llamacpp|onnx|…).")] = "auto",
    peers: Annotated[str, typer.Option(
        "--peers", help="Peer engines: all, none or a,b,… (engine or engine:variant).")] = "all",
    profile: Annotated[str, typer.Option(
        "--profile", help="Speculate with the saved device profile (saved), a start-up probe "
        "(probe, label <draft>+probe) or both.")] = "saved",
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", help="Budgets a,b,… : each adds every draft under that budget "
        "(label <draft>@<budget>), with peak RSS and speed in a memory table.")] = None,
    kv_type: Annotated[str | None, typer.Option(
        "--kv-type", help="KV precisions a,b,… : each adds every draft with its KV cache in "
        "that precision (label <draft>+kv-<type>).")] = None,
    draft_model: Annotated[str | None, typer.Option(
        "--draft-model", help="Draft models a,b,… : each adds the drafts that use one "
        "(--draft model, fused) with it (label <draft>+dm-<file stem>).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for results.")] = Path("bench-out"),
) -> None:
    """edgespec's drafters and peer engines, interleaved in one run, per prompt category."""
    from edgespec.bench import BenchOptions, run_bench

    try:
        _check_numbers(max_tokens=max_tokens, tree_size=tree_size, threads=threads,
                       repeat=repeat)
        budgets = [b.strip() for b in memory_budget.split(",")] if memory_budget else []
        for b in budgets:
            parse_size(b)  # a bad one is refused now, not in a worker
        if profile not in ("saved", "probe", "both"):
            raise UserError(f"--profile must be saved, probe or both (got {profile!r})")
        draft_models = [Path(p.strip()) for p in draft_model.split(",")] if draft_model else []
        if "model" in (draft or []) and not draft_models:
            raise UserError("--draft model needs a draft model: give --draft-model PATH")
        for path in draft_models:
            if not path.is_file():
                raise UserError(f"draft model not found: {path}")
        options = BenchOptions(
            model=model, prompts=prompts, drafts=draft or ["fused"], max_tokens=max_tokens,
            categories=categories.split(",") if categories else None, limit=limit,
            repeat=repeat, threads=threads, ctx=ctx_size, tree_size=tree_size,
            backends=backend.split(","), peers=peers, profile=profile, out=out,
            budgets=budgets, kv_types=kv_type.split(",") if kv_type else [],
            draft_models=draft_models,
        )
        run_bench(options)
    except UserError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


@app.command()
def check(
    path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .gguf file or an export.")],
) -> None:
    """Check a model before any engine reads it: exit 0 and a summary, or 2 and the reason."""
    import runtimes
    from runtimes.ggufinfo import read_gguf

    try:
        if not path.exists():
            raise UserError(f"model not found: {path}")
        if path.is_dir():
            typer.echo(f"ok: {path} is an edgespec export for the {runtimes.backend_for(path)} "
                       "backend")
            return
        info = read_gguf(path)
    except UserError as e:
        raise _fail(str(e)) from None
    types = sorted({t.name for _, t, _ in info.tensors.values()})
    typer.echo(f"ok: {path}: {info.architecture}, {info.arch_value('block_count', '?')} layers, "
               f"{len(info.tensors)} tensors ({', '.join(types)}), {len(info.tokens)} tokens "
               f"({info.metadata.get('tokenizer.ggml.model')}), trained context "
               f"{info.arch_value('context_length', '?')}, {path.stat().st_size / 1e6:,.1f} MB")


@app.command()
def profile(
    first: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Model file.")] = None,
    model: ModelOpt = None,
    backend: Annotated[str | None, typer.Option(
        "--backend", help="Backends to measure, a,b,… (default: every one installed).")] = None,
    threads: Annotated[str | None, typer.Option(
        "-t", "--threads", help="Thread counts, a,b,… (default: 1 and the physical cores).")
    ] = None,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size",
                                          help="Context the backends are loaded with.")] = 4096,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the cost curves.")] = None,
) -> None:
    """What this device is and what verifying 1-64 tokens costs on it, saved for later loads."""
    from rich.console import Console

    from edgespec.models import resolve_model
    from edgespec.profile_cli import installed_backends, plot_curves, run_profile, show
    from runtimes.base import default_threads

    try:
        path = resolve_model(_one_model(first, model))
        counts = sorted({1, default_threads()}) if threads is None else _counts(threads)
        if ctx_size < 512:
            raise UserError(f"-c/--ctx-size must be at least 512 to probe 300 cached tokens "
                            f"(got {ctx_size})")
        names = backend.split(",") if backend else installed_backends(path)
        report = run_profile(path, names, counts, ctx_size)
        if plot is not None:
            plot_curves(report, plot)
    except UserError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    if json_out:
        typer.echo(json.dumps(report, indent=1))
    else:
        show(report, Console())


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise UserError(f"--threads takes counts like 1,2 (got {text!r})") from None
    if counts[0] < 1:
        raise UserError(f"thread counts must be at least 1 (got {text!r})")
    return counts


@app.command()
def serve(
    first: Annotated[str | None, typer.Argument(metavar="[MODEL]", help="Model file.")] = None,
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    queue: Annotated[int, typer.Option("--queue", help="Most requests waiting.")] = 8,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", help="Seconds a request may take, queueing included (504 "
        "beyond).")] = 600.0,
    max_tokens_cap: Annotated[int | None, typer.Option(
        "--max-tokens-cap", help="Largest max_tokens a request may ask (default: -c).")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="EDGESPEC_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    draft: DraftOpt = "fused",
    draft_model: DraftModelOpt = None,
    tree_size: TreeOpt = None,
    threads: ThreadsOpt = None,
    ctx_size: CtxOpt = 4096,
    backend: BackendOpt = "auto",
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    kv_type: KvOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/…)."""
    try:
        from edgespec import server
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise _fail("edgespec serve needs FastAPI and uvicorn: install edgespec[server]"
                    ) from None
    try:
        name = _one_model(first, model)
        _check_numbers(queue=queue, tree_size=tree_size, threads=threads)
        if max_tokens_cap is not None and max_tokens_cap < 1:
            raise UserError(f"--max-tokens-cap must be at least 1 (got {max_tokens_cap})")
        if not 0 < port < 65536:
            raise UserError(f"--port must be between 1 and 65535 (got {port})")
        if not request_timeout > 0:
            raise UserError(f"--request-timeout must be positive (got {request_timeout})")
        if api_key is not None and not api_key.strip():
            raise UserError("--api-key is empty")
        sock = server.bind(host, port)
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"edgespec: warning: serving on {host} with no --api-key", err=True)
        with load(name, backend=backend, draft=draft, threads=threads, ctx=ctx_size,
                  tree_size=tree_size, device=device, memory_budget=memory_budget,
                  kv_type=kv_type, draft_model=draft_model) as engine:
            model_id = Path(name).stem if name is not None else default_model_path().stem
            server.serve(engine, sock, model_id=model_id, queue_size=queue,
                         max_tokens_cap=max_tokens_cap, api_key=api_key,
                         request_timeout_s=request_timeout)
    except UserError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
