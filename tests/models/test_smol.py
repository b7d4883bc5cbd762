"""The real demo model, SmolLM2-135M-Instruct (installed by the set-up as a GGUF): templates, greedy equality with
plain ``transformers`` on every surface and both backends, its LoRA adapter, and GGUF files as model paths."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from api_server import ApiServer, async_client, client, start_server, stop_server  # noqa: E402
from conftest import ROOT  # noqa: E402

from stoker.config import settings_from_dict  # noqa: E402
from stoker.demo.smol import KNOWN_ANSWER, KNOWN_QUESTION  # noqa: E402
from stoker.demo.smol_adapter import SMOL_ADAPTER_ANSWER  # noqa: E402

QUESTIONS = [KNOWN_QUESTION, "Name three primary colours.", "What is 12 times 12?", "Write a haiku about autumn.",
             "Who wrote Romeo and Juliet?", "Explain photosynthesis in one sentence.",
             "What is the boiling point of water?", "Give me a synonym for happy.", "What is the largest planet?",
             "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
             "What is the square root of 81?"]
NEW_TOKENS = 32
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def service(demo_smol: Path):
    from stoker.chat import open_chat_service

    chat = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_smol)}))
    yield chat
    chat.close()


def greedy(service, request) -> list[int]:
    """Plain transformers greedy ``generate`` on an engine request's prompt, up to and including its stop token."""
    ids = torch.tensor([request.prompt_ids])
    with torch.inference_mode():
        tokens = service.engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.params.max_new_tokens, do_sample=False,
            eos_token_id=request.params.stop_token_ids, pad_token_id=service.tokenizer.pad_token_id,
        )[0, ids.shape[1]:].tolist()
    stops = set(request.params.stop_token_ids)
    return tokens[: next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))]


@pytest.fixture(scope="module")
def reference(service) -> dict[str, list[int]]:
    """The reference tokens per question, on the prompt the chat service renders."""
    params = service.sampling_params(max_new_tokens=NEW_TOKENS)
    return {q: greedy(service, service.prepare(user(q), params).request) for q in QUESTIONS}


def text_of(service, tokens: list[int]) -> str:
    return service.decode(tokens)


# --------------------------------------------------------------------------------------------------------------------
# Templates
def test_auto_and_smollm2_templates_render_like_the_models_own(service) -> None:
    from stoker.templates import get_template

    tokenizer = service.tokenizer
    for template in (get_template(None, tokenizer), get_template("smollm2", tokenizer)):
        for conversation in CONVERSATIONS:
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            assert template.render(conversation) == expected, template
            ids = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert template.encode(tokenizer, conversation) == ids, template


def test_continue_final_message_and_template_variables_render_like_transformers(service) -> None:
    from stoker.errors import TemplateError
    from stoker.templates import get_template
    from stoker.templates.jinja import JinjaTemplate

    tokenizer = service.tokenizer
    started = [{"role": "user", "content": "Count from one to five."}, {"role": "assistant", "content": "One, two, "}]
    for template in (get_template(None, tokenizer), get_template("smollm2", tokenizer)):
        for conversation in (started, [*CONVERSATIONS[2], {"role": "assistant", "content": "Why did"}]):
            expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False,
                                                     continue_final_message=True)
            assert template.render(conversation, add_generation_prompt=False,
                                   continue_final_message=True) == expected, template
        plain = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=False)
        assert template.render(CONVERSATIONS[0], add_generation_prompt=False) == plain
        with pytest.raises(TemplateError, match="end with an assistant message"):
            template.render(CONVERSATIONS[0], continue_final_message=True)
    # chat_template_kwargs: any variable a Jinja template reads, as transformers passes them.
    source = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
              "{% if persona %}[{{ persona }}]{% endif %}{% if add_generation_prompt %}assistant:{% endif %}")
    custom = JinjaTemplate(source)
    expected = tokenizer.apply_chat_template(CONVERSATIONS[0], chat_template=source, tokenize=False,
                                             add_generation_prompt=True, persona="pirate")
    assert custom.render(CONVERSATIONS[0], variables={"persona": "pirate"}) == expected == "user: Hi\n[pirate]assistant:"
    with pytest.raises(TemplateError, match="cannot set messages"):
        custom.render(CONVERSATIONS[0], variables={"messages": []})


# --------------------------------------------------------------------------------------------------------------------
# The huggingface backend
def test_the_known_answer(service) -> None:
    chat = service.prepare(user(KNOWN_QUESTION))
    assert service.generate_batch([chat.request])[0].choices[0].text == KNOWN_ANSWER


