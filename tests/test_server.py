"""``edgespec serve`` end to end: the real server in a subprocess on the packaged SmolLM2,
driven by the official OpenAI client and raw HTTP, as llama-server and ollama users would."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

for _module in ("fastapi", "uvicorn", "openai", "httpx"):
    pytest.importorskip(_module)

import httpx  # noqa: E402
import openai  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import edgespec  # noqa: E402
from edgespec.models import default_model_path  # noqa: E402
from edgespec.server import create_app  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-edgespec-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAP = 900  # --max-tokens-cap of the main server (its context: 1024)
MODEL_ID = default_model_path().stem
LONG = "Once upon a time, in a land far away,"  # greedy SmolLM2 goes on past 900 tokens
ERROR_FIELDS = {"message", "type", "param", "code"}


class Server:
    """``edgespec serve`` on a free loopback port, its log in a file."""

    def __init__(self, logs: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"serve-{self.port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgespec", "serve", "--port", str(self.port), "-c",
                 "1024", *args], stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.logged()}")
            try:  # 503 while the worker warms up and probes this device's verify cost
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the server was not ready after {timeout} s:\n{self.logged()}")

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """The main server (API key, max-tokens cap) and a busy one (--queue 1), started together."""
    logs = tmp_path_factory.mktemp("serve")
    main = Server(logs, "--api-key", KEY, "--max-tokens-cap", str(CAP))
    busy = Server(logs, "--queue", "1", "--draft", "none")
    try:
        main.wait_ready()
        busy.wait_ready()
        yield main, busy
    finally:
        main.stop()
        busy.stop()
    assert main.proc.returncode == 0 and busy.proc.returncode == 0


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server: Server, path: str, body: object, headers: dict | None = None
         ) -> httpx.Response:
    """``body``: JSON, or bytes / an iterator of bytes sent as they are."""
    data = {"json": body} if isinstance(body, dict) else {"content": body}
    return httpx.post(f"{server.url}/v1/{path}", headers=AUTH if headers is None else headers,
                      timeout=120, **data)


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    """An OpenAI error body, with nothing of the server's insides in it."""
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == ERROR_FIELDS
    assert "Traceback" not in r.text and ".py" not in r.text
    return r.json()["error"]


