"""Examples -> engine requests: rendered by the chat service, cut to ``cutoff_len``, with their sampling parameters.

The prompt goes through the same ``ChatService`` as every chat surface (``normalize`` then ``build_prompt``), so a
row renders exactly as the same conversation would in the terminal or the API. A prompt longer than the limit keeps
its END, where the question and the generation prompt are (LLaMA-Factory keeps the start, which cuts off the
generation prompt and leaves the model continuing the user's text); a leading BOS the template wrote stays first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from stoker.engines.base import GenerationRequest, SamplingParams
from stoker.errors import StokerError
from stoker.predict.data import BadRow
from stoker.predict.examples import Example


@dataclass
class RenderedRow:
    position: int  # the row's place in the whole run (all datasets, in order); decides its process and seed
    example: Example
    ids: list[int]
    params: SamplingParams
    media: dict[str, Any] | None = None
    truncated: bool = False

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=self.ids, params=self.params, media=self.media,
            request_id=f"predict-{self.example.dataset}-{self.example.index}",
        )  # fmt: skip


def prompt_limit(cutoff_len: int, max_model_len: int, max_new_tokens: int) -> int:
    """Longest prompt kept: ``cutoff_len``, and short enough to leave room to answer in the model's context.

    The answer keeps up to half the context, as the chat surfaces do (``ChatService.fit_history``); beyond that the
    prompt wins and ``max_new_tokens`` is cut to what is left.
    """
    return max(1, min(cutoff_len, max_model_len - min(max_new_tokens, max_model_len // 2)))


def truncate(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last ``limit`` ids; a leading BOS stays in front."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return [bos_id, *ids[len(ids) - (limit - 1) :]]
    return ids[len(ids) - limit :]


def render_rows(
    service: Any, rows: Sequence[tuple[int, Example]], *, cutoff_len: int
) -> tuple[list[RenderedRow], list[BadRow]]:
    """Render ``(position, example)`` pairs with ``service`` (a ``ChatService``).

    A row the template or media loading refuses is returned as a ``BadRow`` (the caller applies ``on_bad_row``).
    """
    base = service.sampling_params()
    limit = prompt_limit(cutoff_len, service.max_model_len, base.max_new_tokens)
    bos_id = getattr(service.tokenizer, "bos_token_id", None)
    rendered: list[RenderedRow] = []
    bad: list[BadRow] = []
    for position, example in rows:
        try:
            rendered.append(_render(service, position, example, base, limit, bos_id))
        except (StokerError, _Unrenderable) as exc:
            reason = exc.message if isinstance(exc, StokerError) else str(exc)
            bad.append(BadRow(example.dataset, example.index, reason.rstrip(".")))
    return rendered, bad


class _Unrenderable(ValueError):
    pass


def _render(
    service: Any, position: int, example: Example, base: SamplingParams, limit: int, bos_id: int | None
) -> RenderedRow:
    for kind in ("videos", "audios"):
        if getattr(example, kind):
            raise _Unrenderable(f"the row has {kind}; Stoker predicts on text and images only")
    messages, part_images = service.normalize(example.messages)
    images = [*part_images, *example.images]
    if example.images and service.engine.info.vision:  # (a text-only model refuses them in build_prompt)
        from stoker.media import load_image, media_roots

        # Dataset images are read from dataset_dir as well as media_dir; the chat surfaces allow media_dir only.
        roots = media_roots(service.settings, dataset=True)
        images = [*part_images, *(load_image(ref, service.settings, roots=roots) for ref in example.images)]
    prompt = service.build_prompt(messages, tools=example.tools, images=images or None)
    ids = prompt.ids
    truncated = len(ids) > limit
    if truncated:
        if prompt.media:
            raise _Unrenderable(
                f"the prompt is {len(ids)} tokens with its images, over the limit of {limit} (cutoff_len, and room "
                "to answer in the model's context); a prompt with images cannot be cut. Raise cutoff_len or shorten "
                "the row"
            )
        ids = truncate(ids, limit, bos_id)
    params = replace(
        base,
        stop=list(dict.fromkeys([*base.stop, *prompt.stop])),
        stop_token_ids=list(dict.fromkeys([*base.stop_token_ids, *prompt.stop_token_ids])),
    )
    params = service.fit_params(len(ids), params)
    if params.seed is not None and not params.greedy:
        # Each row draws from its own seed, so sampled output does not depend on how rows are split or batched.
        params = replace(params, seed=params.seed + position)
    return RenderedRow(position, example, ids, params, prompt.media, truncated)
