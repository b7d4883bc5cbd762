"""Examples -> chat requests: each row prepared by the chat service, cut to ``cutoff_len``, seeded by its position.

The prompt goes through the same ``ChatService.prepare`` as every chat surface, so a row renders, is fitted to the
context and has its reply read exactly as the same conversation would in the terminal or the API. A prompt longer
than the limit keeps its END, where the question and the generation prompt are (LLaMA-Factory keeps the start,
which cuts off the generation prompt and leaves the model continuing the user's text); a leading BOS the template
wrote stays first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from stoker.chat import ChatService, GenerationRequest, PreparedChat, SamplingParams
from stoker.chat.budget import prompt_limit
from stoker.errors import StokerError
from stoker.predict.data import BadRow
from stoker.predict.examples import Example


@dataclass
class RenderedRow:
    position: int  # the row's place in the whole run (all datasets, in order); decides its process and seed
    example: Example
    chat: PreparedChat

    @property
    def ids(self) -> list[int]:
        return self.chat.request.prompt_ids

    @property
    def truncated(self) -> bool:
        return self.chat.truncated

    def request(self) -> GenerationRequest:
        return self.chat.request


def render_rows(
    service: ChatService, rows: Sequence[tuple[int, Example]], *, cutoff_len: int, adapter: str | None = None
) -> tuple[list[RenderedRow], list[BadRow]]:
    """Prepare ``(position, example)`` pairs with ``service``; ``adapter``: the model that answers (a served
    model's ``adapter``; None: the configured model).

    A row the template or media loading refuses is returned as a ``BadRow`` (the caller applies ``on_bad_row``).
    """
    base = service.sampling_params()
    limit = prompt_limit(cutoff_len, service.max_model_len, base.max_new_tokens)
    rendered: list[RenderedRow] = []
    bad: list[BadRow] = []
    for position, example in rows:
        try:
            rendered.append(_render(service, position, example, base, limit, adapter))
        except (StokerError, _Unrenderable) as exc:
            reason = exc.message if isinstance(exc, StokerError) else str(exc)
            bad.append(BadRow(example.dataset, example.index, reason.rstrip(".")))
    return rendered, bad


class _Unrenderable(ValueError):
    pass


def _render(service: ChatService, position: int, example: Example, base: SamplingParams, limit: int,
            adapter: str | None = None) -> RenderedRow:
    if example.audios:
        raise _Unrenderable("the row has audios, which Stoker does not take: no audio-language model is supported yet")
    from stoker.media.video import VideoRef

    images: list[object] = [*example.images, *(VideoRef(ref) for ref in example.videos)]
    if images and service.info.vision:  # (a text-only model refuses them in prepare)
        from stoker.media import load_image, media_roots
        from stoker.media.video import load_video

        # Dataset media are read from dataset_dir as well as media_dir; the chat surfaces allow media_dir only.
        roots = media_roots(service.settings, dataset=True)
        images = [load_image(ref, service.settings, roots=roots) for ref in example.images]
        images += [load_video(ref, service.settings, roots=roots) for ref in example.videos]
    chat = service.prepare(
        example.messages, base, tools=example.tools, images=images, max_prompt_tokens=limit, adapter=adapter,
        request_id=f"predict-{example.dataset}-{example.index}",
    )
    params = chat.request.params
    if params.seed is not None and not params.greedy:
        # Each row draws from its own seed, so sampled output does not depend on how rows are split or batched.
        chat.request.params = replace(params, seed=params.seed + position)
    return RenderedRow(position, example, chat)
