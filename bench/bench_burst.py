"""A burst of new prompts arriving while streams run: time to first token and the running streams' stall, by
``max_prefill_tokens`` (padded prompt tokens per prefill forward; the engine prefills one such group per loop
iteration, with a decode step of the running rows between groups).

Model: the real demo model (SmolLM2-135M-Instruct, float32). ``--streams`` requests are decoding when ``--burst``
new ones arrive at once, each a real alpaca_en_demo instruction in the chat template, ``--new-tokens`` each. One
model object, one engine per setting; the largest setting puts the whole burst in one forward (how the engine
prefilled a burst before groups were spread over iterations), the baseline of the ratios. The prefix cache is off
(the prompts share the template's system prompt; ``bench_prefix.py`` measures that). Reported per setting:

- ``ttft_p50_s`` / ``ttft_p90_s`` / ``ttft_max_s``: the burst's time to first token (a histogram's worth in ``ttft_s``);
- ``stream_stall_s``: the longest gap between two tokens of a running stream while the burst is prefilled;
- ``burst_wall_s``: until the burst's last request ends (the price of more, smaller forwards).

The same for one long prompt alone (``--long-tokens``, default 1500): in one forward it stalls the running streams
for its whole prefill; above ``max_prefill_tokens`` the engine prefills it in chunks of columns, one per iteration.

Prints ONE JSON line.

    python bench/bench_burst.py [--burst 16] [--streams 4] [--settings 8192,1024,512,256] [--threads N]
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


def load_demo_model(threads: int):
    """(folder, tokenizer, float32 model) of the demo model SmolLM2-135M-Instruct, on ``threads`` (0: torch's
    default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stoker.demo import ensure_demo_models

    if threads:
        torch.set_num_threads(threads)
    folder = ensure_demo_models(names=["smol"])["smol"]
    return (folder, AutoTokenizer.from_pretrained(folder),
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` in the model's chat template, ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def prompts(tokenizer, count: int) -> list[list[int]]:
    rows = json.loads((SHARED / "data" / "llamafactory" / "alpaca_en_demo.json").read_text())
    return [render(tokenizer, [{"role": "user", "content": row["instruction"] + ("\n" + row["input"] if row["input"]
                                                                               else "")}]) for row in rows[:count]]


async def one_setting(engine, story: list[int], burst: list[list[int]], streams: int, new_tokens: int) -> dict:
    from stoker.engines.base import GenerationRequest, SamplingParams

    stamps: list[list[float]] = [[] for _ in range(streams)]
    started = asyncio.Event()
    finished = asyncio.Event()

    async def running(i: int) -> None:
        async for delta in engine.stream(GenerationRequest(story, SamplingParams(4096, ignore_eos=True))):
            stamps[i].append(time.perf_counter())
            if len(stamps[i]) == 4 and all(len(s) >= 4 for s in stamps):
                started.set()
            if finished.is_set():
                break

    async def newcomer(prompt: list[int], t0: float) -> tuple[float, float]:
        first = None
        async for _ in engine.stream(GenerationRequest(prompt, SamplingParams(new_tokens, ignore_eos=True))):
            first = first or time.perf_counter() - t0
        return first or 0.0, time.perf_counter() - t0

    tasks = [asyncio.create_task(running(i)) for i in range(streams)]
    await asyncio.wait_for(started.wait(), 120)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(newcomer(p, t0) for p in burst))
    end = time.perf_counter()
    finished.set()
    await asyncio.gather(*tasks)
    ttft = sorted(r[0] for r in results)
    last_first = t0 + ttft[-1]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < last_first]
    return {
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 3),
        "ttft_max_s": round(ttft[-1], 3),
        "ttft_s": [round(t, 3) for t in ttft],
        "stream_stall_s": round(max(gaps), 3) if gaps else None,
        "burst_wall_s": round(end - t0, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--settings", default="8192,1024,512,256", help="max_prefill_tokens values, baseline first")
    parser.add_argument("--long-tokens", type=int, default=1500, help="the long prompt's length")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from stoker.engines.hf import HFEngine

    folder, tokenizer, model = load_demo_model(args.threads)
    burst = prompts(tokenizer, args.burst)
    settings = [int(v) for v in args.settings.split(",")]
    report: dict[str, dict] = {}
    long: dict[str, dict] = {}
    # One long prompt alone: the instructions and answers of many rows, as one user message.
    rows = json.loads((SHARED / "data" / "llamafactory" / "alpaca_en_demo.json").read_text())
    text = "\n\n".join(r["instruction"] + "\n" + r["output"] for r in rows)
    long_prompt = render(tokenizer, [{"role": "user", "content": "Summarize:\n" + text}])[-args.long_tokens:]
    for setting in settings:
        engine = HFEngine(model, tokenizer, max_prefill_tokens=setting, prefix_cache_tokens=0)
        try:
            asyncio.run(one_setting(engine, burst[0], burst[:2], 1, 2))  # warm-up
            report[str(setting)] = asyncio.run(one_setting(engine, burst[0], burst, args.streams, args.new_tokens))
            long[str(setting)] = asyncio.run(one_setting(engine, burst[0], [long_prompt], args.streams,
                                                         args.new_tokens))
        finally:
            engine.close()
    base = report[str(settings[0])]
    print(json.dumps({
        "bench": "burst",
        "model": folder.name,
        "torch_threads": torch.get_num_threads(),
        "burst": args.burst,
        "streams": args.streams,
        "prompt_tokens_mean": round(statistics.mean(len(p) for p in burst), 1),
        "new_tokens": args.new_tokens,
        "by_max_prefill_tokens": report,
        "ttft_p50_ratio_vs_one_forward": {k: round(v["ttft_p50_s"] / base["ttft_p50_s"], 2) for k, v in report.items()},
        "stall_ratio_vs_one_forward": {k: round((v["stream_stall_s"] or 0) / (base["stream_stall_s"] or 1), 2)
                                       for k, v in report.items()},
        "long_prompt_tokens": len(long_prompt),
        "long_prompt_by_max_prefill_tokens": {k: {"ttft_s": v["ttft_max_s"], "stream_stall_s": v["stream_stall_s"]}
                                              for k, v in long.items()},
    }))


if __name__ == "__main__":
    main()
