"""What a vision model's forward pass takes at prefill, for the rows of a batch that carry images.

The chat package has already put each image's tokens into the prompt and run the processor (``chat.media``); here
the engine checks the prompt holds exactly the tokens its images fill, and joins the rows' pixel tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stoker.errors import RequestError


def check_prompt_images(prompt_ids: Sequence[int], media: dict[str, Any] | None, image_token_id: int | None,
                        *, where: str = "the request") -> None:
    """The prompt holds exactly the image tokens its media fill; a mismatch would fail the whole batch's forward."""
    if image_token_id is None:
        return
    found = sum(1 for t in prompt_ids if t == image_token_id)
    wanted = int(media["image_tokens"]) if media else 0
    if found == wanted:
        return
    if not media:
        raise RequestError(
            f"{where} holds {found} image token{'s' if found != 1 else ''} but no image: send images as image_url "
            "content parts rather than writing <image> (or the model's image token) in the text.",
            param="messages",
        )
    raise RequestError(
        f"{where} holds {found} image tokens where its images need {wanted}: the prompt was cut or the chat template "
        "dropped a placeholder; shorten the conversation or check the template.",
        param="messages",
    )


def prefill_inputs(
    model: Any, medias: Sequence[dict[str, Any] | None], input_ids: Any, attention_mask: Any, position_ids: Any
) -> tuple[dict[str, Any], Any, Any]:
    """Forward kwargs for a left-padded prefill batch whose rows carry ``medias`` (None: a text row).

    Returns ``(extra kwargs, position_ids to use, per-row position offsets or None)``. Tensors of the rows' media
    are concatenated along dim 0 in row order, which is the order the model fills its image tokens in. Models with
    multimodal RoPE (Qwen2-VL) get 3D position ids; their offsets shift the text positions of every later decode step.
    """
    import torch

    inputs: dict[str, list[Any]] = {}
    for media in medias:
        for key, value in ((media or {}).get("inputs") or {}).items():
            inputs.setdefault(key, []).append(value)
    device = input_ids.device
    dtype = next(model.parameters()).dtype
    extra = {}
    for key, values in inputs.items():
        value = torch.cat([torch.as_tensor(v) for v in values], dim=0).to(device)
        extra[key] = value.to(dtype) if value.is_floating_point() else value
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(core, "model", None)
    if "image_grid_thw" in extra and hasattr(inner, "get_rope_index"):
        image_id = core.config.image_token_id
        kinds = (input_ids == image_id).to(torch.int)
        positions, deltas = inner.get_rope_index(
            input_ids, mm_token_type_ids=kinds, image_grid_thw=extra["image_grid_thw"], attention_mask=attention_mask
        )
        return extra, positions, deltas.reshape(-1).to(device)
    return extra, position_ids, None
