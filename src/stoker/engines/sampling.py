"""Pick the next token for every row of a batch, each row with its own sampling parameters.

Order of operations per row (the same as transformers' logits processors):
1. raw log-softmax of the model's logits -> reported logprobs (before any penalty, temperature or truncation,
   like vLLM's default ``raw_logprobs`` mode);
2. repetition penalty (HF: divide positive / multiply negative logits of every token seen in prompt + output);
3. presence / frequency penalty (OpenAI: subtract ``presence * [count > 0] + frequency * count`` over generated
   tokens only);
4. greedy rows take the argmax; sampling rows divide by temperature, keep the top-k, keep the top-p nucleus, and
   draw from the softmax with the row's own ``torch.Generator`` (seeded requests) or the global one.

A seeded row draws exactly one multinomial sample per step from its private generator, so its tokens do not
depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stoker.engines.base import SamplingParams

if TYPE_CHECKING:
    import torch


class RowSampler:
    """Sampling state of one sequence: its parameters, RNG and the token statistics penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device,
                 seed: int | None):
        import torch

        self.params = params
        self.greedy = params.greedy
        self.generator: torch.Generator | None = None
        if seed is not None and not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor([i for i in prompt_ids if i < vocab_size], dtype=torch.long, device=device)] = True
        self.counts: torch.Tensor | None = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.penalized = self.seen is not None or self.counts is not None
        # Needs the top-k / top-p filter at all (a cheap per-batch check).
        self.truncates = not self.greedy and (0 < params.top_k or params.top_p < 1.0)

    def penalize(self, logits: torch.Tensor) -> None:
        """Apply this row's penalties to its logits row, in place."""
        import torch

        if self.seen is not None:
            p = self.params.repetition_penalty
            penalized = torch.where(logits < 0, logits * p, logits / p)
            logits.copy_(torch.where(self.seen, penalized, logits))
        if self.counts is not None:
            logits -= self.params.frequency_penalty * self.counts
            logits -= self.params.presence_penalty * (self.counts > 0).to(logits.dtype)

    def observe(self, token_id: int) -> None:
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1.0


@dataclass
class Sampled:
    tokens: list[int]
    # Per row: (chosen logprob, [(token_id, logprob), ...] top alternatives) or None when not requested.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def sample(logits: torch.Tensor, rows: list[RowSampler]) -> Sampled:
    """Choose one token per row. ``logits``: float tensor ``[rows, vocab]`` of the last position."""
    import torch

    logits = logits.float()
    n = len(rows)
    want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None

    if any(r.penalized for r in rows):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.penalized:
                r.penalize(logits[i])

    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled_rows:
        chosen[sampled_rows] = _draw(logits[sampled_rows], [rows[i] for i in sampled_rows])

    tokens = chosen.tolist()
    for r, t in zip(rows, tokens):
        if r.penalized:
            r.observe(t)

    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
    if raw_logprobs is not None:
        k_max = max(rows[i].params.logprobs or 0 for i in want_lp)
        chosen_lp = raw_logprobs.gather(1, chosen[want_lp].unsqueeze(1)).squeeze(1).tolist()
        top_vals: list[list[float]] = [[] for _ in want_lp]
        top_ids: list[list[int]] = [[] for _ in want_lp]
        if k_max > 0:
            vals, ids = raw_logprobs.topk(min(k_max, raw_logprobs.shape[-1]), dim=-1)
            top_vals, top_ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(want_lp):
            k = rows[i].params.logprobs or 0
            logprobs[i] = (chosen_lp[j], list(zip(top_ids[j][:k], top_vals[j][:k])))
    return Sampled(tokens, logprobs)


def _draw(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    """Temperature, top-k, top-p, then one multinomial draw per row."""
    import torch

    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=logits.dtype, device=device)
    logits = logits / temps.unsqueeze(1)
    if any(r.truncates for r in rows):
        logits = _top_k_top_p(logits, rows)
    probs = torch.softmax(logits, dim=-1)
    out = torch.empty(len(rows), dtype=torch.long, device=device)
    shared = [i for i, r in enumerate(rows) if r.generator is None]
    if shared:
        out[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
    for i, r in enumerate(rows):
        if r.generator is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=r.generator)[0]
    return out


def _top_k_top_p(logits: torch.Tensor, rows: list[RowSampler]) -> torch.Tensor:
    import torch

    vocab = logits.shape[-1]
    device = logits.device
    ordered, order = logits.sort(dim=-1, descending=True)
    ks = torch.tensor([r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows], device=device)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    ordered = ordered.masked_fill(ranks >= ks.unsqueeze(1), float("-inf"))
    # top_p >= 1 must keep everything, even where rounding makes the running mass reach 1.0 early.
    ps = torch.tensor([r.params.top_p if r.params.top_p < 1.0 else float("inf") for r in rows], device=device)
    probs = torch.softmax(ordered, dim=-1)
    # Drop a token once the tokens ranked above it cover top_p (as transformers does); the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= ps.unsqueeze(1).to(probs.dtype), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
