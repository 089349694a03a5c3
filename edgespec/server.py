"""``edgespec serve``: an OpenAI-compatible HTTP server for one loaded model.

An engine runs one generation at a time, so requests wait in a bounded FIFO queue (429
with Retry-After beyond it) and a single worker thread runs them off the event loop. Every
request has its own cancel event: a client that disconnects, reads its stream so slowly
that its bounded buffer fills, or outlasts the request timeout (queueing included: one
runaway request must not hold the queue), stops its own generation and nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from edgespec.api import Engine, GenerationResult
from edgespec.errors import Cancelled, UserError

MAX_BODY = 1 << 20  # bytes; far more than a prompt that fits the context
STREAM_BUFFER = 256  # text pieces a streaming client may fall behind before it is dropped
RETRY_AFTER_S = 2
REQUEST_TIMEOUT_S = 600.0  # llama.cpp's server default
FINISH = {"stop": "stop", "length": "length", "context": "length"}  # ours → OpenAI's

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: one log for the server


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- requests: the OpenAI fields we use; whatever else a client sends is ignored ------------

class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # strict: "16" is no max_tokens


class StreamOptions(_Model):
    include_usage: bool | None = False


class _Options(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None  # negative = random, as llama.cpp's -1
    stop: list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1)  # one choice per request

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> list[str] | None:
        if isinstance(v, str):
            return [v]
        if v is None or isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")


class CompletionRequest(_Options):
    prompt: str | list[int]

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
            v = v[0]  # a batch of one prompt
        if isinstance(v, str) or (isinstance(v, list) and v and all(
                isinstance(t, int) and not isinstance(t, bool) for t in v)):
            return v
        raise ValueError("must be a string, a list of one string or a list of token ids")


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, v: Any) -> str:
        """Text, or OpenAI's list of content parts when they are all text."""
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError("must be a string or a list of text parts")


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


# -- the worker: one generation at a time, in arrival order --------------------------------

@dataclass
class Job:
    """One request's generation; its output crosses from the worker thread to the event loop."""

    id: str
    kwargs: dict[str, Any]  # Engine.generate's
    stream: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    overflowed: bool = False
    timed_out: bool = False
    timer: threading.Timer | None = None  # the request timeout, from admission on

    def expire(self) -> None:
        """From the timer's thread: out of time. Answered now, even while still queued."""
        self.timed_out = True
        self.cancel.set()
        self.send(Cancelled("request timeout"))

    def send(self, item: object) -> None:
        """From the worker thread: a text piece, or the final result or exception."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancel.set()

    def _deliver(self, item: object) -> None:
        if isinstance(item, str) and self.out.qsize() >= STREAM_BUFFER:
            self.overflowed = True  # the client fell too far behind: stop generating for it
            self.cancel.set()
        elif not self.overflowed:
            self.out.put_nowait(item)


class Worker:
    """Runs jobs on one thread so that the event loop stays free to accept and stream."""

    def __init__(self, engine: Engine, queue_size: int, timeout_s: float) -> None:
        self.engine, self.queue_size, self.timeout_s = engine, queue_size, timeout_s
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # admitted and not finished: the running job plus those waiting
        self._current: Job | None = None
        self.ready = threading.Event()  # set once the warm-up (cost-curve probe included) is done
        self._thread = threading.Thread(target=self._run, name="edgespec-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)  # queued jobs' clients are disconnected by now: they are skipped
        if (job := self._current) is not None:
            job.cancel.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when ``queue_size`` requests are already waiting."""
        with self._lock:
            if self._pending > self.queue_size:
                return False
            self._pending += 1
        job.timer = threading.Timer(self.timeout_s, job.expire)
        job.timer.daemon = True
        job.timer.start()
        self._jobs.put(job)
        return True

    def _run(self) -> None:
        # Every engine call stays on this one thread, the cost-curve probe included: OpenMP
        # gives each calling thread its own team, and with more threads than cores libgomp
        # stops spinning at barriers (decoding ran at a third of in-process speed).
        try:
            self.engine.generate(" ", max_tokens=0)
        except Exception:  # each request will then fail on its own, with a 500; none hangs
            log.exception("the warm-up generation failed")
        self.ready.set()
        while (job := self._jobs.get()) is not None:
            self._current = job
            outcome = self._generate(job)
            if job.timer is not None:
                job.timer.cancel()
            self._current = None
            with self._lock:  # free the slot before answering: a client may resend at once
                self._pending -= 1
            job.send(outcome)

    def _generate(self, job: Job) -> object:
        try:
            if job.cancel.is_set():
                raise Cancelled("while queued")
            pieces = self.engine.generate(**job.kwargs, stream=True, cancel=job.cancel)
            try:
                for piece in pieces:
                    if job.stream:
                        job.send(piece)
            finally:
                pieces.close()
            return pieces.result
        except Cancelled as e:
            why = ("client too slow" if job.overflowed else "request timeout" if job.timed_out
                   else "client gone or shutdown")
            log.info("%s cancelled (%s): %s", job.id, why, e)
            return e
        except UserError as e:
            return e
        except Exception:
            log.exception("%s failed", job.id)
            return RuntimeError("generation failed")


