"""Proof against the official templates in ../shared/chat_templates: byte-identical text for every built-in family
that has one, token ids identical on the real tokenizers in ../shared/tokenizers, and Mistral's token-id goldens.

Each case is rendered by the built-in template and by the official Jinja file (through Stoker's Jinja renderer,
itself checked against transformers here). Where a family differs on purpose, its ``Official.deviations`` names the
aspect and the reason: those cases are skipped with that reason, after checking the difference is real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED

from stoker.errors import TemplateError
from stoker.templates import get_template, list_templates
from stoker.templates.conversation import to_hf_messages
from stoker.templates.formats import Official
from stoker.templates.jinja import render_jinja
from stoker.templates.registry import TEMPLATES

TEMPLATE_DIR = SHARED / "chat_templates"
TOKENIZER_DIR = SHARED / "tokenizers"

# --------------------------------------------------------------------------------------------------------------------
# The conversations
# --------------------------------------------------------------------------------------------------------------------
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}
U1 = {"role": "user", "content": "Hello! Who are you?"}
A1 = {"role": "assistant", "content": "I am a helpful assistant."}
U2 = {"role": "user", "content": "What's the weather like in Paris today?"}
PADDED = {"role": "user", "content": "  What about\n Lyon?  \n"}
PADDED_REPLY = {"role": "assistant", "content": " Padded reply.\n"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Search flights between two cities",
            "parameters": {
                "type": "object",
                "properties": {
                    "route": {"type": "object", "description": "from/to airport codes"},
                    "dates": {"type": "array", "items": {"type": "string"}, "description": "ISO dates"},
                },
                "required": ["route"],
            },
        },
    },
]
WEATHER_ARGS = {"location": "Paris, France", "unit": "celsius"}
FLIGHT_ARGS = {"route": {"from": "CDG", "to": "NRT"}, "dates": ["2024-07-01", "2024-07-08"]}


def call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


CALL = {"role": "assistant", "content": "", "tool_calls": [call("abcDEF123", "get_weather", WEATHER_ARGS)]}
CALLS2 = {
    "role": "assistant",
    "content": "",
    "tool_calls": [call("abcDEF123", "get_weather", WEATHER_ARGS), call("xyz789QRS", "search_flights", FLIGHT_ARGS)],
}
RESULT = {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather",
          "content": json.dumps({"temperature": 22, "condition": "sunny"})}
RESULT2 = {"role": "tool", "tool_call_id": "xyz789QRS", "name": "search_flights",
           "content": json.dumps({"flights": [{"id": "AF276", "price": 812}]})}
ANSWER = {"role": "assistant", "content": "It is 22 degrees and sunny in Paris."}
THOUGHT = {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nI am a helpful assistant."}
REASONED = {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Check the weather tool output."}
REASONED_CALL = {**CALL, "reasoning_content": "I need the weather tool."}

# name -> (messages, tools, add_generation_prompt, aspects)
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool, set[str]]] = {
    "single": ([U1], None, True, {"no_system"}),
    "single_system": ([SYSTEM, U1], None, True, {"system"}),
    "multi": ([U1, A1, U2], None, True, {"no_system"}),
    "multi_system": ([SYSTEM, U1, A1, U2], None, True, {"system"}),
    "closed": ([U1, A1], None, False, {"no_system", "closed"}),
    "closed_system": ([SYSTEM, U1, A1], None, False, {"system", "closed"}),
    "whitespace": ([U1, PADDED_REPLY, PADDED], None, True, {"no_system", "whitespace"}),
    "tools": ([U2], TOOLS, True, {"no_system", "tools"}),
    "tools_system": ([SYSTEM, U2], TOOLS, True, {"system", "tools"}),
    "tool_results": ([U2, CALL, RESULT], TOOLS, True, {"no_system", "tools", "tool_calls"}),
    "tool_results_system": ([SYSTEM, U2, CALL, RESULT], TOOLS, True, {"system", "tools", "tool_calls"}),
    "parallel_calls": ([U2, CALLS2, RESULT, RESULT2], TOOLS, True,
                       {"no_system", "tools", "tool_calls", "parallel_calls"}),
    "tool_history": ([U2, CALL, RESULT, ANSWER, U1], None, True, {"no_system", "tool_calls"}),
    # Reasoning in history: kept after the last user query (Qwen3), cut before it, by each family's own rules.
    "thought_history": ([U1, THOUGHT, U2], None, True, {"no_system", "reasoning"}),
    "thought_closed": ([U1, THOUGHT], None, False, {"no_system", "closed", "reasoning"}),
    "reasoning_closed": ([U2, REASONED], None, False, {"no_system", "closed", "reasoning"}),
    "reasoning_tool_turn": ([U2, REASONED_CALL, RESULT], TOOLS, True,
                            {"no_system", "tools", "tool_calls", "reasoning"}),
    "parallel_history": ([U2, CALLS2, RESULT, RESULT2, ANSWER, U1], None, True,
                         {"no_system", "tool_calls", "parallel_calls"}),
}
for _case in CASES.values():
    if not _case[3] & {"tools", "tool_calls"}:
        _case[3].add("text")


def runs(template_name: str) -> list[tuple[str, bool | None, set[str]]]:
    """(case, enable_thinking, aspects) to render: reasoning families run each generation case thinking on and off."""
    out = []
    thinking = TEMPLATES[template_name].thinking is not None
    for case, (_, _, generate, aspects) in CASES.items():
        if thinking and generate:
            out.append((case, None, aspects | {"thinking_on"}))
            out.append((case, False, aspects | {"thinking_off"}))
        else:
            out.append((case, None, set(aspects)))
    return out


def official_source(ref: Official) -> str:
    return (TEMPLATE_DIR / ref.file).read_text(encoding="utf-8")


def render_official(name: str, ref: Official, case: str, thinking: bool | None) -> str:
    messages, tools, generate, _ = CASES[case]
    tpl = TEMPLATES[name]
    return render_jinja(
        official_source(ref), to_hf_messages(messages, arguments_as=ref.arguments), tools=tools,
        add_generation_prompt=generate, special_tokens={"bos_token": tpl.bos_token, "eos_token": tpl.eos_token},
        enable_thinking=thinking,
    )


def render_ours(name: str, case: str, thinking: bool | None) -> str:
    messages, tools, generate, _ = CASES[case]
    return get_template(name).render(messages, tools=tools, add_generation_prompt=generate, enable_thinking=thinking)


def compared(ref: Official, aspects: set[str]) -> bool:
    return ref.aspects is None or bool(ref.aspects & aspects)


def deviation_for(ref: Official, aspects: set[str]) -> str | None:
    """The declared reason a case differs; a key "a+b" applies to cases with both aspects."""
    for key in sorted(ref.deviations):
        if set(key.split("+")) <= aspects:
            return ref.deviations[key]
    return None


PARITY = [
    pytest.param(name, ref, case, thinking, aspects, id=f"{name}-{Path(ref.file).stem}-{case}-think{thinking}")
    for name in list_templates()
    for ref in TEMPLATES[name].official
    for case, thinking, aspects in runs(name)
    if compared(ref, aspects)
]


# --------------------------------------------------------------------------------------------------------------------
# Byte-identical text
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_templates())
def test_family_has_official_template(name: str) -> None:
    """Families without an official template in shared/ show up here as skipped, visibly."""
    refs = TEMPLATES[name].official
    if not refs:
        pytest.skip(f"no official template for {name}")
    for ref in refs:
        assert (TEMPLATE_DIR / ref.file).is_file(), f"{name} names a missing official template {ref.file}"


@pytest.mark.parametrize(("name", "ref", "case", "thinking", "aspects"), PARITY)
def test_renders_like_official(name: str, ref: Official, case: str, thinking: bool | None, aspects: set[str]) -> None:
    ours = render_ours(name, case, thinking)
    try:
        theirs: str | None = render_official(name, ref, case, thinking)
    except TemplateError as exc:
        theirs, error = None, str(exc)
    deviation = deviation_for(ref, aspects)
    if deviation is not None:
        # A declared deviation must be a real one, or the declaration is stale.
        assert theirs != ours, f"{name} declares a deviation from {ref.file} on {case}, but they render the same"
        pytest.skip(f"{name} differs from {ref.file} on purpose: {deviation}")
    assert theirs is not None, f"{ref.file} rejects case {case!r} ({error}) and {name} declares no deviation"
    assert ours == theirs


def test_every_official_template_is_accounted_for() -> None:
    """Each official file in shared/ is either proven against a family or listed with the reason it is not."""
    unmapped = {
        "chatml.with-bos.jinja": "ChatML variant that prepends BOS; the chatml family follows plain chatml.jinja",
        "chatqa.jinja": "NVIDIA ChatQA has no LLaMA-Factory template name",
        "codellama-70b-instruct.jinja": "CodeLlama-70B-Instruct has no LLaMA-Factory template name",
        "granite-instruct.jinja": "Granite Code's Question/Answer layout; granite3 is a different family",
        "llama-3.2-vision-instruct.jinja": "Llama 3.2 Vision (mllama) is not among the built-in families",
        "mistral-instruct-v0.1.jinja": "original Mistral v0.1 template; its updated version matches Mistral's "
        "reference tokenizer and is the one mistral_v1 follows",
        "mistral-instruct.eos-space-variant.jinja": "variant of the original Mistral v0.1 template",
        "mixtral-instruct.jinja": "same string as mistral-instruct-v0.1.jinja",
        "phi-3.generic-role-variant.jinja": "Phi-3-small/medium variant; phi follows Phi-3 mini and Phi-3.5",
        "phi-3.with-bos-variant.jinja": "Phi-3 variant that prepends BOS",
        "phi-4-reasoning.jinja": "Phi-4-reasoning, a different model from Phi-4 (phi4)",
        "pixtral.jinja": "Pixtral is not among the built-in families",
        "qwen1.5-chat.variant.jinja": "ChatML variant of uncertain attribution (SOURCES.md)",
        "starcoder2-instruct.jinja": "StarCoder2-Instruct, not StarChat (starchat)",
        "vicuna.jinja": "a community rewrite, not an official template (SOURCES.md); vicuna follows FastChat",
    }
    used = {ref.file for t in TEMPLATES.values() for ref in t.official}
    files = {p.name for p in TEMPLATE_DIR.glob("*.jinja")}
    assert files - used - set(unmapped) == set()
    assert set(unmapped) <= files


def test_jinja_renderer_matches_transformers() -> None:
    """Stoker's Jinja renderer (used for official templates and template: auto) equals transformers' renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template

    checked = 0
    mistral_common = sorted((TEMPLATE_DIR / "sources" / "mistral-common").glob("v*.jinja"))
    for path in sorted(TEMPLATE_DIR.glob("*.jinja")) + mistral_common:
        source = path.read_text(encoding="utf-8")
        if "strftime_now" in source:
            continue  # the date could change between the two renders
        for case, (messages, tools, generate, _) in CASES.items():
            hf = to_hf_messages(messages)
            try:
                ours = render_jinja(source, hf, tools=tools, add_generation_prompt=generate,
                                    special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
            except TemplateError:
                ours = None
            try:
                out, _ = render_jinja_template(conversations=[hf], tools=tools, chat_template=source,
                                               add_generation_prompt=generate, bos_token="<s>", eos_token="</s>")
                theirs = out[0]
            except Exception:  # noqa: BLE001 - transformers raises its own TemplateError / jinja errors
                theirs = None
            assert ours == theirs, f"{path.name} / {case}"
            checked += ours is not None
    assert checked > 300


def test_jinja_renderer_reproduces_recorded_transformers_renders() -> None:
    data = json.loads((TEMPLATE_DIR / "renders_transformers.json").read_text(encoding="utf-8"))
    compared_ = 0
    for family, entry in data["renders"].items():
        source = (TEMPLATE_DIR / f"{family}.jinja").read_text(encoding="utf-8")
        if "strftime_now" in source:
            continue
        for kind, messages in data["conversations"].items():
            recorded = entry[kind]
            special = {"bos_token": entry["bos_token"], "eos_token": entry["eos_token"]}
            if recorded.startswith("ERROR:"):
                with pytest.raises(TemplateError):
                    render_jinja(source, messages, add_generation_prompt=True, special_tokens=special)
            else:
                assert render_jinja(source, messages, add_generation_prompt=True, special_tokens=special) == recorded
                compared_ += 1
    assert compared_ >= 80


# --------------------------------------------------------------------------------------------------------------------
# Token ids on real tokenizers
# --------------------------------------------------------------------------------------------------------------------
def _sentencepiece_tokenizer(tmp_root: Path, model: Path) -> Any:
    from transformers import LlamaTokenizer

    folder = tmp_root / model.name
    folder.mkdir()
    shutil.copy(model, folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder))


LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real tokenizers from shared/tokenizers as Hugging Face tokenizers (built once per session)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    root = tmp_path_factory.mktemp("tokenizers")
    mc = TOKENIZER_DIR / "mistral-common"
    out = {
        "llama2": _sentencepiece_tokenizer(root, TOKENIZER_DIR / "llama2-sentencepiece" / "tokenizer.model"),
        "mistral_v1": _sentencepiece_tokenizer(root, mc / "tokenizer.model.v1"),
        "mistral_v2": _sentencepiece_tokenizer(root, mc / "mistral_instruct_tokenizer_240216.model.v2"),
        "mistral_v3": _sentencepiece_tokenizer(root, mc / "mistral_instruct_tokenizer_240323.model.v3"),
    }
    converter = TikTokenConverter(vocab_file=str(TOKENIZER_DIR / "llama3-tiktoken" / "tokenizer.model"),
                                  extra_special_tokens=LLAMA3_SPECIALS)
    out["llama3"] = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>",
                                            eos_token="<|eot_id|>")
    out["llama3_pattern"] = converter.pattern
    return out


# template -> the tokenizer of its family in shared/tokenizers
TOKENIZER_OF = {
    "llama2": "llama2",
    "mistral_v1": "mistral_v1",
    "zephyr": "mistral_v1",
    "mistral_v2": "mistral_v2",
    "mistral": "mistral_v3",
    "llama3": "llama3",
    "llama3_1": "llama3",
}

