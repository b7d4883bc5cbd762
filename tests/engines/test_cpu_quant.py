"""cpu_matmul: int8 and int4, the engine's opt-in reduced-precision mode: the quantized weights themselves, when the
engine's thread takes their kernels, greedy equality with generate on the same weights and kernels, and the
accuracy check on a real model and real text against float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from stoker.engines.cpu_linear import QUANT_MAX_ROWS, CpuLinears, quantized_weight  # noqa: E402
from stoker.engines.cpu_quant import GROUP, quantize  # noqa: E402
from stoker.errors import ConfigError  # noqa: E402

ROWS = 10  # alpaca_en_demo rows in the accuracy check
ANSWER_TOKENS = 48  # of each row's reference answer


def q4_1_weight(out_features: int, in_features: int) -> torch.Tensor:
    """A weight made of llama.cpp Q4_1 blocks (w = minimum + scale * code, codes 0..15, each block using both ends),
    with scales and offsets that bfloat16 holds exactly, as a model dequantized from a Q4_1 GGUF file is."""
    torch.manual_seed(0)
    blocks = out_features * in_features // GROUP
    codes = torch.randint(0, 16, (blocks, GROUP))
    codes[:, 0], codes[:, 1] = 0, 15
    scale = torch.randint(1, 64, (blocks, 1)) / 2**10
    zero = torch.randint(-64, 64, (blocks, 1)) / 2**9  # the kernel's zero point: minimum + 8 * scale
    return ((codes - 8) * scale + zero).float().reshape(out_features, in_features)


def test_int4_gets_a_q4_1_models_own_codes_back() -> None:
    weight = q4_1_weight(64, 4 * GROUP)
    quant, dequantized = quantize(weight, 4)
    assert quant.bits == 4
    assert torch.equal(dequantized, weight)
    x = torch.randn(3, weight.shape[1])
    # The kernel multiplies by exactly those weights; only the bfloat16 rounding of input and output remains.
    reference = x.to(torch.bfloat16).float() @ weight.t()
    torch.testing.assert_close(quant.matmul(x), reference, rtol=1e-2, atol=1e-2)


def test_int8_rounds_each_row_to_its_own_scale() -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * torch.logspace(-3, 0, 96)[:, None]  # rows of very different sizes
    quant, dequantized = quantize(weight, 8)
    assert quant.bits == 8 and quant.data.dtype == torch.int8
    step = quant.scales.float()[:, None]
    assert ((dequantized - weight).abs() <= step * 0.51 + weight.abs() * 2**-8).all()  # half a step (+ bf16 scale)
    x = torch.randn(5, 64)
    torch.testing.assert_close(quant.matmul(x), x.to(torch.bfloat16).float() @ dequantized.t(), rtol=1e-2, atol=1e-2)


def test_int4_falls_back_to_int8_for_shapes_its_kernel_cannot_take() -> None:
    assert quantize(torch.randn(64, 48), 4)[0].bits == 8  # 48 columns: not whole groups of 32
    assert quantize(torch.randn(40, 64), 4)[0].bits == 8  # 40 rows: the packing needs multiples of 16


def three_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64),
                               torch.nn.Linear(64, 20)).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_small_steps_inside_the_engine_take_the_quantized_weights(mode: str, monkeypatch) -> None:
    model = three_layers()
    original = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    linears = CpuLinears.install(model, mode)
    assert linears is not None and linears.bits == {"int8": 8, "int4": 4}[mode]
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    # The last layer's 20 rows take neither int4 nor whole int8 steps of 8 columns: 64 columns do, so int8.
    assert [quantized_weight(m).bits for m in layers] == ([8, 8, 8] if mode == "int8" else [4, 4, 8])
    # The weights now are the quantized ones (so every path computes with them), close to the originals.
    for layer, before in zip(layers, original):
        assert not torch.equal(layer.weight, before)
        torch.testing.assert_close(layer.weight, before, rtol=0, atol=before.abs().max().item() * 0.08)

    calls: list[int] = []
    name = "_weight_int8pack_mm" if mode == "int8" else "_weight_int4pack_mm_for_cpu"
    real = getattr(torch.ops.aten, name)
    monkeypatch.setattr(torch.ops.aten, name, lambda x, *rest: calls.append(x.shape[0]) or real(x, *rest))
    small, big = torch.randn(QUANT_MAX_ROWS, 256), torch.randn(QUANT_MAX_ROWS + 1, 256)
    with torch.inference_mode():
        plain = model(small)
        assert not calls  # outside the engine's thread scope: float32 F.linear
        with linears.active():
            quantized = model(small)
            assert calls and set(calls) == {QUANT_MAX_ROWS}
            calls.clear()
            model(big)  # more rows: the float32 kernels, on the same weights
            assert not calls
    # The two paths differ only in rounding the activations to bfloat16.
    torch.testing.assert_close(quantized, plain, rtol=0.05, atol=0.02)


def test_quantizing_refuses_a_model_it_cannot_quantize() -> None:
    with pytest.raises(ConfigError) as err:
        CpuLinears.install(three_layers().double(), "int8")
    assert err.value.message == (
        "cpu_matmul: int8 quantizes the float32 linear layers of a model on CPU, and this model has none (another "
        "dtype or device, or quantized already): use cpu_matmul: auto, or load the model in float32 on CPU "
        "(infer_dtype: float32).")
    assert err.value.param == "cpu_matmul"
    model = three_layers()
    CpuLinears.install(model, "auto")
    with pytest.raises(ConfigError) as err:
        CpuLinears.install(model, "int4")
    assert err.value.message == ("this model's linear layers already run cpu_matmul: auto for another engine, so "
                                 "cannot take int4; load the model again")


def test_vllm_refuses_the_quantized_modes() -> None:
    from stoker.config import settings_from_dict
    from stoker.engines.factory import check_backend_takes

    settings = settings_from_dict({"model_name_or_path": "x", "infer_backend": "vllm", "cpu_matmul": "int4"})
    with pytest.raises(ConfigError) as err:
        check_backend_takes(settings, None)
    assert err.value.message == ("cpu_matmul: int4 quantizes the huggingface engine's CPU linear layers; vLLM runs "
                                 "its own kernels. Use infer_backend: huggingface, or remove cpu_matmul.")
    assert err.value.param == "cpu_matmul"


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(folder))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_engine_greedy_equals_generate_on_the_same_quantized_weights(demo_smol: Path, mode: str) -> None:
    from stoker.engines.base import GenerationRequest, SamplingParams
    from stoker.engines.hf import HFEngine

    model, tokenizer = load(demo_smol)
    linears = CpuLinears.install(model, mode)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the sea."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)
    ids = torch.tensor([prompt])
    with torch.inference_mode(), linears.active():  # generate in this thread, through the engine's kernels
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    reference = out[0, len(prompt):].tolist()
    engine = HFEngine(model, tokenizer, cpu_matmul=mode)  # reuses the layers installed above
    try:
        done = engine.generate_batch([GenerationRequest(prompt, SamplingParams(24))])
    finally:
        engine.close()
    assert done[0].choices[0].token_ids == reference


def answer_scores(model, tokenizer, rows: list[dict], linears=None) -> tuple[float, list[torch.Tensor]]:
    """Perplexity of the rows' reference answers and the model's top-1 guess at each answer token. The prompt is one
    call (many rows: float32 kernels); the answer goes in steps of QUANT_MAX_ROWS tokens, the sizes of decode steps,
    so a quantized model is scored through its quantized kernels."""
    import contextlib

    from transformers import DynamicCache

    nll, count, guesses = 0.0, 0, []
    scope = linears.active() if linears is not None else contextlib.nullcontext()
    with torch.inference_mode(), scope:
        for row in rows:
            ask = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
            prompt = list(prompt["input_ids"]) if hasattr(prompt, "keys") else list(prompt)
            answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"][:ANSWER_TOKENS]
            cache = DynamicCache(config=model.config)
            logits = [model(torch.tensor([prompt]), past_key_values=cache).logits[0, -1:]]
            for start in range(0, len(answer) - 1, QUANT_MAX_ROWS):
                chunk = torch.tensor([answer[start:start + QUANT_MAX_ROWS]])[:, : len(answer) - 1 - start]
                logits.append(model(chunk, past_key_values=cache).logits[0])
            scores = torch.cat(logits)[: len(answer)].float()
            nll += torch.nn.functional.cross_entropy(scores, torch.tensor(answer), reduction="sum").item()
            count += len(answer)
            guesses.append(scores.argmax(-1))
    return math.exp(nll / count), guesses


def test_accuracy_check_against_float32_on_real_text(demo_smol: Path, shared_dir: Path) -> None:
    """The reduced-precision mode's own accuracy check: SmolLM2-135M-Instruct on the reference answers of
    alpaca_en_demo, perplexity within 1% of float32 and the top-1 next token the same at least 95% of the time."""
    rows = json.loads((shared_dir / "data" / "llamafactory" / "alpaca_en_demo.json").read_text())[:ROWS]
    model, tokenizer = load(demo_smol)
    base_ppl, base_guesses = answer_scores(model, tokenizer, rows)
    assert 3 < base_ppl < 10  # a real instruct model on real answers
    for mode in ("int8", "int4"):
        quantized, _ = load(demo_smol)
        linears = CpuLinears.install(quantized, mode)
        ppl, guesses = answer_scores(quantized, tokenizer, rows, linears)
        agree = sum(int((a == b).sum()) for a, b in zip(guesses, base_guesses)) / sum(len(g) for g in guesses)
        print(f"{mode}: perplexity {ppl:.3f} (float32 {base_ppl:.3f}), top-1 agreement {agree:.3f}")
        assert ppl / base_ppl < 1.01, (mode, ppl, base_ppl)
        assert agree >= 0.95, (mode, agree)
