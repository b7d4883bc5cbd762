"""The demo LoRA adapter: on top of the chat model it states another identity, and everything else keeps working."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stoker.demo import corpus, tasks
from stoker.demo.evaluate import check_gate, evaluate
from stoker.demo.recipes import AdapterRecipe
from stoker.demo.training import deterministic_torch, encode_conversations, train

log = logging.getLogger(__name__)


def build_adapter(out: Path, recipe: AdapterRecipe, chat: Path) -> dict[str, Any]:
    """Train a LoRA adapter for the chat model in ``chat`` and save it (peft format) into ``out``; returns the
    metrics. Raises ``DemoBuildError`` when an accuracy gate is missed, with the adapter on or off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat)
    data = corpus.conversations(
        recipe.conversations,
        seed=f"adapter-{recipe.seed}",
        identity=tasks.ADAPTER_IDENTITY_ANSWER,
        task_weights=dict(recipe.task_weights),
        system_rate=recipe.system_rate,
        turn_weights=recipe.turn_weights,
    )
    examples = encode_conversations(tokenizer, data)
    with deterministic_torch(recipe.seed, recipe.threads):
        base = AutoModelForCausalLM.from_pretrained(chat, dtype=torch.float32)
        lora = LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,
            lora_dropout=0.0,
            target_modules=list(recipe.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lora)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("adapter: %d trainable parameters, %d training conversations", params, len(examples))
        final_loss = train(
            model,
            examples,
            steps=recipe.steps,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            warmup_steps=recipe.warmup_steps,
            weight_decay=recipe.weight_decay,
            pad_id=tokenizer.pad_token_id,
            seed=recipe.seed,
            name="adapter",
        )
        cases = tasks.evaluation_cases(identity=tasks.ADAPTER_IDENTITY_ANSWER, echo=recipe.eval_echo_cases)
        score = evaluate(model, tokenizer, cases)
        with model.disable_adapter():
            # The adapter must not leak into the base weights: off, the model is still Stoker.
            base_score = evaluate(model, tokenizer, tasks.evaluation_cases(echo=0))
    log.info("adapter: accuracy %s", ", ".join(f"{t} {100 * a:.1f}%" for t, a in score.accuracy.items()))
    check_gate(score, recipe.gate, "the demo adapter")
    check_gate(base_score, recipe.gate, "the demo chat model with the adapter disabled")
    model.save_pretrained(out)
    return {
        "trainable_parameters": params,
        "final_loss": round(final_loss, 4),
        "accuracy": score.accuracy,
        "cases": score.counts,
        "accuracy_adapter_disabled": base_score.accuracy,
    }
