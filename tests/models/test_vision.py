"""Vision-language models end to end: the demo LLaVA answers about generated pictures through the chat service, the
API, the terminal chat, the web chat and predict, token for token as plain transformers does; bad images and
text-only models get clear errors."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stoker.config import settings_from_dict
from stoker.demo.vision_tasks import NO_IMAGE_ANSWER, QUESTIONS, Picture, answer
from stoker.errors import MediaError, RequestError

from conftest import ROOT  # noqa: E402
from media_cases import png, webchat_reply  # noqa: E402

# Pictures never trained on (training draws its seeds from another stream), one per shape, several colours.
PICTURES = [
    Picture("circle", "red", seed=900_001, size=64),
    Picture("square", "blue", seed=900_002, size=48),
    Picture("triangle", "green", seed=900_003, size=96),
    Picture("cross", "orange", seed=900_004, size=64),
    Picture("circle", "purple", seed=900_005, size=128),
    Picture("triangle", "yellow", seed=900_006, size=40),
]
SHAPE_Q, COLOR_Q, DESCRIBE_Q = QUESTIONS["shape"][0], QUESTIONS["color"][0], QUESTIONS["describe"][0]



def data_url(picture: Picture) -> str:
    return "data:image/png;base64," + base64.b64encode(png(picture)).decode()


def ask(picture: Picture | None, question: str, *, image_first: bool = True) -> list[dict[str, Any]]:
    if picture is None:
        return [{"role": "user", "content": question}]
    image = {"type": "image_url", "image_url": {"url": data_url(picture)}}
    text = {"type": "text", "text": question}
    return [{"role": "user", "content": [image, text] if image_first else [text, image]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    for i, picture in enumerate(PICTURES):
        (folder / f"p{i}.png").write_bytes(png(picture))
    return folder


@pytest.fixture(scope="module")
def service(demo_vision: Path, media_dir: Path) -> Iterator[Any]:
    from stoker.chat import open_chat_service

    svc = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_vision), "media_dir": str(media_dir)}))
    yield svc
    svc.engine.close()


def complete(service: Any, conversations: list[list[dict[str, Any]]]) -> list[tuple[str, list[int]]]:
    """Replies of one batch (all requests prefilled and decoded together)."""
    requests = [service.request(c) for c in conversations]
    return [(c.choices[0].text, c.choices[0].token_ids) for c in service.engine.generate_batch(requests)]


# ----------------------------------------------------------------------------------------------------------------------
def test_demo_vision_is_an_offline_llava_checkpoint(demo_vision: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from stoker.demo.cache import build_record

    config = AutoConfig.from_pretrained(demo_vision)
    assert config.model_type == "llava"
    assert config.architectures == ["LlavaForConditionalGeneration"]
    assert config.text_config.head_dim == 64  # what vLLM's CPU attention accepts
    processor = AutoProcessor.from_pretrained(demo_vision)
    assert type(processor).__name__ == "LlavaProcessor"
    model = AutoModelForImageTextToText.from_pretrained(demo_vision)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHAPE_Q}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        f"<|im_start|>user\n<image>\n{SHAPE_Q}<|im_end|>\n<|im_start|>assistant\n"
    )
    accuracy = build_record(demo_vision)["metrics"]["accuracy"]
    assert set(accuracy) == {"shape", "color", "describe", "no_image"}
    assert all(value >= 0.95 for value in accuracy.values()), accuracy


def test_answers_about_generated_pictures_in_one_batch(service: Any) -> None:
    """Image rows and a text-only row share prefill and decode; each gets its own picture's answer."""
    conversations, expected = [], []
    for picture in PICTURES:
        for task, question in (("shape", SHAPE_Q), ("color", COLOR_Q), ("describe", DESCRIBE_Q)):
            conversations.append(ask(picture, question, image_first=len(conversations) % 2 == 0))
            expected.append(answer(task, picture.shape, picture.color))
    conversations.append(ask(None, SHAPE_Q))
    expected.append(NO_IMAGE_ANSWER)
    assert [text for text, _ in complete(service, conversations)] == expected


