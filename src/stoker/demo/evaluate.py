"""Ask a demo model the task questions with greedy decoding and score exact answers.

The build runs this and refuses to publish a model below its gate; tests run it on the published models.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stoker.demo.tasks import Case


class DemoBuildError(RuntimeError):
    """A demo model failed its accuracy gate: the recipe is broken and the build must not ship it."""


@dataclass
class Score:
    accuracy: dict[str, float]  # task -> fraction answered exactly
    counts: dict[str, int]  # task -> number of cases
    failures: list[tuple[Case, str]] = field(default_factory=list)  # (case, what the model said)


def greedy_replies(model: Any, tokenizer: Any, cases: Sequence[Case], *, batch_size: int = 64) -> list[str | None]:
    """The model's greedy reply to each case (special tokens skipped), or None where it did not end its turn."""
    import torch

    eos = tokenizer.eos_token_id
    longest = max(len(tokenizer.encode(c.answer, add_special_tokens=False)) for c in cases)
    prompts = [tokenizer.apply_chat_template(list(c.messages), add_generation_prompt=True, tokenize=False) for c in cases]
    replies: list[str | None] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its end
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **batch,
                    do_sample=False,
                    max_new_tokens=longest + 4,
                    eos_token_id=eos,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for row in out[:, batch["input_ids"].shape[1] :].tolist():
                if eos not in row:
                    replies.append(None)
                    continue
                replies.append(tokenizer.decode(row[: row.index(eos)], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
    return replies


def evaluate(model: Any, tokenizer: Any, cases: Sequence[Case]) -> Score:
    """Per-task exact-match accuracy of greedy replies."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    failures = []
    for case, reply in zip(cases, greedy_replies(model, tokenizer, cases), strict=True):
        total[case.task] += 1
        if reply == case.answer:
            right[case.task] += 1
        else:
            failures.append((case, reply if reply is not None else "<no end of turn>"))
    return Score({t: right[t] / total[t] for t in total}, dict(total), failures)


def check_gate(score: Score, gate: float, what: str) -> None:
    """Raise ``DemoBuildError`` unless every task reaches ``gate``, showing a few wrong answers."""
    below = {t: a for t, a in score.accuracy.items() if a < gate}
    if below:
        shown = "\n".join(f"  {c.messages[-1]['content']!r}: wanted {c.answer!r}, got {r!r}" for c, r in score.failures[:8])
        raise DemoBuildError(
            f"{what} failed its accuracy gate ({gate:.0%}): "
            + ", ".join(f"{t} {a:.1%}" for t, a in sorted(below.items()))
            + f"\nsome wrong answers:\n{shown}\nThe demo recipe is broken; fix it in src/stoker/demo/."
        )
