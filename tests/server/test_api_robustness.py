"""A server one request cannot stall: hostile and careless clients against `stoker api` on 127.0.0.1.

One server (the demo vision model, so image URLs are fetched for real; ``max_num_seqs=4``) takes:
- bodies that used to freeze every client (8M characters, a million messages, a 60 MiB string, an image URL on a
  server that trickles its bytes) while another client's ``/health`` and short generations keep answering;
- bad input that used to reach a 500 or be accepted (lone surrogates, tool schemas that are no schema,
  ``enable_thinking: "yes"``), trailing slashes with a forged ``Host``, the local docs page;
- a bounded mutation fuzz of valid bodies for both completion routes;
- a bounded soak of mixed traffic at twice the batch size, after which the queue, the slots and the memory are back.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # one server, a fuzz run and a soak: about four minutes

from api_server import REQUEST_TIMEOUT_S, ApiServer, client, start_server, stop_server  # noqa: E402

MAX_NUM_SEQS = 4
RESPONSIVE_S = 0.5  # the longest /health or short generation may take while a heavy body is handled
FUZZ_CASES = 200  # per route
FUZZ_BUDGET_S = 90
SOAK_S = 75
SOAK_RSS_GROWTH_MIB = 64  # the bound on the server's resident memory growth over the soak (after warm-up)


# ----------------------------------------------------------------------------------------------------------------------
# The server, and an image server that never finishes
# ----------------------------------------------------------------------------------------------------------------------
class _Trickle(http.server.BaseHTTPRequestHandler):
    """A 200 whose body arrives a byte every 50 ms for 20 s: each read succeeds, the whole never does."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(400):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the fetch gave up and hung up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def trickle_url() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/cat.png"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(demo_vision: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    config = {"model_name_or_path": str(demo_vision), "max_num_seqs": MAX_NUM_SEQS, "allow_private_urls": True,
              "image_fetch_timeout": 1.0}
    srv = start_server(config, tmp_path_factory.mktemp("robust"))
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log_text(), srv.log_text()


def model_id(srv: ApiServer) -> str:
    return httpx.get(srv.v1 + "/models", timeout=10).json()["data"][0]["id"]


def chat_body(srv: ApiServer, content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": model_id(srv), "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def post(srv: ApiServer, route: str, body: bytes | dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(srv.v1 + route, content=raw, headers={"Content-Type": "application/json"}, timeout=timeout)


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ----------------------------------------------------------------------------------------------------------------------
# The event loop keeps answering
# ----------------------------------------------------------------------------------------------------------------------
def _million_messages(model: str) -> bytes:
    one = b'{"role":"user","content":"hi"}'
    return b'{"model":"' + model.encode() + b'","messages":[' + b",".join([one] * 1_000_000) + b"]}"


HEAVY: dict[str, Callable[[ApiServer, str], bytes]] = {
    "8M characters": lambda srv, _: json.dumps(chat_body(srv, "x" * 8_000_000)).encode(),
    "a million messages": lambda srv, _: _million_messages(model_id(srv)),
    "a 60 MiB string": lambda srv, _: json.dumps(chat_body(srv, "y" * (60 * 1024**2))).encode(),
    "an image that trickles": lambda srv, url: json.dumps(chat_body(srv, [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])).encode(),
}
HEAVY_ANSWERS = {
    "8M characters": "the conversation's text is 8,000,000 characters, more than the model's context",
    "a million messages": "the request body holds about 1,000,002 JSON objects and arrays",
    "a 60 MiB string": "the conversation's text is 62,914,560 characters",
    "an image that trickles": "fetching the image URL took longer than 1 s (image_fetch_timeout)",
}


# Another client, in its own process (so the test's own threads cannot slow it down): /health and a short
# generation in turn. It says "ready" after a first round, which is not timed (the heavy body is sent after that), and
# goes on until its stdin closes (after at least 3 more rounds), then prints the slowest of each as JSON.
PROBE = """
import json, select, sys, time, httpx
url, body = sys.argv[1], sys.argv[2].encode()
worst, rounds = {"health": 0.0, "generation": 0.0}, -1
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if rounds == 0:
        worst = {"health": 0.0, "generation": 0.0}
        print("ready", flush=True)
    if rounds >= 3 and select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
        break
    started = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    worst["health"] = max(worst["health"], time.monotonic() - started)
    started = time.monotonic()
    answer = httpx.post(url + "/v1/chat/completions", content=body, timeout=10,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    worst["generation"] = max(worst["generation"], time.monotonic() - started)
    rounds += 1
print(json.dumps({**worst, "rounds": rounds}))
"""


@pytest.mark.parametrize("case", list(HEAVY))
def test_one_heavy_body_does_not_stall_other_clients(server: ApiServer, trickle_url: str, case: str) -> None:
    body = HEAVY[case](server, trickle_url)
    short = json.dumps(chat_body(server, "Hi"))
    post(server, "/chat/completions", short.encode())  # warm
    probe = subprocess.Popen([sys.executable, "-c", PROBE, server.url, short], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline() == "ready\n"
        started = time.monotonic()
        response = post(server, "/chat/completions", body, timeout=120)
        took = time.monotonic() - started
    finally:
        out, _ = probe.communicate(timeout=90)  # closes its stdin: it stops after its third round
    assert probe.returncode == 0, out
    worst = json.loads(out)
    assert HEAVY_ANSWERS[case] in error_of(response)["message"]
    assert worst["health"] < RESPONSIVE_S and worst["generation"] < RESPONSIVE_S, (worst, took)


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: a 400 that names the field, never a 500, never silently accepted
# ----------------------------------------------------------------------------------------------------------------------
def test_lone_surrogates_are_400_in_every_text_field(server: ApiServer) -> None:
    model = model_id(server).encode()
    bodies = {
        "/chat/completions": [
            b'{"model":"' + model + b'","messages":[{"role":"user","content":"a\\ud800b"}]}',
            b'{"model":"' + model + b'","messages":[{"role":"user","content":[{"type":"text","text":"\\udc00"}]}]}',
            b'{"model":"' + model + b'","messages":[{"role":"user","content":"hi"}],"stop":["\\ud83d"]}',
        ],
        "/completions": [b'{"model":"' + model + b'","prompt":"x\\udfff"}'],
    }
    for route, raws in bodies.items():
        for raw in raws:
            message = error_of(post(server, route, raw))["message"]
            assert message.startswith("the request body holds a lone UTF-16 surrogate ("), message
            assert message.endswith("which is not text: send valid Unicode."), message
    # A pair is one character, and an escaped backslash before "ud800" is text.
    assert post(server, "/chat/completions", b'{"model":"' + model + b'","max_tokens":1,"messages":[{"role":"user",'
                b'"content":"\\ud83d\\ude00 and \\\\ud800"}]}').status_code == 200


def test_tool_schemas_must_be_json_schemas(server: ApiServer) -> None:
    def tools(parameters: Any) -> dict[str, Any]:
        return chat_body(server, "Hi", tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])

    error = error_of(post(server, "/chat/completions", tools({"type": 5, "properties": [1, 2]})))
    assert error["param"] == "tools[0].function.parameters", error
    assert "parameters" in error["message"] and "is not a valid JSON Schema" in error["message"], error
    error = error_of(post(server, "/chat/completions", tools({"type": "string"})))
    assert "parameters must describe an object (type 'object'), not 'string'" in error["message"], error
    ok = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    assert post(server, "/chat/completions", tools(ok)).status_code == 200


def test_enable_thinking_must_be_a_boolean(server: ApiServer) -> None:
    error = error_of(post(server, "/chat/completions", chat_body(server, "Hi", chat_template_kwargs={
        "enable_thinking": "yes"})))
    assert error["param"] == "chat_template_kwargs.enable_thinking", error
    assert "valid boolean" in error["message"], error
    body = chat_body(server, "Hi", chat_template_kwargs={"enable_thinking": False, "other": 1})
    assert post(server, "/chat/completions", body).status_code == 200


def test_token_id_prompts_refuse_booleans(server: ApiServer) -> None:
    for prompt in ([[False]], [True, 1], [[1, 2], [None]]):
        error = error_of(post(server, "/completions", {"model": model_id(server), "prompt": prompt}))
        assert error["param"] is not None and error["param"].startswith("prompt"), error


def test_text_that_cannot_fit_is_refused_before_tokenizing(server: ApiServer) -> None:
    started = time.monotonic()
    error = error_of(post(server, "/completions", {"model": model_id(server), "prompt": ["ok", "z" * 3_000_000]}))
    assert time.monotonic() - started < 2.0
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt", error
    assert error["message"].startswith("prompt[1] is 3,000,000 characters, more than the model's context"), error


def test_the_schema_states_the_rules_between_fields(server: ApiServer) -> None:
    schema = httpx.get(server.url + "/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    for route, name in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        body = schema["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert "messages" in components[name]["properties"] or "prompt" in components[name]["properties"]
    rules = components["ChatCompletionRequest"]["allOf"]
    assert {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}} in rules
    needs_stream = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
    assert needs_stream in rules and needs_stream in components["CompletionRequest"]["allOf"]
    assert "ChatMessage" in components and "ToolDef" in components  # every $ref resolves
    refs = set(_refs(schema))
    assert refs <= {f"#/components/schemas/{n}" for n in components}, refs - {f"#/components/schemas/{n}"
                                                                                for n in components}


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref":
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def test_trailing_slashes_are_served_without_a_redirect(server: ApiServer) -> None:
    for path in ("/health/", "/v1/models/"):
        response = httpx.get(server.url + path, headers={"Host": "evil.example"}, timeout=10, follow_redirects=False)
        assert response.status_code == 200, response.text
        assert "location" not in response.headers
    answer = post(server, "/chat/completions/", chat_body(server, "Hi"))
    assert answer.status_code == 200 and answer.json()["object"] == "chat.completion"


def test_the_docs_page_needs_no_internet(server: ApiServer) -> None:
    page = httpx.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text and "http://" not in page.text and "https://" not in page.text
    assert "/v1/chat/completions" in page.text and "<code>messages</code>" in page.text
    assert httpx.get(server.url + "/redoc", timeout=10).status_code == 404


# ----------------------------------------------------------------------------------------------------------------------
# Mutation fuzz: valid bodies, changed one or a few fields at a time
# ----------------------------------------------------------------------------------------------------------------------
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**64, -(2**63) - 1, 1e308, -0.0, 0.5, "", " ", "a", "\u0000", "\ud800",
    "\U0001f600", "\u202e\u0645\u0631\u062d\u0628\u0627", "x" * 100_000, "<|im_start|>system", [], [None], [1, "a"],
    {}, {"a": {"b": []}}, [[]], [[1, 2]], [True], {"type": "text"}, "auto", "none", "required", -2.5, 3,
]


def _mutate(rng: random.Random, value: Any, depth: int = 0) -> Any:
    """One change somewhere inside ``value``: a field replaced, dropped or added; a list item replaced or repeated."""
    if isinstance(value, dict) and value and rng.random() < 0.7 and depth < 4:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["n", "logprobs", "top_logprobs", "stream", "stream_options", "tool_choice", "tools",
                            "response_format", "echo", "suffix", "best_of", "stop", "seed", "top_k", "logit_bias",
                            "chat_template_kwargs", "max_completion_tokens", "parallel_tool_calls",
                            "structured_outputs", "guided_json", "guided_regex", "guided_choice", "prompt_logprobs",
                            "min_tokens", "min_p", "ignore_eos", "stop_token_ids", "bad_words", "allowed_token_ids",
                            "continue_final_message", "add_generation_prompt", "include_reasoning"])] = rng.choice(
                ODD_VALUES)
        else:
            out[key] = _mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7 and depth < 4:
        out = list(value)
        i = rng.randrange(len(out))
        if rng.random() < 0.2:
            return out * rng.choice([2, 7, 300])
        out[i] = _mutate(rng, out[i], depth + 1)
        return out
    return rng.choice(ODD_VALUES)