def test_health_and_the_model_list(server: Server, client: openai.OpenAI) -> None:
    r = httpx.get(f"{server.url}/health")  # no API key needed
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_health_is_503_until_the_worker_has_warmed_up(smollm_path: Path) -> None:
    """A script that waits for 200 must not send its first request into the warm-up: under
    load that probe once made a request wait more than a minute."""
    with edgespec.load(smollm_path, ctx=256) as engine:
        engine._lock.acquire()  # before the worker starts: its warm-up generation waits for it
        with TestClient(create_app(engine, model_id=MODEL_ID)) as client:
            try:
                r = client.get("/health")
            finally:
                engine._lock.release()
            assert assert_openai_error(r, 503)["code"] == "loading"
            assert r.headers["Retry-After"].isdigit()
            deadline = time.monotonic() + 120
            while (r := client.get("/health")).status_code == 503:
                assert time.monotonic() < deadline, "still loading after 120 s"
                time.sleep(0.05)
            assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion_streams_the_text_it_returns(client: openai.OpenAI) -> None:
    args = dict(model=MODEL_ID, prompt="The three primary colours are", max_tokens=16,
                temperature=0)
    full = client.completions.create(**args)
    choice, usage = full.choices[0], full.usage
    assert full.object == "text_completion" and full.model == MODEL_ID
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert 0 < usage.completion_tokens <= 16 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stats = full.model_extra["edgespec"]
    assert stats["backend"] == "llamacpp" and stats["draft"] == "fused"
    assert stats["accepted_per_step"] >= 1 and stats["tokens_per_s"] > 0
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_streams_the_role_first_then_the_same_reply(client: openai.OpenAI) -> None:
    args = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Name three colours."}],
                max_completion_tokens=16, temperature=0)
    full = client.chat.completions.create(**args)
    message = full.choices[0].message
    assert full.object == "chat.completion" and message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        message.content
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_raw_events_end_with_usage_then_done(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "an_unknown_field": {"clients": "send extras"}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    finish = events[-2]
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(finish["edgespec"]) == {"tokens_per_s", "accepted_per_step",
                                       "draft_nodes_per_step", "backend", "draft"}
    assert events[-1]["choices"] == []
    assert set(events[-1]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    args = dict(model=MODEL_ID, prompt="Count: one, two, three, four,", max_tokens=16,
                temperature=0)
    full = client.completions.create(**args).choices[0].text
    assert len(full) > 8, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    expected = full[:full.index(stop)]
    cut = client.completions.create(**args, stop=stop).choices[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    chunks = list(client.completions.create(**args, stop=["never-said", stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    args = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=16, temperature=0.9,
                top_p=0.95, seed=7)
    first = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args).choices[0].text == first
    streamed = client.completions.create(**args, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == first


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), [
    ("completions", b"{not json", 400, None, None),
    ("completions", b"[1, 2]", 400, None, None),
    ("completions", {"prompt": "hi", "max_tokens": "lots"}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    ("completions", {"prompt": "hi", "stop": 3}, 400, "stop", None),
    ("completions", {"prompt": 12}, 400, "prompt", None),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("completions", {"prompt": "hi", "max_tokens": CAP + 1}, 400, "max_tokens", None),
    ("completions", {"prompt": "word " * 1100}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", None),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", None),
])
def test_bad_requests_get_openai_errors(server: Server, path: str, body: dict | bytes,
                                        status: int, param: str | None,
                                        code: str | None) -> None:
    error = assert_openai_error(post(server, path, body), status)
    assert error["param"] == param and error["code"] == code
    if status == 400:
        assert error["type"] == "invalid_request_error"


def test_oversized_bodies_are_refused(server: Server) -> None:
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert_openai_error(post(server, "completions", big), 413)

    def chunks():  # no Content-Length: the limit holds on the bytes themselves
        yield big[:1000]
        yield big[1000:]

    assert_openai_error(post(server, "completions", chunks()), 413)


def test_the_api_key_is_required(server: Server) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        error = assert_openai_error(post(server, "completions", body, headers), 401)
        assert error["type"] == "authentication_error"
    assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401)
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_budget_below_the_least_is_refused_in_one_line(tmp_path: Path) -> None:
    refused = Server(tmp_path, "--memory-budget", "100MB")
    assert refused.proc.wait(timeout=120) == 2
    assert "the least is" in refused.logged() and len(refused.logged().splitlines()) == 1


def test_unknown_paths_get_openai_errors(server: Server) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v1/engines", headers=AUTH), 404)
    assert_openai_error(httpx.get(f"{server.url}/v1/completions", headers=AUTH), 405)


def test_a_full_queue_answers_429_with_retry_after(servers) -> None:
    busy = servers[1]
    body = {"prompt": LONG, "max_tokens": 600, "temperature": 0, "stream": True}
    start, release = threading.Barrier(5), threading.Event()
    answers: list[tuple[int, str | None]] = []

    def request() -> None:
        start.wait()
        with httpx.stream("POST", f"{busy.url}/v1/completions", json=body, timeout=120) as r:
            answers.append((r.status_code, r.headers.get("retry-after")))
            release.wait(60)  # hold the stream open: the generation keeps running

    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(answers) < len(threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _ in answers)
    assert len(statuses) == len(threads) and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert all(int(after) > 0 for status, after in answers if status == 429)
    # the closed streams cancel their generations: the server soon takes requests again
    deadline = time.monotonic() + 30
    while True:
        r = httpx.post(f"{busy.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4},
                       timeout=120)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_a_client_that_disconnects_cancels_only_its_own_generation(
        server: Server, client: openai.OpenAI) -> None:
    body = {"model": MODEL_ID, "prompt": LONG, "max_tokens": CAP, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=120) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        first = json.loads(next(events).removeprefix("data: "))
        next(events)
    # the stream is closed after two pieces; the next request is answered, and the log
    # says the abandoned generation was cancelled rather than run to its end
    reply = client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4)
    assert reply.choices[0].text
    deadline = time.monotonic() + 10
    while f"{first['id']} cancelled" not in server.logged() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"{first['id']} cancelled" in server.logged()


def test_a_reader_that_falls_too_far_behind_is_cut_off() -> None:
    """A stream's buffer is bounded: once STREAM_BUFFER pieces wait unread, the request's
    generation is cancelled and its stream ends with an error event."""
    from edgespec import server as srv

    async def fill_and_read() -> tuple[srv.Job, list[str]]:
        job = srv.Job("cmpl-slow", {}, True, asyncio.get_running_loop())

        def worker() -> None:  # as the worker thread sends a generation's pieces
            for i in range(srv.STREAM_BUFFER + 10):
                job.send(f"piece {i} ")

        await asyncio.to_thread(worker)
        await asyncio.sleep(0)
        return job, [event async for event in srv._events(job, {"id": job.id}, 1, False, False)]

    job, events = asyncio.run(fill_and_read())
    assert job.overflowed and job.cancel.is_set()
    assert len(events) == 1 and json.loads(events[0][6:])["error"]["code"] == "slow_client"


def test_an_engine_generation_stops_on_its_own_cancel_event(smollm_path: Path) -> None:
    """What the server relies on: a request's event cancels its generation only, and
    ``Engine.cancel()`` does not reach a generation that has its own event."""
    with edgespec.load(smollm_path, ctx=512, draft="none") as engine:
        own = threading.Event()
        pieces = engine.stream(LONG, max_tokens=6, cancel=own)
        rest = iter(pieces)
        next(rest)
        engine.cancel()
        list(rest)
        assert pieces.result is not None and pieces.result.stats.new_tokens == 6
        pieces = engine.stream(LONG, max_tokens=400, cancel=own)
        rest = iter(pieces)
        next(rest)
        own.set()
        with pytest.raises(edgespec.Cancelled):
            list(rest)
        assert engine.generate("Hello", max_tokens=4).stats.new_tokens == 4
