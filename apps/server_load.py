"""A bounded load test of ``edgespec serve`` on loopback, and its speed against in-process.

Starts the server on a free loopback port, sends ``--requests`` requests from
``--clients`` concurrent clients (the official openai client; every other request
streams; a 429 is retried after its Retry-After), and stops by itself. Reports every
answer's status (anything but 200 or a deliberate 429 is a failure), p50/p99 latency,
and the server's resident memory after warm-up and at the end. ``--compare`` then times
the same greedy prompts through the server and in-process, interleaved, for the per-token
cost of the HTTP layer.

    python apps/server_load.py --clients 8 --requests 200 --compare 41
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai

import edgespec
from edgespec.bench_tables import speed_ratio_interval

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts" / "dev.jsonl"
MODEL = ["?"]  # the served model's id, from /v1/models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(port: int, queue: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "edgespec", "serve", "--port", str(port),
                               "--queue", str(queue), "-c", "2048"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:  # 503 while the server warms up
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not come up within 120 s")


def load(client: openai.OpenAI, prompts: list[str], clients: int, requests: int) -> dict:
    outcomes: Counter = Counter()
    latencies: list[float] = []
    lock, jobs = threading.Lock(), iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(jobs, None)
            if i is None:
                return
            messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
            outcome = "429"
            while outcome == "429":  # a busy server says when to come back: do as it says
                start, wait = time.perf_counter(), 0.0
                try:
                    if i % 2:
                        text = "".join(c.choices[0].delta.content or "" for c in
                                       client.chat.completions.create(
                                           model=MODEL[0], messages=messages, max_tokens=32,
                                           temperature=0, stream=True) if c.choices)
                    else:
                        text = client.chat.completions.create(
                            model=MODEL[0], messages=messages, max_tokens=32,
                            temperature=0).choices[0].message.content
                    outcome = "ok" if text else "empty"
                except openai.RateLimitError as e:
                    outcome, wait = "429", float(e.response.headers["retry-after"])
                except openai.APIStatusError as e:
                    outcome = str(e.status_code)
                except openai.APIConnectionError:
                    outcome = "connection"
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "ok":
                        latencies.append(time.perf_counter() - start)
                time.sleep(wait)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {"outcomes": dict(outcomes), "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def compare(client: openai.OpenAI, prompts: list[str], n: int, repeat: int) -> dict:
    """Greedy 64-token answers through the server and in-process, interleaved prompt by
    prompt (the order alternating), for the HTTP layer's cost per token with an interval."""
    def served(messages: list[dict]) -> int:
        return client.chat.completions.create(model=MODEL[0], messages=messages, max_tokens=64,
                                              temperature=0).usage.completion_tokens

    def timed(ask, prompt: str) -> tuple[int, float]:
        start = time.perf_counter()
        tokens = ask([{"role": "user", "content": prompt}])
        return tokens, time.perf_counter() - start

    with edgespec.load(ctx=2048) as engine:
        def local(messages: list[dict]) -> int:
            return engine.chat(messages, max_tokens=64).stats.new_tokens

        for ask in (served, local):  # both sides warm
            timed(ask, "warm up")
        pairs = []
        for r in range(repeat):
            for i, prompt in enumerate(prompts[:n]):
                first, second = (served, local) if (i + r) % 2 == 0 else (local, served)
                got = {first: timed(first, prompt), second: timed(second, prompt)}
                pairs.append((*got[served], *got[local]))
    tokens_s, seconds_s, tokens_l, seconds_l = (sum(col) for col in zip(*pairs))
    return {"pairs": len(pairs), "server_s_per_token": seconds_s / tokens_s,
            "in_process_s_per_token": seconds_l / tokens_l,
            "server_speed_over_in_process": (tokens_s / seconds_s) / (tokens_l / seconds_l),
            "interval_95": speed_ratio_interval(pairs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--compare", type=int, default=0, help="prompts for the speed ratio")
    parser.add_argument("--repeat", type=int, default=2, help="passes over those prompts")
    args = parser.parse_args()
    prompts = [json.loads(line)["turns"][0] for line in PROMPTS.read_text().splitlines()]
    port = free_port()
    server = start(port, args.queue)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0, timeout=300)
    try:
        MODEL[0] = client.models.list().data[0].id
        load(client, prompts, args.clients, 2 * args.clients)  # warm-up
        before = rss_mib(server.pid)
        report = load(client, prompts, args.clients, args.requests)
        report |= {"rss_after_warmup_mib": before, "rss_end_mib": rss_mib(server.pid),
                   "server_alive": server.poll() is None}
        if args.compare:
            report |= compare(client, prompts, args.compare, args.repeat)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
