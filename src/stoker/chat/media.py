"""Images and videos in a prompt: where each goes (its ``<image>`` / ``<video>`` placeholder) and what it becomes
(the model's image or video tokens).

Loading is ``stoker.media``'s job; this module places the loaded images and videos in the conversation and builds
the media the engine takes with the request:
- ``images``: the loaded RGB PIL images (vLLM: ``multi_modal_data={"image": images}``); ``videos``: the sampled
  ``media.video.Video`` clips (Qwen-VL models on the huggingface engine);
- ``inputs``: the processor's tensors (``pixel_values``, and e.g. ``image_grid_thw``; ``pixel_values_videos`` and
  ``video_grid_thw``) for the model's forward pass at prefill (``engines.hf_media.prefill_inputs`` joins them);
- ``image_token_id`` / ``image_tokens`` (``video_token_id`` / ``video_tokens``): the prompt must hold exactly that
  many of that token.

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
from stoker.media.video import VIDEO_PLACEHOLDER, Video, VideoRef, load_video
from stoker.templates.base import Template
from stoker.templates.types import Message

def place_placeholders(messages: list[Message], count: int, placeholder: str = IMAGE_PLACEHOLDER,
                       kind: str = "image") -> list[Message]:
    """Check the ``<image>`` (``<video>``) placeholders match ``count`` images (videos); with none, put them all at
    the start of the first user message (LLaMA-Factory's rule). Returns new message dicts."""
    found = sum(str(m.get("content") or "").count(placeholder) for m in messages)
    if found == count:
        return [dict(m) for m in messages]
    if found:
        raise MediaError(
            f"the messages hold {found} {placeholder} placeholder{'s' if found != 1 else ''} but "
            f"{count} {kind}{'s were' if count != 1 else ' was'} given: put one {placeholder} where each {kind} "
            f"goes, or none to put all {kind}s at the start of the first user message.",
            param="messages",
        )
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] = placeholder * count + str(out[first].get("content") or "")
    return out


def model_placeholder(processor: Any, template: Template | None = None) -> str:
    """The text that stands for one image in this model's prompts, before expansion to its image tokens: the chat
    template family's (``Template.image_token``), else the processor's."""
    if template is not None and template.image_token:
        return template.image_token
    return getattr(processor, "placeholder", None) or processor.image_token  # Qwen-VL's: models.qwen_vl


@dataclass(frozen=True)
class ImagePrompter:
    """Puts a conversation's images and videos into its prompt, for one model (its processor, template and
    tokenizer)."""

    settings: Settings
    processor: Any
    template: Template
    tokenizer: Any
    expand: bool  # run the processor and expand each image to its tokens here (else the engine does)
    model_name: str = "model"

    def place(self, messages: list[Message], refs: Sequence[Any]) -> tuple[list[Message], dict[str, Any]]:
        """Load the images and videos in ``refs`` (videos as ``VideoRef`` or ``Video``), put each one's text where
        its placeholder is, and build the engine's media."""
        videos = [r for r in refs if isinstance(r, (Video, VideoRef))]
        processor = self.processor
        if processor is None or not getattr(processor, "image_token", None):
            raise MediaError(f"the model {self.model_name!r} has no image processor, so it takes no images.",
                             param="messages")
        if videos and not (self.expand and getattr(processor, "takes_videos", False)):
            raise MediaError(
                f"the model {self.model_name!r} takes no videos here: videos work with Qwen-VL models (Qwen2-VL, "
                "Qwen2.5-VL, Qwen3-VL) on the huggingface backend; send images (frames) instead.", param="messages")
        loaded = [load_image(ref, self.settings) for ref in refs if not isinstance(ref, (Video, VideoRef))]
        clips = [load_video(ref, self.settings) for ref in videos]
        messages = place_placeholders(messages, len(loaded))
        token = processor.image_token
        token_id = int(processor.image_token_id if getattr(processor, "image_token_id", None) is not None
                       else self.tokenizer.convert_tokens_to_ids(token))
        inputs: dict[str, Any] = {}
        replacements = [model_placeholder(processor, self.template)] * len(loaded)
        if self.expand and loaded:
            inputs, replacements = self._expanded(loaded, replacements[0], token)
        messages = _substitute(messages, IMAGE_PLACEHOLDER, replacements)
        media = {"images": loaded, "inputs": inputs, "image_token_id": token_id,
                 "image_tokens": sum(r.count(token) for r in replacements)}
        if clips:
            messages = place_placeholders(messages, len(clips), VIDEO_PLACEHOLDER, "video")
            settings = self.settings
            try:
                video_inputs = processor.video_inputs(clips, settings.video_min_pixels, settings.video_max_pixels)
            except ValueError as exc:
                raise MediaError(f"the model's image processor cannot take this video: {exc}", param="messages") from None
            expanded = [processor.video_prompt(video_inputs, i, clip) for i, clip in enumerate(clips)]
            messages = _substitute(messages, VIDEO_PLACEHOLDER, expanded)
            media.update(videos=clips, video_token_id=processor.video_token_id,
                         video_tokens=sum(e.count(processor.video_token) for e in expanded))
            inputs.update(video_inputs)
        return messages, media

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


def _substitute(messages: list[Message], placeholder: str, replacements: Sequence[str]) -> list[Message]:
    """Each ``placeholder`` in the messages' text, in order, replaced by the next of ``replacements``."""
    pending = iter(replacements)
    out = []
    for message in messages:
        text = str(message.get("content") or "")
        if placeholder in text:
            pieces = text.split(placeholder)
            text = pieces[0] + "".join(next(pending) + piece for piece in pieces[1:])
        out.append({**message, "content": text})
    return out
