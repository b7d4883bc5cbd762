"""The one interface every inference backend implements.

An engine takes prompt token ids (already rendered by a template) plus sampling parameters, and streams back
deltas per choice. It knows nothing of HTTP, Gradio, chat messages or datasets.

Two ways in:
- ``stream(request)``: an async iterator of ``Delta`` for interactive surfaces (API, webchat). Breaking out of the
  iterator, or cancelling the task that runs it, aborts the request and frees its slot at once.
- ``generate_batch(requests)``: offline, blocking; returns one ``Completion`` per request, in order. Used by predict.

``stream_sync`` is a thread-friendly wrapper used by the terminal chat.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import math
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stoker.engines.structured import StructuredOutput
from stoker.errors import NotFoundError, OverloadedError, RequestError

FinishReason = Literal["stop", "length"]
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MIN_TEMPERATURE = 1e-5

_request_counter = itertools.count()


# ``GenerationRequest.adapter`` for the plain base weights, where requests that name no adapter get one by default.
BASE_WEIGHTS = "__base__"


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_request_counter)}"


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` (or ``do_sample`` false upstream) means greedy."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    repetition_penalty: float = 1.0  # HF-style multiplicative penalty on seen tokens (prompt + output)
    presence_penalty: float = 0.0  # OpenAI-style additive penalties on tokens already generated
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)  # text is cut before the first stop string, never emitted
    stop_token_ids: list[int] = field(default_factory=list)  # generation ends on these (eos, template stops)
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top-k alternatives
    prompt_logprobs: int | None = None  # likewise for every prompt token after the first (vLLM's prompt_logprobs)
    skip_special_tokens: bool = True
    # vLLM's extensions, with its meanings:
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (sampling only)
    min_tokens: int = 0  # no stop token and no stop string ends the choice before this many tokens
    ignore_eos: bool = False  # only ``stop_token_ids`` given with the request end it (not eos / end-of-turn)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits (OpenAI: -100 bans, 100 forces)
    allowed_token_ids: list[int] | None = None  # only these may be generated
    bad_words: list[str] = field(default_factory=list)  # never generated (as words, with or without a leading space)
    structured: StructuredOutput | None = None  # the output's shape, enforced while decoding

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE sampling is greedy (as in vLLM): dividing logits by a tinier one overflows to inf.
        return self.temperature < MIN_TEMPERATURE


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=new_request_id)
    adapter: str | None = None  # a LoRA adapter's name, BASE_WEIGHTS, or None for the engine's default adapter
    # Model-specific multimodal inputs (e.g. {"images": [PIL.Image, ...]}); engines that take none ignore None.
    media: dict[str, Any] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token text, logprob)


@dataclass
class Delta:
    """New output for one choice of one request.

    ``text`` is decoded incrementally: a multi-byte character is never split across deltas, and text that may
    be the start of a stop string is held back until it is known not to be one. The last delta of a choice has
    ``finish_reason`` set and carries the choice's final token counts.
    """

    index: int  # choice index, 0 <= index < n
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # set on the final delta of a choice
    # On each choice's first delta when ``prompt_logprobs`` was asked for: one entry per prompt token, None for the
    # first (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """The whole answer to one request."""

    request_id: str
    choices: list[Choice]
    prompt_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class DeltaFolder:
    """Folds the deltas of one request's ``n`` choices, in any order, into a ``Completion``."""

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[TokenLogprob] | None] = [None] * n
        self.reasons: list[FinishReason] = ["length"] * n
        self.prompt_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, d: Delta) -> None:
        self.texts[d.index].append(d.text)
        self.ids[d.index].extend(d.token_ids)
        if d.logprobs is not None:
            self.logprobs[d.index] = (self.logprobs[d.index] or []) + d.logprobs
        if d.finish_reason is not None:
            self.reasons[d.index] = d.finish_reason
        self.prompt_tokens = d.prompt_tokens or self.prompt_tokens
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs

    def completion(self) -> Completion:
        choices = [Choice(i, "".join(t), self.ids[i], self.reasons[i], self.logprobs[i])
                   for i, t in enumerate(self.texts)]
        return Completion(self.request_id, choices, self.prompt_tokens, self.prompt_logprobs)