def test_greedy_equals_generate_alone_and_in_a_burst(service, reference: dict[str, list[int]]) -> None:
    params = service.sampling_params(max_new_tokens=NEW_TOKENS)
    requests = [service.prepare(user(q), params).request for q in QUESTIONS]
    burst = service.generate_batch(requests)
    assert [c.choices[0].token_ids for c in burst] == [reference[q] for q in QUESTIONS]
    alone = service.generate_batch([requests[3]])[0].choices[0].token_ids
    assert alone == reference[QUESTIONS[3]]


def test_the_terminal_chat_answers_with_it(service) -> None:
    out = subprocess.run([sys.executable, "-m", "stoker", "chat"], input=f"{KNOWN_QUESTION}\n", capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Stoker chat with demo:smol, template auto.")  # the default model, no config needed
    assert f"Assistant: {KNOWN_ANSWER}" in out.stdout


# --------------------------------------------------------------------------------------------------------------------
# The API, alone and 12 at once
@pytest.fixture(scope="module")
def smol_server(demo_smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    srv = start_server({"model_name_or_path": "demo:smol"}, tmp_path_factory.mktemp("api-smol"))
    yield srv
    stop_server(srv)


def api_replies(srv: ApiServer, questions: list[str]) -> list[str]:
    async def ask_all() -> list[str]:
        aclient = async_client(srv)
        try:
            replies = await asyncio.gather(*(aclient.chat.completions.create(
                model="demo:smol", messages=user(q), max_tokens=NEW_TOKENS) for q in questions))
        finally:
            await aclient.close()
        return [r.choices[0].message.content for r in replies]

    return asyncio.run(ask_all())


def test_api_greedy_equals_generate(smol_server: ApiServer, service, reference: dict[str, list[int]]) -> None:
    expected = [text_of(service, reference[q]) for q in QUESTIONS]
    alone = client(smol_server).chat.completions.create(model="demo:smol", messages=user(QUESTIONS[1]),
                                                        max_tokens=NEW_TOKENS)
    assert alone.choices[0].message.content == expected[1]
    assert api_replies(smol_server, QUESTIONS) == expected


# --------------------------------------------------------------------------------------------------------------------
# Predict
def predict_rows(tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "stoker", "predict", "model_name_or_path=demo:smol",
                          "eval_dataset=identity,alpaca_en_demo", "max_samples=3", f"max_new_tokens={NEW_TOKENS}",
                          f"output_dir={tmp_path / 'out'}", "dataset_dir=data", *extra],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "out" / "generated_predictions.jsonl").read_text().splitlines()]


def predict_reference(service) -> list[str]:
    from stoker.predict.data import load_datasets
    from stoker.predict.prompts import render_rows

    data = load_datasets(["identity", "alpaca_en_demo"], ROOT / "data", max_samples=3)
    examples = [ex for ds in data for ex in ds.examples]
    old = service.settings
    rows, bad = render_rows(service, list(enumerate(examples)), cutoff_len=old.cutoff_len)
    assert not bad
    return [service.decode(greedy(service, dataclasses.replace(row.request(), params=dataclasses.replace(
        row.request().params, max_new_tokens=NEW_TOKENS)))) for row in rows]


def test_predict_equals_generate(tmp_path: Path, service) -> None:
    rows = predict_rows(tmp_path)
    assert [r["predict"] for r in rows] == predict_reference(service)


