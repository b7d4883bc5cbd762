"""Tool formats: how a family writes tool definitions into the prompt, writes the calls an assistant made, and how
Stoker finds tool calls in generated text.

Parsing is strict about JSON and lenient about everything else: a reply whose call JSON does not parse is handed
back as plain text (``parse`` returns None), never raised. Arguments always come back as compact-ish JSON text
(``json.dumps`` of the parsed object), so nested objects survive a round trip unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from stoker.errors import TemplateError
from stoker.templates.types import Tool, ToolCall
from stoker.templates.conversation import Call

Parsed = tuple[str, list[ToolCall]]


def function_of(tool: Any, index: int = 0) -> dict[str, Any]:
    """The function schema of an OpenAI tool ({"type": "function", "function": {...}}) or of a bare schema."""
    if not isinstance(tool, dict):
        raise TemplateError(f"tools[{index}] must be an object like {{'type': 'function', 'function': {{...}}}}.")
    fn = tool.get("function") if tool.get("type") == "function" else tool
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise TemplateError(f"tools[{index}] needs a function with a non-empty 'name'.")
    return fn


def wrapped(tool: Any, index: int = 0) -> dict[str, Any]:
    """The OpenAI shape {"type": "function", "function": schema}, whichever shape the caller used."""
    fn = function_of(tool, index)
    return tool if isinstance(tool, dict) and tool.get("type") == "function" else {"type": "function", "function": fn}


def checked(tools: Sequence[Tool]) -> list[Tool]:
    """The tools as given, after checking each names a function (official templates dump them verbatim)."""
    if not isinstance(tools, (list, tuple)):
        raise TemplateError("tools must be a list of {'type': 'function', 'function': {...}} objects.")
    for i, tool in enumerate(tools):
        function_of(tool, i)
    return list(tools)


def dumps(obj: Any, **kw: Any) -> str:
    # ensure_ascii=False is what Hugging Face's `tojson` filter does; official templates render tools with it.
    return json.dumps(obj, ensure_ascii=False, **kw)


def tool_call(name: Any, arguments: Any, call_id: Any = "") -> ToolCall | None:
    """A ToolCall from a parsed name and arguments (object or JSON text); None when they are not valid."""
    if not isinstance(name, str) or not name.strip():
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=name.strip(), arguments=dumps(arguments), id=str(call_id or ""))


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in ``text``, one after another, separated by whitespace, commas or semicolons."""
    decoder = json.JSONDecoder()
    values, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
        if pos >= len(text):
            return values
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.append(value)


def find_calls(fmt: ToolFormat, text: str) -> Parsed | None:
    """``fmt.parse(text)``, with text that defeats the JSON parser treated as no call: a model stuck repeating "[" can
    nest deeper than Python's recursion limit, and that reply must come back as text, not as a crash."""
    try:
        return fmt.parse(text)
    except (ValueError, RecursionError):
        return None


ARGS_PLACEHOLDER = "STOKER_ARGUMENTS_PLACEHOLDER"


class ToolFormat:
    """Base class; a family's template decides *where* the definitions go, the format decides *what* they say."""

    name = "base"
    markers: tuple[str, ...] = ()  # text that opens a tool call in generated output (for streaming surfaces)
    joiner = "\n"  # between an assistant's text and its calls, and between calls

    def definitions(self, tools: Sequence[Tool]) -> str:
        raise NotImplementedError

    def render_call(self, call: Call) -> str:
        raise NotImplementedError

    def calls(self, calls: Sequence[Call]) -> str:
        return self.joiner.join(self.render_call(c) for c in calls)

    def parse(self, text: str) -> Parsed | None:
        raise NotImplementedError

    def call_frame(self, name: str) -> tuple[str, str] | None:
        """The text of one call to ``name`` before and after its arguments object, as this format writes a reply
        holding just that call; None when the arguments are not written as one JSON object. Constrained decoding
        (``tool_choice`` required or named) fills the arguments in between."""
        placeholder = {ARGS_PLACEHOLDER: 0}
        text = self.calls([Call(name, json.dumps(placeholder), placeholder)])
        for written in (json.dumps(placeholder), json.dumps(placeholder, separators=(",", ":"))):
            if text.count(written) == 1:
                start = text.index(written)
                return text[:start], text[start + len(written):]
        return None

    def call_start(self, text: str) -> int | None:
        """Where a tool call begins in a reply streamed so far (its first marker), or None while none has shown.

        A format without markers (GLM's bare ``name\\n{args}``) can begin anywhere, so for it the answer is 0."""
        if not self.markers:
            return 0
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None


