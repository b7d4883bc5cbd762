"""The template registry, ``template: auto``, the mismatch guard, stop ids, errors, the no-torch rule and the
``stoker template`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, STORIES

from stoker.errors import TemplateError
from stoker.templates import check_template_mismatch, get_template, list_templates
from stoker.template_cli import main as template_cli

from conftest import ROOT  # noqa: E402
OFFICIAL = SHARED / "chat_templates"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Tell me a joke."},
]
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": {"type": "object", "properties": {}}}}]

REQUIRED = """default empty alpaca vicuna llama2 llama3 llama4 mistral ministral mistral_small chatml qwen qwen2_vl
qwen3 qwen3_nothink gemma gemma2 gemma3 phi phi4 yi deepseek deepseek3 deepseekr1 deepseekcoder glm4 chatglm3 intern2
baichuan2 zephyr openchat cohere llava llava_next falcon granite3 solar starchat dbrx smollm smollm2 olmo""".split()


@pytest.fixture(scope="module")
def stories_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


def tokenizer_dir(tmp_path: Path, *, chat_template: str | None, generation_eos: Any = None) -> Path:
    """A copy of the stories260K tokenizer (a real Llama sentencepiece tokenizer) with a chosen chat template."""
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_eos is not None:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return folder


def load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------
def test_llamafactory_names_are_all_there() -> None:
    assert set(REQUIRED) <= set(list_templates())
    assert list_templates() == sorted(list_templates())


def test_unknown_name_lists_the_nearest() -> None:
    with pytest.raises(TemplateError) as err:
        get_template("lama3")
    message = err.value.message
    assert "'lama3'" in message and "llama3" in message and "stoker template list" in message


def test_names_are_forgiving_about_case_and_dashes() -> None:
    assert get_template("Qwen2-VL").name == "qwen2_vl"


@pytest.mark.parametrize("name", list_templates())
def test_every_template_renders_every_role(name: str) -> None:
    messages = [*CONVERSATION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123xyz", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "abc123xyz", "content": "12:00"}]
    text = get_template(name).render(messages, tools=TOOLS)
    assert "Tell me a joke." in text and "12:00" in text and "get_time" in text


def test_bos_and_eos_are_the_tokenizers(stories_tokenizer: Any) -> None:
    eos_swapped = get_template("default", stories_tokenizer)
    assert eos_swapped.render([{"role": "user", "content": "Hi"}]) == "Human: Hi</s>\nAssistant:"
    stories_tokenizer_eos = stories_tokenizer.eos_token
    try:
        stories_tokenizer.eos_token = "<unk>"
        swapped = get_template("default", stories_tokenizer)
        assert swapped.render([{"role": "user", "content": "Hi"}]) == "Human: Hi<unk>\nAssistant:"
    finally:
        stories_tokenizer.eos_token = stories_tokenizer_eos


def test_encode_writes_bos_once(stories_tokenizer: Any) -> None:
    template = get_template("llama2", stories_tokenizer)
    ids = template.encode(stories_tokenizer, CONVERSATION)
    text = template.render(CONVERSATION)
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST] Hi. </s><s>[INST] Tell me a joke. [/INST]"
    assert ids == stories_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == stories_tokenizer.bos_token_id and ids[1] != stories_tokenizer.bos_token_id
    assert ids.count(stories_tokenizer.bos_token_id) == 2  # one per [INST] turn, as Llama 2 writes it


def test_stop_token_ids(tmp_path: Path) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=None, generation_eos=[2, 7]))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == 513
    # eos, then the family's end-of-turn token, then generation_config's eos ids.
    assert get_template("qwen", tokenizer).stop_token_ids(tokenizer) == [2, 513, 7]
    # A stop word that is not one token ("\nHuman:") is a text stop only.
    assert get_template("default", tokenizer).stop_token_ids(tokenizer) == [2, 7]
    assert get_template("default", tokenizer, extra_stop_ids=[5]).stop_token_ids(tokenizer) == [2, 5]
    assert get_template("default", tokenizer).stop_words == ["\nHuman:"]


# --------------------------------------------------------------------------------------------------------------------
# template: auto
# --------------------------------------------------------------------------------------------------------------------
AUTO_CASES = [
    [{"role": "user", "content": "Hi"}],
    CONVERSATION,
    [{"role": "user", "content": "What time is it?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "12:00"}],
]


@pytest.mark.parametrize("case", range(len(AUTO_CASES)))
@pytest.mark.parametrize("official", ["qwen2.5-instruct.jinja", "llama-3.1-instruct.jinja", "qwen3.jinja"])
def test_auto_renders_like_apply_chat_template(tmp_path: Path, official: str, case: int) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=(OFFICIAL / official).read_text(), generation_eos=[2, 3]))
    template = get_template(None, tokenizer)
    assert template.name == "auto"
    messages = AUTO_CASES[case]
    # transformers gets tool-call arguments as objects, which is what Stoker hands Jinja templates.
    hf_messages = json.loads(json.dumps(messages))
    for m in hf_messages:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    for tools in (None, TOOLS):
        expected = tokenizer.apply_chat_template(hf_messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert template.render(messages, tools=tools) == expected
        ids = tokenizer.apply_chat_template(hf_messages, tools=tools, tokenize=True, add_generation_prompt=True)
        assert template.encode(tokenizer, messages, tools=tools) == list(ids["input_ids"])
    assert template.stop_token_ids(tokenizer) == [2, 3]


def test_auto_passes_enable_thinking(tmp_path: Path) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=(OFFICIAL / "qwen3.jinja").read_text()))
    template = get_template("auto", tokenizer)
    prompt = template.render([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    parsed = template.parse_reply("<think>\nhm\n</think>\n\nHello", tools_given=True)
    assert (parsed.reasoning, parsed.content) == ("hm", "Hello")


def test_auto_without_chat_template_suggests_a_name(stories_tokenizer: Any) -> None:
    with pytest.raises(TemplateError) as err:
        get_template("auto", stories_tokenizer)
    assert "chat_template" in err.value.message and "template: default" in err.value.message
    with pytest.raises(TemplateError, match="needs the tokenizer"):
        get_template(None)


def test_auto_template_errors_are_template_errors(tmp_path: Path) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=(OFFICIAL / "gemma-it.jinja").read_text()))
    template = get_template("auto", tokenizer)
    with pytest.raises(TemplateError, match="System role not supported"):
        template.render(CONVERSATION)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(TemplateError, match="not valid Jinja"):
        get_template("auto", tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Mismatch guard
# --------------------------------------------------------------------------------------------------------------------
def test_mismatch_guard(tmp_path: Path) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=(OFFICIAL / "qwen2.5-instruct.jinja").read_text()))
    assert check_template_mismatch(get_template("qwen", tokenizer), tokenizer) is None
    warning = check_template_mismatch(get_template("chatml", tokenizer), tokenizer)
    # Same layout, but no default system prompt: only the no-system probe tells them apart.
    assert warning is not None and "\n" not in warning
    assert "'chatml'" in warning and "chat_template" in warning and "template: auto" in warning
    assert "You are Qwen" in warning
    assert check_template_mismatch(get_template("llama3", tokenizer), tokenizer) is not None


def test_mismatch_guard_tolerates_templates_that_reject_a_system_prompt(tmp_path: Path) -> None:
    tokenizer = load(tokenizer_dir(tmp_path, chat_template=(OFFICIAL / "gemma-it.jinja").read_text()))
    assert check_template_mismatch(get_template("gemma", tokenizer), tokenizer) is None
    assert check_template_mismatch(get_template("chatml", tokenizer), tokenizer) is not None


def test_mismatch_guard_without_chat_template(stories_tokenizer: Any) -> None:
    assert check_template_mismatch(get_template("llama2", stories_tokenizer), stories_tokenizer) is None


# --------------------------------------------------------------------------------------------------------------------
# Input errors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported type 'audio'"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
         r"messages\[1\].tool_calls\[0\].function.name"),
    ],
)
def test_bad_messages(messages: list[Any], match: str) -> None:
    with pytest.raises(TemplateError, match=match):
        get_template("chatml").render(messages)


def test_image_parts_become_the_family_placeholder() -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}},
                                             {"type": "text", "text": "What is this?"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in get_template("qwen2_vl").render(messages)
    with pytest.raises(TemplateError, match="no image placeholder"):
        get_template("chatml").render(messages)


def test_bad_tools() -> None:
    with pytest.raises(TemplateError, match=r"tools\[0\] needs a function"):
        get_template("qwen").render([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])


# --------------------------------------------------------------------------------------------------------------------
# No torch
# --------------------------------------------------------------------------------------------------------------------
def test_templates_import_neither_torch_nor_transformers() -> None:
    code = """
