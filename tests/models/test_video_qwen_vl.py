"""Videos for the Qwen-VL family on the huggingface engine: decoding (PyAV), LLaMA-Factory's frame sampling, the
temporal patch layout, greedy equality with ``generate``, the API's ``video_url`` parts and predict's ``videos``
column on LLaMA-Factory's own mllm_video_demo; audio is refused by name.

The videos are the real clips of LLaMA-Factory's demo data (``shared/data/llamafactory/mllm_demo_data``).
"""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.config import settings_from_dict
from stoker.demo.vision_tasks import Picture
from stoker.errors import MediaError

from conftest import ROOT  # noqa: E402

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clips(shared_dir: Path) -> Path:
    return shared_dir / "data" / "llamafactory" / "mllm_demo_data"


def data_url(path: Path, kind: str = "video/mp4") -> str:
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def test_frames_are_sampled_as_llamafactory_samples_them(clips: Path) -> None:
    import av

    from stoker.media.video import load_video, sample_indices

    for name in ("1.mp4", "2.avi", "3.mp4", "4.mp4"):
        with av.open(str(clips / name)) as container:
            stream = container.streams.video[0]
            total, duration = stream.frames, float(stream.duration * stream.time_base)
        for fps, maxlen in ((2.0, 128), (0.5, 128), (2.0, 8)):
            settings = settings_from_dict({"model_name_or_path": "m", "media_dir": str(clips), "video_fps": fps,
                                           "video_maxlen": maxlen, "video_max_pixels": 64 * 64})
            count = min(total, maxlen, max(1, math.floor(duration * fps)))
            indices = sample_indices(total, duration, fps, maxlen)
            assert len(indices) == count and indices[0] == 0 and indices[-1] == total - 1
            video = load_video(name, settings)
            assert len(video.frames) == count, (name, fps, maxlen)
            width, height = video.frames[0].size
            assert width * height <= 64 * 64 and {f.size for f in video.frames} == {(width, height)}
            assert video.fps == pytest.approx(count / duration)


def test_video_files_keep_the_media_rules(clips: Path, tmp_path: Path) -> None:
    from stoker.media.video import load_video

    settings = settings_from_dict({"model_name_or_path": "m", "media_dir": str(clips), "video_max_bytes": 1000})
    size = (clips / "4.mp4").stat().st_size
    with pytest.raises(MediaError) as exc:
        load_video("4.mp4", settings)
    assert exc.value.message == f"video file '4.mp4' is {size:,} bytes, over the video_max_bytes limit of 1,000 bytes."
    with pytest.raises(MediaError) as exc:
        load_video(data_url(clips / "4.mp4"), settings)
    assert exc.value.message.startswith("the data: URL video is ") and "video_max_bytes" in exc.value.message
    (tmp_path / "clip.mp4").write_bytes((clips / "4.mp4").read_bytes())
    with pytest.raises(MediaError) as exc:
        load_video(str(tmp_path / "clip.mp4"), settings_from_dict({"model_name_or_path": "m"}))
    assert exc.value.message.startswith("local video paths are not allowed here (")
    local = settings_from_dict({"model_name_or_path": "m"})
    assert load_video(str(tmp_path / "clip.mp4"), local, local_ok=True).frames  # a local user's own file


def test_two_equal_frames_are_one_image(clips: Path) -> None:
    """The temporal patch layout: a clip of one frame twice gives exactly the image processor's patches."""
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from stoker.media.video import Video
    from stoker.models.qwen_vl import PilQwenVLProcessor

    frame = Picture("circle", "red", 5, 64).render().resize((100, 60))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=128 * 128)
    processor = PilQwenVLProcessor(image_processor, None, "qwen2_5_vl")
    video = processor.video_inputs([Video([frame, frame], 2.0)], 32 * 32, 128 * 128)
    image = image_processor([frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 4, 8]]
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])
    assert video["second_per_grid_ts"].tolist() == [1.0]  # two frames a patch at 2 frames a second
    odd = processor.video_inputs([Video([frame] * 3, 2.0)], 32 * 32, 128 * 128)
    assert odd["video_grid_thw"].tolist() == [[2, 4, 8]]  # the last frame repeated to fill the second patch


def reference(model: Any, prompt_ids: list[int], media: dict[str, Any] | None, max_new: int) -> list[int]:
    import torch

    x = torch.tensor([prompt_ids])
    extra = {}
    if media:
        kinds = (x == model.config.image_token_id).int() + 2 * (x == model.config.video_token_id).int()
        extra = {**media["inputs"], "mm_token_type_ids": kinds}
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=0, **extra)
    return out[0, len(prompt_ids):].tolist()


