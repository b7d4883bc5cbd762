"""Batch prediction throughput: Stoker's predict runner against plain ``transformers`` generate, in one process.

Workload: the first ``--rows`` rows of LLaMA-Factory's alpaca_en_demo (../shared/data/llamafactory), rendered by the
chat service for the demo chat model, greedy, ``--new-tokens`` new tokens at most (a row also ends at the model's
end of turn). All three contenders get the same prompt token ids and the same stop token, on the same model object:

- ``stoker``: ``runner.generate_rows``, the loop ``stoker predict`` runs (chunks in flight on the continuous-batching
  engine, up to ``max_num_seqs`` rows decoding together whatever ``per_device_eval_batch_size`` says, each row
  appended to a part file);
- ``stoker_capped`` (with ``--capped``): the same loop with the engine capped at ``per_device_eval_batch_size`` rows,
  as Stoker read the key before; with LLaMA-Factory's ``per_device_eval_batch_size: 1`` it decodes one row at a time;
- ``generate_batched``: ``model.generate`` over fixed batches of ``per_device_eval_batch_size`` rows in dataset
  order, left-padded (what LLaMA-Factory's ``do_predict`` does);
- ``generate_one_by_one``: ``model.generate`` one row at a time.

Model loading, rendering and scoring are outside the timings; each contender's best of ``--repeats`` interleaved
runs counts (the least disturbed one on a shared machine). Prints ONE JSON line with rows/s and generated
tokens/s for each, the speedups, and how many rows' text equals the one-by-one output.

Usage: ``python bench/bench_predict.py [--rows 200] [--new-tokens 64] [--batch-size 8] [--threads 1] [--repeats 3]``
(on a CPU shared with other jobs, ``--threads 1`` gives far steadier numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_eval_batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, interleaved; the best counts")
    parser.add_argument("--skip-one-by-one", action="store_true", help="leave out the slowest baseline")
    parser.add_argument("--skip-batched", action="store_true", help="leave out generate in fixed batches")
    parser.add_argument("--capped", action="store_true", help="add the engine capped at --batch-size rows")
    parser.add_argument("--cpu-matmul", default="auto", choices=["auto", "packed", "stock"], help="the engine's cpu_matmul")
    parser.add_argument("--model", default="demo:chat",
                        help="model folder (default demo:chat); 'stories' for ../shared's stories260K, template empty")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from stoker.config import load_settings
    from stoker.demo import ensure_demo_models
    from stoker.predict.data import load_datasets
    from stoker.predict.prompts import render_rows
    from stoker.predict.runner import RankStats, engine_settings, generate_rows
    from stoker.predict.writer import PartWriter
    from stoker.chat import open_chat_service

    model_keys: dict[str, str] = {"model_name_or_path": str(ensure_demo_models(names=["chat"])["chat"])}
    if args.model == "stories":
        model_keys = {"model_name_or_path": str(SHARED / "models" / "stories260K" / "hf"), "template": "empty"}
    elif args.model != "demo:chat":
        model_keys = {"model_name_or_path": args.model}
    settings = load_settings(None, {
        **model_keys, "max_new_tokens": args.new_tokens, "do_sample": False, "cpu_matmul": args.cpu_matmul,
        "per_device_eval_batch_size": args.batch_size,
    })  # fmt: skip
    data = load_datasets(["alpaca_en_demo"], SHARED / "data" / "llamafactory", max_samples=args.rows)
    service = open_chat_service(engine_settings(settings))
    rows, bad = render_rows(service, list(enumerate(data[0].examples)), cutoff_len=settings.cutoff_len)
    assert not bad, bad
    model, tokenizer = service.engine.model, service.tokenizer
    stop_ids = rows[0].request().params.stop_token_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [r.ids for r in rows]

    def trim(tokens: list[int]) -> list[int]:
        """Generated tokens up to and including the first stop token (generate pads finished rows)."""
        for i, token in enumerate(tokens):
            if token in stop_ids:
                return tokens[: i + 1]
        return tokens

    def generate(batch: list[list[int]]) -> list[list[int]]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad_id)
        return [trim(row[width:].tolist()) for row in out]

    def run_stoker(service: Any = service) -> tuple[float, int, list[str]]:
        stats = RankStats()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part.jsonl"
            with PartWriter(path) as part:
                start = time.perf_counter()
                generate_rows(service, rows, part, stats)
                elapsed = time.perf_counter() - start
            by_index = {r["index"]: r["predict"] for r in map(json.loads, path.read_text().splitlines())}
        return elapsed, stats.completion_tokens, [by_index[r.example.index] for r in rows]

    def texts(outputs: list[list[int]]) -> list[str]:
        """Each row's text as decoded after its prompt, as the engine's incremental detokenizer sees it (a
        sentencepiece word piece decodes to " word" after a prompt, but to "word" alone)."""
        def after_prompt(prompt: list[int], out: list[int]) -> str:
            head = tokenizer.decode(prompt, skip_special_tokens=True)
            return tokenizer.decode(prompt + out, skip_special_tokens=True)[len(head):]

        return [after_prompt(p, o) for p, o in zip(prompts, outputs)]

    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

    def run_batched() -> tuple[float, int, list[str]]:
        start = time.perf_counter()
        out = [t for batch in batches for t in generate(batch)]
        return time.perf_counter() - start, sum(map(len, out)), texts(out)

    def run_one_by_one() -> tuple[float, int, list[str]]:
        start = time.perf_counter()
        out = [generate([p])[0] for p in prompts]
        return time.perf_counter() - start, sum(map(len, out)), texts(out)

    # Warm-up (allocator, kernels, lazy imports).
    generate(prompts[:2])
    service.generate_batch([r.request() for r in rows[:2]])

    contenders: dict[str, Callable[[], tuple[float, int, list[str]]]] = {"stoker": run_stoker}
    if args.capped:
        capped = open_chat_service(dataclasses.replace(engine_settings(settings), max_num_seqs=args.batch_size))
        capped.generate_batch([r.request() for r in rows[:2]])
        contenders["stoker_capped"] = lambda: run_stoker(capped)
    if not args.skip_batched:
        contenders["generate_batched"] = run_batched
    if not args.skip_one_by_one:
        contenders["generate_one_by_one"] = run_one_by_one
    timings: dict[str, tuple[float, int, list[str]]] = {}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every contender alike
        for name, run in contenders.items():
            result = run()
            if name not in timings or result[0] < timings[name][0]:
                timings[name] = result
    service.close()
    if args.capped:
        capped.close()

    reference = next(timings[k][2] for k in ("generate_one_by_one", "generate_batched", "stoker_capped", "stoker")
                     if k in timings)
    report = {}
    for name, (seconds, tokens, outputs) in timings.items():
        report[name] = {"seconds": round(seconds, 2), "rows_s": round(len(rows) / seconds, 2),
                        "tok_s": round(tokens / seconds, 1), "tokens": tokens,
                        "rows_equal_to_reference": sum(a == b for a, b in zip(outputs, reference))}  # fmt: skip
    print(json.dumps({
        "bench": "predict",
        "model": args.model,
        "cpu_matmul": args.cpu_matmul,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "rows": len(rows),
        "new_tokens": args.new_tokens,
        "per_device_eval_batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "prompt_tokens": sum(len(p) for p in prompts),
        # What the fixed batches prefill, padding included: the work continuous batching can save on the prompts.
        "batched_padded_prompt_tokens": sum(max(map(len, b)) * len(b) for b in batches),
        "reference": next(k for k in ("generate_one_by_one", "generate_batched", "stoker_capped", "stoker")
                          if k in timings),
        **report,
        **{f"speedup_vs_{name.removeprefix('generate_')}": round(timings[name][0] / timings["stoker"][0], 2)
           for name in timings if name != "stoker"},
    }))


if __name__ == "__main__":
    main()