def test_engine_matches_transformers_token_for_token(service: Any, demo_vision: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(demo_vision)
    model = AutoModelForImageTextToText.from_pretrained(demo_vision).eval()
    ours = complete(service, [ask(p, DESCRIBE_Q) for p in PICTURES])
    for picture, (_, ids) in zip(PICTURES, ours, strict=True):
        # Stoker flattens [image, text] parts to "<image>" + text (no newline), so render that string.
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>" + DESCRIBE_Q}], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[fit(picture)], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=16)
        reference = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert ids == reference, (picture, ids, reference)


def fit(picture: Picture) -> Any:
    """The picture as Stoker hands it to the processor (scaled into the default pixel bounds: unchanged here)."""
    from stoker.media import fit_pixels

    return fit_pixels(picture.render(), 32 * 32, 768 * 768)


def test_prompt_holds_the_expanded_image_tokens(service: Any) -> None:
    request = service.request(ask(PICTURES[0], SHAPE_Q))
    image_id = service.processor.image_token_id
    assert request.prompt_ids.count(image_id) == 16  # (32 / 8)^2 patches, the CLS token dropped
    assert request.media["image_tokens"] == 16
    assert tuple(request.media["inputs"]["pixel_values"].shape) == (1, 3, 32, 32)
    # The placeholder sits where the image part was: before the question here.
    text = service.tokenizer.decode(request.prompt_ids)
    assert text.startswith("<|im_start|>user\n" + "<image>" * 16 + SHAPE_Q)


def test_follow_up_question_about_the_same_picture(service: Any) -> None:
    picture = PICTURES[3]
    conversation = [
        *ask(picture, SHAPE_Q),
        {"role": "assistant", "content": answer("shape", picture.shape, picture.color)},
        {"role": "user", "content": COLOR_Q},
    ]
    assert complete(service, [conversation])[0][0] == answer("color", picture.shape, picture.color)


def test_local_paths_only_inside_media_dir(service: Any, media_dir: Path, tmp_path: Path) -> None:
    picture = PICTURES[1]
    ok = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "p1.png"}},
                                       {"type": "text", "text": DESCRIBE_Q}]}]
    assert complete(service, [ok])[0][0] == answer("describe", picture.shape, picture.color)
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(picture))
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(outside)}}]}]
    with pytest.raises(MediaError) as exc:
        service.request(bad)
    assert exc.value.message == f"image file {str(outside)!r} is outside the allowed media folder ({media_dir.resolve()})."


def test_placeholder_errors(service: Any) -> None:
    two = [{"role": "user", "content": [{"type": "text", "text": "<image><image>" + SHAPE_Q},
                                        {"type": "image_url", "image_url": {"url": data_url(PICTURES[0])}}]}]
    with pytest.raises(MediaError) as exc:
        service.request(two)
    assert exc.value.message.startswith("the messages hold 3 <image> placeholders but 1 image was given")
    # "<image>" typed as text with no image would feed the model an image token without features.
    typed = service.request([{"role": "user", "content": "<image>" + SHAPE_Q}])
    with pytest.raises(RequestError) as exc2:
        service.engine.generate_batch([typed])
    assert exc2.value.message == (
        f"request 0 ({typed.request_id}) holds 1 image token but no image: send images as image_url content parts "
        "rather than writing <image> (or the model's image token) in the text."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Surfaces
@pytest.fixture(scope="module")
def api(service: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from stoker.server.app import create_app

    with TestClient(create_app(service, service.settings)) as client:
        yield client


def test_api_answers_with_data_urls_and_streams(api: Any) -> None:
    picture = PICTURES[2]
    body = {"model": api.get("/v1/models").json()["data"][0]["id"], "messages": ask(picture, DESCRIBE_Q)}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer("describe", picture.shape, picture.color)
    with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer("describe", picture.shape, picture.color)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64," + base64.b64encode(b"not a picture").decode(),
         "the data: URL image is not an image in a supported format (PNG, JPEG, GIF, WEBP or BMP)."),
        ("http://127.0.0.1:9/cat.png",
         "the image URL points to 127.0.0.1, a private or loopback address; set allow_private_urls: true to allow it."),
        ("http://169.254.169.254/latest/meta-data",
         "the image URL points to 169.254.169.254, a private or loopback address; set allow_private_urls: true to "
         "allow it."),
        ("gopher://example.com/x", "unsupported image URL scheme 'gopher': send a data: URL, an http(s) URL or a file path."),
    ],
)
def test_api_bad_images_are_400(api: Any, url: str, message: str) -> None:
    body = {"model": api.get("/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == message
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_api_truncated_image_is_400(api: Any) -> None:
    data = png(PICTURES[0])
    body = {"model": api.get("/v1/models").json()["data"][0]["id"],
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data[:-40]).decode()}},
                {"type": "text", "text": SHAPE_Q}]}]}
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("the data: URL image cannot be decoded: ")