import sys
from stoker.templates import get_template, list_templates, check_template_mismatch
import stoker.template_cli
for name in list_templates():
    t = get_template(name)
    t.render([{"role": "user", "content": "hi"}], tools=[{"type": "function", "function": {"name": "f"}}])
    t.parse_reply("hello", tools_given=True)
assert "jinja2" not in sys.modules, "built-in templates must not need Jinja"
from stoker.templates.jinja import render_jinja
render_jinja("{{ messages[0]['content'] }}", [{"role": "user", "content": "x"}])
print(sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------------------------
# stoker template
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def conv_file(tmp_path: Path) -> Path:
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(CONVERSATION))
    return path


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert template_cli(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [*list_templates(), "auto"]


@pytest.mark.parametrize("name", ["llama3", "qwen3", "mistral"])
def test_cli_render_prints_exactly_the_prompt(name: str, conv_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    assert template_cli(["render", name, "--messages", str(conv_file)]) == 0
    assert capsys.readouterr().out == get_template(name).render(CONVERSATION)
    assert template_cli(["render", name, "--messages", str(conv_file), "--tools", str(tools), "--no-generation-prompt",
                         "--enable-thinking", "false"]) == 0
    assert capsys.readouterr().out == get_template(name).render(CONVERSATION, tools=TOOLS, add_generation_prompt=False,
                                                                enable_thinking=False)


def test_cli_render_ids_with_a_tokenizer(conv_file: Path, stories_tokenizer: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert template_cli(["render", "llama2", "--messages", str(conv_file), "--ids", "--tokenizer", str(STORIES)]) == 0
    expected = get_template("llama2").encode(stories_tokenizer, CONVERSATION)
    assert capsys.readouterr().out == json.dumps(expected) + "\n"
    assert template_cli(["render", "llama2", "--messages", str(conv_file), "--ids"]) == 2
    assert "--ids needs a tokenizer" in capsys.readouterr().err


def test_cli_render_config(tmp_path: Path, conv_file: Path, stories_tokenizer: Any,
                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {STORIES}\ntemplate: llama2\ndefault_system: Be kind.\n")
    single = tmp_path / "single.json"
    single.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    assert template_cli(["render", str(cfg), "--messages", str(single)]) == 0
    assert capsys.readouterr().out == "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi [/INST]"
    assert template_cli(["render", str(cfg), "--messages", str(conv_file), "--ids"]) == 0
    assert json.loads(capsys.readouterr().out) == get_template("llama2").encode(stories_tokenizer, CONVERSATION)
    cfg.write_text(f"model_name_or_path: {STORIES}\n")  # template: auto, and this tokenizer has no chat_template
    assert template_cli(["render", str(cfg), "--messages", str(conv_file)]) == 2
    assert "has none" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("[{", "not valid JSON"), ('{"role": "user"}', "JSON list")],
)
def test_cli_bad_messages_file(tmp_path: Path, content: str | None, message: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conv.json"
    if content is not None:
        path.write_text(content)
    assert template_cli(["render", "chatml", "--messages", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and "Traceback" not in captured.err


def test_cli_as_a_process(conv_file: Path) -> None:
    """Through the real `stoker` entry point: stdout holds the prompt and nothing else, errors exit 2 quietly."""
    ok = subprocess.run([sys.executable, "-m", "stoker", "template", "render", "gemma3", "--messages", str(conv_file)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0
    assert ok.stdout == get_template("gemma3").render(CONVERSATION)
    bad = subprocess.run([sys.executable, "-m", "stoker", "template", "render", "nope", "--messages", str(conv_file)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stdout == "" and "unknown template 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
