"""A small, deterministic training loop for the demo models (full fine-tuning or LoRA): CPU, float32, seeded."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from stoker.demo.tasks import Message
from stoker.demo.tokenizer import IM_START, render_chatml

log = logging.getLogger(__name__)

IGNORE = -100


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seed torch and pin its thread count (reductions depend on it), restoring the caller's settings after."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)


def encode_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[Message]]
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each ChatML conversation, and labels that train only the assistant replies and their end token.

    Special tokens split the text before BPE runs, so encoding piece by piece gives the same ids as encoding the
    whole rendered conversation (``tests/test_demo.py`` checks this against ``apply_chat_template``).
    """
    pieces: list[str] = []
    trained: list[bool] = []
    bounds: list[int] = []
    for messages in conversations:
        for message in messages:
            if message["role"] == "assistant":
                pieces += [f"{IM_START}assistant\n", message["content"] + tokenizer.eos_token, "\n"]
                trained += [False, True, False]
            else:
                pieces.append(render_chatml([message]))
                trained.append(False)
        bounds.append(len(pieces))
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]  # one batched call: fast
    result = []
    start = 0
    for end in bounds:
        ids: list[int] = []
        labels: list[int] = []
        for piece, is_target in zip(encoded[start:end], trained[start:end], strict=True):
            ids += piece
            labels += piece if is_target else [IGNORE] * len(piece)
        result.append((ids, labels))
        start = end
    return result


def _batches(
    examples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
) -> Iterator[tuple[Any, Any]]:
    """Endless right-padded batches (no attention mask needed: padding only follows real tokens).

    Batches are drawn from runs of similar length, which halves the padding the CPU would otherwise compute on.
    """
    import torch

    pending: list[list[int]] = []
    while True:
        if not pending:
            order = list(range(len(examples)))
            rng.shuffle(order)
            pool = batch_size * 32
            for at in range(0, len(order) - batch_size + 1, pool):
                chunk = sorted(order[at : at + pool], key=lambda i: len(examples[i][0]))
                pending += [chunk[b : b + batch_size] for b in range(0, len(chunk) - batch_size + 1, batch_size)]
            rng.shuffle(pending)
        chosen = pending.pop()
        width = max(len(examples[i][0]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(chosen):
            example_ids, example_labels = examples[i]
            ids[row, : len(example_ids)] = torch.tensor(example_ids)
            labels[row, : len(example_labels)] = torch.tensor(example_labels)
        yield ids, labels


def _loss(model: Any, ids: Any, labels: Any) -> Any:
    """Next-token cross-entropy on labelled positions only; the vocabulary projection runs on those rows alone."""
    import torch.nn.functional as F

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits, targets[keep])


def train(
    model: Any,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    pad_id: int,
    seed: int,
    name: str,
) -> float:
    """AdamW with linear warmup and cosine decay to a tenth of ``lr``; returns the mean loss of the last 20 steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    batches = _batches(examples, batch_size, pad_id, random.Random(seed))
    recent: list[float] = []
    started = time.monotonic()
    for step in range(steps):
        ids, labels = next(batches)
        loss = _loss(model, ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log.info("%s: step %d/%d, loss %.4f, %.0f s", name, step + 1, steps, loss.item(), time.monotonic() - started)
    model.eval()
    return sum(recent) / len(recent)
