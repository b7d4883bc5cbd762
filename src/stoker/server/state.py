"""What every route shares: the chat service, the served model ids, request-to-sampling mapping and the token budget.

Model ids follow vLLM's serving semantics: the base model is served under ``API_MODEL_NAME`` (or its folder name),
and each LoRA adapter loaded unmerged under its own name; a request picks one by its ``model`` field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stoker.chat import MIN_TEMPERATURE, SamplingParams
from stoker.errors import NotFoundError, RequestError
from stoker.server.metrics import ServerMetrics
from stoker.server.protocol import ModelCard

if TYPE_CHECKING:
    from stoker.chat import ChatService
    from stoker.config import Settings
    from stoker.server.protocol import SamplingFields


def _greedy(body: SamplingFields) -> bool:
    """A temperature of (about) zero, or top_p 0 (only the most likely token is kept): both mean greedy."""
    return body.top_p == 0 or (body.temperature is not None and body.temperature < MIN_TEMPERATURE)


@dataclass
class ServerState:
    service: ChatService
    settings: Settings
    base_model: str
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def adapters(self) -> list[str]:
        return list(self.service.info.adapters)

    def model_cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.base_model, created=self.created)]
        cards += [ModelCard(id=name, created=self.created, parent=self.base_model) for name in self.adapters]
        return cards

    def adapter_for(self, model: str) -> str | None:
        """The adapter a ``model`` id selects (None for the base model); ``NotFoundError`` (404) for unknown ids."""
        if model == self.base_model:
            return None
        if model in self.adapters:
            return model
        known = ", ".join(repr(c.id) for c in self.model_cards())
        raise NotFoundError(
            f"The model {model!r} does not exist on this server. Served models: {known} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )

    # ---------------------------------------------------------------------------------------------------------------
    def sampling_params(self, body: SamplingFields, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's sampling fields over the config's defaults (fields the request leaves out keep them)."""
        if body.logit_bias:
            raise RequestError("logit_bias is not supported by this server: remove it.", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise RequestError("stream_options is only allowed when stream is true.", param="stream_options")
        max_num_seqs = self.service.info.max_num_seqs
        if body.n > max_num_seqs:
            raise RequestError(
                f"n={body.n} is more than this server runs at once (max_num_seqs={max_num_seqs}): "
                "ask for fewer choices.",
                param="n",
            )
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
        )
