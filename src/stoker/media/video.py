"""``load_video``: a video reference to the frames a video-language model sees, sampled as LLaMA-Factory samples them.

A video comes from the same places as an image (``media.load.media_bytes``: data: URLs, http(s) URLs on public
hosts, paths inside the media folders) under the same rules, with its own byte cap (``video_max_bytes``). It is
decoded with PyAV (FFmpeg), which reads MP4, AVI, MKV, WEBM and the other containers FFmpeg knows.

Frames are sampled the way LLaMA-Factory does: ``floor(duration x video_fps)`` frames (at least one, at most
``video_maxlen`` and the stream's frame count), spread evenly from the first frame to the last; each is scaled into
[``video_min_pixels``, ``video_max_pixels``] keeping its aspect ratio.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stoker.config import Settings
from stoker.errors import MediaError
from stoker.media.images import MAX_DECODE_PIXELS, check_size, fit_pixels
from stoker.media.load import media_bytes

VIDEO_PLACEHOLDER = "<video>"  # what users and datasets write where a video goes


@dataclass(frozen=True)
class VideoRef:
    """A video not loaded yet: a ``video_url`` part's URL or a dataset row's path (told apart from images)."""

    ref: Any


@dataclass(frozen=True)
class Video:
    frames: list[Any]  # RGB PIL images of one size, in time order
    fps: float  # sampled frames per second of the source (sets the time between temporal patches)
    timestamps: tuple[float, ...] = ()  # each frame's time in the source, in seconds (Qwen3-VL writes them)


def sample_indices(total_frames: int, duration_s: float, video_fps: float, video_maxlen: int) -> list[int]:
    """LLaMA-Factory's choice of frames: evenly spaced, ``floor(duration x video_fps)`` of them within the bounds."""
    if total_frames <= 0:  # a stream that does not say how long it is: the first video_maxlen frames' span
        return sorted({round(i) for i in _linspace(0, video_maxlen - 1, video_maxlen)})
    count = min(total_frames, video_maxlen, max(1, math.floor(duration_s * video_fps)))
    return sorted({int(i) for i in _linspace(0, total_frames - 1, count)})


def _linspace(start: float, stop: float, count: int) -> list[float]:
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    return [start + i * step for i in range(count)]


def load_video(
    ref: Any, settings: Settings, *, local_ok: bool = False, roots: Sequence[str | os.PathLike[str]] | None = None
) -> Video:
    """The sampled, scaled frames of ``ref`` (a ``Video``, a ``VideoRef`` or any reference ``media_bytes`` takes)."""
    if isinstance(ref, VideoRef):
        ref = ref.ref
    if isinstance(ref, Video):
        return ref
    data, what = media_bytes(ref, settings, "video", local_ok=local_ok, roots=roots)
    return decode_video(data, settings, what=what)


def decode_video(data: bytes, settings: Settings, *, what: str = "the video") -> Video:
    check_size(len(data), settings, what, "video")
    try:
        import av
    except ImportError:
        raise MediaError("videos need PyAV, which is not installed: pip install av.", param="messages") from None
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, ValueError, OSError):
        raise MediaError(f"{what} is not a video in a format FFmpeg reads (MP4, AVI, MKV, WEBM, ...).",
                         param="messages") from None
    with container:
        if not container.streams.video:
            raise MediaError(f"{what} has no video stream.", param="messages")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > MAX_DECODE_PIXELS:
            raise MediaError(f"{what} is {width}x{height} pixels a frame, more than the {MAX_DECODE_PIXELS:,} that "
                             "are decoded: scale it down.", param="messages")
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / 1e6
        wanted = sample_indices(stream.frames or 0, duration, settings.video_fps, settings.video_maxlen)
        rate = float(stream.average_rate or 0) or (len(wanted) / duration if duration > 0 else settings.video_fps)
        chosen, frames, times = set(wanted), [], []
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index in chosen:
                    frames.append(fit_pixels(frame.to_image().convert("RGB"), settings.video_min_pixels,
                                             settings.video_max_pixels))
                    times.append(index / rate)
                if index >= wanted[-1]:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            raise MediaError(f"{what} cannot be decoded: {exc}.", param="messages") from None
    if not frames:
        raise MediaError(f"{what} has no frames that decode.", param="messages")
    fps = len(frames) / duration if duration > 0 else settings.video_fps
    return Video(frames, fps, tuple(times))
