"""What a vision model's forward pass takes at prefill, for the rows of a batch that carry images.

The chat package has already put each image's tokens into the prompt and run the processor (``chat.media``); here
the engine checks the prompt holds exactly the tokens its images fill, and joins the rows' pixel tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stoker.errors import RequestError


def check_prompt_images(prompt_ids: Sequence[int], media: dict[str, Any] | None, image_token_id: int | None,
                        *, where: str = "the request", video_token_id: int | None = None) -> None:
    """The prompt holds exactly the image (and video) tokens its media fill; a mismatch would fail the whole batch's
    forward."""
    for kind, token_id in (("image", image_token_id), ("video", video_token_id)):
        if token_id is None:
            continue
        found = sum(1 for t in prompt_ids if t == token_id)
        wanted = int((media or {}).get(f"{kind}_tokens") or 0)
        if found == wanted:
            continue
        if not wanted:
            raise RequestError(
                f"{where} holds {found} {kind} token{'s' if found != 1 else ''} but no {kind}: send {kind}s as "
                f"{kind}_url content parts rather than writing <{kind}> (or the model's {kind} token) in the text.",
                param="messages",
            )
        raise RequestError(
            f"{where} holds {found} {kind} tokens where its {kind}s need {wanted}: the prompt was cut or the chat "
            "template dropped a placeholder; shorten the conversation or check the template.",
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
    grids = {k: extra[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in extra}
    if ("image_grid_thw" in grids or "video_grid_thw" in grids) and hasattr(inner, "get_rope_index"):
        # Token types as the model's processor marks them: text 0, image 1, video 2.
        kinds = (input_ids == core.config.image_token_id).to(torch.int)
        video_id = getattr(core.config, "video_token_id", None)
        if video_id is not None:
            kinds = kinds + 2 * (input_ids == video_id).to(torch.int)
        positions, deltas = inner.get_rope_index(input_ids, mm_token_type_ids=kinds, attention_mask=attention_mask,
                                                 **grids)
        return extra, positions, deltas.reshape(-1).to(device)
    return extra, position_ids, None
