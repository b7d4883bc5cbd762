"""Every current decoder family under continuous batching: greedy tokens equal ``generate`` on each prompt alone,
whether the prompt runs alone, joins eleven others at different steps, or comes in one burst of twelve.

Sliding-window families get a window smaller than most prompts; hybrid and recurrent families (gated delta nets,
Mamba, short convolutions) carry per-row state through joins and leaves. docs/engine.md publishes the matrix.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import STORIES  # noqa: E402
from families import FAMILIES, build, prompts  # noqa: E402

from stoker.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from stoker.engines.hf import HFEngine  # noqa: E402

NEW_TOKENS = 8
PROMPTS = prompts()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def reference(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def request(prompt: list[int], n: int = 1) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, params=SamplingParams(max_new_tokens=NEW_TOKENS, n=n))


async def staggered(engine: HFEngine, batch: list[list[int]]) -> list[list[int]]:
    """Each prompt starts a moment after the one before, so they join the running batch at different steps."""
    async def one(i: int, prompt: list[int]) -> list[int]:
        await asyncio.sleep(0.004 * i)
        tokens: list[int] = []
        async for delta in engine.stream(request(prompt)):
            tokens.extend(delta.token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(batch))))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_batches_exactly_like_generate_alone(family: str, tokenizer) -> None:
    model = build(family)
    expected = [reference(model, p) for p in PROMPTS]
    engine = HFEngine(model, tokenizer, eos_ids=[], max_num_seqs=16)
    try:
        alone = [engine.generate_batch([request(p)])[0].choices[0].token_ids for p in PROMPTS[:4]]
        assert alone == expected[:4], "alone"
        assert asyncio.run(staggered(engine, PROMPTS)) == expected, "joining at different steps"
        burst = engine.generate_batch([request(p) for p in PROMPTS] + [request(PROMPTS[0], n=2)])
        assert [c.choices[0].token_ids for c in burst[:-1]] == expected, "one burst"
        assert [c.token_ids for c in burst[-1].choices] == [expected[0]] * 2, "n=2 choices"
    finally:
        engine.close()


@pytest.mark.parametrize(("family", "overrides"), [("jamba", {"mamba_proj_bias": True}), ("deepseek_v4", {})])
def test_caches_that_cannot_be_padded_run_one_request_at_a_time(family: str, overrides: dict, tokenizer) -> None:
    """A bias on a recurrent input projection would leak through padding, and DeepSeek-V4's compressed attention
    cuts windows on cache columns: those engines admit one request at a time, and stay exact."""
    model = build(family, **overrides)
    with torch.no_grad():  # a real bias: zero-initialised ones would hide the leak
        for name, param in model.named_parameters():
            if name.endswith("in_proj.bias"):
                param.normal_(0, 0.5)
    expected = [reference(model, p) for p in PROMPTS[:6]]
    engine = HFEngine(model, tokenizer, eos_ids=[], max_num_seqs=16)
    try:
        assert engine.info.max_num_seqs == 1
        assert asyncio.run(staggered(engine, PROMPTS[:6])) == expected
    finally:
        engine.close()
