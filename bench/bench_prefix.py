"""The prefix cache (``prefix_cache_tokens``): time to first token with it and without it, on the real demo model.

Model: SmolLM2-135M-Instruct, float32. One model object, two engines (``prefix_cache_tokens`` 4096 and 0), run one
after the other on the same prompts, each scenario with a fresh engine pair. Greedy outputs of the two are compared.

- ``conversation``: a chat of ``--turns`` turns, each user message an alpaca_en_demo instruction and each reply the
  model's own (32 tokens); every turn's prompt is the whole history in the chat template, as an API client sends it.
  Reported: the TTFT of each turn, and the sum.
- ``system_prompt``: ``--burst`` requests arrive one after another, each with the same long system prompt (the
  first alpaca_en_demo answers, about ``--system-tokens`` tokens) and its own question; TTFT p50.

Prints ONE JSON line.

    python bench/bench_prefix.py [--turns 8] [--burst 8] [--system-tokens 400] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_burst import load_demo_model, render  # noqa: E402


async def first_token(engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    from stoker.engines.base import GenerationRequest, SamplingParams

    started = time.perf_counter()
    ttft, tokens = None, []
    async for delta in engine.stream(GenerationRequest(prompt, SamplingParams(new_tokens))):
        ttft = ttft or time.perf_counter() - started
        tokens.extend(delta.token_ids)
    return ttft or 0.0, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from stoker.engines.hf import HFEngine

    folder, tokenizer, model = load_demo_model(args.threads)
    rows = json.loads((SHARED / "data" / "llamafactory" / "alpaca_en_demo.json").read_text())
    asks = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in rows]
    settings = {"cached": 4096, "uncached": 0}
    report: dict[str, dict] = {name: {} for name in settings}
    same: dict[str, bool] = {}

    # A conversation: the cached engine replies, both engines see the same history turn by turn.
    engines = {name: HFEngine(model, tokenizer, prefix_cache_tokens=tokens) for name, tokens in settings.items()}
    try:
        messages: list[dict] = []
        turns: dict[str, list[float]] = {name: [] for name in settings}
        equal = True
        for turn in range(args.turns):
            messages.append({"role": "user", "content": asks[turn]})
            prompt = render(tokenizer, messages)
            replies = {}
            for name, engine in engines.items():
                ttft, replies[name] = asyncio.run(first_token(engine, prompt, 32))
                turns[name].append(ttft)
            equal = equal and replies["cached"] == replies["uncached"]
            messages.append({"role": "assistant", "content": tokenizer.decode(replies["cached"],
                                                                                skip_special_tokens=True)})
        same["conversation"] = equal
        for name in settings:
            report[name]["conversation_ttft_s"] = [round(t, 3) for t in turns[name]]
            report[name]["conversation_ttft_sum_s"] = round(sum(turns[name]), 2)
        last_prompt_tokens = len(prompt)
    finally:
        for engine in engines.values():
            engine.close()

    # One long system prompt, many questions.
    system = ""
    while len(tokenizer(system)["input_ids"]) < args.system_tokens:
        system += rows[len(system) % len(rows)]["output"] + "\n"
    engines = {name: HFEngine(model, tokenizer, prefix_cache_tokens=tokens) for name, tokens in settings.items()}
    try:
        prompts = [render(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": ask}])
                   for ask in asks[100:100 + args.burst]]
        outputs: dict[str, list[list[int]]] = {}
        for name, engine in engines.items():
            results = [asyncio.run(first_token(engine, p, 8)) for p in prompts]
            report[name]["system_prompt_ttft_p50_s"] = round(statistics.median(r[0] for r in results), 3)
            report[name]["system_prompt_ttft_first_s"] = round(results[0][0], 3)
            outputs[name] = [r[1] for r in results]
            report[name]["prefix_cache_hit_tokens"] = engine.stats().get("prefix_cache_hit_tokens_total", 0)
        same["system_prompt"] = outputs["cached"] == outputs["uncached"]
    finally:
        for engine in engines.values():
            engine.close()

    print(json.dumps({
        "bench": "prefix_cache",
        "model": folder.name,
        "torch_threads": torch.get_num_threads(),
        "turns": args.turns,
        "last_turn_prompt_tokens": last_prompt_tokens,
        "system_prompt_tokens": len(prompts[0]),
        "by_setting": report,
        "conversation_ttft_ratio": round(report["cached"]["conversation_ttft_sum_s"]
                                         / report["uncached"]["conversation_ttft_sum_s"], 2),
        "system_prompt_ttft_p50_ratio": round(report["cached"]["system_prompt_ttft_p50_s"]
                                              / report["uncached"]["system_prompt_ttft_p50_s"], 2),
        "greedy_equal_cached_vs_uncached": same,
    }))


if __name__ == "__main__":
    main()
