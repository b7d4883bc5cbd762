"""quantization_bit on CPU: memory and speed of bitsandbytes 8-bit and 4-bit against float32, in one process.

Model: a seeded random Llama the size of a small real one (hidden 768, 8 layers, ~62M parameters, the stories260K
tokenizer's 512-token vocabulary widened to 32000 rows), saved to a temporary folder and loaded three times through
Stoker's own loader, as ``quantization_bit`` loads a model. For each: the weights' memory
(``get_memory_footprint``), and greedy decode tokens/s through the engine for 1 request and for 16 at once. Prints
ONE JSON line, with each quantized figure also as a ratio to float32 measured in the same run.

Usage: ``python bench/bench_quant.py [--new-tokens 32] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def build(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "stories260K" / "hf")
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[2] = 0.0  # no early stop: every run makes all its tokens
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def measure(folder: Path, bits: int | None, new_tokens: int) -> dict[str, float]:
    from stoker.chat import GenerationRequest, SamplingParams
    from stoker.config import settings_from_dict
    from stoker.engines.factory import open_engine

    raw = {"model_name_or_path": str(folder), "template": "empty"}
    if bits:
        raw["quantization_bit"] = bits
    opened = open_engine(settings_from_dict(raw))
    engine = opened.engine
    try:
        memory = engine.model.get_memory_footprint()  # type: ignore[attr-defined]
        prompt = opened.tokenizer("Once upon a time, there was a little girl")["input_ids"]
        params = SamplingParams(max_new_tokens=new_tokens)

        def run(n: int) -> float:
            requests = [GenerationRequest(prompt_ids=prompt, params=params) for _ in range(n)]
            start = time.perf_counter()
            done = engine.generate_batch(requests)
            return sum(c.completion_tokens for c in done) / (time.perf_counter() - start)

        run(1)  # warm-up
        return {"weights_mib": round(memory / 2**20, 1), "tok_s_1": round(max(run(1) for _ in range(2)), 1),
                "tok_s_16": round(max(run(16) for _ in range(2)), 1)}
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder)
        results = {name: measure(folder, bits, args.new_tokens) for name, bits in
                   (("float32", None), ("bnb_8bit", 8), ("bnb_4bit", 4))}
    base = results["float32"]
    for name in ("bnb_8bit", "bnb_4bit"):
        for key in ("weights_mib", "tok_s_1", "tok_s_16"):
            results[name][f"{key}_vs_float32"] = round(results[name][key] / base[key], 3)
    print(json.dumps({"bench": "quant", "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                      **results}))


if __name__ == "__main__":
    main()
