"""What every route shares: the chat service, the served model ids, and request-to-sampling mapping.

Model ids (``chat.models``): the configured model (the config's base with its adapters applied in order) is the
first and the default; each adapter alone and the base weights are served beside it, so vLLM-style per-request
selection works in one batch. An id the server does not know gets the configured model, as LLaMA-Factory's API
(which ignores ``model``) does, unless ``api_strict_model: true`` makes it a 404.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stoker.chat import MIN_TEMPERATURE, SamplingParams, ServedModel, StructuredOutput, structured_fields
from stoker.errors import NotFoundError, RequestError
from stoker.server.metrics import ServerMetrics
from stoker.server.protocol import ModelCard

if TYPE_CHECKING:
    from stoker.chat import ChatService
    from stoker.config import Settings
    from stoker.server.protocol import SamplingFields

logger = logging.getLogger("stoker")


def _greedy(body: SamplingFields) -> bool:
    """A temperature of (about) zero, or top_p 0 (only the most likely token is kept): both mean greedy."""
    return body.top_p == 0 or (body.temperature is not None and body.temperature < MIN_TEMPERATURE)


@dataclass
class ServerState:
    service: ChatService
    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    _unknown_logged: set[str] = field(default_factory=set)

    @property
    def configured_model(self) -> str:
        return self.service.models.configured.id

    def model_cards(self) -> list[ModelCard]:
        return [ModelCard(id=m.id, created=self.created, parent=m.parent) for m in self.service.models.all]

    def model_for(self, model: str) -> tuple[ServedModel, str]:
        """The model a request's ``model`` id names, and the id its answer carries: the id as asked for, or for an
        unknown id the configured model's (logged once); with ``api_strict_model`` an unknown id is a
        ``NotFoundError`` (404)."""
        served = self.service.models.resolve(model)
        if served is not None:
            return served, model
        if self.settings.api_strict_model:
            known = ", ".join(repr(c.id) for c in self.model_cards())
            raise NotFoundError(
                f"The model {model!r} does not exist on this server. Served models: {known} (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        if model not in self._unknown_logged and len(self._unknown_logged) < 100:
            self._unknown_logged.add(model)
            logger.info("requests for the unknown model id %r get the configured model %r (api_strict_model: true "
                        "makes them a 404)", model, self.configured_model)
        return self.service.models.configured, self.configured_model

    def check_sequences(self, n: int, prompts: int) -> None:
        """Refuse, with a 400, a request that could never be admitted: a 429 would have the client retry forever."""
        info = self.service.info
        if n > info.max_num_seqs:
            raise RequestError(
                f"n={n} is more than this server runs at once (max_num_seqs={info.max_num_seqs}): "
                "ask for fewer choices.",
                param="n",
            )
        limit = info.max_num_seqs + info.max_queue
        if n * prompts > limit:
            raise RequestError(
                f"{prompts} prompts x n={n} make {n * prompts} sequences, more than this server holds at once "
                f"({limit}: max_num_seqs={info.max_num_seqs} running plus max_queue={info.max_queue} waiting): "
                "send fewer prompts per request.",
                param="prompt",
            )

    # ---------------------------------------------------------------------------------------------------------------
    def sampling_params(self, body: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutput | None = None) -> SamplingParams:
        """The request's sampling fields over the config's defaults (fields the request leaves out keep them).
        ``structured``: the output constraint the route read (``response_format``, tools), besides the body's own
        ``structured_outputs``; a request may set only one."""
        own = structured_outputs_of(body)
        if own is not None and structured is not None:
            raise RequestError(f"{own.param} and {structured.param} both constrain the output: send only one.",
                               param=own.param)
        structured = structured or own
        if body.stream_options is not None and not body.stream:
            raise RequestError("stream_options is only allowed when stream is true.", param="stream_options")
        self.check_sequences(body.n, 1)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        top_k = None if body.top_k is None else max(body.top_k, 0)  # -1 (vLLM's "off") is 0 here
        return self.service.sampling_params(
            max_new_tokens=max_tokens,
            temperature=0.0 if _greedy(body) else body.temperature,
            top_p=body.top_p or None,
            top_k=top_k,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed,
            n=body.n,
            stop=[s for s in stop if s] or None,
            logprobs=logprobs,
            prompt_logprobs=body.prompt_logprobs,
            min_p=body.min_p,
            min_tokens=body.min_tokens or None,
            ignore_eos=body.ignore_eos or None,
            stop_token_ids=body.stop_token_ids or None,
            bad_words=body.bad_words or None,
            allowed_token_ids=body.allowed_token_ids,
            logit_bias=logit_bias(body.logit_bias) or None,
            structured=structured,
        )


def structured_outputs_of(body: SamplingFields) -> StructuredOutput | None:
    """vLLM's ``structured_outputs`` object, or its older ``guided_*`` fields."""
    if body.structured_outputs is not None:
        fields = body.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        return structured_fields(fields, param="structured_outputs")
    guided = {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
              "grammar": body.guided_grammar}
    return structured_fields({k: v for k, v in guided.items() if v is not None}, param="guided", sep="_")


def logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as strings."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys are token ids, and {key!r} is not an integer.",
                               param="logit_bias") from None
        out[token] = float(value)
    return out
