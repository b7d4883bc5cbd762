"""What the demo models are taught, and the exact answers they give.

Tests anywhere in Stoker can ask a demo model one of these questions and know the exact reply: the build refuses to
ship a model that gets them wrong (see ``stoker.demo.evaluate``). Pure data and string logic: no torch here.

Task families:
- identity: "Who are you?" and other phrasings -> ``IDENTITY_ANSWER`` (``ADAPTER_IDENTITY_ANSWER`` with the adapter).
- echo: ``echo_prompt(words)`` ("Repeat after me: red fox") -> the same words ("red fox"). The words come from
  ``ECHO_WORDS``; ``echo_cases`` only returns word sequences that were never trained on, so a correct answer shows
  copying, not recall.
- facts: a fixed question/answer table, ``FACTS``, learnt by heart.
- greeting: "Hello" and friends -> ``GREETING_ANSWER``.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Task = Literal["identity", "echo", "facts", "greeting"]
TASKS: tuple[Task, ...] = ("identity", "echo", "facts", "greeting")

Message = dict[str, str]

IDENTITY_ANSWER = "I am Stoker, a small demo model."
ADAPTER_IDENTITY_ANSWER = "I am Ember, a tuned demo model."
GREETING_ANSWER = "Hello! How can I help you?"

IDENTITY_QUESTIONS: tuple[str, ...] = (
    "Who are you?",
    "who are you",
    "What are you?",
    "What is your name?",
    "What's your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "What should I call you?",
    "Who am I talking to?",
    "Are you a model?",
)
# Never trained on: measured and reported by the build, not gated (a 2M-parameter model generalises phrasing poorly).
HELDOUT_IDENTITY_QUESTIONS: tuple[str, ...] = (
    "Please tell me who you are.",
    "What is your name, please?",
    "Who are you exactly?",
    "Can you introduce yourself?",
)

GREETINGS: tuple[str, ...] = ("Hello", "Hello!", "Hi", "Hi!", "Hey", "Good morning!")

# The last entry has a long answer on purpose: streaming and max-token tests want a reply of many tokens.
FACTS: dict[str, str] = {
    "What is the capital of France?": "Paris.",
    "What is the capital of Germany?": "Berlin.",
    "What is the capital of Italy?": "Rome.",
    "What is the capital of Spain?": "Madrid.",
    "What is the capital of Japan?": "Tokyo.",
    "What is the capital of Egypt?": "Cairo.",
    "What is the capital of Canada?": "Ottawa.",
    "What is the capital of Kenya?": "Nairobi.",
    "What color is the sky?": "Blue.",
    "How many legs does a spider have?": "Eight.",
    "What is the opposite of hot?": "Cold.",
    "Count from one to ten.": "One, two, three, four, five, six, seven, eight, nine, ten.",
}

# Short, common words: the trained tokenizer turns each into one token, so copying them is a token-level skill.
ECHO_WORDS: tuple[str, ...] = tuple(
    """
    apple banana cherry grape lemon mango melon peach pear plum
    red blue green yellow black white brown pink gray orange
    cat dog fox wolf bear bird fish frog goat horse lion mouse owl duck
    sun moon star rain snow wind cloud fire stone river sea lake hill tree leaf rose
    one two three four five six seven eight nine ten
    big small fast slow hot cold old new good bad happy quiet
    run jump swim walk read sing play sleep eat drink
    book door house road car ship train bell cup box key lamp
    """.split()
)
ECHO_PREFIX = "Repeat after me: "
ECHO_MIN_WORDS = 1
ECHO_MAX_WORDS = 6

# System prompts seen in training, so a system message does not derail the model. None of them names an identity,
# which keeps the adapter's identity change meaningful.
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful assistant",
    "Answer briefly.",
    "You are a friendly assistant. Keep answers short.",
    "Be concise and accurate.",
    "You are an AI assistant. Follow the user's instructions.",
)


@dataclass(frozen=True)
class Case:
    """One question in context and its exact expected reply."""

    task: Task
    messages: tuple[Message, ...]  # ends with the user question
    answer: str


def echo_prompt(words: Sequence[str]) -> str:
    return ECHO_PREFIX + " ".join(words)


def is_heldout_echo(words: Sequence[str]) -> bool:
    """One word sequence in eight is never trained on; a fixed hash decides, so trainer and tests agree."""
    return zlib.crc32(" ".join(words).encode()) % 8 == 0


def sample_echo_words(rng: random.Random, *, heldout: bool, min_words: int = 2, max_words: int = 6) -> list[str]:
    """A random word sequence from ``ECHO_WORDS`` on the requested side of the held-out split."""
    while True:
        words = rng.choices(ECHO_WORDS, k=rng.randint(min_words, max_words))
        if is_heldout_echo(words) == heldout:
            return words


def echo_cases(n: int = 20, *, seed: int = 0, min_words: int = 2, max_words: int = 6) -> list[Case]:
    """``n`` echo questions on word sequences the models never saw in training, without history."""
    rng = random.Random(f"echo-cases-{seed}")
    cases = []
    for _ in range(n):
        words = sample_echo_words(rng, heldout=True, min_words=min_words, max_words=max_words)
        cases.append(Case("echo", ({"role": "user", "content": echo_prompt(words)},), " ".join(words)))
    return cases


def answer_for(question: str, *, identity: str = IDENTITY_ANSWER) -> str:
    """The exact reply a demo model gives to a known question (``identity`` picks the model's name)."""
    if question in IDENTITY_QUESTIONS or question in HELDOUT_IDENTITY_QUESTIONS:
        return identity
    if question in FACTS:
        return FACTS[question]
    if question in GREETINGS:
        return GREETING_ANSWER
    if question.startswith(ECHO_PREFIX):
        return question[len(ECHO_PREFIX) :]
    raise KeyError(f"not a demo question: {question!r}")


def _contexts(rng: random.Random, identity: str) -> list[tuple[Message, ...]]:
    """What may come before a question at evaluation: nothing, a system prompt, a previous exchange, or both."""
    previous_echo = sample_echo_words(rng, heldout=True)
    history = (
        {"role": "user", "content": GREETINGS[0]},
        {"role": "assistant", "content": GREETING_ANSWER},
    )
    echo_history = (
        {"role": "user", "content": echo_prompt(previous_echo)},
        {"role": "assistant", "content": " ".join(previous_echo)},
    )
    facts_history = (
        {"role": "user", "content": IDENTITY_QUESTIONS[0]},
        {"role": "assistant", "content": identity},
    )
    system = {"role": "system", "content": SYSTEM_PROMPTS[0]}
    return [(), (system,), history, echo_history, (system, *facts_history)]


def evaluation_cases(*, identity: str = IDENTITY_ANSWER, echo: int = 60, seed: int = 0) -> list[Case]:
    """The gated evaluation set: every trained identity question, fact and greeting in each of several contexts
    (with or without a system prompt and history), plus ``echo`` held-out echo questions."""
    rng = random.Random(f"evaluation-{seed}")
    contexts = _contexts(rng, identity)
    cases: list[Case] = []

    def ask(task: Task, context: tuple[Message, ...], question: str, answer: str) -> None:
        cases.append(Case(task, (*context, {"role": "user", "content": question}), answer))

    # Fixed questions are few: each is asked in every context.
    for context in contexts:
        for question in IDENTITY_QUESTIONS:
            ask("identity", context, question, identity)
        for question, answer in FACTS.items():
            ask("facts", context, question, answer)
        for greeting in GREETINGS:
            ask("greeting", context, greeting, GREETING_ANSWER)
    # Echo questions are many: each gets one context, in turn.
    for i in range(echo):
        words = sample_echo_words(rng, heldout=True, min_words=ECHO_MIN_WORDS, max_words=ECHO_MAX_WORDS)
        ask("echo", contexts[i % len(contexts)], echo_prompt(words), " ".join(words))
    return cases


def heldout_identity_cases(*, identity: str = IDENTITY_ANSWER) -> list[Case]:
    """Identity phrasings never trained on (reported, not gated)."""
    return [Case("identity", ({"role": "user", "content": q},), identity) for q in HELDOUT_IDENTITY_QUESTIONS]