def _valid_bodies(srv: ApiServer) -> dict[str, list[dict[str, Any]]]:
    model = model_id(srv)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    return {
        "/chat/completions": [
            {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
            {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
             "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}, "n": 2, "seed": 1},
            {"model": model, "messages": [{"role": "user", "content": "Weather?"}], "tools": [tool],
             "tool_choice": "auto", "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "stop": ["\n"]},
            {"model": model, "messages": [{"role": "user", "content": "JSON"}], "max_tokens": 3,
             "response_format": {"type": "json_object"}, "temperature": 0.7, "top_p": 0.9},
        ],
        "/completions": [
            {"model": model, "prompt": "Once upon a time", "max_tokens": 3},
            {"model": model, "prompt": ["a", "b"], "max_tokens": 2, "stream": True, "echo": True},
            {"model": model, "prompt": [1, 2, 3], "max_tokens": 2, "logprobs": 2, "n": 2},
        ],
    }


def test_mutation_fuzz_finds_no_server_error(server: ApiServer) -> None:
    rng = random.Random(15)
    deadline = time.monotonic() + FUZZ_BUDGET_S
    sent = {"/chat/completions": 0, "/completions": 0}
    statuses: dict[int, int] = {}
    for route, bodies in _valid_bodies(server).items():
        for _ in range(FUZZ_CASES):
            if time.monotonic() > deadline:
                break
            body = rng.choice(bodies)
            for _ in range(rng.choice([1, 1, 2, 3])):
                body = _mutate(rng, body)
            raw = json.dumps(body).encode()  # a lone surrogate in a value is written as its \\u escape
            with httpx.stream("POST", server.v1 + route, content=raw, timeout=REQUEST_TIMEOUT_S,
                              headers={"Content-Type": "application/json"}) as response:
                text = response.read().decode(errors="replace")
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (route, raw[:500], text[:500])
            if response.status_code >= 400:
                assert set(json.loads(text)) == {"error"}, text[:500]
            elif "data: " in text:
                assert '"server_error"' not in text, (raw[:500], text[:500])
            sent[route] += 1
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.process.poll() is None
    assert min(sent.values()) >= 50, sent
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 20, statuses  # both kinds were exercised


# ----------------------------------------------------------------------------------------------------------------------
# Soak: mixed traffic at twice the batch size, then everything is back where it started
# ----------------------------------------------------------------------------------------------------------------------
def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")  # pragma: no cover - Linux always has it


def _soak_one(srv: ApiServer, rng: random.Random, model: str, counts: dict[str, int]) -> None:
    openai_client = client(srv)
    kind = rng.choice(["stream", "whole", "cancel", "invalid", "completion"])
    messages = [{"role": "user", "content": rng.choice(["Hi", "What is the capital of France?", "Tell me a story"])}]
    if kind == "stream":
        chunks = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=rng.randint(1, 24),
                                                       stream=True)
        assert sum(1 for _ in chunks) >= 2
    elif kind == "whole":
        reply = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=rng.randint(1, 24),
                                                      n=rng.choice([1, 2]))
        assert reply.usage.completion_tokens >= 1
    elif kind == "cancel":
        with httpx.stream("POST", srv.v1 + "/chat/completions", timeout=REQUEST_TIMEOUT_S, json={
                "model": model, "messages": messages, "max_tokens": 200, "stream": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # then hang up mid-stream
    elif kind == "invalid":
        response = post(srv, "/chat/completions", {"model": model, "messages": messages, "temperature": "hot"})
        assert response.status_code == 400
    else:
        reply = openai_client.completions.create(model=model, prompt=["Once", "There"], max_tokens=rng.randint(1, 16))
        assert len(reply.choices) == 2
    counts[kind] = counts.get(kind, 0) + 1


def test_soak_leaves_queue_slots_and_memory_where_they_were(server: ApiServer) -> None:
    model = model_id(server)
    workers = 2 * MAX_NUM_SEQS
    failures: list[BaseException] = []
    counts: dict[str, int] = {}

    def worker(seed: int, until: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until and not failures:
            try:
                _soak_one(server, rng, model, counts)
            except BaseException as exc:  # noqa: BLE001 - reported below, with the traceback
                failures.append(exc)

    def run(seconds: float) -> None:
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=worker, args=(i + int(seconds), until)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 120)
        if failures:
            raise failures[0]

    run(10)  # warm-up: caches, allocator pools and thread pools reach their working size
    with contextlib.suppress(AssertionError):
        _wait_idle(server)
    before = _rss_mib(server.process.pid)
    run(SOAK_S)
    _wait_idle(server)
    after = _rss_mib(server.process.pid)
    stats = server.metrics()
    assert stats["stoker_engine_running"] == 0 and stats["stoker_engine_waiting"] == 0, stats
    assert stats["stoker_engine_tokens_in_flight"] == 0 and stats["stoker_requests_in_progress"] == 1, stats
    assert after - before < SOAK_RSS_GROWTH_MIB, (before, after, counts)
    assert min(counts.get(k, 0) for k in ("stream", "whole", "cancel", "invalid", "completion")) >= 5, counts
    assert server.process.poll() is None


def _wait_idle(srv: ApiServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = srv.metrics()
        if stats["stoker_engine_running"] == 0 and stats["stoker_engine_waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"the engine did not go idle: {srv.metrics()}")
