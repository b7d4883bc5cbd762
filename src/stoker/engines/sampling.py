"""Pick the next token for every row of a batch, each row with its own sampling parameters.

Order of operations per row (the same as transformers' logits processors):
1. raw log-softmax of the model's logits -> reported logprobs (before any penalty, temperature or truncation,
   like vLLM's default ``raw_logprobs`` mode);
2. repetition penalty (HF: divide positive / multiply negative logits of every token seen in prompt + output);
3. presence / frequency penalty (OpenAI: subtract ``presence * [count > 0] + frequency * count`` over generated
   tokens only);
4. the request's rules on what may come next (vLLM's order after penalties): ``logit_bias`` is added,
   ``allowed_token_ids`` / ``bad_words`` / ``min_tokens`` (no stop id yet) set the others to -inf, and a structured
   output's grammar masks what it does not allow (``engines.grammar``);
5. greedy rows take the argmax; sampling rows divide by temperature, keep the top-k, keep the top-p nucleus, drop
   tokens under ``min_p`` x the top probability, and draw from the softmax with the row's own ``torch.Generator``
   (seeded requests) or the global one.

A seeded row draws exactly one multinomial sample per step from its private generator, so its tokens do not
depend on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stoker.engines.base import SamplingParams

if TYPE_CHECKING:
    import torch

    from stoker.engines.grammar import RowGrammar


class RowSampler:
    """Sampling state of one sequence: its parameters, RNG and the token statistics penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device,
                 seed: int | None, *, stop_ids: Collection[int] = (), bad_words: Sequence[Sequence[int]] = (),
                 grammar: RowGrammar | None = None):
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
        # Needs the top-k / top-p / min-p filter at all (a cheap per-batch check).
        self.truncates = not self.greedy and (0 < params.top_k or params.top_p < 1.0 or params.min_p > 0)
        self.grammar = grammar
        self.generated = 0
        self._stop_ids = sorted(set(stop_ids))
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = [i for i in params.logit_bias if i < vocab_size]
            self._bias = (torch.tensor(ids, dtype=torch.long, device=device),
                          torch.tensor([params.logit_bias[i] for i in ids], dtype=torch.float32, device=device))
        self._disallowed: torch.Tensor | None = None
        if params.allowed_token_ids is not None:
            self._disallowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
            self._disallowed[[i for i in params.allowed_token_ids if i < vocab_size]] = False
        # Bad words: one-token words are always banned; a longer one bans its last token after the others.
        self._banned = [w[0] for w in bad_words if len(w) == 1]
        self._banned_after = [(w[:-1], w[-1]) for w in bad_words if len(w) > 1]
        self.output: list[int] = []
        self.ruled = bool(self._bias is not None or self._disallowed is not None or bad_words or grammar is not None
                          or (params.min_tokens > 0 and self._stop_ids))

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

    def rule(self, logits: torch.Tensor) -> None:
        """Apply the request's rules on what may come next (all but the grammar's), in place."""
        if self._bias is not None:
            logits.index_add_(0, self._bias[0], self._bias[1].to(logits.dtype))
        if self._disallowed is not None:
            logits.masked_fill_(self._disallowed, float("-inf"))
        banned = list(self._banned)
        for prefix, last in self._banned_after:
            if len(self.output) >= len(prefix) and self.output[len(self.output) - len(prefix):] == list(prefix):
                banned.append(last)
        if self.generated < self.params.min_tokens:
            banned.extend(self._stop_ids)
        if banned:
            logits[[t for t in banned if t < logits.shape[-1]]] = float("-inf")

    def observe(self, token_id: int) -> None:
        self.generated += 1
        if self._banned_after:
            self.output.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
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

    if any(r.penalized or r.ruled for r in rows):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.penalized:
                r.penalize(logits[i])
            if r.ruled:
                r.rule(logits[i])
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        if constrained:
            from stoker.engines.grammar import mask_rows

            mask_rows(logits, constrained)

    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, r in enumerate(rows) if not r.greedy]
    if sampled_rows:
        chosen[sampled_rows] = _draw(logits[sampled_rows], [rows[i] for i in sampled_rows])

    tokens = chosen.tolist()
    for r, t in zip(rows, tokens):
        r.observe(t)

    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * n
    if raw_logprobs is not None:
        found = chosen_and_top(raw_logprobs, chosen[want_lp], [rows[i].params.logprobs or 0 for i in want_lp])
        for i, item in zip(want_lp, found):
            logprobs[i] = item
    return Sampled(tokens, logprobs)


def chosen_and_top(logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of ``logprobs`` ``[rows, vocab]``: the chosen token's logprob and the row's top ``ks[i]`` (id, logprob)."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    k_max = max(ks, default=0)
    top_vals: list[list[float]] = [[] for _ in ks]
    top_ids: list[list[int]] = [[] for _ in ks]
    if k_max > 0:
        vals, ids = logprobs.topk(min(k_max, logprobs.shape[-1]), dim=-1)
        top_vals, top_ids = vals.tolist(), ids.tolist()
    return [(chosen_lp[j], list(zip(top_ids[j][:k], top_vals[j][:k]))) for j, k in enumerate(ks)]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int
                    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """The raw logprob of each prompt token given the tokens before it, with the top ``k``; None for the first.
    ``logits``: ``[len(prompt_ids), vocab]``, the prefill's logits at the prompt's positions."""
    import torch

    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long, device=logits.device)
    return [None, *chosen_and_top(logprobs, targets, [k] * (len(prompt_ids) - 1))]


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
    if any(r.params.min_p > 0 for r in rows):
        # min_p against the most likely token's probability, after top-k / top-p (as vLLM applies it).
        min_ps = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype, device=device)
        kept = torch.softmax(ordered, dim=-1)
        ordered = ordered.masked_fill(kept < min_ps.unsqueeze(1) * kept[:, :1], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