def video_message(url: str, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_replies_equal_generate_alone_and_batched(kind: str, qwen_vl_models: dict[str, Path], clips: Path
                                                        ) -> None:
    import io

    from stoker.chat import open_chat_service

    template = "qwen3_vl_nothink" if kind == "qwen3_vl" else "qwen2_vl"
    settings = settings_from_dict({"model_name_or_path": str(qwen_vl_models[kind]), "template": template,
                                   "video_max_pixels": 64 * 64, "video_fps": 1.0})
    service = open_chat_service(settings)
    try:
        buf = io.BytesIO()
        Picture("square", "blue", 2, 64).render().save(buf, format="PNG")
        picture = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        conversations = [
            video_message(data_url(clips / "4.mp4"), "What is she doing?"),
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                          {"type": "text", "text": "Describe the image."}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                          {"type": "video_url", "video_url": {"url": data_url(clips / "3.mp4")}},
                                          {"type": "text", "text": "hello world"}]}],
            [{"role": "user", "content": "hello world"}],
        ]
        params = service.sampling_params(max_new_tokens=8, ignore_eos=True)
        requests = [service.request(c, params) for c in conversations]
        video_id = service.processor.video_token_id
        # 4.mp4: 5 s at 1 frame a second -> 5 frames, padded to 6 -> 3 temporal patches of 2x2 merged tokens.
        grid = requests[0].media["inputs"]["video_grid_thw"].tolist()
        assert grid[0][0] == 3
        assert requests[0].prompt_ids.count(video_id) == grid[0][0] * grid[0][1] * grid[0][2] // 4
        text = service.tokenizer.decode(requests[2].prompt_ids)
        assert "<|vision_start|><|image_pad|>" in text
        if kind == "qwen3_vl":
            # Each temporal patch after its time: the mean of its two frames' times, as transformers computes it.
            from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

            from stoker.media.video import sample_indices

            indices = sample_indices(150, 5.0, 1.0, 128)  # 4.mp4: 150 frames, 5 s at 30 frames a second
            assert requests[0].media["videos"][0].timestamps == tuple(i / 30 for i in indices)
            times = Qwen3VLProcessor._calculate_timestamps(None, indices, 30.0, 2)
            grid_hw = grid[0][1] * grid[0][2] // 4
            prompt = service.tokenizer.decode(requests[0].prompt_ids)
            assert "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * grid_hw + "<|vision_end|>"
                           for t in times) + "What is she doing?" in prompt
            assert prompt.count("<|vision_start|>") == len(times) == 3
        else:
            assert "<|vision_end|><|vision_start|><|video_pad|>" in text
        model = service.engine.model
        want = [reference(model, r.prompt_ids, r.media, 8) for r in requests]
        assert [c.choices[0].token_ids for c in service.engine.generate_batch(requests)] == want
        assert service.engine.generate_batch([requests[2]])[0].choices[0].token_ids == want[2]
    finally:
        service.engine.close()


def test_models_without_video_refuse_it_by_name(qwen_vl_models: dict[str, Path], demo_vision: Path, clips: Path,
                                                shared_dir: Path) -> None:
    from stoker.chat import open_chat_service
    from stoker.errors import RequestError

    message = video_message(data_url(clips / "4.mp4"), "What is she doing?")
    for path, template in ((demo_vision, None),):
        service = open_chat_service(settings_from_dict({"model_name_or_path": str(path), "template": template}))
        try:
            with pytest.raises(MediaError) as exc:
                service.request(message)
            assert exc.value.message.endswith(
                "takes no videos here: videos work with Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on the "
                "huggingface backend; send images (frames) instead.")
        finally:
            service.engine.close()
    text = open_chat_service(settings_from_dict({
        "model_name_or_path": str(shared_dir / "models" / "stories260K" / "hf"), "template": "llama2"}))
    try:
        with pytest.raises(RequestError) as exc:
            text.request(message)
        assert exc.value.message == "the model 'hf' takes no videos: send text only, or serve a vision-language model."
    finally:
        text.engine.close()


