"""The vLLM engine: vLLM schedules and runs the model; Stoker turns its token ids into text.

One driver thread owns a ``vllm.v1.engine.llm_engine.LLMEngine``: it adds and aborts requests and calls ``step()``
while any are unfinished. Both ``stream`` and ``generate_batch`` go through it, so the interactive surfaces and
predict share one engine (one model copy, one KV cache) and behave the same way.

Why not vLLM's ``AsyncLLM``: it always runs the engine core in a second process, whereas ``LLMEngine`` can run it
in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which starts in seconds instead of tens of seconds on a CPU. With
multiprocessing on (vLLM's default on GPU) ``LLMEngine`` runs the same engine-core process ``AsyncLLM`` does.

Text: vLLM is asked for token ids only (``detokenize=False``). Each choice's ids go through Stoker's own incremental
detokenizer and stop-string matcher, exactly as in the huggingface engine, so both backends emit the same text,
token ids and finish reasons. Stop strings are matched here, not in vLLM: when one completes, the driver aborts that
choice before the next step. Stop token ids (eos included) are handed to vLLM with ``ignore_eos`` so that vLLM stops
on exactly the ids the huggingface engine stops on.

Each choice of a request is its own vLLM request (``n=1``, seed ``seed + index``), so a choice that hits a stop
string can be aborted alone, and seeded sampling matches the huggingface engine's per-choice seeds.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stoker.engines.base import (
    BASE_WEIGHTS,
    Delta,
    EngineInfo,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    check_prompt,
    check_queue,
    unknown_adapter,
)
from stoker.engines.detokenize import IncrementalDetokenizer, TokenTexts
from stoker.engines.outputs import ChoiceOutput
from stoker.engines.stops import StopStringMatcher
from stoker.engines.threaded import PreparedRequest, ThreadedEngine
from stoker.engines.vllm_args import INSTALL_HINT
from stoker.errors import ConfigError, ModelLoadError, RequestError, StokerError

logger = logging.getLogger("stoker")

# In-process vLLM engines share this process's torch.distributed groups: only the last one to close may tear them down.
_inprocess_lock = threading.Lock()
_inprocess_engines = 0


def import_vllm() -> Any:
    """Import vllm (8-16 s), with the install instructions when it is missing or broken."""
    # vLLM configures its logging on import: INFO lines on stdout would mix with chat output and JSON results.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from stoker.engines.vllm_plugin import register

    register()  # vLLM's own processes get it through the entry point; this one may import vLLM's models first
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(
            f"infer_backend: vllm needs the vllm package, which cannot be imported ({exc}). {INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways (missing torch ops, CUDA libs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"infer_backend: vllm is installed but fails to import ({type(exc).__name__}: {first}). "
                          f"{INSTALL_HINT}") from None
    return vllm


def prepare_environment(*, cpu: bool) -> None:
    """Environment vLLM reads when its engine starts; values the user already set win."""
    # vLLM's internal sockets otherwise bind to the machine's public address.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if cpu:
        # In-process engine core: starts in seconds rather than tens of seconds (see docs/vllm.md).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@dataclass(eq=False)
class _Choice:
    vllm_id: str
    out: ChoiceOutput
    live: bool = False  # known to vLLM and not finished there


@dataclass(eq=False)
class _Request(PreparedRequest):
    lora: Any  # vllm LoRARequest or None
    max_new: int
    stop_ids: list[int]
    media: dict[str, Any] | None
    choices: list[_Choice] = field(default_factory=list)
    open_choices: int = 0


class VLLMEngine(ThreadedEngine):
    """Stoker's Engine over a vLLM ``LLMEngine`` driven by one background thread.

    - ``engine_kwargs``: ``vllm.EngineArgs`` keywords (see ``vllm_args.engine_kwargs``).
    - ``adapters``: LoRA adapter name -> folder; ``default_adapter`` applies to requests that name none;
      ``per_request``: requests may pick any of them (else the default adapter is fixed).
    - ``eos_ids``: ids that end every choice, besides each request's own ``stop_token_ids``.
    - ``max_queue``: ``stream`` raises ``OverloadedError`` when this many sequences (choices) wait beyond
      ``max_num_seqs``.
    """

    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        tokenizer: Any,
        *,
        adapters: dict[str, Path] | None = None,
        default_adapter: str | None = None,
        per_request: bool = True,
        eos_ids: Sequence[int] = (),
        max_queue: int = 256,
        max_batch_tokens: int | None = None,
        vision: bool = False,
    ):
        import_vllm()
        from vllm.engine.arg_utils import EngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.llm_engine import LLMEngine

        self.tokenizer = tokenizer
        self._adapters = dict(adapters or {})
        if default_adapter is not None and default_adapter not in self._adapters:
            raise ConfigError(f"default adapter {default_adapter!r} is not among the adapters {list(self._adapters)}")
        # lora_int_id must be >= 1 and fixed per adapter: vLLM caches loaded adapters by it.
        self._loras = {name: LoRARequest(name, i, str(path)) for i, (name, path) in enumerate(self._adapters.items(), 1)}
        self._default_lora = self._loras[default_adapter] if default_adapter else None
        self._eos_ids = sorted(set(eos_ids))
        self._token_texts = TokenTexts(tokenizer)
        engine_kwargs = dict(engine_kwargs)
        outputs_config = engine_kwargs.get("structured_outputs_config")
        if outputs_config is None or isinstance(outputs_config, dict):
            from vllm.config import StructuredOutputsConfig

            # xgrammar and compact JSON, as the huggingface engine compiles them (engines.grammar): the same outputs,
            # and no whitespace for a small model to loop in.
            engine_kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                **{"backend": "xgrammar", "disable_any_whitespace": True, **(outputs_config or {})})
        try:
            args = EngineArgs(**engine_kwargs)
        except TypeError as exc:  # an unknown key in vllm_config
            raise ConfigError(f"invalid vllm_config: {exc}. Keys must be vllm.EngineArgs fields.") from None
        try:
            self._llm = LLMEngine.from_engine_args(args)
        except Exception as exc:  # noqa: BLE001 - vLLM fails on unsupported models in many ways (KeyError, ...)
            # pydantic's errors put the field and the reason on the lines after "1 validation error for ...".
            detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:4])[:600]
            detail = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
            raise ModelLoadError(f"vLLM could not start on {engine_kwargs.get('model')}: {detail}. The huggingface "
                                 "backend (infer_backend: huggingface) runs every family transformers has.") from None
        self._inprocess = type(self._llm.engine_core).__name__ == "InprocClient"
        if self._inprocess:
            global _inprocess_engines
            with _inprocess_lock:
                _inprocess_engines += 1
        model_config = self._llm.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        from stoker.engines.grammar import Grammars

        # vLLM compiles structured outputs itself, with xgrammar. Compiling here first (cached per constraint, about
        # a millisecond for a small schema) refuses a bad one with the huggingface engine's 400, before vLLM sees it.
        self._grammars = Grammars(tokenizer, self.vocab_size)
        self.max_num_seqs = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self.max_queue = max(1, int(max_queue))
        self.info = EngineInfo(
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            max_num_seqs=self.max_num_seqs,
            max_batch_tokens=max_batch_tokens,
            max_queue=self.max_queue,
            eos_ids=self._eos_ids,
            # Without per-request adapters the config's weights are fixed, as when the huggingface engine merges them.
            adapters=list(self._adapters) if per_request else [],
            default_adapter=default_adapter,
            vision=vision,
            expands_images=False,  # vLLM runs the model's processor on the raw images itself
            backend="vllm",
        )
        self._vision = vision

        self._uids = itertools.count()
        self._cond = threading.Condition()
        self._incoming: list[_Request] = []
        self._to_abort: list[_Request] = []
        self._requests: dict[int, _Request] = {}  # submitted and not finished, by uid
        self._closed = False
        # Owned by the driver thread.
        self._live: dict[str, tuple[_Request, _Choice]] = {}  # vLLM request id -> choice
        self._counters = {"generated_tokens_total": 0, "prompt_tokens_total": 0, "requests_finished_total": 0,
                          "requests_aborted_total": 0, "steps_total": 0}
        self._thread = threading.Thread(target=self._run, name="stoker-vllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    async def abort(self, request_id: str) -> None:
        with self._cond:
            matches = [r for r in self._requests.values() if r.request_id == request_id and not r.aborted]
        for req in matches:
            self._cancel(req)
            # Whoever still waits on it (a stream, generate_batch) learns why instead of waiting forever.
            self._send(req, RequestError(f"the request {request_id!r} was aborted", code="aborted"))

    def stats(self) -> dict[str, float]:
        """Counts of Stoker's requests; vLLM runs up to ``max_num_seqs`` sequences, the rest wait (vLLM may hold
        back more while its KV cache is full, which this does not see)."""
        with self._cond:
            requests = list(self._requests.values())
            sequences = sum(r.open_choices for r in requests)
            out: dict[str, float] = {
                "running": min(sequences, self.max_num_seqs),
                "waiting": max(0, sequences - self.max_num_seqs),
                "running_requests": len(requests),
                "max_num_seqs": self.max_num_seqs,
            }
            out.update(self._counters)
        return out

    def _take_unfinished(self) -> list[_Request]:
        with self._cond:
            pending = list(self._requests.values()) + self._incoming
            self._requests.clear()
            self._incoming.clear()
        return pending

    def _after_close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        last = True
        if self._inprocess:
            global _inprocess_engines
            with _inprocess_lock:
                _inprocess_engines -= 1
                last = _inprocess_engines == 0
        try:
            if last:
                llm.engine_core.shutdown()
            else:
                # In-process, vLLM's shutdown also destroys this process's torch.distributed groups, which the other
                # in-process engines still use: only the last one may run it, here or from the client's finalizer.
                llm.engine_core._finalizer.detach()
        except Exception:  # noqa: BLE001 - best effort: the process may be exiting already
            logger.debug("vLLM engine shutdown failed", exc_info=True)
        del llm
        gc.collect()

    # ------------------------------------------------------------------ request intake

    def check_params(self, params: SamplingParams) -> None:
        if params.structured is not None:
            self._grammars.compile(params.structured)

    def _prepare(self, request: GenerationRequest, position: int | None = None) -> _Request:
        where = f"request {position} ({request.request_id})" if position is not None else "the request"
        p = request.params
        prompt, max_new = check_prompt(request, where, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                       vision=self._vision)
        self.check_params(p)
        lora = self._default_lora
        if request.adapter == BASE_WEIGHTS:
            lora = None
        elif request.adapter is not None:
            lora = self._loras.get(request.adapter)
            if lora is None:
                raise unknown_adapter(request.adapter, list(self._loras))
        stop_ids = sorted({*(() if p.ignore_eos else self._eos_ids), *p.stop_token_ids})
        uid = next(self._uids)
        req = _Request(uid, request.request_id, prompt, p, lora, max_new, stop_ids, request.media)
        req.choices = [
            _Choice(f"stoker-{uid}-{i}", ChoiceOutput(
                i, len(prompt), max_new, stop_ids,
                IncrementalDetokenizer(self.tokenizer, prompt, skip_special_tokens=p.skip_special_tokens),
                StopStringMatcher(p.stop), with_logprobs=p.logprobs is not None, min_tokens=p.min_tokens))
            for i in range(p.n)
        ]
        req.open_choices = p.n
        return req

    def _submit(self, requests: list[_Request], *, bounded: bool) -> None:
        with self._cond:
            if self._closed:
                raise RequestError("the engine is shut down")
            if bounded:
                rows = sum(r.open_choices for r in self._requests.values()) + sum(r.params.n for r in requests)
                check_queue(rows - self.max_num_seqs, sum(r.params.n for r in requests), self.max_queue)
            for req in requests:
                self._requests[req.uid] = req
            self._incoming.extend(requests)
            self._cond.notify()

    def _cancel(self, req: _Request) -> None:
        """Abort from any thread; the driver frees the request's vLLM slots before its next step."""
        with self._cond:
            if req.aborted or req.uid not in self._requests:
                return
            req.aborted = True
            self._to_abort.append(req)
            self._cond.notify()

    # ------------------------------------------------------------------ driver thread

    def _run(self) -> None:
        llm = self._llm
        while True:
            with self._cond:
                while not (self._closed or self._incoming or self._to_abort or llm.has_unfinished_requests()):
                    self._cond.wait()
                if self._closed:
                    return
                incoming, self._incoming = self._incoming, []
                to_abort, self._to_abort = self._to_abort, []
            try:
                for req in to_abort:
                    self._abort_now(req)
                for req in incoming:
                    self._add_now(req)
                if llm.has_unfinished_requests():
                    outputs = llm.step()
                    self._counters["steps_total"] += 1
                    self._dispatch(outputs)
            except Exception as exc:  # a failed step fails the requests in it, never the thread
                logger.exception("vLLM step failed")
                self._fail_all(exc)

    def _add_now(self, req: _Request) -> None:
        if req.aborted:
            self._finish_request(req)
            return
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = req.params
        prompt: dict[str, Any] = {"prompt_token_ids": req.prompt_ids}
        if req.media and req.media.get("images"):
            prompt["multi_modal_data"] = {"image": list(req.media["images"])}
        try:
            rendered = self._llm.renderer.render_cmpl([prompt])[0]
            rules = vllm_rules(p)
            for choice in req.choices:
                params = VSamplingParams(
                    n=1,
                    temperature=p.temperature if not p.greedy else 0.0,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    repetition_penalty=p.repetition_penalty,
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    seed=None if p.seed is None or p.greedy else p.seed + choice.out.index,
                    max_tokens=req.max_new,
                    stop_token_ids=req.stop_ids,
                    ignore_eos=True,  # eos is in stop_token_ids: vLLM stops on exactly those ids
                    logprobs=p.logprobs,
                    prompt_logprobs=p.prompt_logprobs,  # every choice's first delta carries them
                    detokenize=False,
                    output_kind=RequestOutputKind.DELTA,
                    **rules,
                )
                self._llm.add_request(choice.vllm_id, rendered, params, lora_request=req.lora)
                choice.live = True
                self._live[choice.vllm_id] = (req, choice)
        except Exception as exc:  # noqa: BLE001 - vLLM's own validation (ValueError, TypeError ...)
            self._abort_now(req)
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._send(req, exc if isinstance(exc, StokerError) else RequestError(f"vLLM rejected the request: {detail}"))
            return
        self._counters["prompt_tokens_total"] += len(req.prompt_ids)

    def _abort_now(self, req: _Request) -> None:
        ids = [c.vllm_id for c in req.choices if c.live]
        for c in req.choices:
            c.live = False
            self._live.pop(c.vllm_id, None)
        if ids:
            self._llm.abort_request(ids)
        self._finish_request(req)

    def _finish_request(self, req: _Request) -> None:
        with self._cond:
            if self._requests.pop(req.uid, None) is None:
                return
        self._counters["requests_aborted_total" if req.aborted else "requests_finished_total"] += 1

    def _dispatch(self, outputs: list[Any]) -> None:
        by_request: dict[int, tuple[_Request, list[Delta]]] = {}
        done: list[str] = []
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None:  # aborted meanwhile: vLLM may still deliver what it had computed
                continue
            req, choice = entry
            if req.aborted:
                continue
            completion = out.outputs[0]
            deltas = by_request.setdefault(req.uid, (req, []))[1]
            if out.prompt_token_ids:  # as the model saw it: vLLM's processor expanded each image placeholder
                choice.out.prompt_tokens = len(out.prompt_token_ids)
            if getattr(out, "prompt_logprobs", None) and req.params.prompt_logprobs is not None:
                k_prompt = req.params.prompt_logprobs
                choice.out.prompt_logprobs = [
                    None if e is None else self._token_logprob(t, e, k_prompt)
                    for t, e in zip(req.prompt_ids, out.prompt_logprobs)]
            logprobs = completion.logprobs
            k = req.params.logprobs
            for j, token in enumerate(map(int, completion.token_ids)):
                entry = logprobs[j] if logprobs is not None and j < len(logprobs) else None
                logprob = self._token_logprob(token, entry, k) if entry is not None and k is not None else None
                delta = choice.out.push(token, logprob)
                if delta is not None:
                    deltas.append(delta)
                if choice.out.finish is not None:
                    break
            self._counters["generated_tokens_total"] += len(completion.token_ids)
            if choice.out.finish is None and out.finished:
                # vLLM ended the choice on a rule of its own (e.g. its context limit); close it the same way.
                deltas.append(choice.out.close("stop" if completion.finish_reason == "stop" else "length"))
            if choice.out.finish is not None:
                if not out.finished:
                    done.append(choice.vllm_id)  # a stop string: vLLM does not know it is over
                choice.live = False
                self._live.pop(choice.vllm_id, None)
                req.open_choices -= 1
                if req.open_choices == 0:
                    self._finish_request(req)
        if done:
            self._llm.abort_request(done)
        for req, deltas in by_request.values():
            if deltas:
                self._send(req, deltas)

    def _token_logprob(self, token: int, entry: Any, k: int) -> TokenLogprob:
        """vLLM's per-position {token id: Logprob(logprob, rank)} -> chosen token plus its top-k, best first."""
        text_of = self._token_texts
        items = list(entry.items())
        chosen = next((lp.logprob for tid, lp in items if tid == token), float("nan"))
        top = sorted(((tid, lp) for tid, lp in items if lp.rank is not None and lp.rank <= k),
                     key=lambda item: item[1].rank)
        return TokenLogprob(token, text_of(token), chosen, [(tid, text_of(tid), lp.logprob) for tid, lp in top[:k]])

    def _send(self, req: _Request, item: list[Delta] | BaseException) -> None:
        if req.sink is None:
            return
        try:
            req.sink(item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self._cancel(req)

    def _fail_all(self, exc: Exception) -> None:
        failed = {req.uid: req for req, _ in self._live.values()}
        for req in failed.values():
            try:
                self._abort_now(req)
            except Exception:  # noqa: BLE001 - the engine is failing already; free what can be freed
                logger.debug("abort after a failed step failed", exc_info=True)
        error = exc if isinstance(exc, StokerError) else RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
        for req in failed.values():
            if not req.aborted:
                self._send(req, error)


def vllm_rules(p: SamplingParams) -> dict[str, Any]:
    """The request's vLLM extensions (same names and meanings in vLLM's ``SamplingParams``); only those set."""
    out: dict[str, Any] = {}
    if p.min_p:
        out["min_p"] = p.min_p
    if p.min_tokens:
        out["min_tokens"] = p.min_tokens
    if p.logit_bias:
        out["logit_bias"] = dict(p.logit_bias)
    if p.allowed_token_ids is not None:
        out["allowed_token_ids"] = list(p.allowed_token_ids)
    if p.bad_words:
        out["bad_words"] = list(p.bad_words)
    if p.structured is not None:
        from vllm.sampling_params import StructuredOutputsParams

        spec = p.structured
        fields: dict[str, Any] = {"json": spec.schema} if spec.kind == "json" else (
            {"json_object": True} if spec.kind == "json_object" else
            {"choice": spec.choices} if spec.kind == "choice" else {spec.kind: spec.spec})
        out["structured_outputs"] = StructuredOutputsParams(**fields)
    return out