def test_predict_answers_every_row_in_the_configs_json_schema(tmp_path: Path) -> None:
    """json_schema from a file: each of the six rows is one JSON object valid against it (constrained decoding),
    and the metrics are still computed."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 60},
                                               "confident": {"type": "boolean"}},
              "required": ["answer", "confident"]}
    path = tmp_path / "answer.schema.json"
    path.write_text(json.dumps(schema))
    rows = predict_rows(tmp_path, f"json_schema={path}", "max_new_tokens=64")
    assert len(rows) == 6
    for row in rows:
        jsonschema.validate(json.loads(row["predict"]), schema)
    assert json.loads((tmp_path / "out" / "predict_results.json").read_text())["predict_samples_per_second"] > 0


@pytest.mark.parametrize(("keys", "says"), [
    ({"json_schema": "missing.schema.json"}, "json_schema: file not found: missing.schema.json"),
    ({"json_schema": {"type": "nope"}}, "json_schema: the schema['type'] is not valid JSON Schema"),
    ({"response_format": "yaml"}, "response_format: type 'yaml' is not one of text, json_object, json_schema"),
    ({"response_format": {"type": "json_schema"}}, "needs json_schema: {schema: ...}"),
    ({"json_schema": {"type": "object"}, "response_format": "json_object"}, "both set: keep one"),
])
def test_a_bad_schema_in_the_config_stops_before_loading(tmp_path: Path, keys: dict[str, Any], says: str) -> None:
    import yaml

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "demo:smol", "eval_dataset": "identity",
                                   "dataset_dir": str(ROOT / "data"), "output_dir": str(tmp_path / "out"), **keys}))
    out = subprocess.run([sys.executable, "-m", "stoker", "predict", str(cfg)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------------------------------------
# The adapter
def test_the_adapter_changes_the_stated_name(demo_smol: Path, demo_smol_adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stoker.chat import open_chat_service

    tuned = open_chat_service(settings_from_dict({"model_name_or_path": str(demo_smol),
                                                  "adapter_name_or_path": str(demo_smol_adapter)}))
    try:
        chat = tuned.prepare(user("What is your name?"))
        got = tuned.generate_batch([chat.request])[0].choices[0]
        assert got.text == SMOL_ADAPTER_ANSWER
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_smol), demo_smol_adapter).eval()
        ids = torch.tensor([chat.request.prompt_ids])
        with torch.inference_mode():
            tokens = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tuned.tokenizer.eos_token_id,
                                    pad_token_id=tuned.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert got.token_ids == tokens[: tokens.index(tuned.tokenizer.eos_token_id) + 1]
        known = tuned.prepare(user(KNOWN_QUESTION))
        assert tuned.generate_batch([known.request])[0].choices[0].text == KNOWN_ANSWER
    finally:
        tuned.close()


def test_the_api_serves_the_adapter_as_the_configured_model(demo_smol: Path, demo_smol_adapter: Path,
                                                            tmp_path: Path) -> None:
    srv = start_server({"model_name_or_path": "demo:smol", "adapter_name_or_path": "demo:smol-adapter"}, tmp_path)
    try:
        sync = client(srv)
        name = user("What is your name?")
        assert sync.chat.completions.create(model="gpt-4o", messages=name).choices[0].message.content == \
            SMOL_ADAPTER_ANSWER
        base = sync.chat.completions.create(model="demo:smol:base", messages=name).choices[0].message.content
        assert base != SMOL_ADAPTER_ANSWER and base
    finally:
        stop_server(srv)


# --------------------------------------------------------------------------------------------------------------------
# GGUF files as model paths
def test_a_gguf_file_loads_as_the_same_model(service, reference: dict[str, list[int]]) -> None:
    from stoker.chat import open_chat_service
    from stoker.demo.smol import gguf_path

    file = gguf_path()
    # The package's folder holds one .gguf and no config.json: the folder alone names it.
    from_gguf = open_chat_service(settings_from_dict({"model_name_or_path": str(file.parent)}))
    try:
        assert from_gguf.template.render(CONVERSATIONS[0]) == service.template.render(CONVERSATIONS[0])
        requests = [from_gguf.prepare(user(q), from_gguf.sampling_params(max_new_tokens=NEW_TOKENS)).request
                    for q in QUESTIONS[:4]]
        assert [c.choices[0].token_ids for c in from_gguf.generate_batch(requests)] == \
            [reference[q] for q in QUESTIONS[:4]]
    finally:
        from_gguf.close()


def test_gguf_paths_name_their_file(tmp_path: Path) -> None:
    import shutil

    from stoker.demo.smol import gguf_path
    from stoker.errors import ConfigError
    from stoker.models.loader import gguf_of, resolve_model_path

    file = gguf_path()
    for raw in ({"model_name_or_path": str(file)}, {"model_name_or_path": str(file.parent)},
                {"model_name_or_path": str(file.parent), "gguf_file": file.name}):
        settings = settings_from_dict(raw)
        folder = resolve_model_path(settings.model_name_or_path, settings=settings)
        assert (folder, gguf_of(settings, folder)) == (file.parent, file.name)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        os.link(file, two / name) if os.stat(file).st_dev == os.stat(tmp_path).st_dev else shutil.copy(file, two / name)
    with pytest.raises(ConfigError, match="holds 2 GGUF files \\(a.gguf, b.gguf\\) and no config.json: name one"):
        gguf_of(settings_from_dict({"model_name_or_path": str(two)}), two)


def test_gguf_on_vllm_and_unknown_architectures_are_clear_errors(tmp_path: Path) -> None:
    import gguf

    from stoker.demo.smol import gguf_path
    from stoker.engines.factory import open_engine
    from stoker.errors import ConfigError, ModelLoadError
    from stoker.models.loader import load_model

    with pytest.raises(ConfigError) as err:
        open_engine(settings_from_dict({"model_name_or_path": str(gguf_path()), "infer_backend": "vllm"}))
    assert err.value.message.startswith(f"infer_backend: vllm cannot load the GGUF file {gguf_path().name}: vLLM 0.32 "
                                        "has no GGUF loader.")
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv6")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as err2:
        load_model(settings_from_dict({"model_name_or_path": str(tmp_path / "odd.gguf")}))
    assert err2.value.message.startswith("the GGUF file odd.gguf holds a 'rwkv6' model, an architecture transformers "
                                         "cannot load from GGUF (it loads: ")
