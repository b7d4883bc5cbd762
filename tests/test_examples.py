"""Every file under examples/ runs from the repository's root as the README shows, and LLaMA-Factory's inference
guide YAMLs (model paths changed to the demo models) run unchanged through chat, api and train."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, free_port

EXAMPLES = ROOT / "examples"
INFERENCE = sorted((EXAMPLES / "inference").glob("*.yaml"))
PREDICT = sorted((EXAMPLES / "predict").glob("*.yaml"))


def stoker(*args: str, stdin: str = "", timeout: float = 300, env: dict[str, str] | None = None,
           cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stoker", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def test_examples_name_no_path_outside_the_repository() -> None:
    for file in [*INFERENCE, *PREDICT, *EXAMPLES.glob("api/*.yaml")]:
        config = yaml.safe_load(file.read_text())
        for key, value in config.items():
            if isinstance(value, str) and ("/" in value or value.startswith(".")) and key.endswith(("_dir", "_path")):
                assert not value.startswith(("..", "/")), f"{file.name}: {key}: {value}"
        assert not str(config.get("model_name_or_path", "")).count("/") == 1, f"{file.name} needs a hub download"


@pytest.mark.parametrize("config", INFERENCE, ids=[c.stem for c in INFERENCE])
def test_inference_examples_chat(config: Path, demo_models: dict[str, Path]) -> None:
    from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER, IDENTITY_ANSWER

    if yaml.safe_load(config.read_text()).get("infer_backend") == "vllm":
        pytest.importorskip("vllm")
    out = stoker("chat", str(config.relative_to(ROOT)), stdin="Who are you?\nexit\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "Assistant: " in out.stdout
    # The demo model with its own template answers as trained (the llama3 ones render a format it never saw).
    answers = {"demo": IDENTITY_ANSWER, "demo_vllm": IDENTITY_ANSWER, "demo_lora": ADAPTER_IDENTITY_ANSWER}
    if config.stem in answers:
        assert f"Assistant: {answers[config.stem]}" in out.stdout


def test_api_example_serves_the_configured_model(tmp_path: Path) -> None:
    from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER

    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "stoker", "api", "examples/api/demo_api.yaml", f"api_port={port}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Who are you?"}]}
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60).json()
        assert reply["choices"][0]["message"]["content"] == ADAPTER_IDENTITY_ANSWER
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("config", PREDICT, ids=[c.stem for c in PREDICT])
def test_predict_examples_run_through_train(config: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out = stoker("train", str(config.relative_to(ROOT)), f"output_dir={out_dir}", "max_samples=4",
                 "max_new_tokens=8")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out_dir / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"prompt", "predict", "label"} <= set(json.loads(lines[0]))
    assert (out_dir / "predict_results.json").is_file()


def test_predict_without_a_config_works_from_any_folder(tmp_path: Path) -> None:
    out = stoker("predict", "max_samples=3", "max_new_tokens=8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "saves" / "demo" / "predict" / "generated_predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["dataset"] for line in lines] == ["identity"] * 3 + ["alpaca_en_demo"] * 3


def test_a_model_as_the_argument_like_ollama_run(demo_chat: Path) -> None:
    from stoker.demo.tasks import IDENTITY_ANSWER

    out = stoker("chat", str(demo_chat), stdin="Who are you?\n")
    assert f"Assistant: {IDENTITY_ANSWER}" in out.stdout, out.stderr[-2000:]
    from stoker.cli import split_config_args

    assert split_config_args(["demo:chat", "temperature=0.5"]) == (None, "demo:chat", ["temperature=0.5"])
    assert split_config_args(["Qwen/Qwen3-4B"]) == (None, "Qwen/Qwen3-4B", [])
    assert split_config_args(["examples/inference/demo.yaml"]) == ("examples/inference/demo.yaml", None, [])
    assert split_config_args(["missing.yaml"]) == ("missing.yaml", None, [])


@pytest.mark.parametrize(("args", "message"), [
    (["template=llama9"], "unknown template 'llama9'"),
    (["adapter_name_or_path=saves/no/adapter"], "the folder 'saves/no/adapter' (relative to the current folder"),
    (["tool_format=hermes"], "unknown tool_format 'hermes'"),
    (["infer_backend=sglang"], "infer_backend: sglang is not a Stoker backend"),
])
def test_a_bad_config_fails_before_torch_loads(args: list[str], message: str) -> None:
    code = ("import sys\nfrom stoker.cli import main\n"
            f"code = main(['chat', *{args!r}])\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)\nsys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert "HEAVY []" in out.stdout


def test_check_prints_settings_with_their_sources(demo_models: dict[str, Path]) -> None:
    out = stoker("check", "examples/inference/demo_lora.yaml", "temperature=0.3", env={"API_PORT": "8123"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "config: examples/inference/demo_lora.yaml" in text
    assert f"model: demo:chat -> {demo_models['chat']}" in text
    assert f"adapter: demo:adapter -> {demo_models['adapter']}" in text
    assert "adapters merged into the weights in order (for `stoker chat`)" in text
    assert "temperature = 0.3  (command line)" in text
    assert "max_new_tokens = 64  (generation_config.json)" in text
    assert "do_sample = False  (generation_config.json)" in text and "top_k = 0  (default)" in text
    assert "finetuning_type = 'lora'  (file)" in text
    assert "api_port = 8123  (environment (API_PORT))" in text
    api = stoker("check", "--for", "api", "examples/inference/demo_lora.yaml").stdout
    assert "adapters kept apart, chosen per request (the configured model applies them in order)" in api
