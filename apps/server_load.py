"""A bounded load test of ``edgespec serve`` on loopback, and its speed against in-process.

Starts the server on a free loopback port, sends ``--requests`` requests from
``--clients`` concurrent clients (the official openai client; every other request
streams), and stops by itself. Reports every answer's status (anything but 200 or a
deliberate 429 is a failure), p50/p99 latency, and the server's resident memory after
warm-up and at the end. ``--compare`` then times the same greedy prompts through the
server and in-process, one after the other, for the per-token cost of the HTTP layer.

    python apps/server_load.py --clients 8 --requests 200 --compare 16
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
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
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
            start = time.perf_counter()
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
            except openai.RateLimitError:
                outcome = "429"
            except openai.APIStatusError as e:
                outcome = str(e.status_code)
            except openai.APIConnectionError:
                outcome = "connection"
            with lock:
                outcomes[outcome] += 1
                if outcome == "ok":
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    return {"outcomes": dict(outcomes), "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def compare(client: openai.OpenAI, prompts: list[str], n: int) -> dict:
    """Greedy answers of 64 tokens through the server, then in-process: seconds per token."""
    def timed(ask) -> float:
        tokens, seconds = 0, 0.0
        for prompt in prompts[:n]:
            start = time.perf_counter()
            tokens += ask([{"role": "user", "content": prompt}])
            seconds += time.perf_counter() - start
        return seconds / tokens

    client.chat.completions.create(model=MODEL[0], max_tokens=4,  # both sides warm
                                   messages=[{"role": "user", "content": "warm up"}])
    served = timed(lambda m: client.chat.completions.create(
        model=MODEL[0], messages=m, max_tokens=64, temperature=0).usage.completion_tokens)
    with edgespec.load(ctx=2048) as engine:
        engine.chat([{"role": "user", "content": "warm up"}], max_tokens=4)
        local = timed(lambda m: engine.chat(m, max_tokens=64).stats.new_tokens)
    return {"server_s_per_token": served, "in_process_s_per_token": local,
            "server_over_in_process": served / local}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--compare", type=int, default=0, help="prompts for the speed ratio")
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
            report |= compare(client, prompts, args.compare)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
