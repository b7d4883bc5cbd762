"""The transformers engine: continuous batching over any HF causal LM, on one background thread.

One step thread owns the model. Each loop iteration it (1) drops aborted rows, (2) admits waiting requests within
the budgets (``max_num_seqs`` rows, ``max_batch_tokens`` of prompt + max_new_tokens), (3) prefills the next group of
admitted requests (at most ``max_prefill_tokens`` padded prompt tokens), merging their KV rows into the running
batch (``kv_batch.PaddedKVBatch``), and (4) runs one decode step for every running row. A burst of prompts is thus
prefilled a group per iteration, each followed by a decode step, so running streams keep streaming and the first
group's requests get their first token without waiting for the whole burst; a prompt longer than the budget is
prefilled in chunks of columns, one per iteration, for the same reason. A row that finishes leaves the batch in the
same iteration. Deltas go back to each caller through the request's sink (``engines.threaded``).

A request with ``n`` choices is prefilled once; its KV rows are copied ``n`` times.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from stoker.engines.base import (
    BASE_WEIGHTS,
    Delta,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    bad_word_ids,
    check_prompt,
    check_queue,
    unknown_adapter,
)
from stoker.engines.detokenize import IncrementalDetokenizer, TokenTexts
from stoker.engines.outputs import ChoiceOutput
from stoker.engines.prefill import Prefill
from stoker.engines.stops import StopStringMatcher
from stoker.engines.threaded import PreparedRequest, ThreadedEngine
from stoker.errors import RequestError, StokerError

logger = logging.getLogger("stoker")

BASE_ADAPTER = BASE_WEIGHTS  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass(eq=False)
class _Choice:
    """One generated sequence: a row of the running batch."""

    request: _Request
    sampler: Any  # sampling.RowSampler
    out: ChoiceOutput
    done: bool = False  # released: finished or aborted (a row that cannot leave its batch stays as ballast)


@dataclass(eq=False)
class _Request(PreparedRequest):
    adapter: str  # peft adapter name, or BASE_ADAPTER
    max_new: int  # max_new_tokens clipped to the context
    stop_ids: frozenset[int]
    choices: list[_Choice] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)  # token sequences of params.bad_words
    prompt_logprobs: list[TokenLogprob | None] | None = None  # computed at prefill when params.prompt_logprobs is set
    open_choices: int = 0
    media: dict[str, Any] | None = None  # vision inputs (stoker.media.prepare_images), dropped after prefill

    @property
    def row_cost(self) -> int:
        return len(self.prompt_ids) + self.max_new

    @property
    def cost(self) -> int:
        return self.params.n * self.row_cost


class HFEngine(ThreadedEngine):
    """Continuous batching for a loaded ``transformers`` causal LM (optionally a peft model with LoRA adapters).

    - ``max_num_seqs``: rows (choices) decoded together.
    - ``max_batch_tokens``: admission budget, sum over running rows of prompt + max_new_tokens.
    - ``max_queue``: sequences (choices) that may wait beyond the batch's free slots before ``stream`` raises
      ``OverloadedError``.
    - ``max_model_len``: context length; default the model config's ``max_position_embeddings``.
    - ``adapters``: names of LoRA adapters loaded unmerged in the peft ``model``, selectable per request.
    - ``max_prefill_tokens``: padded prompt tokens per prefill forward; more newcomers take several forwards, one per
      loop iteration, with a decode step of the running rows between them. Default 256 on CPU, 8192 elsewhere
      (``engines.prefill``).
    - ``cpu_matmul``: ``auto``, ``packed`` or ``stock``: whether a CPU model's float32 linear layers take the faster
      paths of ``engines.cpu_linear`` inside the engine (packed oneDNN weights for several rows, a single row split
      across the threads); ``int8`` or ``int4`` also quantize the weights (in place) for small decode steps.
    - ``prefix_cache_tokens``: prompt tokens whose keys and values are kept for later prompts that start the same
      way (``engines.prefix_cache``); 0 turns it off. Only for plain attention caches.

    A request bigger than a budget on its own still runs, alone, when the batch is empty.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 32768,
        max_queue: int = 256,
        max_model_len: int | None = None,
        adapters: list[str] | None = None,
        default_adapter: str | None = None,
        eos_ids: list[int] | None = None,
        max_prefill_tokens: int | None = None,
        cpu_matmul: str = "auto",
        prefix_cache_tokens: int = 4096,
    ):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        from stoker.engines.kv_batch import CacheRecipe

        self._caches = CacheRecipe(model.config.get_text_config() if hasattr(model.config, "get_text_config")
                                   else model.config)
        self.max_num_seqs = max(1, int(max_num_seqs))
        if not self._caches.batchable and self.max_num_seqs > 1:
            logger.warning("%s: %s, so this engine runs one request at a time (infer_backend: vllm may batch it)",
                           model.config.model_type, self._caches.why_serial)
            self.max_num_seqs = 1
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self.max_queue = max(1, int(max_queue))
        self.device = next(model.parameters()).device
        if max_prefill_tokens is None:
            from stoker.engines.prefill import CPU_PREFILL_TOKENS, GPU_PREFILL_TOKENS

            max_prefill_tokens = CPU_PREFILL_TOKENS if self.device.type == "cpu" else GPU_PREFILL_TOKENS
        self.max_prefill_tokens = max(1, int(max_prefill_tokens))
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_model_len = int(max_model_len or _context_length(config, tokenizer))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        head = model.get_output_embeddings()
        self._logits_width = int(head.weight.shape[0]) if head is not None else int(config.vocab_size)
        self._adapters = list(adapters or [])
        self._check_adapters(model)
        if default_adapter is not None and default_adapter not in self._adapters:
            raise unknown_adapter(default_adapter, self._adapters)
        self._default_adapter = default_adapter or BASE_ADAPTER  # for requests that name none
        from stoker.models.vision import is_vision_config

        vision = is_vision_config(model.config)
        # The token a vision model's image features replace; prompts must hold exactly as many as their media fill.
        self._image_token_id = getattr(model.config, "image_token_id", None) if vision else None
        self._video_token_id = getattr(model.config, "video_token_id", None) if vision else None
        if eos_ids is None:  # a model handed in directly: its own generation config decides, as in generate()
            from stoker.models.facts import eos_token_ids

            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_ids = eos_token_ids({"eos_token_id": eos}, [], tokenizer)
        self._eos_ids = sorted(set(eos_ids))
        self.info = EngineInfo(
            max_model_len=self.max_model_len, vocab_size=self.vocab_size, max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens, max_queue=self.max_queue, eos_ids=self._eos_ids,
            adapters=list(self._adapters), default_adapter=default_adapter, vision=vision, expands_images=True, backend="huggingface",
        )

        base = model.get_base_model() if self._adapters else model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._token_texts = TokenTexts(tokenizer)
        from stoker.engines.grammar import Grammars

        self._grammars = Grammars(tokenizer, self._logits_width)
        self._torch = torch
        self._packed = None
        if self.device.type == "cpu":
            from stoker.engines.cpu_linear import CpuLinears

            self._packed = CpuLinears.install(model, cpu_matmul)

        self._uids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # admitted, not finished
        self._abort_uids: set[int] = set()
        self._rows_admitted = 0
        self._tokens_in_flight = 0
        self._closed = False
        # Owned by the step thread.
        self._rows: list[_Choice] = []
        self._prefilling: deque[_Request] = deque()  # admitted, not prefilled yet
        self._partial: Prefill | None = None  # the group being prefilled
        self._prefixes = None
        if prefix_cache_tokens > 0 and self._caches.chunkable:
            from stoker.engines.prefix_cache import PrefixCache

            self._prefixes = PrefixCache(prefix_cache_tokens)
        self._batch: Any = None  # kv_batch.PaddedKVBatch
        self._kv_cache_tokens = 0  # rows x columns of the running cache, padding included
        self._counters = {"generated_tokens_total": 0, "prompt_tokens_total": 0, "requests_finished_total": 0,
                          "requests_aborted_total": 0, "steps_total": 0, "peak_running": 0}
        self._thread = threading.Thread(target=self._run, name="stoker-hf-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    async def abort(self, request_id: str) -> None:
        with self._cond:
            matches = [r for r in (*self._waiting, *self._active.values()) if r.request_id == request_id]
        for req in matches:
            self._cancel(req)

    def stats(self) -> dict[str, float]:
        with self._cond:
            out: dict[str, float] = {
                "running": self._rows_admitted,
                "running_requests": len(self._active),
                "waiting": len(self._waiting),
                "tokens_in_flight": self._tokens_in_flight,
                "kv_cache_tokens": self._kv_cache_tokens,
                "max_num_seqs": self.max_num_seqs,
                "max_batch_tokens": self.max_batch_tokens,
            }
            out.update(self._counters)
        if self._prefixes is not None:
            out["prefix_cache_tokens"] = self._prefixes.tokens
            out["prefix_cache_hit_tokens_total"] = self._prefixes.hit_tokens
        return out

    def _take_unfinished(self) -> list[_Request]:
        with self._cond:
            pending = [*self._waiting, *self._active.values()]
            self._waiting.clear()
        return pending

    # ------------------------------------------------------------------ request intake

    def _check_adapters(self, model: Any) -> None:
        if not self._adapters:
            return
        loaded = set(getattr(model, "peft_config", {}) or {})
        if not loaded:
            raise StokerError("adapters were given but the model is not a peft model with LoRA adapters loaded")
        missing = [a for a in self._adapters if a not in loaded]
        if missing:
            raise StokerError(f"adapters {missing} are not loaded in the peft model (loaded: {sorted(loaded)})")

    def _prepare(self, request: GenerationRequest, position: int | None = None) -> _Request:
        where = f"request {position} ({request.request_id})" if position is not None else "the request"
        p = request.params
        prompt, max_new = check_prompt(request, where, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                       vision=self.info.vision)
        if self.info.vision:
            from stoker.engines.hf_media import check_prompt_images

            check_prompt_images(prompt, request.media, self._image_token_id, where=where,
                                video_token_id=self._video_token_id)
        adapter = self._default_adapter
        if request.adapter is not None and request.adapter != BASE_WEIGHTS:
            if request.adapter not in self._adapters:
                raise unknown_adapter(request.adapter, self._adapters)
            adapter = request.adapter
        elif request.adapter == BASE_WEIGHTS:
            adapter = BASE_ADAPTER
        stop_ids = frozenset(() if p.ignore_eos else self._eos_ids) | frozenset(p.stop_token_ids)
        self.check_params(p)  # compiles a structured output's grammar (cached) or refuses it
        return _Request(next(self._uids), request.request_id, prompt, p, adapter, max_new, stop_ids,
                        media=request.media or None, bad_words=bad_word_ids(self.tokenizer, p.bad_words))

    def check_params(self, params: SamplingParams) -> None:
        if params.structured is not None:
            self._grammars.compile(params.structured)

    def _submit(self, requests: list[_Request], *, bounded: bool) -> None:
        with self._cond:
            if self._closed:
                raise RequestError("the engine is shut down")
            if bounded:
                # Only what cannot start at the next step queues: rows beyond the batch's free slots.
                rows = self._rows_admitted + sum(r.params.n for r in (*self._waiting, *requests))
                check_queue(rows - self.max_num_seqs, sum(r.params.n for r in requests), self.max_queue)
            self._waiting.extend(requests)
            self._cond.notify()

    def _cancel(self, req: _Request) -> None:
        """Abort from any thread: a waiting request leaves the queue now, a running one before the next step."""
        with self._cond:
            if req.aborted:
                return
            req.aborted = True
            try:
                self._waiting.remove(req)
                self._counters["requests_aborted_total"] += 1
                return
            except ValueError:
                pass
            if req.uid in self._active:
                self._abort_uids.add(req.uid)
                self._cond.notify()

    # ------------------------------------------------------------------ step thread

    def _run(self) -> None:
        torch = self._torch
        packed = self._packed.active() if self._packed is not None else contextlib.nullcontext()
        with torch.inference_mode(), packed:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._rows or self._abort_uids or self._prefilling
                               or self._partial is not None):
                        self._cond.wait()
                    if self._closed:
                        return
                    aborted, self._abort_uids = self._abort_uids, set()
                    self._prefilling.extend(self._admit())
                if aborted:
                    try:
                        self._drop_aborted(aborted)
                    except Exception as exc:  # noqa: BLE001 - shrinking failed: the batch state is unknown
                        self._fail(self._running_requests(), exc)
                if self._partial is not None or self._prefilling:
                    self._prefill_step()
                if self._rows:
                    try:
                        self._decode()
                    except Exception as exc:  # the batch state is unknown now: fail everything running
                        self._fail(self._running_requests(), exc)

    def _admit(self) -> list[_Request]:
        """Pop waiting requests in order while they fit the budgets (caller holds the lock)."""
        admitted: list[_Request] = []
        while self._waiting:
            if not self._caches.batchable and (self._rows or admitted or self._prefilling or self._partial):
                break  # its cache holds one prompt's rows at a time (see kv_batch.CacheRecipe)
            req = self._waiting[0]
            fits = (self._rows_admitted + req.params.n <= self.max_num_seqs
                    and self._tokens_in_flight + req.cost <= self.max_batch_tokens)
            if not fits and (self._rows_admitted or admitted):
                break
            self._waiting.popleft()
            admitted.append(req)
            self._active[req.uid] = req
            req.open_choices = req.params.n
            self._rows_admitted += req.params.n
            self._counters["peak_running"] = max(self._counters["peak_running"], self._rows_admitted)
            self._tokens_in_flight += req.cost
            self._counters["prompt_tokens_total"] += len(req.prompt_ids)
        return admitted

    def _release(self, choice: _Choice) -> None:
        if choice.done:
            return
        choice.done = True
        req = choice.request
        with self._cond:
            self._rows_admitted -= 1
            self._tokens_in_flight -= req.row_cost
            req.open_choices -= 1
            if req.open_choices == 0:
                self._active.pop(req.uid, None)
                self._counters["requests_aborted_total" if req.aborted else "requests_finished_total"] += 1

    def _new_choices(self, req: _Request) -> list[_Choice]:
        from stoker.engines.sampling import RowSampler

        p = req.params
        choices = []
        for i in range(p.n):
            seed = None if p.seed is None else p.seed + i
            grammar = None
            if p.structured is not None:
                grammar = self._grammars.matcher(p.structured, sorted(req.stop_ids))
            sampler = RowSampler(p, req.prompt_ids, self._logits_width, self.device, seed, stop_ids=req.stop_ids,
                                 bad_words=req.bad_words, grammar=grammar)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, skip_special_tokens=p.skip_special_tokens)
            out = ChoiceOutput(i, len(req.prompt_ids), req.max_new, req.stop_ids, detok, StopStringMatcher(p.stop),
                               with_logprobs=p.logprobs is not None, min_tokens=p.min_tokens,
                               prompt_logprobs=req.prompt_logprobs)
            choices.append(_Choice(req, sampler, out))
        req.choices = choices
        return choices

    def _forward(self, adapters: list[str], *, every_position: bool = False, **inputs: Any) -> Any:
        """The last position's logits ``[rows, vocab]``; ``every_position``: all of them ``[rows, width, vocab]``."""
        if self._adapters:
            inputs["adapter_names"] = adapters
        if self._logits_to_keep and not every_position:
            inputs["logits_to_keep"] = 1
        logits = self.model(**inputs).logits
        return logits if every_position else logits[:, -1, :]

    def _prefill_step(self) -> None:
        """One forward pass of prefill: the next group's whole prompts, or the next chunk of the group under way."""
        from stoker.engines import prefill

        if self._partial is not None:
            group = self._partial.group
        else:
            group = prefill.next_group(self._prefilling, self.max_prefill_tokens)
        try:
            if self._partial is None:
                # A cache that cannot copy rows gets each choice's prompt as a row of its own.
                rows = group if self._caches.batchable else [r for r in group for _ in range(r.params.n)]
                self._partial = prefill.plan(group, rows, model=self.model, device=self.device, caches=self._caches,
                                             max_tokens=self.max_prefill_tokens, prefixes=self._prefixes)
            part = self._partial
            logits = self._forward([r.adapter for r in part.rows], every_position=part.every, **part.next_inputs())
            if part.finished:
                self._partial = None
                self._join(part, logits)
        except Exception as exc:  # e.g. out of memory on a long prompt: only the newcomers fail
            self._partial = None
            self._fail([r for r in group if r.open_choices], exc)

    def _join(self, part: Prefill, logits: Any) -> None:
        """Sample the first tokens of a prefilled group and merge its rows into the running batch."""
        from stoker.engines.kv_batch import PaddedKVBatch, select_rows

        torch = self._torch
        batchable = self._caches.batchable
        group, rows, mask, cache = part.group, part.rows, part.mask, part.cache
        if self._prefixes is not None:
            from stoker.engines.prefill import store_prefixes

            store_prefixes(part, self._prefixes)
        if part.every:  # one request, unpadded (see prefill.next_group)
            group[0].prompt_logprobs = self._prompt_logprobs(group[0], logits[0])
            logits = logits[:, -1, :]
        lengths = torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long, device=self.device)
        if part.offsets is not None:  # multimodal RoPE (Qwen2-VL): text after an image goes on from a shifted position
            lengths = lengths + part.offsets
        if batchable and any(r.params.n > 1 for r in group):
            index = torch.tensor([j for j, r in enumerate(group) for _ in range(r.params.n)],
                                 dtype=torch.long, device=self.device)
            select_rows(cache, index)
            mask, logits, lengths = mask[index], logits[index], lengths[index]
        choices = [c for r in group for c in self._new_choices(r)]
        tokens, keep = self._sample_and_emit(choices, logits)
        # The first generated token sits at position len(prompt), right after the prompt.
        new = PaddedKVBatch(cache, mask, positions=lengths, last_tokens=tokens)
        if not keep:
            return
        if batchable:
            new.keep(keep)
            choices = [choices[i] for i in keep]
        if self._batch is None:
            self._batch = new
        else:
            self._batch.merge(new)
        self._rows.extend(choices)

    def _decode(self) -> None:
        inputs = self._batch.decode_inputs()
        logits = self._forward([c.request.adapter for c in self._rows], **inputs)
        self._counters["steps_total"] += 1
        tokens, keep = self._sample_and_emit(self._rows, logits)
        self._batch.advance(tokens)
        self._shrink(keep)
        self._kv_cache_tokens = self._batch.rows * self._batch.cols if self._rows else 0

    def _drop_aborted(self, uids: set[int]) -> None:
        if self._partial is not None and all(r.uid in uids or r.aborted for r in self._partial.group):
            self._retire(self._partial.group)  # a partial prefill nobody waits for
            self._partial = None
        unstarted = [r for r in self._prefilling if r.uid in uids]
        if unstarted:
            self._prefilling = deque(r for r in self._prefilling if r.uid not in uids)
            self._retire(unstarted)
        keep = [i for i, c in enumerate(self._rows) if c.request.uid not in uids]
        for i, c in enumerate(self._rows):
            if c.request.uid in uids:
                self._release(c)
        self._shrink(keep)

    def _shrink(self, keep: list[int]) -> None:
        """Keep the running rows ``keep``. A cache that cannot drop rows keeps the others as ballast until every row
        is done (their tokens are computed and thrown away): only one prompt's rows share such a batch."""
        live = [i for i in keep if not self._rows[i].done]
        if not live:
            self._rows, self._batch = [], None
        elif len(live) != len(self._rows) and self._caches.batchable:
            self._batch.keep(live)
            self._rows = [self._rows[i] for i in live]

    def _sample_and_emit(self, choices: list[_Choice], logits: Any) -> tuple[Any, list[int]]:
        """Sample one token per row, turn it into deltas, and return (tokens tensor, rows still running)."""
        from stoker.engines.sampling import sample

        torch = self._torch
        sampled = sample(logits, [c.sampler for c in choices])
        out: dict[int, tuple[_Request, list[Delta]]] = {}
        keep: list[int] = []
        generated = sum(not c.done for c in choices)
        for i, (choice, token) in enumerate(zip(choices, sampled.tokens)):
            req = choice.request
            if choice.done:  # ballast (see _shrink)
                continue
            if req.aborted:
                self._release(choice)
                continue
            delta = self._advance(choice, token, sampled.logprobs[i])
            if delta is not None:
                out.setdefault(req.uid, (req, []))[1].append(delta)
            if choice.out.finish is None:
                keep.append(i)
            else:
                self._release(choice)
        self._counters["generated_tokens_total"] += generated
        for req, deltas in out.values():
            self._send(req, deltas)
        return torch.tensor(sampled.tokens, dtype=torch.long, device=self.device), keep

    def _advance(self, choice: _Choice, token: int, logprob: tuple[float, list[tuple[int, float]]] | None
                 ) -> Delta | None:
        """Take one generated token; return a delta when there is news."""
        return choice.out.push(token, self._token_logprob(token, logprob))

    def _token_logprob(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None
                       ) -> TokenLogprob | None:
        if logprob is None:
            return None
        text_of = self._token_texts
        return TokenLogprob(token, text_of(token), logprob[0], [(tid, text_of(tid), lp) for tid, lp in logprob[1]])

    def _prompt_logprobs(self, req: _Request, logits: Any) -> list[TokenLogprob | None]:
        from stoker.engines.sampling import prompt_logprobs

        found = prompt_logprobs(logits[-len(req.prompt_ids):], req.prompt_ids, req.params.prompt_logprobs or 0)
        return [self._token_logprob(t, lp) for t, lp in zip(req.prompt_ids, found)]

    def _send(self, req: _Request, item: list[Delta] | BaseException) -> None:
        if req.sink is None:
            return
        try:
            req.sink(item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            with self._cond:
                req.aborted = True

    def _running_requests(self) -> list[_Request]:
        return list({c.request.uid: c.request for c in self._rows}.values())

    def _fail(self, requests: list[_Request], exc: Exception) -> None:
        """End ``requests`` with an error: their rows leave the batch, their callers get the exception."""
        logger.error("generation failed for %d request(s): %s: %s", len(requests), type(exc).__name__, exc,
                     exc_info=exc)
        uids = {r.uid for r in requests}
        keep = [i for i, c in enumerate(self._rows) if c.request.uid not in uids]
        if not keep or not self._caches.batchable:
            requests = [*requests, *self._running_requests()]
            self._rows, self._batch = [], None
        elif len(keep) != len(self._rows):
            try:
                self._batch.keep(keep)
                self._rows = [self._rows[i] for i in keep]
            except Exception:  # noqa: BLE001 - cannot even shrink the batch: drop it all
                requests = [*requests, *self._running_requests()]
                self._rows, self._batch = [], None
        error = exc if isinstance(exc, StokerError) else RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
        for req in self._retire(requests):
            self._send(req, error)

    def _retire(self, requests: list[_Request]) -> list[_Request]:
        """Take ``requests`` out of the budgets whatever rows they still hold; return those not aborted (their
        callers are still waiting for an ending)."""
        live = []
        with self._cond:
            for req in {r.uid: r for r in requests}.values():
                if req.open_choices == 0:
                    continue
                self._active.pop(req.uid, None)
                self._rows_admitted -= req.open_choices
                self._tokens_in_flight -= req.open_choices * req.row_cost
                req.open_choices = 0
                if req.aborted:
                    self._counters["requests_aborted_total"] += 1
                else:
                    live.append(req)
        return live


def _context_length(config: Any, tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:
        return value
    raise StokerError("cannot tell the model's context length from its config: set max_model_len (e.g. 4096).")