def test_text_only_model_refuses_images_with_400(shared_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from stoker.chat import open_chat_service
    from stoker.server.app import create_app

    settings = settings_from_dict({"model_name_or_path": str(shared_dir / "models" / "stories260K" / "hf"),
                                   "template": "llama2"})
    text_service = open_chat_service(settings)
    try:
        with TestClient(create_app(text_service, settings)) as client:
            body = {"model": "hf", "messages": ask(PICTURES[0], SHAPE_Q)}
            response = client.post("/v1/chat/completions", json=body)
    finally:
        text_service.engine.close()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == (
        "the model 'hf' takes no images: send text only, or serve a vision-language model."
    )


def test_terminal_chat_image_command(demo_vision: Path, tmp_path: Path) -> None:
    picture = PICTURES[4]
    file = tmp_path / "shape.png"
    file.write_bytes(png(picture))
    stdin = f"/image {file}\n{SHAPE_Q}\n{COLOR_Q}\n/image {tmp_path / 'missing.png'}\nexit\n"
    out = subprocess.run([sys.executable, "-m", "stoker", "chat", f"model_name_or_path={demo_vision}"],
                         input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    replies = [line[len("Assistant: "):] for line in out.stdout.splitlines() if line.startswith("Assistant: ")]
    assert replies == [answer("shape", picture.shape, picture.color), answer("color", picture.shape, picture.color)]
    assert f"Image attached: {file}" in out.stdout
    assert f"Error: image file {str(tmp_path / 'missing.png')!r} not found." in out.stdout


def test_webchat_upload(service: Any, tmp_path: Path) -> None:
    picture = PICTURES[5]
    upload = tmp_path / "upload.png"
    upload.write_bytes(png(picture))
    assert webchat_reply(service, DESCRIBE_Q, upload) == answer("describe", picture.shape, picture.color)


def write_dataset(folder: Path) -> None:
    """A LLaMA-Factory sharegpt dataset with an images column, paths relative to dataset_dir."""
    (folder / "pics").mkdir(parents=True)
    rows = []
    for i, picture in enumerate(PICTURES):
        (folder / "pics" / f"{i}.png").write_bytes(png(picture))
        rows.append({
            "messages": [{"role": "user", "content": f"<image>{DESCRIBE_Q}"},
                         {"role": "assistant", "content": answer("describe", picture.shape, picture.color)}],
            "images": [f"pics/{i}.png"],
        })
    (folder / "shapes.json").write_text(json.dumps(rows))
    info = {"shapes": {"file_name": "shapes.json", "formatting": "sharegpt",
                       "columns": {"messages": "messages", "images": "images"},
                       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                "assistant_tag": "assistant"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def run_predict(config: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    import yaml

    cfg = folder / "predict.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "stoker", "predict", str(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def read_predictions(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]


def test_predict_on_a_dataset_images_column(demo_vision: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dataset(data)
    out = tmp_path / "out"
    done = run_predict({"model_name_or_path": str(demo_vision), "dataset_dir": str(data), "eval_dataset": "shapes",
                        "do_predict": True, "predict_with_generate": True, "output_dir": str(out)}, tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_predictions(out)
    assert [r["predict"] for r in rows] == [r["label"] for r in rows]
    assert len(rows) == len(PICTURES)


def test_predict_runs_the_shared_mllm_demo(demo_vision: Path, shared_dir: Path, tmp_path: Path) -> None:
    """LLaMA-Factory's own multimodal demo (real photos, two images in one row): every row renders and runs."""
    out = tmp_path / "out"
    done = run_predict({"model_name_or_path": str(demo_vision), "dataset_dir": str(shared_dir / "data" / "llamafactory"),
                        "eval_dataset": "mllm_demo", "do_predict": True, "predict_with_generate": True,
                        "max_new_tokens": 8, "output_dir": str(out)}, tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_predictions(out)
    source = json.loads((shared_dir / "data" / "llamafactory" / "mllm_demo.json").read_text())
    assert len(rows) == len(source)
    assert [r["label"] for r in rows] == [row["messages"][-1]["content"] for row in source]


def test_visual_inputs_is_accepted_and_checked() -> None:
    from transformers import LlamaConfig, LlavaConfig

    from stoker.errors import ConfigError
    from stoker.models.vision import is_vision_config

    on = settings_from_dict({"model_name_or_path": "some/text-model", "visual_inputs": True})
    assert is_vision_config(LlavaConfig(), on) is True
    assert is_vision_config(LlamaConfig()) is False
    assert is_vision_config(LlamaConfig(), settings_from_dict({"visual_inputs": False})) is False
    with pytest.raises(ConfigError) as exc:
        is_vision_config(LlamaConfig(), on)
    assert exc.value.message == (
        "visual_inputs is true but 'some/text-model' is a text-only model (its config has no vision_config): remove "
        "visual_inputs, or point model_name_or_path at a vision-language model."
    )
