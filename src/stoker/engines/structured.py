"""What a request's output must look like: a JSON schema, any JSON object, a regex, one of some strings, or an EBNF
grammar. Backend-neutral (no torch, no grammar library): the huggingface engine compiles it with xgrammar
(``engines.grammar``), the vllm engine hands the same fields to vLLM's structured outputs.

The kinds and their meaning follow vLLM's ``structured_outputs`` request field (``json``, ``json_object``, ``regex``,
``choice``, ``grammar``); OpenAI's ``response_format`` maps onto ``json`` and ``json_object``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stoker.errors import ConfigError, RequestError

Kind = Literal["json", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[Kind, ...] = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """One output constraint. ``spec`` is text so that equal constraints share one compiled grammar:
    the schema as JSON (property order kept: it is the order generated), the regex, the EBNF, or the choices as a JSON list."""

    kind: Kind
    spec: str = ""
    param: str = "response_format"  # the request field it came from, for error messages

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, *, param: str = "response_format") -> StructuredOutput:
        check_json_schema(schema, param)
        return cls("json", json.dumps(schema, ensure_ascii=False), param)

    @classmethod
    def choice(cls, options: list[str], *, param: str = "structured_outputs.choice") -> StructuredOutput:
        if not options or any(not isinstance(o, str) for o in options):
            raise RequestError(f"{param} must be a non-empty list of strings.", param=param)
        return cls("choice", json.dumps(list(options), ensure_ascii=False), param)

    @property
    def schema(self) -> Any:
        return json.loads(self.spec) if self.kind == "json" else None

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind == "choice" else []

    def describe(self) -> str:
        return {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[self.kind]


def check_json_schema(schema: Any, param: str) -> None:
    """A schema that is not valid JSON Schema gets a 400 naming where it is wrong."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise RequestError(f"{param}: a JSON schema must be an object, not {type(schema).__name__}.", param=param)
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise RequestError(f"{param}: the schema{where} is not valid JSON Schema: {exc.message}.",
                           param=param) from None


def from_fields(fields: dict[str, Any], *, param: str = "structured_outputs", sep: str = ".") -> StructuredOutput | None:
    """vLLM's ``structured_outputs`` object (``{"json": ..., "regex": ..., "choice": [...], "grammar": ...,
    "json_object": true}``): exactly one constraint, or None when the object sets none."""
    given = {k: v for k, v in fields.items() if k in KINDS and v not in (None, False)}
    if len(given) > 1:
        names = ", ".join(f"{param}{sep}{k}" for k in sorted(given))
        raise RequestError(f"{names} are all set: set exactly one of them.", param=param)
    if not given:
        return None
    kind, value = next(iter(given.items()))
    where = f"{param}{sep}{kind}"
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RequestError(f"{where} is not valid JSON: {exc.msg} at position {exc.pos}.", param=where) from None
        return StructuredOutput.json_schema(value, param=where)
    if kind == "json_object":
        return StructuredOutput("json_object", "", where)
    if kind == "choice":
        return StructuredOutput.choice(value, param=where)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where} must be a non-empty string.", param=where)
    return StructuredOutput(kind, value, where)


def configured(settings: Any) -> StructuredOutput | None:
    """The constraint a ``Settings`` sets with ``json_schema`` / ``response_format`` (see ``from_config``)."""
    source = getattr(settings, "source", None)
    return from_config(settings.json_schema, settings.response_format,
                       config_dir=Path(source).parent if source else None)


def from_config(json_schema: dict[str, Any] | str | None, response_format: dict[str, Any] | str | None, *,
                config_dir: Path | None = None) -> StructuredOutput | None:
    """The config's ``json_schema`` / ``response_format`` keys as a constraint, or a ``ConfigError`` naming the key.

    ``json_schema``: a mapping, a JSON text, or the path of a ``.json`` file (relative to the working directory, then
    to the config file's folder). ``response_format``: ``text``, ``json_object``, or OpenAI's mapping
    (``{type: json_schema, json_schema: {schema: ...}}``)."""
    try:
        if json_schema is not None:
            return StructuredOutput.json_schema(_schema_value(json_schema, config_dir), param="json_schema")
        if response_format is None:
            return None
        fmt = {"type": response_format} if isinstance(response_format, str) else response_format
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutput("json_object", "", "response_format")
        if kind == "json_schema":
            inner = fmt.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if schema is None:
                raise ConfigError("response_format: type json_schema needs json_schema: {schema: ...} (or use the "
                                  "json_schema key with the schema or its file).", param="response_format")
            return StructuredOutput.json_schema(_schema_value(schema, config_dir), param="response_format")
        raise ConfigError(f"response_format: type {kind!r} is not one of text, json_object, json_schema.",
                          param="response_format")
    except RequestError as exc:
        raise ConfigError(exc.message, param=exc.param) from None


def _schema_value(value: Any, config_dir: Path | None) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith(("{", "[")) or text in ("true", "false"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"json_schema is not valid JSON: {exc.msg} at position {exc.pos}.",
                              param="json_schema") from None
    candidates = [Path(text)] + ([config_dir / text] if config_dir is not None else [])
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ConfigError(f"json_schema: file not found: {text}. Give a JSON schema file's path, or the schema "
                          "inline.", param="json_schema")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"json_schema: {path} is not a readable JSON file: {exc}.", param="json_schema") from None