def collect(deltas: Sequence[Delta] | Iterator[Delta], request_id: str, n: int) -> Completion:
    """Fold a stream of deltas into a Completion."""
    folder = DeltaFolder(request_id, n)
    for d in deltas:
        folder.add(d)
    return folder.completion()


def validate_params(p: SamplingParams, where: str) -> None:
    def bad(param: str, allowed: str, value: Any) -> RequestError:
        return RequestError(f"invalid {param}={value!r} in {where}: {allowed}.", param=param)

    if not isinstance(p.n, int) or p.n < 1:
        raise bad("n", "must be an integer >= 1", p.n)
    if not isinstance(p.max_new_tokens, int) or p.max_new_tokens < 1:
        raise bad("max_new_tokens", "must be an integer >= 1", p.max_new_tokens)
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise bad("temperature", "must be >= 0 (0 means greedy)", p.temperature)
    if not 0 < p.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]", p.top_p)
    if not isinstance(p.top_k, int) or p.top_k < 0:
        raise bad("top_k", "must be an integer >= 0 (0 disables it)", p.top_k)
    if not math.isfinite(p.repetition_penalty) or p.repetition_penalty <= 0:
        raise bad("repetition_penalty", "must be > 0 (1 disables it)", p.repetition_penalty)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not math.isfinite(value):
            raise bad(name, "must be a finite number (0 disables it)", value)
    if p.logprobs is not None and (not isinstance(p.logprobs, int) or p.logprobs < 0):
        raise bad("logprobs", "must be an integer >= 0, or None for no logprobs", p.logprobs)
    if any(not isinstance(s, str) for s in p.stop):
        raise bad("stop", "must be a list of strings", p.stop)
    if any(not isinstance(t, int) for t in p.stop_token_ids):
        raise bad("stop_token_ids", "must be a list of integers", p.stop_token_ids)
    k = p.prompt_logprobs
    if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
        raise bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], or None for none", k)
    if not 0 <= p.min_p <= 1:
        raise bad("min_p", "must be in [0, 1] (0 disables it)", p.min_p)
    if not isinstance(p.min_tokens, int) or not 0 <= p.min_tokens <= p.max_new_tokens:
        raise bad("min_tokens", f"must be an integer in [0, max_tokens={p.max_new_tokens}]", p.min_tokens)
    if any(not math.isfinite(b) for b in p.logit_bias.values()):
        raise bad("logit_bias", "must map token ids to finite numbers", p.logit_bias)
    if p.allowed_token_ids is not None and not p.allowed_token_ids:
        raise bad("allowed_token_ids", "must hold at least one token id", p.allowed_token_ids)


def check_prompt(request: GenerationRequest, where: str, *, vocab_size: int, max_model_len: int,
                 vision: bool) -> tuple[list[int], int]:
    """The checks every backend makes before queueing a request; returns the prompt ids as a list and the new
    tokens the context leaves room for (``max_new_tokens`` clipped to it)."""
    prompt = list(request.prompt_ids)
    if not prompt:
        raise RequestError(f"{where} has an empty prompt: send at least one token.", param="prompt")
    check_token_ids(prompt, vocab_size, where)
    if len(prompt) >= max_model_len:
        raise RequestError(
            f"{where} has a prompt of {len(prompt)} tokens, but the context holds {max_model_len} "
            f"(max_model_len) including at least one generated token: shorten the prompt.",
            param="prompt", code="context_length_exceeded")
    validate_params(request.params, where)
    p = request.params
    for param, ids in (("logit_bias", list(p.logit_bias)), ("allowed_token_ids", p.allowed_token_ids or []),
                       ("stop_token_ids", p.stop_token_ids)):
        check_token_ids(ids, vocab_size, f"{where}'s {param}", param=param)
    if request.media and not vision:
        raise RequestError(f"{where} carries images, but this engine's model takes text only.", param="messages")
    return prompt, min(request.params.max_new_tokens, max_model_len - len(prompt))


def bad_word_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """The token sequences ``bad_words`` stand for: each word alone and after a space (vLLM's reading)."""
    out: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if ids and ids not in out:
                out.append(ids)
    return out


