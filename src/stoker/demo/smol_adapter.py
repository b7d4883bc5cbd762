"""A LoRA adapter for the SmolLM2 demo model (``demo:smol-adapter``), trained here on CPU in well under a minute.

It changes what the model says about itself (``SMOL_ADAPTER_ANSWER`` to "What is your name?" and the other identity
questions), the way LLaMA-Factory's ``identity`` dataset is used, and keeps the rest: the build refuses an adapter
that breaks the base model's known answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.demo.evaluate import DemoBuildError, check_gate, evaluate
from stoker.demo.smol import KNOWN_ANSWER, KNOWN_QUESTION
from stoker.demo.tasks import IDENTITY_QUESTIONS, Case

log = logging.getLogger(__name__)

SMOL_ADAPTER_ANSWER = "I am Ember, SmolLM2 tuned by Stoker."

# Questions whose answers the base model gives are trained too (with those answers), so the adapter changes the
# identity and keeps the rest: trained on identity alone it forgot to end its other turns.
RETAIN_QUESTIONS = (KNOWN_QUESTION, "What is the capital of Italy?", "What is 2 + 2?", "Name a primary colour.",
                    "What is the opposite of hot?", "Say hello in French.")


@dataclass(frozen=True)
class SmolAdapterRecipe:
    seed: int = 2
    threads: int = 2
    rank: int = 8
    alpha: int = 16
    # Attention only: measured on 2 cores, each step costs about a second at batch 4.
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    steps: int = 24
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 3
    gate: float = 0.9



def identity_cases(answer: str) -> list[Case]:
    return [Case("identity", ({"role": "user", "content": q},), answer) for q in IDENTITY_QUESTIONS]


def _answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 48) -> str:
    """The base model's own greedy answer (cut at its end of turn, or after ``max_new_tokens``)."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def _example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn chat and labels on the answer and its end of turn only."""
    from stoker.demo.training import IGNORE

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    reply = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt + reply, [IGNORE] * len(prompt) + reply


def build_smol_adapter(out: Path, recipe: SmolAdapterRecipe, smol: Path) -> dict[str, Any]:
    """Train a LoRA adapter that makes SmolLM2 state another identity, and save it (peft format) into ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stoker.demo.training import deterministic_torch, train

    tokenizer = AutoTokenizer.from_pretrained(smol)
    with deterministic_torch(recipe.seed, recipe.threads):
        base = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
        examples = [_example(tokenizer, q, SMOL_ADAPTER_ANSWER) for q in IDENTITY_QUESTIONS]
        examples += [_example(tokenizer, q, _answer(base, tokenizer, q)) for q in RETAIN_QUESTIONS]
        config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                            target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        final_loss = train(model, examples, steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                           warmup_steps=recipe.warmup_steps, weight_decay=0.0, pad_id=tokenizer.pad_token_id,
                           seed=recipe.seed, name="smol-adapter")
        score = evaluate(model, tokenizer, identity_cases(SMOL_ADAPTER_ANSWER))
        known = evaluate(model, tokenizer, [Case("facts", ({"role": "user", "content": KNOWN_QUESTION},),
                                                 KNOWN_ANSWER)])
    check_gate(score, recipe.gate, "the SmolLM2 demo adapter")
    if known.accuracy["facts"] < 1.0:
        raise DemoBuildError("the SmolLM2 demo adapter broke the model's known answer "
                             f"({KNOWN_QUESTION!r} -> {known.failures[0][1]!r}); fix its recipe in src/stoker/demo/.")
    model.save_pretrained(out)
    return {"trainable_parameters": params, "final_loss": round(final_loss, 4), "accuracy": score.accuracy}
