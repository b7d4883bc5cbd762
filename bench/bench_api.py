"""Aggregate generation throughput of `stoker api` under 1, 4, 16 and 64 concurrent streaming clients.

Two models: the demo chat model (chat completions, real replies that end at end-of-turn) and a ~60M-parameter
Llama with random weights (text completions of exactly --max-tokens tokens: its end-of-turn row is pushed down so
it never stops early). Baselines, in the same run and on the same prompts:
  (a) plain transformers ``generate``, one request at a time, in this process;
  (b) the same server with batching off (``max_num_seqs=1``), serving one request at a time.

Each level sends ``max(--min-requests, 2 x clients)`` requests (``max(--min-requests, clients)`` with batching off)
from ``clients`` concurrent streaming clients; each client sends its next request when the previous one ends. Reported per level: generated tokens/s over the level's
wall time (tokens from the server's own usage counts), and time to first token (p50/p90).

Prints one JSON line on stdout; a readable table goes to stderr.

    .venv/bin/python bench/bench_api.py              # about 3-4 minutes on 2 CPU cores
    .venv/bin/python bench/bench_api.py --quick      # fewer requests, the 60M model only at 1 and 16 clients
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LEVELS = (1, 4, 16, 64)
THREADS = [1]  # torch threads for the servers and the baseline (set from --threads)


# ----------------------------------------------------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------------------------------------------------
def build_random_model(tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    """A Llama of about 60M parameters with seeded random weights on the demo tokenizer; never emits end-of-turn."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2304, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Zero rows score 0 while the best of ~1000 random zero-mean scores is positive: greedy never ends a request
    # early (special tokens) nor writes broken UTF-8 (partial byte pieces), so every request is max_tokens long.
    banned = set(tokenizer.all_special_ids) | {
        i for i in range(len(tokenizer)) if not tokenizer.decode([i]).isascii() or "\ufffd" in tokenizer.decode([i])}
    with torch.no_grad():
        model.lm_head.weight[sorted(banned)] = 0.0
    model.generation_config.max_new_tokens = 64
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def demo_prompts(count: int) -> list[list[dict[str, str]]]:
    from stoker.demo import tasks

    questions = [*tasks.FACTS, *tasks.IDENTITY_QUESTIONS, *tasks.GREETINGS]
    echoes = [c.messages[-1]["content"] for c in tasks.echo_cases(count, seed=7, min_words=4, max_words=8)]
    pool = [*questions, *echoes]
    random.Random(0).shuffle(pool)  # every slice mixes short answers (facts) with long ones (counting, echoes)
    return [[{"role": "user", "content": pool[i % len(pool)]}] for i in range(count)]


def story_prompts(count: int) -> list[str]:
    words = "apple river stone cloud lamp train bird rose key cup".split()
    return [f"Story {i}: the {words[i % 10]} and the {words[(i * 3 + 1) % 10]}" for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------------
# Baseline (a): transformers generate, one at a time
# ----------------------------------------------------------------------------------------------------------------------
def transformers_baseline(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    tokens = 0
    ttfts = []
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            t0 = time.perf_counter()
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=model.generation_config.pad_token_id)
            # generate streams nothing; one request's first token comes after the previous request ends
            ttfts.append(time.perf_counter() - t0)
            tokens += out.shape[1] - len(ids)
    wall = time.perf_counter() - started
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "seconds_per_request_p50": round(statistics.median(ttfts), 4)}


