"""One request alone on the huggingface engine: tokens/s against ``model.generate`` and the memory-bandwidth limit.

A request served alone is bound by reading every weight once per token, so the bench measures the machine's memory
bandwidth itself (the best of several sums over a 512 MiB float32 tensor) and reports each rate as a share of
``bandwidth / bytes of weights read per token``.

Model: the real demo model (SmolLM2-135M-Instruct, float32; ``--model DIR`` for another folder). One model object
serves three runs, interleaved ``--repeats`` times so that drift in a shared machine hits all alike, each the median:

- ``generate``: plain ``model.generate`` (greedy, exactly ``--new-tokens`` tokens), the baseline;
- ``engine_stock``: ``HFEngine`` with ``cpu_matmul: stock`` (the engine's own per-step cost on stock kernels);
- ``engine``: ``HFEngine`` with the default ``cpu_matmul: auto`` (``engines/cpu_linear.py``);
- ``engine_int8``, ``engine_int4``: ``cpu_matmul: int8`` / ``int4`` (``engines/cpu_quant.py``), each on its own copy
  of the model, since they quantize its weights in place. Their bandwidth share counts the bytes they read.

Greedy tokens of the float32 engines are checked against ``generate``'s; those of a quantized engine against
``generate`` on the same quantized model inside the same kernels, and how many leading tokens agree with float32 is
reported. Prints ONE JSON line.

    python bench/bench_single_stream.py [--new-tokens 64] [--repeats 3] [--threads N] [--model DIR]
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
sys.path.insert(0, str(ROOT / "src"))

ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper and her cat."}]


def memory_bandwidth() -> float:
    """Bytes per second that a sum over a tensor far bigger than any cache reads, best of five."""
    import torch

    big = torch.ones(128 * 1024 * 1024)  # 512 MiB
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * big.element_size() / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def weight_bytes_per_token(model) -> int:
    """Every parameter is read once per decode step, except the embedding table: one row of it (a tied output
    layer reads all of it, and is counted as that layer)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    row = embedding.shape[1] * embedding.element_size()
    return total + (embedding.numel() * embedding.element_size() if tied else row)


def quantized_bytes_per_token(model) -> int:
    """What a quantized decode step reads: a quantized layer's integers and scales instead of its float32 weight (the
    float32 copy is still held, for prefills, but a small step does not read it), plus one embedding row."""
    from stoker.engines.cpu_linear import quantized_weight

    embedding = model.get_input_embeddings().weight
    total = embedding.shape[1] * embedding.element_size()
    seen = {id(embedding)}
    for module in model.modules():
        quant = quantized_weight(module)
        for name, p in module.named_parameters(recurse=False):
            if quant is not None and name == "weight":
                total += quant.data.numel() * quant.data.element_size() + quant.scales.numel() * 2
            elif id(p) not in seen:
                total += p.numel() * p.element_size()
            seen.add(id(p))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--model", help="a model folder (default: the demo model SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stoker.engines.base import GenerationRequest, SamplingParams
    from stoker.engines.cpu_linear import CpuLinears
    from stoker.engines.hf import HFEngine

    if args.model:
        folder = Path(args.model)
    else:
        from stoker.demo import ensure_demo_models

        folder = ensure_demo_models(names=["smol"])["smol"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = list(prompt["input_ids"])
    new = args.new_tokens

    def generate(on: object = model) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        with torch.inference_mode():
            out = on.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=tokenizer.pad_token_id or 0)
        tokens = out[0, len(prompt):].tolist()
        return len(tokens) / (time.perf_counter() - started), tokens

    def engine_run(engine: HFEngine) -> tuple[float, list[int]]:
        async def one() -> list[int]:
            tokens: list[int] = []
            async for delta in engine.stream(GenerationRequest(prompt, SamplingParams(new, ignore_eos=True))):
                tokens.extend(delta.token_ids)
            return tokens

        started = time.perf_counter()
        tokens = asyncio.run(one())
        return len(tokens) / (time.perf_counter() - started), tokens

    engines = {"engine_stock": HFEngine(model, tokenizer, cpu_matmul="stock"),
               "engine": HFEngine(model, tokenizer, cpu_matmul="auto")}
    references: dict[str, list[int]] = {}
    read: dict[str, int] = {}
    leading: dict[str, int] = {}
    reference = generate()[1]  # also the warm-up
    for mode in ("int8", "int4"):
        copy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        linears = CpuLinears.install(copy, mode)  # the engine below reuses these forwards
        with linears.active():
            references[f"engine_{mode}"] = generate(copy)[1]
        engines[f"engine_{mode}"] = HFEngine(copy, tokenizer, cpu_matmul=mode)
        read[f"engine_{mode}"] = quantized_bytes_per_token(copy)
        leading[f"engine_{mode}"] = next(
            (i for i, (a, b) in enumerate(zip(reference, references[f"engine_{mode}"])) if a != b), new)
    rates: dict[str, list[float]] = {"generate": [], **{name: [] for name in engines}}
    same: dict[str, bool] = {}
    try:
        for engine in engines.values():
            engine_run(engine)
        for _ in range(args.repeats):
            rates["generate"].append(generate()[0])
            for name, engine in engines.items():
                rate, tokens = engine_run(engine)
                rates[name].append(rate)
                same[name] = same.get(name, True) and tokens == references.get(name, reference)
    finally:
        for engine in engines.values():
            engine.close()

    bandwidth = memory_bandwidth()
    per_token = weight_bytes_per_token(model)
    bound = bandwidth / per_token
    medians = {name: statistics.median(values) for name, values in rates.items()}
    bounds = {name: bandwidth / read.get(name, per_token) for name in rates}
    print(json.dumps({
        "bench": "single_stream",
        "model": folder.name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "torch_threads": torch.get_num_threads(),
        "new_tokens": new,
        "prompt_tokens": len(prompt),
        "repeats": args.repeats,
        "memory_gb_s": round(bandwidth / 1e9, 1),
        "weight_mb_per_token": round(per_token / 1e6, 1),
        "bandwidth_bound_tok_s": round(bound, 1),
        "tok_s": {name: round(rate, 1) for name, rate in medians.items()},
        "ratio_vs_generate": {name: round(medians[name] / medians["generate"], 2) for name in engines},
        "weight_mb_per_token_quantized": {name: round(n / 1e6, 1) for name, n in read.items()},
        "share_of_bound": {name: round(rate / bounds[name], 2) for name, rate in medians.items()},
        "greedy_equal_to_generate": same,
        "quantized_leading_tokens_equal_to_float32": leading,
    }))


if __name__ == "__main__":
    main()