def _outcome(item: object, job: Job) -> GenerationResult:
    """The worker's final item as a result, or the APIError to answer with."""
    if isinstance(item, GenerationResult):
        return item
    if isinstance(item, UserError):
        raise APIError(400, str(item))
    if isinstance(item, Cancelled) and job.timed_out:
        raise APIError(504, "the request took longer than this server's request timeout; "
                       "ask for fewer tokens", type="server_error", code="timeout")
    if isinstance(item, Cancelled):
        raise APIError(503, "the generation was cancelled", type="server_error")
    raise APIError(500, "the generation failed; see the server log", type="server_error")


# -- the app --------------------------------------------------------------------------------

def create_app(engine: Engine, *, model_id: str, queue_size: int = 8,
               max_tokens_cap: int | None = None, api_key: str | None = None,
               request_timeout_s: float = REQUEST_TIMEOUT_S) -> FastAPI:
    """The app serving ``engine`` as ``model_id``; its worker runs while the app does."""
    n_ctx = engine.backend.n_ctx
    cap = n_ctx if max_tokens_cap is None else max_tokens_cap
    worker = Worker(engine, queue_size, request_timeout_s)
    card = {"id": model_id, "object": "model", "created": int(time.time()),
            "owned_by": "edgespec"}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body, e.status, headers=e.headers)

    @app.exception_handler(HTTPException)  # unknown paths and methods, in OpenAI's shape too
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)  # the trace goes to the log, never to the client
    async def internal_error(request: Request, _: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, "internal error", type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"model '{name}' is not served here; this server has "
                           f"'{model_id}'", param="model", code="model_not_found")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @app.get("/health")
    async def health() -> dict:
        # the model has loaded before the app starts; the worker still warms up (and probes
        # this device's verify cost) before its first job: requests queue meanwhile, and a
        # load balancer or script waiting for 200 sees 503 as from llama.cpp's server
        if not worker.ready.is_set():
            raise APIError(503, "the model is loading; retry shortly", type="server_error",
                           code="loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok"}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict:
        check_model(name)
        return card

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        check_model(req.model)
        ids = await _in_thread(_prompt_ids, engine, req.prompt)
        return await respond(request, req, ids, req.max_tokens, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatRequest)
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = await _in_thread(lambda: engine.tokenize(engine.render_chat(messages)))
        limit = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        return await respond(request, req, ids, limit, chat=True)

    async def respond(request: Request, req: _Options, ids: list[int], max_tokens: int | None,
                      *, chat: bool) -> Response:
        """Refuse what the engine would, queue the job, then answer or stream its output."""
        what = "messages" if chat else "prompt"
        if len(ids) >= n_ctx:
            raise APIError(400, f"the {what} has {len(ids)} tokens but the context holds "
                           f"{n_ctx}", param=what, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's cap of {cap}",
                           param="max_tokens")
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": model_id}
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        seed = req.seed if req.seed is not None and req.seed >= 0 else None
        job = Job(head["id"], dict(
            prompt=ids, max_tokens=cap if max_tokens is None else max_tokens,
            temperature=temperature, top_p=req.top_p or 1.0, top_k=req.top_k or 0,
            stop=req.stop or (), seed=seed), bool(req.stream), asyncio.get_running_loop())
        if not worker.submit(job):
            raise APIError(429, f"the server is busy ({queue_size} requests waiting); retry "
                           "later", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if job.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_events(job, head, len(ids), chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        item = await _wait(job, request)
        if item is None:
            return Response(status_code=499)  # the client has gone; nobody reads this
        result = _outcome(item, job)
        choice = ({"message": {"role": "assistant", "content": result.text}} if chat
                  else {"text": result.text, "logprobs": None})
        return JSONResponse({
            **head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{"index": 0, **choice, "finish_reason": FINISH[result.finish_reason]}],
            "usage": _usage(result, len(ids)), "edgespec": _vendor(result)})

    app.include_router(v1)
    return app


async def _parse(request: Request, model: type[_Model]) -> Any:
    """The body as ``model``, read no further than :data:`MAX_BODY` bytes."""
    too_big = APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():  # the bytes themselves: a header can lie
            body += chunk
            if len(body) > MAX_BODY:
                raise too_big
        return model.model_validate_json(bytes(body))
    except ClientDisconnect:
        raise APIError(400, "the client disconnected before sending its request") from None
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{where}: {message}" if where else message,
                       param=where or None) from None


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Tokenizing or templating a long prompt takes a while: off the event loop."""
    try:
        return await asyncio.to_thread(fn, *args)
    except UserError as e:
        raise APIError(400, str(e)) from None


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return engine.tokenize(prompt)
    if not all(0 <= t < engine.backend.vocab_size for t in prompt):
        raise UserError(f"prompt: token ids must be in [0, {engine.backend.vocab_size})")
    return prompt


async def _wait(job: Job, request: Request) -> object | None:
    """The job's final item; None, the job cancelled, if the client disconnects first."""
    get = asyncio.ensure_future(job.out.get())
    try:
        while not (await asyncio.wait({get}, timeout=0.5))[0]:
            if await request.is_disconnected():
                return None
        return get.result()
    finally:
        if not get.done():
            get.cancel()
            job.cancel.set()


