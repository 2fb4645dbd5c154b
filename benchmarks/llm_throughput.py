"""Throughput of LLMClient against the loopback fake server with a fixed per-reply latency.

With latency L and concurrency C the ideal is C / L requests/s (64 / 0.2 s = 320 req/s); the gap is the
client's and the fake server's own overhead. Prints one JSON object.

    .venv/bin/python benchmarks/llm_throughput.py [--requests 640 --concurrency 64 --latency 0.2]
        [--server-process] [--cache]

--server-process runs the fake server in its own interpreter, so the client does not share a GIL with
it (closer to a real remote server); --cache also writes every reply to a local response cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import openai
from pydantic import BaseModel

from synthvlm.llm import LLMClient, LLMConfig, LLMRequest
from synthvlm.llm.fake_server import FakeLLMServer

KEY_ENV = "SYNTHVLM_BENCH_LLM_KEY"


class Echo(BaseModel):
    echo: str
    n_chars: int


@contextmanager
def serve(latency_s: float, in_process: bool) -> Iterator[str]:
    """Yield the base URL of a fake server, in a thread here or in a child interpreter."""
    if in_process:
        with FakeLLMServer(latency_s=latency_s) as server:
            yield server.base_url
        return
    cmd = [sys.executable, "-m", "synthvlm.llm.fake_server", "--latency", str(latency_s)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        child.terminate()
        child.wait(timeout=10)


def run(n_requests: int, concurrency: int, latency_s: float, server_process: bool, cache: bool) -> dict:
    os.environ.setdefault(KEY_ENV, "sk-bench")
    with serve(latency_s, in_process=not server_process) as base_url, tempfile.TemporaryDirectory() as tmp:
        config = LLMConfig(
            base_url=base_url,
            model="fake",
            api_key_env=KEY_ENV,
            max_concurrency=concurrency,
            timeout_s=30,
            cache_dir=os.path.join(tmp, "cache") if cache else None,
        )
        client = LLMClient(config)
        requests = [
            LLMRequest.from_prompt(f"r{i}", f"prompt number {i}", schema=Echo) for i in range(n_requests)
        ]
        start = time.perf_counter()
        results = client.run_many(requests)
        seconds = time.perf_counter() - start
    produced = sum(r.ok for r in results)
    return {
        "requests": n_requests,
        "produced": produced,
        "concurrency": concurrency,
        "latency_s": latency_s,
        "seconds": round(seconds, 3),
        "requests_per_s": round(n_requests / seconds, 1),
        "ideal_requests_per_s": round(concurrency / latency_s, 1),
        "efficiency": round(n_requests / seconds / (concurrency / latency_s), 3),
        "server": "separate process" if server_process else "thread in the client's process",
        "structured_output": "json_schema + pydantic validation",
        "cache": cache,
        "cpu_count": os.cpu_count(),
        "openai_version": openai.__version__,
        "python": sys.version.split()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--server-process", action="store_true")
    parser.add_argument("--cache", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.requests, args.concurrency, args.latency, args.server_process, args.cache)))


if __name__ == "__main__":
    main()
