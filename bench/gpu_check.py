"""The engine on one CUDA GPU: greedy equality with ``generate`` and throughput at 1, 16 and 64 streams.

Meant for a bare GPU machine that has torch (CUDA), transformers, peft and accelerate but no registry, no vLLM,
FastAPI or Gradio: it imports only the engine (``stoker.engines``) and the launch rule (``stoker.predict.launch``),
builds its models in memory and needs no download.

1. A Llama-3-8B-shaped model with random weights (bf16, about 16 GB): tokens/s of the engine at 1, 16 and 64
   concurrent streams against ``generate`` on the same prompts in the same run (one call per stream count, all
   prompts of one length, so ``generate`` pads nothing), peak memory, and how many streams' greedy tokens equal
   ``generate``'s. bf16 sums in a different order in another batch shape, so with random weights (nearly flat
   logits) a few streams may differ after some tokens; the count is reported, not asserted.
2. The real stories260K model (``../shared/models/stories260K/hf`` or ``shared/...``) in float32 on the GPU: greedy
   tokens of 16 concurrent prompts must equal ``generate`` alone, token for token (this one is asserted).
3. The multi-GPU launch decision ``stoker predict`` would take on this machine.

Prints one JSON line per part and exits 1 if the equality check of part 2 fails. ``--quick`` runs a small 2-layer model
for part 1 (a smoke test of the script itself on any machine, CPU included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def word_tokenizer(vocab_size: int):
    """A tokenizer over ``vocab_size`` made-up words: the engine detokenizes, and no real one can be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w0")


def engine_tokens(model, tokenizer, prompts: list[list[int]], new: int, **engine_kw) -> tuple[list[list[int]], float]:
    from stoker.engines.base import GenerationRequest, SamplingParams
    from stoker.engines.hf import HFEngine

    engine = HFEngine(model, tokenizer, eos_ids=[], max_num_seqs=max(64, len(prompts)), max_batch_tokens=1 << 20,
                      **engine_kw)
    try:
        engine.generate_batch([GenerationRequest(prompts[0], SamplingParams(max_new_tokens=4))])  # warm-up
        _sync()
        start = time.perf_counter()
        done = engine.generate_batch([GenerationRequest(p, SamplingParams(max_new_tokens=new)) for p in prompts])
        _sync()
        return [list(c.choices[0].token_ids) for c in done], time.perf_counter() - start
    finally:
        engine.close()


def generate_tokens(model, prompts: list[list[int]], new: int) -> tuple[list[list[int]], float]:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)  # every prompt has the same length: no padding
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)  # warm-up
        _sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        _sync()
    return out[:, ids.shape[1]:].tolist(), time.perf_counter() - start


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_llama8b(quick: bool, new: int, prompt_len: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    if quick:  # the same kinds of layers, small enough for a CPU
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=4096)
    config = LlamaConfig(**shape, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no 32 GB float32 copy first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    tokenizer = word_tokenizer(config.vocab_size)
    gen = torch.Generator().manual_seed(1)
    report: dict = {"part": "llama3_8b_shape_random_bf16", "device": device, "layers": config.num_hidden_layers,
                    "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2), "new_tokens": new,
                    "prompt_tokens": prompt_len}  # fmt: skip
    for streams in (1, 16, 64):
        prompts = torch.randint(10, config.vocab_size, (streams, prompt_len), generator=gen).tolist()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ours, t_ours = engine_tokens(model, tokenizer, prompts, new)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        ref, t_ref = generate_tokens(model, prompts, new)
        report[f"streams_{streams}"] = {
            "engine_tok_s": round(streams * new / t_ours, 1), "generate_tok_s": round(streams * new / t_ref, 1),
            "speedup": round(t_ref / t_ours, 2), "greedy_equal_streams": sum(a == b for a, b in zip(ours, ref)),
            "engine_peak_gib": round(peak, 2) if peak is not None else None}  # fmt: skip
    return report


def part_stories(new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "models/stories260K/hf").is_dir()),
                  None)
    if folder is None:
        return {"part": "stories260K", "skipped": "no shared/models/stories260K/hf"}
    path = folder / "models/stories260K/hf"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    starts = ["Once upon a time", "The cat", "Lily and Tom", "One day", "There was a big", "A little bird"] * 3
    prompts = [tokenizer(s).input_ids for s in starts[:16]]
    ours, _ = engine_tokens(model, tokenizer, prompts, new)
    alone = []
    for p in prompts:
        tokens, _ = generate_tokens(model, [p], new)
        alone.append(tokens[0])
    return {"part": "stories260K", "device": device, "prompts": len(prompts), "new_tokens": new,
            "greedy_equal": sum(a == b for a, b in zip(ours, alone)),
            "story": tokenizer.decode(prompts[0] + ours[0], skip_special_tokens=True)[:120]}  # fmt: skip


def part_launch() -> dict:
    from stoker.predict.launch import plan_launch, visible_devices

    devices, memory = visible_devices()
    eight_b = 16 * 10**9
    plans = {backend: plan_launch(dict(os.environ), devices, backend=backend, model_bytes=eight_b,
                                  device_bytes=memory, heads=32).reason for backend in ("huggingface", "vllm")}
    return {"part": "launch", "gpus": devices, "gpu_memory_gib": round(memory / 2**30, 1) if memory else None,
            "predict_8b": plans}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer model for part 1 (a smoke test anywhere)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args()
    import torch
    import transformers

    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
    print(json.dumps(part_launch()), flush=True)
    stories = part_stories(args.new_tokens)
    print(json.dumps(stories), flush=True)
    print(json.dumps(part_llama8b(args.quick, args.new_tokens, args.prompt_tokens)), flush=True)
    return 0 if stories.get("skipped") or stories["greedy_equal"] == stories["prompts"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