TOKEN_CASES = [
    pytest.param(name, ref, case, id=f"{name}-{Path(ref.file).stem}-{case}")
    for name in TOKENIZER_OF
    for ref in TEMPLATES[name].official
    for case, _, aspects in runs(name)
    if compared(ref, aspects) and deviation_for(ref, aspects) is None
]


@pytest.mark.parametrize(("name", "ref", "case"), TOKEN_CASES)
def test_token_ids_match_official(tokenizers: dict[str, Any], name: str, ref: Official, case: str) -> None:
    tokenizer = tokenizers[TOKENIZER_OF[name]]
    messages, tools, generate, _ = CASES[case]
    template = get_template(name, tokenizer)
    ids = template.encode(tokenizer, messages, tools=tools, add_generation_prompt=generate)
    official = render_jinja(official_source(ref), to_hf_messages(messages, arguments_as=ref.arguments), tools=tools,
                            add_generation_prompt=generate,
                            special_tokens={"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token})
    assert ids == tokenizer.encode(official, add_special_tokens=False)
    # BOS is written once, by the template, never again by the tokenizer.
    if official.startswith(tokenizer.bos_token):
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("parallel_calls", "parallel_history")])
@pytest.mark.parametrize("name", ["llama3", "llama3_1"])
def test_llama3_ids_equal_tiktoken(tokenizers: dict[str, Any], name: str, case: str) -> None:
    """Cross-check with tiktoken itself (Meta's tokenizer implementation), not only the converted HF tokenizer."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(TOKENIZER_DIR / "llama3-tiktoken" / "tokenizer.model"))
    encoding = tiktoken.Encoding("llama3", pat_str=tokenizers["llama3_pattern"], mergeable_ranks=ranks,
                                 special_tokens={tok: 128000 + i for i, tok in enumerate(LLAMA3_SPECIALS)})
    messages, tools, generate, _ = CASES[case]
    template = get_template(name, tokenizers["llama3"])
    text = template.render(messages, tools=tools, add_generation_prompt=generate)
    ids = template.encode(tokenizers["llama3"], messages, tools=tools, add_generation_prompt=generate)
    assert ids == encoding.encode(text, allowed_special="all")
    assert ids[0] == 128000 and ids.count(128000) == 1


def test_llama3_stop_ids(tokenizers: dict[str, Any]) -> None:
    tokenizer = tokenizers["llama3"]
    # <|eot_id|> (the instruct tokenizer's eos) and <|eom_id|> (end of a tool-calling message).
    assert get_template("llama3", tokenizer).stop_token_ids(tokenizer) == [128009, 128008]


GOLDEN_DIR = TOKENIZER_DIR / "mistral-common" / "samples"
GOLDENS = [
    pytest.param(sample.name, version, id=f"{sample.name}-{version}")
    for sample in sorted(GOLDEN_DIR.iterdir())
    for version in ("v1", "v2", "v3")
    if (sample / f"tokens_{version}.json").is_file()
]


@pytest.mark.parametrize(("sample", "version"), GOLDENS)
def test_mistral_token_goldens(tokenizers: dict[str, Any], sample: str, version: str) -> None:
    """mistral-common's reference token ids for each chat request, per tokenizer version."""
    name = {"v1": "mistral_v1", "v2": "mistral_v2", "v3": "mistral"}[version]
    tokenizer = tokenizers[f"mistral_{version}"]
    request = json.loads((GOLDEN_DIR / sample / "sample.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN_DIR / sample / f"tokens_{version}.json").read_text(encoding="utf-8"))["tokens"]
    ids = get_template(name, tokenizer).encode(tokenizer, request["messages"], tools=request.get("tools") or None)
    assert ids == golden
