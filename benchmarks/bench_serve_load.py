"""The load and the probes of `benchmarks/bench_serve.py`: streaming completions over real HTTP in a
closed loop, and the resident memory of the Serve replica and engine processes.

A request is one `POST /v1/completions` with `stream: true`, `ignore_eos` (every request decodes
exactly `max_tokens` tokens) and `stream_options.include_usage` (the token count comes from the
server). TTFT is the time to the first chunk carrying text, TPOT the time from there to the last
chunk over the remaining tokens. Ray Serve LLM batches stream chunks (50 ms by default), so both
are as a client sees them, not per engine step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

__all__ = ["closed_loop", "one_request", "RssSampler", "serve_processes"]


def _failure(start: float, kind: str) -> dict:
    return {"ok": False, "error": kind, "tokens": 0, "ttft_s": None, "tpot_s": None,
            "start_s": start, "end_s": time.perf_counter()}


async def one_request(client, body: dict) -> dict:
    """One streamed completion: {"ok", "error" (a failure's kind, None when ok), "tokens",
    "ttft_s", "tpot_s", "start_s", "end_s"}. Failure kinds: `http_<status>` (refused),
    `stream_error_<code>` (an error event), `no_done` (closed without `[DONE]`), `short_output`
    (fewer tokens than max_tokens), or the client exception's class name."""
    import httpx

    start = time.perf_counter()
    first = last = None
    tokens, done = 0, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return _failure(start, f"http_{response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):].strip()
                if payload == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    return _failure(start, f"stream_error_{chunk['error'].get('code')}")
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
    except httpx.HTTPError as error:
        return _failure(start, type(error).__name__)
    if not done:
        return _failure(start, "no_done")
    if first is None or tokens < body["max_tokens"]:
        return _failure(start, "short_output")
    return {"ok": True, "error": None, "tokens": tokens, "ttft_s": first - start,
            "tpot_s": (last - first) / (tokens - 1) if tokens > 1 else None,
            "start_s": start, "end_s": time.perf_counter()}


async def closed_loop(base_url: str, headers: dict, model: str, prompts: list[str], *, concurrency: int,
                      duration_s: float, max_tokens: int, timeout_s: float,
                      max_requests: int = 1_000_000) -> tuple[list[dict], float]:
    """`concurrency` clients send requests back to back (request i uses prompts[i % len]) until
    `duration_s` has passed or `max_requests` were sent; in-flight requests are awaited.
    Returns (per-request results, seconds from the first send to the last answer)."""
    import httpx

    counter = itertools.count()
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout_s)) as client:
        start = time.perf_counter()

        async def client_loop():
            while time.perf_counter() - start < duration_s:
                i = next(counter)
                if i >= max_requests:
                    return
                body = {"model": model, "prompt": prompts[i % len(prompts)],
                        "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "ignore_eos": True, "stream_options": {"include_usage": True}}
                results.append(await one_request(client, body))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    end = max((r["end_s"] for r in results), default=time.perf_counter())
    return results, end - start


# --------------------------------------------------------------------------- memory


def serve_processes(raylet_pid: int, app: str) -> dict[str, list]:
    """The processes of Serve app `app` under this cluster's raylet, by role: "engine" (its
    SereLLMServer replicas and every process they started: vLLM's engine core and workers) and
    "ingress" (its SereIngress replicas)."""
    import psutil

    markers = {"engine": f"ServeReplica:{app}:SereLLMServer", "ingress": f"ServeReplica:{app}:SereIngress"}
    roles: dict[str, list] = {role: [] for role in markers}
    for proc in psutil.Process(raylet_pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            for role, marker in markers.items():
                if marker in cmdline:
                    roles[role] += [proc] + proc.children(recursive=True)
        except psutil.Error:  # ended while being listed
            continue
    return roles


class RssSampler:
    """Samples the summed RSS of `serve_processes(raylet_pid, app)` per role every `interval_s` in
    a background thread: `samples` = [(seconds since start, {role: bytes}, {role: process count})]."""

    def __init__(self, raylet_pid: int, app: str, interval_s: float = 5.0):
        self.raylet_pid = raylet_pid
        self.app = app
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, started: float) -> None:
        import psutil

        rss, count = {}, {}
        for role, procs in serve_processes(self.raylet_pid, self.app).items():
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # ended between listing and reading
                    continue
            rss[role], count[role] = total, len(procs)
        self.samples.append((time.perf_counter() - started, rss, count))

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            self.sample(started)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
