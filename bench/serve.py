"""Serving throughput: continuous batching against one-at-a-time, N concurrent clients, the same run and answers.

    python bench/serve.py --model runs/sft/final                   # after `make train`
    python bench/serve.py --model CKPT --clients 1 4 16 --requests 64 --gen_length 32

Two in-process servers (`diffa2.serve`, uvicorn on free ports of 127.0.0.1) over one loaded checkpoint: one with
continuous batching (`--max_batch` = the largest client count), one decoding one request at a time (`max_batch` 1).
For each client count N, N threads with the official `openai` client share `--requests` chat requests (the
synthetic test split's clips and prompts, cycled); each server gets the same requests, one-at-a-time first. Printed
per N and server: requests/s, p50 / p95 latency, the speedup of continuous batching in requests/s, and how many
answers are identical to the one-at-a-time ones (greedy decoding: all should be).
"""

from __future__ import annotations

import argparse
import base64
import queue
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import openai
import torch
import uvicorn

from diffa2.cli_flags import add_flag
from diffa2.data.synth import DEFAULT_CORPUS_DIR, ensure_synth_corpus
from diffa2.eval import core
from diffa2.eval.specs import load_spec
from diffa2.inference import AudioQA
from diffa2.serve.app import ServeOptions, create_app
from diffa2.threads import add_threads_option, apply_threads
from diffa2.validation import parse_checked

MODEL = "bench"


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, qa: AudioQA, max_batch: int) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(create_app(qa, ServeOptions(MODEL, max_batch=max_batch)),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()


def load_requests(test_file: Path, count: int, gen_length: int, mode: str) -> list[dict]:
    """`count` chat requests over the test split's clips and prompts (cycled)."""
    spec = load_spec("synth")
    items, _ = core.load_items(spec, test_file, test_file.parent)
    prompts = core.render_prompts(spec, items)
    requests = []
    for i in range(count):
        item, prompt = items[i % len(items)], prompts[i % len(items)]
        audio = base64.b64encode(Path(item.audio.path).read_bytes()).decode()
        content = [{"type": "text", "text": prompt},
                   {"type": "input_audio", "input_audio": {"data": audio, "format": Path(item.audio.path).suffix[1:]}}]
        requests.append({"model": MODEL, "messages": [{"role": "user", "content": content}],
                         "max_tokens": gen_length, "extra_body": {"decode_mode": mode}})
    return requests


def run_clients(url: str, requests: list[dict], clients: int) -> tuple[float, list[float], list[str]]:
    """Wall seconds, per-request latencies and answers of `clients` threads sharing `requests`."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(requests)):
        todo.put(i)
    latencies: list[float] = []
    answers = [""] * len(requests)

    def client() -> None:
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            start = time.perf_counter()
            answers[i] = api.chat.completions.create(**requests[i]).choices[0].message.content
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, answers


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (q in 1..99) of `values`."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, "--model", "--checkpoint", default="runs/sft/final",
             help="DIFFA-2 checkpoint (default: runs/sft/final)")
    parser.add_argument("--data", help=f"MMAU-format test file (default: the synthetic corpus at {DEFAULT_CORPUS_DIR})")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16],
                        help="concurrent clients (default 1 4 16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per client count and server (default 64)")
    add_flag(parser, "--gen_length", type=int, default=32, help="max_tokens of every request (default 32)")
    add_flag(parser, "--decode_mode", default="parallel", help="decode_mode of every request (default parallel)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_checked(build_parser(), argv)
    apply_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file():
        print(f"no checkpoint at {args.model}: train one with `make train`, then pass --model DIR", file=sys.stderr)
        return 2
    qa = AudioQA.from_checkpoint(args.model, device=args.device)
    test_file = Path(args.data) if args.data else ensure_synth_corpus(DEFAULT_CORPUS_DIR).test_mmau
    requests = load_requests(test_file, args.requests, args.gen_length, args.decode_mode)
    servers = {"one-at-a-time": Server(qa, 1), "continuous": Server(qa, max(args.clients))}
    print(f"checkpoint {args.model} | {len(requests)} requests per run | gen length {args.gen_length}, "
          f"{args.decode_mode} | device {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"{'clients':>7} {'server':>14} {'req/s':>8} {'p50 s':>7} {'p95 s':>7} {'speedup':>8} {'identical':>10}")
    try:
        for clients in args.clients:
            baseline = None
            for name, server in servers.items():
                seconds, latencies, answers = run_clients(server.url, requests, clients)
                rate = len(requests) / seconds
                baseline = baseline or (rate, answers)
                same = sum(a == b for a, b in zip(answers, baseline[1], strict=True))
                print(f"{clients:>7} {name:>14} {rate:>8.2f} {percentile(latencies, 50):>7.2f} "
                      f"{percentile(latencies, 95):>7.2f} {rate / baseline[0]:>7.2f}x {same:>5}/{len(answers)}")
    finally:
        for server in servers.values():
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
