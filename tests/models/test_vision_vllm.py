"""The demo vision model on real vLLM: images go in as multi_modal_data, on every surface, and the answers equal the
huggingface engine's token for token.

vLLM's LLaVA code imports a torchvision-only transformers module for one helper; Stoker's vLLM plugin points it at
the PIL module's copy when torchvision is missing (``stoker.engines.vllm_plugin``, docs/vllm.md), so these tests run
without torchvision, as CI has none.
"""

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
from stoker.demo.vision_tasks import QUESTIONS, Picture, answer

from conftest import ROOT  # noqa: E402
from media_cases import png, webchat_reply  # noqa: E402

pytestmark = [pytest.mark.vllm]

VLLM = {"infer_backend": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_space": 1, "vllm_maxlen": 256}
PICTURES = [Picture("circle", "red", 910_001, 64), Picture("cross", "blue", 910_002, 48),
            Picture("triangle", "orange", 910_003, 96), Picture("square", "green", 910_004, 80)]
DESCRIBE_Q, SHAPE_Q = QUESTIONS["describe"][0], QUESTIONS["shape"][0]


def conversation(picture: Picture, question: str) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + base64.b64encode(png(picture)).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def vllm_service(demo_vision: Path) -> Iterator[Any]:
    from stoker.chat import open_chat_service

    service = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_vision), **VLLM}))
    yield service
    service.engine.close()


def test_vllm_answers_about_pictures_like_huggingface(vllm_service: Any, demo_vision: Path) -> None:
    from stoker.chat import open_chat_service

    question = DESCRIBE_Q
    requests = [vllm_service.request(conversation(p, question)) for p in PICTURES]
    # The prompt keeps one placeholder per image: vLLM's processor expands it.
    assert [r.prompt_ids.count(vllm_service.processor.image_token_id) for r in requests] == [1] * len(PICTURES)
    ours = vllm_service.engine.generate_batch(requests)
    # A text-only question in the same engine: the model's trained no-image answer.
    text_only = vllm_service.engine.generate_batch([vllm_service.request([{"role": "user", "content": SHAPE_Q}])])
    hf_service = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_vision)}))
    try:
        reference = hf_service.engine.generate_batch([hf_service.request(conversation(p, question)) for p in PICTURES])
        hf_text = hf_service.engine.generate_batch([hf_service.request([{"role": "user", "content": SHAPE_Q}])])
    finally:
        hf_service.engine.close()
    assert [c.choices[0].text for c in ours] == [answer("describe", p.shape, p.color) for p in PICTURES]
    assert [c.choices[0].token_ids for c in ours] == [c.choices[0].token_ids for c in reference]
    assert text_only[0].choices[0].token_ids == hf_text[0].choices[0].token_ids


def test_webchat_upload_on_vllm(vllm_service: Any, tmp_path: Path) -> None:
    picture = PICTURES[3]
    upload = tmp_path / "upload.png"
    upload.write_bytes(png(picture))
    assert webchat_reply(vllm_service, DESCRIBE_Q, upload) == answer("describe", picture.shape, picture.color)


@pytest.fixture(scope="module")
def server(demo_vision: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from api_server import start_server, stop_server

    srv = start_server({"model_name_or_path": str(demo_vision), **VLLM}, tmp_path_factory.mktemp("vision-vllm"))
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def test_api_on_vllm_answers_whole_and_streamed_and_refuses_bad_images(server: Any) -> None:
    import openai

    from api_server import client

    api = client(server)
    for picture in PICTURES[:2]:
        messages = conversation(picture, DESCRIBE_Q)
        whole = api.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0)
        assert whole.choices[0].message.content == answer("describe", picture.shape, picture.color)
        assert whole.usage.prompt_tokens > 16  # the image's 16 tokens are counted, as vLLM expanded them
        chunks = api.chat.completions.create(model="m", messages=messages, max_tokens=32, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        api.chat.completions.create(model="m", messages=bad, max_tokens=8)
    assert exc.value.body["message"] == (
        "the image URL points to 127.0.0.1, a private or loopback address; set allow_private_urls: true to allow it.")


def test_terminal_chat_on_vllm_image_command(demo_vision: Path, tmp_path: Path) -> None:
    picture = PICTURES[2]
    file = tmp_path / "shape.png"
    file.write_bytes(png(picture))
    overrides = [f"{k}={v}" for k, v in VLLM.items()]
    out = subprocess.run([sys.executable, "-m", "stoker", "chat", f"model_name_or_path={demo_vision}", *overrides],
                         input=f"/image {file}\n{SHAPE_Q}\nexit\n", capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    replies = [line[len("Assistant: "):] for line in out.stdout.splitlines() if line.startswith("Assistant: ")]
    assert replies == [answer("shape", picture.shape, picture.color)]


def test_predict_on_vllm_answers_an_images_column(demo_vision: Path, tmp_path: Path) -> None:
    import yaml

    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    rows = []
    for i, picture in enumerate(PICTURES):
        (data / "pics" / f"{i}.png").write_bytes(png(picture))
        rows.append({"messages": [{"role": "user", "content": f"<image>{DESCRIBE_Q}"},
                                  {"role": "assistant", "content": answer("describe", picture.shape, picture.color)}],
                     "images": [f"pics/{i}.png"]})
    (data / "shapes.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"shapes": {
        "file_name": "shapes.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    cfg = tmp_path / "predict.yaml"
    out = tmp_path / "out"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(demo_vision), "dataset_dir": str(data),
                                   "eval_dataset": "shapes", "do_predict": True, "predict_with_generate": True,
                                   "output_dir": str(out), **VLLM}))
    done = subprocess.run([sys.executable, "-m", "stoker", "predict", str(cfg)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [r["predict"] for r in predictions] == [r["label"] for r in predictions]
    assert len(predictions) == len(PICTURES)
