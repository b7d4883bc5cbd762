"""The synthetic chat corpus the demo models learn from: random conversations over the task families.

Conversations have one to three exchanges, often a system prompt, and mix the tasks, so a system message or history
does not derail the model. Echo questions only use word sequences outside the held-out split (see ``tasks``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from stoker.demo.tasks import (
    ECHO_MAX_WORDS,
    ECHO_MIN_WORDS,
    FACTS,
    GREETING_ANSWER,
    GREETINGS,
    IDENTITY_QUESTIONS,
    SYSTEM_PROMPTS,
    Message,
    Task,
    echo_prompt,
    sample_echo_words,
)

_FACT_ITEMS = tuple(FACTS.items())
# Long answers need more practice to be recalled word for word (the count to ten dropped a word when sampled as
# often as one-word answers).
_FACT_WEIGHTS = tuple(1 + len(answer.split()) // 4 for answer in FACTS.values())


def exchange(rng: random.Random, task: Task, identity: str) -> tuple[str, str]:
    """One (question, answer) pair of the given task, as trained."""
    if task == "identity":
        return rng.choice(IDENTITY_QUESTIONS), identity
    if task == "echo":
        words = sample_echo_words(rng, heldout=False, min_words=ECHO_MIN_WORDS, max_words=ECHO_MAX_WORDS)
        return echo_prompt(words), " ".join(words)
    if task == "facts":
        return rng.choices(_FACT_ITEMS, weights=_FACT_WEIGHTS)[0]
    return rng.choice(GREETINGS), GREETING_ANSWER


def conversations(
    n: int,
    *,
    seed: str,
    identity: str,
    task_weights: Mapping[Task, float],
    system_rate: float,
    turn_weights: tuple[float, ...],
) -> list[list[Message]]:
    """``n`` conversations, each ending with an assistant turn; every assistant turn is a training target."""
    rng = random.Random(seed)
    tasks = list(task_weights)
    weights = list(task_weights.values())
    result = []
    for _ in range(n):
        messages: list[Message] = []
        if rng.random() < system_rate:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = rng.choices(range(1, len(turn_weights) + 1), weights=turn_weights)[0]
        for task in rng.choices(tasks, weights=weights, k=turns):
            question, answer = exchange(rng, task, identity)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        result.append(messages)
    return result