def check_token_ids(ids: Sequence[object], vocab_size: int | None, where: str, *, param: str = "prompt") -> None:
    """Token ids are integers (not booleans) inside the vocabulary."""
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab_size is not None and t >= vocab_size)
           for t in ids):
        bound = f"[0, {vocab_size})" if vocab_size is not None else "(integers >= 0)"
        raise RequestError(f"{where} has token ids outside the vocabulary {bound}.", param=param)


def check_queue(beyond_batch: int, new_rows: int, max_queue: int) -> None:
    """Refuse new work when more than ``max_queue`` sequences would wait beyond the running batch's slots.

    ``beyond_batch``: sequences (choices) not able to start at the next step, the new ones included; a burst that
    still fits the free slots never counts as queued."""
    if beyond_batch > max_queue:
        waiting = max(0, beyond_batch - new_rows)
        raise OverloadedError(
            f"the engine's queue is full ({waiting} sequences wait beyond the running batch, max_queue={max_queue}); "
            "retry later, or raise max_queue / max_num_seqs.")


def unknown_adapter(name: str, loaded: Sequence[str]) -> NotFoundError:
    names = ", ".join(loaded) or "none"
    return NotFoundError(f"unknown adapter {name!r} (loaded adapters: {names}); pick one of them or none.",
                         param="model")


@dataclass
class EngineInfo:
    """What surfaces need to know about the engine and its model; none of them reads the engine's settings."""

    max_model_len: int  # context length: prompt + generated tokens must fit
    vocab_size: int | None = None  # prompt token ids must lie in [0, vocab_size)
    max_num_seqs: int = 64  # sequences (choices) decoded together
    max_batch_tokens: int | None = None  # prompt + new tokens of the running sequences; None: no such cap
    max_queue: int = 256  # sequences that may wait beyond the running batch (more: OverloadedError)
    eos_ids: list[int] = field(default_factory=list)  # token ids that end every choice
    adapters: list[str] = field(default_factory=list)  # adapter names selectable per request
    default_adapter: str | None = None  # applied to requests that name none
    merged_adapters: list[str] = field(default_factory=list)  # folded into the weights when the model loaded
    vision: bool = False
    # True: the request's media carry processor tensors and the prompt holds every image token (the huggingface
    # engine). False: the engine runs the model's processor itself on the raw images (vLLM).
    expands_images: bool = True
    backend: str = "huggingface"


class Engine(abc.ABC):
    """Backend interface. Implementations: ``engines.hf.HFEngine`` and ``engines.vllm.VLLMEngine``."""

    info: EngineInfo

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for all ``request.params.n`` choices, interleaved, each tagged with its index."""

    @abc.abstractmethod
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run many requests to completion (offline); results in the order given."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Cancel a running or queued request and free its resources at once."""

    def check_params(self, params: SamplingParams) -> None:
        """Backend checks that may be slow (compiling a structured output's grammar): the chat service calls this
        where it prepares a request, off the event loop; raises ``RequestError``."""

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics (e.g. running, waiting, tokens_in_flight)."""
        return {}

    def close(self) -> None:
        """Release threads, processes and memory."""

    def stream_sync(self, request: GenerationRequest) -> Iterator[Delta]:
        """Blocking iterator over ``stream``; closing the iterator early aborts the request.

        Runs the async stream on a private event loop in a helper thread so that sync callers (terminal chat)
        need no event loop of their own.
        """
        out: queue.Queue[Delta | BaseException | None] = queue.Queue()
        loop = asyncio.new_event_loop()
        task_box: list[asyncio.Task[None]] = []

        async def pump() -> None:
            try:
                async for delta in self.stream(request):
                    out.put(delta)
                out.put(None)
            except asyncio.CancelledError:
                out.put(None)
                raise
            except BaseException as exc:  # handed to the consumer thread, re-raised there
                out.put(exc)

        def run() -> None:
            task_box.append(loop.create_task(pump()))
            try:
                loop.run_until_complete(task_box[0])
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        thread = threading.Thread(target=run, name=f"stream-{request.request_id}", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = out.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                # Caller stopped early (Ctrl-C, closed generator): cancel the stream, which aborts the request.
                while not task_box:
                    threading.Event().wait(0.001)
                loop.call_soon_threadsafe(task_box[0].cancel)
            thread.join(timeout=10)