@pytest.fixture(scope="module")
def server(qwen_vl_models: dict[str, Path], clips: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from api_server import start_server, stop_server

    srv = start_server({"model_name_or_path": str(qwen_vl_models["qwen2_vl"]), "template": "qwen2_vl",
                        "media_dir": str(clips), "video_max_pixels": 64 * 64, "max_new_tokens": 4},
                       tmp_path_factory.mktemp("video-api"))
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def test_api_takes_video_url_parts_and_refuses_bad_media(server: Any, clips: Path) -> None:
    import openai

    from api_server import client

    api = client(server)
    whole = api.chat.completions.create(model="m", messages=video_message(data_url(clips / "4.mp4"), "hi"),
                                        max_tokens=4, temperature=0)
    by_path = api.chat.completions.create(model="m", messages=video_message("4.mp4", "hi"), max_tokens=4, temperature=0)
    assert whole.choices[0].message.content == by_path.choices[0].message.content
    assert whole.usage.prompt_tokens == by_path.usage.prompt_tokens > 20  # the video's tokens are counted
    streamed = api.chat.completions.create(model="m", messages=video_message("4.mp4", "hi"), max_tokens=4,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content

    bad = {
        "http://127.0.0.1:9/clip.mp4":
            "the video URL points to 127.0.0.1, a private or loopback address; set allow_private_urls: true to "
            "allow it.",
        # (the folder as resolved: shared/ may be reached through a symlink)
        "../secret.mp4": f"video file '../secret.mp4' is outside the allowed media folder ({clips.resolve()}).",
        "data:video/mp4;base64," + base64.b64encode(b"not a video").decode():
            "the data: URL video is not a video in a format FFmpeg reads (MP4, AVI, MKV, WEBM, ...).",
        "data:image/png;base64,AAAA": "the data: URL has media type 'image/png'; a video needs video/<type>.",
    }
    for url, message in bad.items():
        with pytest.raises(openai.BadRequestError) as exc:
            api.chat.completions.create(model="m", messages=video_message(url, "hi"), max_tokens=4)
        assert exc.value.body["message"] == message, url
        assert exc.value.body["type"] == "invalid_request_error"
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        api.chat.completions.create(model="m", messages=audio, max_tokens=4)
    assert exc.value.body["message"] == ("messages[0].content[0] is audio ('input_audio'), which Stoker does not take: "
                                         "no audio-language model is supported yet. Send text, images or videos.")


def run_predict(config: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    import yaml

    cfg = folder / "predict.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "stoker", "predict", str(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_predict_runs_the_shared_mllm_video_demo_and_refuses_audio(qwen_vl_models: dict[str, Path],
                                                                   shared_dir: Path, tmp_path: Path) -> None:
    data = shared_dir / "data" / "llamafactory"
    out = tmp_path / "out"
    config = {"model_name_or_path": str(qwen_vl_models["qwen2_vl"]), "template": "qwen2_vl",
              "dataset_dir": str(data), "eval_dataset": "mllm_video_demo", "do_predict": True,
              "predict_with_generate": True, "max_new_tokens": 4, "video_max_pixels": 64 * 64,
              "output_dir": str(out)}
    done = run_predict(config, tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    source = json.loads((data / "mllm_video_demo.json").read_text())
    assert [r["label"] for r in rows] == [row["messages"][-1]["content"] for row in source]
    assert all(r["predict"] for r in rows)

    done = run_predict({**config, "eval_dataset": "mllm_audio_demo", "output_dir": str(tmp_path / "audio")}, tmp_path)
    assert done.returncode == 2
    assert "row 0: the row has audios, which Stoker does not take: no audio-language model is supported yet" in done.stderr
    assert "Traceback" not in done.stderr


def test_terminal_chat_video_command(qwen_vl_models: dict[str, Path], demo_vision: Path, clips: Path,
                                     tmp_path: Path) -> None:
    def chat(model: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stoker", "chat", f"model_name_or_path={model}", *extra],
                              input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT)

    clip = clips / "4.mp4"
    out = chat(qwen_vl_models["qwen2_vl"], f"/video {clip}\nWhat is she doing?\n/video {clips / 'none.mp4'}\n"
               f"/save {tmp_path / 'saved.json'}\nexit\n", "template=qwen2_vl", "max_new_tokens=4", "video_max_pixels=4096")
    assert out.returncode == 0, out.stderr
    assert f"Video attached: {clip}" in out.stdout
    assert f"Error: video file {str(clips / 'none.mp4')!r} not found." in out.stdout
    assert sum(line.startswith("Assistant: ") for line in out.stdout.splitlines()) == 1
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved[0]["content"][0] == {"type": "text", "text": "[video]"}
    out = chat(demo_vision, f"/video {clip}\nexit\n")
    assert out.returncode == 0, out.stderr
    assert f"Error: the model {demo_vision.name} takes no videos." in out.stdout
