"""Twenty JSON schemas of increasing difficulty, shared by the structured-output tests of both backends.

Strings, numbers and arrays are bounded: a small model can go on inside an unbounded one (digits of an integer, items
of an array) until ``max_tokens``, which is the model's habit, not the constraint failing (docs/api.md says so)."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 24}
WORD = {"type": "string", "maxLength": 10}

SCHEMAS: list[dict[str, Any]] = [
    # 1-5: flat objects, one kind of value each
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 100}}, "required": ["score"]},
    {"type": "object", "properties": {"name": NAME, "nickname": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["name", "nickname"]},
    # 6-10: bounds, enums, constants, patterns
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"kind": {"const": "person"}, "name": NAME}, "required": ["kind", "name"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -40, "maximum": 50},
                                      "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"]},
    # 11-14: arrays
    {"type": "object", "properties": {"tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 10}, "maxItems": 4}},
     "required": ["scores"]},
    {"type": "array", "items": {"type": "object", "properties": {"name": WORD}, "required": ["name"]},
     "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3}},
     "required": ["colour", "tags"]},
    # 15-17: nesting
    {"type": "object", "properties": {"address": {"type": "object", "properties": {"city": NAME, "zip": {
        "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}}, "required": ["address"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": NAME, "pets": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "species": {"enum": ["cat", "dog", "fish"]}, "age": {"type": "integer", "minimum": 0, "maximum": 30}},
            "required": ["species", "age"]}}}, "required": ["name", "pets"]}}, "required": ["person"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["c"]}}, "required": ["b"]}},
     "required": ["a"]},
    # 18-20: anyOf, $defs and everything together
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, WORD]}}, "required": ["id"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "contact": {"anyOf": [
            {"type": "object", "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
             "required": ["email"]},
            {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
             "required": ["phone"]}]},
        "roles": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "minItems": 1, "maxItems": 2},
        "active": {"type": "boolean"}},
     "required": ["name", "age", "contact", "roles", "active"]},
]

ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


HI = [{"role": "user", "content": "Say hi."}]


def check_sampling_extensions(api: Any, tok: Any) -> tuple[int, Any]:
    """logit_bias, allowed_token_ids, min_tokens and ignore_eos on a server of the SmolLM2 demo model, as vLLM defines
    them. Returns the natural reply's length and the min_tokens reply, for a backend's further checks."""
    plain = api.completions.create(model="m", prompt="Once upon a time", max_tokens=8, temperature=0)
    first = tok(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    banned = api.completions.create(model="m", prompt="Once upon a time", max_tokens=8, temperature=0,
                                    logit_bias={str(first): -100})
    assert tok(banned.choices[0].text, add_special_tokens=False)["input_ids"][0] != first
    only = tok(" yes", add_special_tokens=False)["input_ids"]
    allowed = api.completions.create(model="m", prompt="Once upon a time", max_tokens=4, temperature=0,
                                     extra_body={"allowed_token_ids": only})
    assert allowed.choices[0].text == " yes" * 4
    short = api.chat.completions.create(model="m", messages=HI, max_tokens=40, temperature=0)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 30
    longer = api.chat.completions.create(model="m", messages=HI, max_tokens=40, temperature=0,
                                         extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5
    endless = api.chat.completions.create(model="m", messages=HI, max_tokens=n + 6, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert endless.choices[0].finish_reason == "length" and endless.usage.completion_tokens == n + 6
    return n, longer