# ----------------------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, folder: Path, *, max_num_seqs: int):
        import yaml

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cfg = folder / f"api-{max_num_seqs}.yaml"
        cfg.write_text(yaml.safe_dump({"model_name_or_path": str(model), "api_host": "127.0.0.1", "api_port": port,
                                       "max_num_seqs": max_num_seqs, "max_queue": 1024}))
        env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "API_MODEL_NAME")}
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(THREADS[0])})
        self.log = folder / f"server-{max_num_seqs}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "stoker", "api", str(cfg)], stdout=out,
                                            stderr=subprocess.STDOUT, env=env)
        self.model = model.name

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def __exit__(self, *exc: Any) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def one_request(http: Any, url: str, body: dict[str, Any]) -> tuple[float | None, int, float]:
    """(time to first token, completion tokens, total time) of one streamed request."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if first is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                    first = time.perf_counter() - started
    return first, tokens, time.perf_counter() - started


async def run_level(server: Server, bodies: list[dict[str, Any]], path: str, clients: int) -> dict[str, Any]:
    import httpx

    url = server.url + path
    queue = list(bodies)
    results: list[tuple[float | None, int, float]] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def client() -> None:
            while queue:
                body = queue.pop()
                results.append(await one_request(http, url, body))

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), timeout=600)
        wall = time.perf_counter() - started
    tokens = sum(r[1] for r in results)
    ttft = sorted(r[0] for r in results if r[0] is not None)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 4) if ttft else None,
        "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 4) if ttft else None,
    }


def bodies_for(kind: str, model: str, count: int, max_tokens: int) -> tuple[str, list[dict[str, Any]]]:
    common = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "chat":
        return "/v1/chat/completions", [{**common, "messages": m} for m in demo_prompts(count)]
    return "/v1/completions", [{**common, "prompt": p} for p in story_prompts(count)]


def bench_model(name: str, folder: Path, kind: str, work: Path, args: argparse.Namespace,
                levels: tuple[int, ...]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    count = max(levels) * 2
    path, bodies = bodies_for(kind, folder.name, count, args.max_tokens)
    if kind == "chat":
        prompts = [tokenizer.apply_chat_template(b["messages"], add_generation_prompt=True, tokenize=False)
                   for b in bodies]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    else:
        prompt_ids = [tokenizer(b["prompt"])["input_ids"] for b in bodies]
    out: dict[str, Any] = {"kind": kind}
    n_base = args.min_requests
    out["transformers_one_at_a_time"] = transformers_baseline(folder, prompt_ids[:n_base], args.max_tokens)
    log(f"{name}: transformers generate, one at a time: {out['transformers_one_at_a_time']}")

    def level_bodies(clients: int) -> list[dict[str, Any]]:
        return bodies[: max(args.min_requests, 2 * clients)]

    with Server(folder, work, max_num_seqs=1) as server:
        asyncio.run(run_level(server, level_bodies(1)[:2], path, 1))  # warm-up
        out["server_batching_off"] = {}
        for clients in (1, 16):
            # One request per client is enough here: one at a time, the rate does not depend on the clients.
            result = asyncio.run(run_level(server, bodies[: max(args.min_requests, clients)], path, clients))
            out["server_batching_off"][str(clients)] = result
            log(f"{name}: server, max_num_seqs=1, {clients} clients: {result}")
    with Server(folder, work, max_num_seqs=64) as server:
        asyncio.run(run_level(server, level_bodies(1)[:2], path, 1))
        out["server_batching_on"] = {}
        for clients in levels:
            result = asyncio.run(run_level(server, level_bodies(clients), path, clients))
            out["server_batching_on"][str(clients)] = result
            log(f"{name}: server, batching, {clients} clients: {result}")
    if "16" in out["server_batching_on"]:
        at16 = out["server_batching_on"]["16"]
        one_at_a_time = out["server_batching_off"]["16"]["tokens_per_s"]
        out["at_16_clients"] = {
            "speedup_vs_server_one_at_a_time": round(at16["tokens_per_s"] / one_at_a_time, 2),
            "speedup_vs_transformers_one_at_a_time": round(
                at16["tokens_per_s"] / out["transformers_one_at_a_time"]["tokens_per_s"], 2),
            "ttft_p50_s": at16["ttft_p50_s"],
            "target_met": at16["tokens_per_s"] >= 6 * one_at_a_time and (at16["ttft_p50_s"] or 99) < 1.0,
        }
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests; the 60M model at 1 and 16 clients")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least (and baseline)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a small shared CPU, threads mostly wait on "
                             "each other)")
    args = parser.parse_args()
    THREADS[0] = args.threads
    import torch

    torch.set_num_threads(args.threads)
    if args.quick:
        args.min_requests = 4

    from stoker.demo import ensure_demo_models

    demo = ensure_demo_models()["chat"]
    started = time.perf_counter()
    report: dict[str, Any] = {"bench": "api", "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        work = Path(tmp)
        random_dir, params = build_random_model(demo, work / "random-60m")
        report["models"] = {
            "demo_chat": bench_model("demo", demo, "chat", work, args, LEVELS),
            "random_60m": {"parameters": params, **bench_model(
                "random-60m", random_dir, "completion", work, args, (1, 16) if args.quick else LEVELS)},
        }
    report["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
