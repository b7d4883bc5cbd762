"""The data a template reads and writes: OpenAI-style messages and tools, tool calls, and a parsed reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Tool = dict[str, Any]  # OpenAI tool definition: {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = ""


@dataclass
class ParsedReply:
    content: str
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
