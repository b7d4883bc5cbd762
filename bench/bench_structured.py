"""What a JSON schema costs on the huggingface engine: tokens/s with and without a constraint, 1 and 16 streams.

Workload: the real demo model (SmolLM2-135M-Instruct, float32), greedy, a chat prompt asking for a story as JSON,
``--new-tokens`` tokens per stream. Unconstrained, the reply is free text; constrained, it is decoded under
``{"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}`` (a long string keeps
both runs generating the same number of tokens). The same engine runs both, interleaved, so the ratio compares
like with like. Target (docs/api.md): constrained within 15% of unconstrained at 1 and 16 streams.

    python bench/bench_structured.py [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON with the key story."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from stoker.chat import StructuredOutput, open_chat_service
    from stoker.config import settings_from_dict
    from stoker.demo import ensure_demo_models

    model = ensure_demo_models(names=["smol"])["smol"]
    service = open_chat_service(settings_from_dict({"model_name_or_path": str(model), "template": "auto"}))
    constraint = StructuredOutput.json_schema(SCHEMA, param="bench")
    results = []
    try:
        def run(streams: int, structured: StructuredOutput | None) -> tuple[float, int, bool]:
            params = service.sampling_params(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                             structured=structured)
            requests = [service.prepare(ASK, params).request for _ in range(streams)]
            started = time.perf_counter()
            done = service.generate_batch(requests)
            wall = time.perf_counter() - started
            tokens = sum(len(c.choices[0].token_ids) for c in done)
            text = done[0].choices[0].text
            valid_prefix = structured is None or text.lstrip().startswith('{"story"') or text.lstrip().startswith("{")
            return tokens / wall, tokens, valid_prefix

        run(1, constraint)  # the first constrained request builds the vocabulary table (~0.5 s): not measured
        for streams in (1, 16):
            free, held = [], []
            for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
                free.append(run(streams, None)[0])
                rate, tokens, ok = run(streams, constraint)
                assert ok, "the constrained reply does not start as the schema says"
                held.append(rate)
            row = {"streams": streams, "new_tokens": args.new_tokens,
                   "free_tokens_per_s": round(statistics.median(free), 1),
                   "constrained_tokens_per_s": round(statistics.median(held), 1)}
            row["constrained_over_free"] = round(row["constrained_tokens_per_s"] / row["free_tokens_per_s"], 3)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        service.close()
    worst = min(r["constrained_over_free"] for r in results)
    print(f"constrained / free, worst of 1 and 16 streams: {worst:.3f} (target >= 0.85)")


if __name__ == "__main__":
    main()
