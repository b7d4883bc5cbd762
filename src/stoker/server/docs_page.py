"""``GET /docs``: the API described in one self-contained HTML page, built from the OpenAPI schema.

FastAPI's own pages load their scripts from a public CDN, which a machine without internet (or behind a firewall)
cannot reach, so users saw a blank page. This one has no scripts and no outside links; the machine-readable schema
stays at ``/openapi.json``.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
          "code{background:#f3f3f3;padding:0 .2rem}table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}"
          "td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}"
          "h2{margin-top:2rem;font-size:1.1rem}.m{font-weight:bold;color:#06c}")


def docs_html(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(info.get('title', 'API'))} API</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             "<p>The schema as JSON: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    components = schema.get("components", {}).get("schemas", {})
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            parts.append(f"<h2><span class='m'>{method.upper()}</span> <code>{escape(path)}</code></h2>")
            if operation.get("summary"):
                parts.append(f"<p>{escape(operation['summary'])}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(_fields_table(_resolve(body, components), components))
            codes = ", ".join(escape(code) for code in operation.get("responses", {}))
            parts.append(f"<p>Responses: {codes}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return components.get(ref.rsplit("/", 1)[-1], schema) if ref else schema


def _type_of(schema: dict[str, Any], components: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_of(s, components) for s in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if schema.get("type") == "array":
        return f"array of {_type_of(schema.get('items', {}), components)}"
    return str(schema.get("type", "any"))


def _fields_table(schema: dict[str, Any], components: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = ["<table><tr><th>field</th><th>type</th><th>default</th><th>about</th></tr>"]
    for name, field in schema.get("properties", {}).items():
        default = json.dumps(field["default"]) if "default" in field else ("required" if name in required else "")
        rows.append(f"<tr><td><code>{escape(name)}</code></td><td>{escape(_type_of(field, components))}</td>"
                    f"<td>{escape(default)}</td><td>{escape(field.get('description', ''))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
