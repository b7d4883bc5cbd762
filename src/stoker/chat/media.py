"""Images in a prompt: where each goes (its ``<image>`` placeholder) and what it becomes (the model's image tokens).

Loading is ``stoker.media``'s job; this module places the loaded images in the conversation and builds the media
the engine takes with the request:
- ``images``: the loaded RGB PIL images (vLLM: ``multi_modal_data={"image": images}``);
- ``inputs``: the processor's tensors (``pixel_values``, and e.g. ``image_grid_thw``) for the model's forward pass
  at prefill (``engines.hf_media.prefill_inputs`` joins them across a batch);
- ``image_token_id`` / ``image_tokens``: the prompt must hold exactly that many of that token.

An engine that runs the model's processor itself (``EngineInfo.expands_images`` false: vLLM) gets each placeholder
as the model's unexpanded image text and no ``inputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stoker.config import Settings
from stoker.errors import MediaError
from stoker.media import IMAGE_PLACEHOLDER, load_image
from stoker.templates.base import Template
from stoker.templates.types import Message

# Placeholder text (before expansion), by processor class, where it is not the processor's image token alone.
PROCESSOR_PLACEHOLDERS = {
    "Qwen2VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
    "Qwen2_5_VLProcessor": "<|vision_start|><|image_pad|><|vision_end|>",
}


def place_placeholders(messages: list[Message], count: int) -> list[Message]:
    """Check the ``<image>`` placeholders match ``count`` images; with none, put them all at the start of the first
    user message (LLaMA-Factory's rule). Returns new message dicts."""
    found = sum(str(m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in messages)
    if found == count:
        return [dict(m) for m in messages]
    if found:
        raise MediaError(
            f"the messages hold {found} {IMAGE_PLACEHOLDER} placeholder{'s' if found != 1 else ''} but "
            f"{count} image{'s were' if count != 1 else ' was'} given: put one {IMAGE_PLACEHOLDER} where each image "
            "goes, or none to put all images at the start of the first user message.",
            param="messages",
        )
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = IMAGE_PLACEHOLDER * count + str(out[first].get("content") or "")
    return out


def model_placeholder(processor: Any, template: Template | None = None) -> str:
    """The text that stands for one image in this model's prompts, before expansion to its image tokens: the chat
    template family's (``Template.image_token``), else the processor's."""
    if template is not None and template.image_token:
        return template.image_token
    return PROCESSOR_PLACEHOLDERS.get(type(processor).__name__, processor.image_token)


@dataclass(frozen=True)
class ImagePrompter:
    """Puts a conversation's images into its prompt, for one model (its processor, template and tokenizer)."""

    settings: Settings
    processor: Any
    template: Template
    tokenizer: Any
    expand: bool  # run the processor and expand each image to its tokens here (else the engine does)
    model_name: str = "model"

    def place(self, messages: list[Message], images: Sequence[Any]) -> tuple[list[Message], dict[str, Any]]:
        """Load ``images``, put each one's image text where its placeholder is, and build the engine's media."""
        loaded = [load_image(ref, self.settings) for ref in images]
        messages = place_placeholders(messages, len(loaded))
        processor = self.processor
        if processor is None or not getattr(processor, "image_token", None):
            raise MediaError(f"the model {self.model_name!r} has no image processor, so it takes no images.",
                             param="messages")
        placeholder = model_placeholder(processor, self.template)
        token = processor.image_token
        token_id = int(processor.image_token_id if getattr(processor, "image_token_id", None) is not None
                       else self.tokenizer.convert_tokens_to_ids(token))
        if self.expand:
            inputs, replacements = self._expanded(loaded, placeholder, token)
        else:
            inputs, replacements = {}, [placeholder] * len(loaded)
        count = sum(r.count(token) for r in replacements)
        pending = iter(replacements)
        out = []
        for message in messages:
            text = str(message.get("content") or "")
            if IMAGE_PLACEHOLDER in text:
                pieces = text.split(IMAGE_PLACEHOLDER)
                text = pieces[0] + "".join(next(pending) + piece for piece in pieces[1:])
            out.append({**message, "content": text})
        media = {"images": loaded, "inputs": inputs, "image_token_id": token_id, "image_tokens": count}
        return out, media

    def _expanded(self, loaded: list[Any], placeholder: str, token: str) -> tuple[dict[str, Any], list[str]]:
        processor = self.processor
        try:
            inputs = dict(processor.image_processor(loaded, return_tensors="pt"))
        except (ValueError, TypeError) as exc:  # e.g. an image below the processor's own minimum size
            raise MediaError(f"the model's image processor cannot take this image: {exc}", param="messages") from None
        try:
            expanded = [processor.replace_image_token(inputs, i) for i in range(len(loaded))]
        except NotImplementedError:
            raise MediaError(
                f"Stoker cannot tell how many image tokens {type(processor).__name__} needs per image, so this model "
                "takes no images here.",
                param="messages",
            ) from None
        return inputs, [placeholder.replace(token, e) for e in expanded]