class DefaultFormat(ToolFormat):
    """LLaMA-Factory's default ReAct-style format ("Action: ... / Action Input: ..."). Fine-tuned models expect the
    exact prompt LLaMA-Factory wrote, so the wording below is that format, character for character."""

    name = "default"
    markers = ("Action:",)
    _call = re.compile(r"Action:\s*([A-Za-z0-9_.\-]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def definitions(self, tools: Sequence[Tool]) -> str:
        text, names = "", []
        for i, tool in enumerate(tools):
            fn = function_of(tool, i)
            params = fn.get("parameters") or {}
            required = params.get("required") or []
            args = ""
            for pname, spec in (params.get("properties") or {}).items():
                spec = spec if isinstance(spec, dict) else {}
                req = ", required" if pname in required else ""
                enum = ", should be one of [{}]".format(", ".join(map(str, spec["enum"]))) if spec.get("enum") else ""
                items = spec.get("items")
                item = ""
                if isinstance(items, dict) and items:
                    item = ", where each item should be {}".format(items.get("type", ""))
                args += f"  - {pname} ({spec.get('type', '')}{req}): {spec.get('description', '')}{enum}{item}\n"
            text += f"> Tool Name: {fn['name']}\nTool Description: {fn.get('description', '')}\nTool Args:\n{args}\n"
            names.append(fn["name"])
        return (
            f"You have access to the following tools:\n{text}"
            "Use the following format if using a tool:\n```\n"
            f"Action: tool name (one of [{', '.join(names)}])\n"
            "Action Input: the input to the tool, in a JSON format representing the kwargs "
            '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
        )

    def render_call(self, call: Call) -> str:
        return f"Action: {call.name}\nAction Input: {call.arguments}"

    def parse(self, text: str) -> Parsed | None:
        matches = list(self._call.finditer(text))
        if not matches:
            return None
        calls = []
        for m in matches:
            raw = m.group(2).strip().strip('"').strip("`").strip()
            call = tool_call(m.group(1), raw)
            if call is None:
                return None
            calls.append(call)
        return text[: matches[0].start()].strip(), calls


class HermesFormat(ToolFormat):
    """Qwen / Hermes: definitions in <tools></tools>, calls as JSON inside <tool_call></tool_call>."""

    name = "qwen"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def definitions(self, tools: Sequence[Tool]) -> str:
        listed = "".join("\n" + dumps(tool) for tool in checked(tools))
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            f"{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_call(self, call: Call) -> str:
        return '<tool_call>\n{"name": "' + call.name + '", "arguments": ' + call.arguments_json() + "}\n</tool_call>"

    def parse(self, text: str) -> Parsed | None:
        blocks = list(self._block.finditer(text))
        if not blocks:
            return None
        calls = []
        for m in blocks:
            try:
                obj = json.loads(m.group(1))
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict):
                return None
            call = tool_call(obj.get("name"), obj.get("arguments", obj.get("parameters")))
            if call is None:
                return None
            calls.append(call)
        content = self._block.sub("", text).strip()
        return content, calls


class Qwen3Format(HermesFormat):
    """Qwen3 writes string arguments verbatim (older Qwen templates `tojson` them); the rest is Hermes."""

    name = "qwen3"

    def render_call(self, call: Call) -> str:
        return '<tool_call>\n{"name": "' + call.name + '", "arguments": ' + call.arguments + "}\n</tool_call>"


class Llama3Format(ToolFormat):
    """Llama 3.1's JSON tool calling: definitions as indented JSON, a call as {"name", "parameters"}."""

    name = "llama3"
    markers = ("<|python_tag|>", '{"name"', '[{"name"')
    instructions = (
        "Given the following functions, please respond with a JSON for a function call "
        "with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n"
    )

    def definitions(self, tools: Sequence[Tool]) -> str:
        return self.instructions + "".join(dumps(tool, indent=4) + "\n\n" for tool in checked(tools))

    def render_call(self, call: Call) -> str:
        return '{"name": "' + call.name + '", "parameters": ' + call.arguments_json() + "}"

    def calls(self, calls: Sequence[Call]) -> str:
        # Llama 3.1 has no parallel calls; several are written as one JSON list, as LLaMA-Factory does.
        if len(calls) == 1:
            return self.render_call(calls[0])
        return "[" + ", ".join(self.render_call(c) for c in calls) + "]"

    def parse(self, text: str) -> Parsed | None:
        body = text.strip()
        for tag in ("<|python_tag|>", "<|python_start|>"):
            body = body.replace(tag, "")
        body = body.replace("<|python_end|>", "").strip()
        if not body.startswith(("{", "[")):
            return None
        values = _json_values(body)
        if not values:
            return None
        objs = [o for v in values for o in (v if isinstance(v, list) else [v])]
        calls = []
        for obj in objs:
            if not isinstance(obj, dict):
                return None
            call = tool_call(obj.get("name"), obj.get("parameters", obj.get("arguments")))
            if call is None:
                return None
            calls.append(call)
        return "", calls


class Llama4Format(Llama3Format):
    """Llama 4 writes several calls back to back, each a {"name", "parameters"} object."""

    name = "llama4"

    def calls(self, calls: Sequence[Call]) -> str:
        return "".join(self.render_call(c) for c in calls)


