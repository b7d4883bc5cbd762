"""The vllm backend against the huggingface backend on the same model, in one process.

Two workloads, greedy, float32:
- offline (what predict does): ``--prompts`` requests of ``--new-tokens`` tokens through ``generate_batch``;
- streaming (what the API does): ``--streams`` concurrent ``stream`` calls, each of ``--new-tokens`` tokens;
  aggregate tokens/s and the median time to the first delta.

Model: a Llama with seeded random weights on the demo tokenizer (``--size small``: the demo chat model's shape,
2.8M parameters; ``medium``: 768 wide, 8 layers, about 60M), with every special token's output row zeroed so
greedy decoding never ends a request early: each one runs exactly ``--new-tokens`` tokens. ``--model DIR`` runs a
model folder of your own instead (replies then end where the model ends them).

The huggingface engine runs first, then is closed before vLLM starts. vLLM runs in-process on CPU
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, Stoker's default there); run with ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` in the
environment to measure vLLM's multiprocess mode. Prints ONE JSON line.

    .venv/bin/python bench/bench_vllm.py [--size small|medium] [--prompts 64] [--new-tokens 64] [--streams 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = {
    "small": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3, "num_attention_heads": 4},
    "medium": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 8, "num_attention_heads": 12},
}


def build_model(out: Path, size: str, tokenizer_dir: Path | None) -> Path:
    """A random Llama (head size 64, which vLLM's CPU attention needs) on the demo tokenizer; never stops early."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stoker.config import settings_from_dict
    from stoker.models.loader import load_tokenizer

    if tokenizer_dir is None:
        from stoker.demo import ensure_demo_models

        tokenizer_dir = ensure_demo_models()["chat"]
    tokenizer = load_tokenizer(settings_from_dict({"model_name_or_path": str(tokenizer_dir)}))
    shape = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer), **shape, num_key_value_heads=shape["num_attention_heads"], head_dim=64,
        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # A zero output row gives logit 0, below the largest of the other random logits: greedy never picks it.
        model.lm_head.weight[list(tokenizer.all_special_ids)] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    words = "apple river stone cloud lamp train bird rose key cup".split()
    texts = [f"Story {i}: the {words[i % 10]} and the {words[(i * 3 + 1) % 10]} went" for i in range(count)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def run_engine(engine: Any, ids: list[list[int]], streams: int, new_tokens: int) -> dict[str, Any]:
    from stoker.engines.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    engine.generate_batch([GenerationRequest(ids[0], SamplingParams(max_new_tokens=4))])  # warm up
    t0 = time.perf_counter()
    done = engine.generate_batch([GenerationRequest(p, params) for p in ids])
    offline_s = time.perf_counter() - t0
    offline_tokens = sum(c.completion_tokens for c in done)

    async def one(p: list[int]) -> tuple[int, float]:
        start = time.perf_counter()
        first = None
        tokens = 0
        async for delta in engine.stream(GenerationRequest(p, params)):
            if first is None:
                first = time.perf_counter() - start
            tokens += len(delta.token_ids)
        return tokens, first or 0.0

    async def all_streams() -> list[tuple[int, float]]:
        return await asyncio.gather(*(one(ids[i % len(ids)]) for i in range(streams)))

    t0 = time.perf_counter()
    results = asyncio.run(all_streams())
    stream_s = time.perf_counter() - t0
    stream_tokens = sum(t for t, _ in results)
    return {
        "offline_tok_s": round(offline_tokens / offline_s, 1),
        "offline_tokens": offline_tokens,
        "stream_tok_s": round(stream_tokens / stream_s, 1),
        "stream_ttft_p50_s": round(statistics.median(f for _, f in results), 4),
        "token_ids": [c.choices[0].token_ids for c in done],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--model", type=Path, help="a model folder instead of the random model")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the random model (default: the demo's)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()

    from stoker.config import settings_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or build_model(Path(tmp) / "model", args.size, args.tokenizer)
        settings = settings_from_dict({
            "model_name_or_path": str(folder), "infer_backend": "vllm", "vllm_enforce_eager": True,
            "vllm_kv_cache_space": 1, "vllm_maxlen": 1024, "max_num_seqs": max(args.prompts, args.streams)})

        from stoker.engines.hf import HFEngine
        from stoker.models.loader import load_model

        t0 = time.perf_counter()
        loaded = load_model(settings)
        hf = HFEngine(loaded.model, loaded.tokenizer, max_num_seqs=settings.max_num_seqs)
        hf_start = time.perf_counter() - t0
        params = round(sum(p.numel() for p in loaded.model.parameters()) / 1e6, 2)
        ids = prompts(loaded.tokenizer, args.prompts)
        hf_result = run_engine(hf, ids, args.streams, args.new_tokens)
        hf.close()
        del hf, loaded

        from stoker.engines.vllm import open_vllm_engine

        t0 = time.perf_counter()
        engine, _, _, _ = open_vllm_engine(settings)
        vllm_start = time.perf_counter() - t0
        vllm_result = run_engine(engine, ids, args.streams, args.new_tokens)
        engine.close()

    identical = hf_result.pop("token_ids") == vllm_result.pop("token_ids")
    print(json.dumps({
        "bench": "vllm_vs_huggingface",
        "model": str(args.model) if args.model else f"random-{args.size}",
        "params_m": params,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "streams": args.streams,
        "vllm_multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "start_s": {"huggingface": round(hf_start, 2), "vllm": round(vllm_start, 2)},
        "huggingface": hf_result,
        "vllm": vllm_result,
        "offline_speedup": round(vllm_result["offline_tok_s"] / hf_result["offline_tok_s"], 2),
        "stream_speedup": round(vllm_result["stream_tok_s"] / hf_result["stream_tok_s"], 2),
        "greedy_identical": identical,
    }))


if __name__ == "__main__":
    main()
