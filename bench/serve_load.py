"""Load on `specbeam serve`, on 127.0.0.1 only: a bounded number of streamed completions at each concurrency;
prints throughput and time-to-first-token / per-token latency p50, p95, p99 per concurrency, the speed-up over
one client at a time, and the goals (at 32 clients: >= 4x the throughput, p99 time to first token <= 1 s).

    python bench/serve_load.py --concurrency 1,32 --requests 64          # starts its own server (shipped pair)
    python bench/serve_load.py --url http://127.0.0.1:8000 --mode mixed --png load.png

Per-token latency: a request's (last token - first token) time / (its tokens per choice - 1), for requests that
streamed more than one chunk (beam search streams one final chunk and has none)."""
import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from tqdm import tqdm

from specbeam.cli.table import format_table

PROMPTS = [json.loads(line)["prompt"] for line in
           (Path(__file__).parents[1] / "specbeam/assets/prompts.jsonl").read_text().splitlines()]
MODES = {"greedy": dict(temperature=0), "sample": dict(temperature=0.8, top_p=0.95),
         "beam": dict(use_beam_search=True, n=4), "sample2": dict(temperature=0.8, top_p=0.95, n=2)}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
GOAL_CLIENTS, GOAL_SPEEDUP, GOAL_TTFT_P99 = 32, 4.0, 1.0


@dataclass
class Sample:
    ttft: float | None  # seconds to the first generated text
    per_token: float | None
    tokens: int  # completion tokens, all choices
    ok: bool


@dataclass
class Level:
    concurrency: int
    seconds: float
    samples: list[Sample]

    @property
    def tokens_per_second(self) -> float:
        return sum(s.tokens for s in self.samples) / self.seconds

    def percentiles(self, name: str) -> list[float]:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) is not None]
        return list(np.percentile(values, [50, 95, 99])) if values else [float("nan")] * 3


def request_body(i: int, mode: str, max_tokens: int) -> dict:
    fields = MODES[list(MODES)[i % len(MODES)]] if mode == "mixed" else MODES[mode]
    seeded = dict(seed=i) if fields.get("temperature", 0) > 0 else {}
    return dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, **fields, **seeded)


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start, first, last, chunks, usage = time.perf_counter(), None, None, 0, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Sample(None, None, 0, False)
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            if any(c["text"] for c in chunk["choices"]):
                last = time.perf_counter()
                first, chunks = first or last, chunks + 1
    tokens = usage["completion_tokens"] if usage else 0
    per_choice = tokens / body.get("n", 1)
    per_token = (last - first) / (per_choice - 1) if chunks > 1 and per_choice > 1 else None
    return Sample(None if first is None else first - start, per_token, tokens, usage is not None)


async def level(url: str, concurrency: int, requests: int, mode: str, max_tokens: int) -> Level:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        with tqdm(total=requests, desc=f"{concurrency} clients", unit="req", leave=False) as bar:
            async def gated(i: int) -> Sample:
                async with gate:
                    sample = await one(client, url, request_body(i, mode, max_tokens))
                bar.update()
                return sample

            start = time.perf_counter()
            samples = await asyncio.gather(*(gated(i) for i in range(requests)))
    return Level(concurrency, time.perf_counter() - start, list(samples))


def report(levels: list[Level]) -> str:
    base = next((lv for lv in levels if lv.concurrency == 1), None)
    headers = ["clients", "requests", "failed", "seconds", "tokens/s", "vs 1 client",
               "TTFT p50", "p95", "p99", "per-token p50", "p95", "p99"]
    rows = []
    for lv in levels:
        speedup = f"{lv.tokens_per_second / base.tokens_per_second:.2f}x" if base else "-"
        ms = [f"{1000 * v:.0f} ms" for v in lv.percentiles("ttft")] + \
             [f"{1000 * v:.1f} ms" for v in lv.percentiles("per_token")]
        rows.append([lv.concurrency, len(lv.samples), sum(not s.ok for s in lv.samples), f"{lv.seconds:.2f}",
                     f"{lv.tokens_per_second:.1f}", speedup, *ms])
    return format_table(headers, [[str(c) for c in row] for row in rows]) + goals(levels, base)


def goals(levels: list[Level], base: Level | None) -> str:
    goal = next((lv for lv in levels if lv.concurrency == GOAL_CLIENTS), None)
    if goal is None or base is None:
        return ""
    speedup, p99 = goal.tokens_per_second / base.tokens_per_second, goal.percentiles("ttft")[2]
    return (f"\n\nat {GOAL_CLIENTS} clients: throughput {speedup:.2f}x one client at a time "
            f"(goal >= {GOAL_SPEEDUP:.0f}x: {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}), "
            f"p99 time to first token {p99:.3f} s (goal <= {GOAL_TTFT_P99:.0f} s: "
            f"{'met' if p99 <= GOAL_TTFT_P99 else 'NOT met'})")


def plot(levels: list[Level], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [lv.concurrency for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(clients, [lv.tokens_per_second for lv in levels], marker="o")
    left.set(xlabel="concurrent clients", ylabel="tokens/s", title="throughput", xscale="log")
    for q, label in zip(range(3), ("p50", "p95", "p99")):
        right.plot(clients, [lv.percentiles("ttft")[q] for lv in levels], marker="o", label=label)
    right.set(xlabel="concurrent clients", ylabel="seconds", title="time to first token", xscale="log")
    right.legend()
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = args.port
    command = [sys.executable, "-m", "specbeam.cli", "serve", "--port", str(port), "--threads", str(args.threads),
               "--max-num-seqs", str(args.max_num_seqs), *(["--draft", args.draft] if args.draft else [])]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("serve_load: the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server on 127.0.0.1 (default: start one)")
    parser.add_argument("--port", type=int, default=8765, help="for the server started here")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server started here")
    parser.add_argument("--draft", default=None, help="--draft of the server started here (default: shipped)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="of the server started here")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests at each concurrency")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--mode", default="greedy", choices=[*MODES, "mixed"])
    parser.add_argument("--png", default=None, help="write a throughput / TTFT chart here")
    args = parser.parse_args()
    if args.url is not None and urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url must be on 127.0.0.1 (this tool loads loopback servers only), got {args.url}")
    server, url = start_server(args) if args.url is None else (None, args.url.rstrip("/"))
    try:
        asyncio.run(level(url, 1, 2, args.mode, 4))  # warm-up
        levels = [asyncio.run(level(url, int(c), args.requests, args.mode, args.max_tokens))
                  for c in args.concurrency.split(",")]
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)
    print(f"{args.requests} requests per level, mode {args.mode}, max_tokens {args.max_tokens}, {url}\n")
    print(report(levels))
    if args.png:
        plot(levels, args.png)
        print(f"\nwrote {args.png}")
    return 0 if all(s.ok for lv in levels for s in lv.samples) else 1


if __name__ == "__main__":
    sys.exit(main())