async def _events(job: Job, head: dict, n_prompt: int, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, **extra: Any) -> str:
        # text: a content delta; a finish: an empty one; neither: the first, naming the role
        delta = ({"content": text} if text is not None else {} if finish
                 else {"role": "assistant", "content": ""})
        choice = {"delta": delta} if chat else {"text": text or "", "logprobs": None}
        return _sse({**head, "object": kind,
                     "choices": [{"index": 0, **choice, "finish_reason": finish}], **extra})

    try:
        if chat:  # the role comes first, as from OpenAI, before any queueing or prefill
            yield chunk(None)
        while True:
            item = await job.out.get()
            if job.overflowed:
                yield _sse(APIError(408, "the client read the stream too slowly; generation "
                                    "stopped", type="server_error", code="slow_client").body)
                return
            if isinstance(item, str):
                yield chunk(item)
                continue
            try:
                result = _outcome(item, job)
            except APIError as e:
                yield _sse(e.body)  # the headers have gone: the error travels as an event
                return
            yield chunk(None, FINISH[result.finish_reason], edgespec=_vendor(result))
            if include_usage:
                yield _sse({**head, "object": kind, "choices": [],
                            "usage": _usage(result, n_prompt)})
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel.set()  # the client left (or the stream ended): stop this generation only


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(result: GenerationResult, n_prompt: int) -> dict:
    n = result.stats.new_tokens
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def _vendor(result: GenerationResult) -> dict:
    s = result.stats
    return {"tokens_per_s": round(s.tokens_per_s, 2),
            "accepted_per_step": round(s.accepted_per_step, 3),
            "draft_nodes_per_step": round(s.draft_nodes_per_step, 2),
            "backend": s.backend, "draft": s.draft}


# -- running it ------------------------------------------------------------------------------

def bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` before the model loads: a taken port fails at
    once, and a request arriving during the load waits for it instead of being refused."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
        # accepted connections inherit it: without it, a response written in two pieces
        # waits on the client's delayed ACK, 40 ms a request on Linux loopback
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as e:  # create_server appends the address to the reason: once is enough
        reason = (e.strerror or str(e)).split(" (while attempting")[0]
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(engine: Engine, sock: socket.socket, **options: Any) -> None:
    """Serve until Ctrl-C or SIGTERM; ``options`` are :func:`create_app`'s."""
    config = uvicorn.Config(create_app(engine, **options), log_level="info",
                            timeout_graceful_shutdown=3)
    host, port = sock.getsockname()[:2]  # logged after Config, which sets up uvicorn's logging
    log.info("edgespec: serving %s at http://%s:%d/v1", options["model_id"], host, port)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C once it has
        uvicorn.Server(config).run(sockets=[sock])  # shut down gracefully: a normal stop