class MistralFormat(ToolFormat):
    """Mistral's control-token format: [AVAILABLE_TOOLS] [...] and [TOOL_CALLS] [{"name", "arguments", "id"}].

    ``space`` is the sentencepiece layout (a space after each control token); tekken tokenizers have none.
    """

    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def __init__(self, *, space: bool = True, ids: bool = True):
        self.sp = " " if space else ""
        self.ids = ids

    def definitions(self, tools: Sequence[Tool]) -> str:
        listed = dumps([wrapped(t, i) for i, t in enumerate(tools)])
        return "[AVAILABLE_TOOLS]" + self.sp + listed + "[/AVAILABLE_TOOLS]"

    def render_call(self, call: Call) -> str:
        obj = {"name": call.name, "arguments": call.parsed if call.parsed is not None else call.arguments}
        if self.ids:
            obj["id"] = call.id
        return dumps(obj)

    def calls(self, calls: Sequence[Call]) -> str:
        return "[TOOL_CALLS]" + self.sp + "[" + ", ".join(self.render_call(c) for c in calls) + "]"

    def parse(self, text: str) -> Parsed | None:
        body = text.strip()
        content = ""
        if "[TOOL_CALLS]" in body:
            content, _, body = body.partition("[TOOL_CALLS]")
            body = body.strip()
        elif not body.startswith("[{"):
            # The [TOOL_CALLS] control token vanishes when special tokens are skipped in decoding; a bare JSON
            # list of calls is accepted so such output still parses.
            return None
        values = _json_values(body)
        if not values:
            return None
        objs = [o for v in values for o in (v if isinstance(v, list) else [v])]
        calls = []
        for obj in objs:
            call = tool_call(obj.get("name"), obj.get("arguments"), obj.get("id")) if isinstance(obj, dict) else None
            if call is None:
                return None
            calls.append(call)
        return content.strip(), calls


class GlmFormat(ToolFormat):
    """GLM-4 / ChatGLM3: a call is the function name on one line and its JSON arguments below it."""

    name = "glm4"
    markers = ()
    joiner = "<|assistant|>"  # GLM writes each call as its own assistant turn
    _name = re.compile(r"^[A-Za-z_][\w.\-]*$")

    def definitions(self, tools: Sequence[Tool]) -> str:
        text = ""
        for i, tool in enumerate(tools):
            fn = function_of(tool, i)
            text += f"\n\n## {fn['name']}\n\n{dumps(fn, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        return (
            "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
            "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具" + text
        )

    def render_call(self, call: Call) -> str:
        return f"{call.name}\n{call.arguments}"

    def parse(self, text: str) -> Parsed | None:
        calls = []
        for segment in text.split("<|assistant|>"):
            segment = segment.strip()
            if not segment:
                continue
            name, _, rest = segment.partition("\n")
            if not self._name.match(name.strip()) or not rest.strip():
                return None
            call = tool_call(name, rest.strip())
            if call is None:
                return None
            calls.append(call)
        return ("", calls) if calls else None


class DeepSeekFormat(ToolFormat):
    """DeepSeek V3 / R1: calls between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>, arguments in a json fence."""

    name = "deepseek3"
    begin, end = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    call_begin, call_end, sep = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
    markers = (begin,)
    joiner = "\n"
    _call = re.compile(
        r"<｜tool▁call▁begin｜>\s*(\w+)?\s*<｜tool▁sep｜>\s*([^\n]+?)\s*\n```(?:json)?\s*(.*?)\s*```\s*<｜tool▁call▁end｜>",
        re.DOTALL,
    )

    def definitions(self, tools: Sequence[Tool]) -> str:
        # DeepSeek-V3's own template writes no tool list at all, which leaves the model blind; Stoker lists the
        # tools and spells out the call format the template renders below.
        listed = "".join(
            f"\n\n### {fn['name']}\nDescription: {fn.get('description', '')}"
            f"\nParameters: {dumps(fn.get('parameters', {}))}"
            for fn in (function_of(t, i) for i, t in enumerate(tools))
        )
        return (
            "## Tools\nYou can call these tools:" + listed + "\n\nTo call tools, reply with exactly:\n"
            f"{self.begin}{self.call_begin}function{self.sep}TOOL_NAME\n```json\nJSON_ARGUMENTS\n```{self.call_end}"
            f"{self.end}\nand put one {self.call_begin}...{self.call_end} block per call."
        )

    def render_call(self, call: Call) -> str:
        return f"{self.call_begin}{call.type}{self.sep}{call.name}\n```json\n{call.arguments}\n```{self.call_end}"

    def calls(self, calls: Sequence[Call]) -> str:
        return self.begin + self.joiner.join(self.render_call(c) for c in calls) + self.end

    def parse(self, text: str) -> Parsed | None:
        if self.begin not in text and self.call_begin not in text:
            return None
        if self.begin in text:
            head, _, body = text.partition(self.begin)
        else:
            head, body = text[: text.find(self.call_begin)], text
        matches = list(self._call.finditer(body))
        if not matches:
            return None
        calls = []
        for m in matches:
            call = tool_call(m.group(2), m.group(3))
            if call is None:
                return None
            calls.append(call)
        return head.strip(), calls


FORMATS: dict[str, ToolFormat] = {
    "default": DefaultFormat(),
    "qwen": HermesFormat(),
    "qwen3": Qwen3Format(),
    "llama3": Llama3Format(),
    "llama4": Llama4Format(),
    "mistral": MistralFormat(),
    "glm4": GlmFormat(),
    "deepseek3": DeepSeekFormat(),
}
