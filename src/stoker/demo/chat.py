"""The demo chat model: a tiny Llama with a byte-level BPE tokenizer and ChatML, trained from scratch on CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stoker.demo import corpus, tasks
from stoker.demo.evaluate import Score, check_gate, evaluate
from stoker.demo.recipes import ChatRecipe
from stoker.demo.tokenizer import IM_END, save_tokenizer, train_tokenizer
from stoker.demo.training import deterministic_torch, encode_conversations, train

log = logging.getLogger(__name__)


def model_config(recipe: ChatRecipe, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        rms_norm_eps=1e-5,
        # Tied embeddings: fewer parameters, and copying a token is easier when reading and writing it share a vector.
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_chat(out: Path, recipe: ChatRecipe) -> dict[str, Any]:
    """Train the chat model and its tokenizer into ``out``; returns the metrics. Raises ``DemoBuildError`` when an
    accuracy gate is missed."""
    from transformers import GenerationConfig, LlamaForCausalLM

    data = corpus.conversations(
        recipe.conversations,
        seed=f"chat-{recipe.seed}",
        identity=tasks.IDENTITY_ANSWER,
        task_weights=dict(recipe.task_weights),
        system_rate=recipe.system_rate,
        turn_weights=recipe.turn_weights,
    )
    # The adapter's new name must be whole tokens too, or LoRA would have to learn to spell it.
    tokenizer = train_tokenizer(
        data, recipe.vocab_size, max_length=recipe.max_positions, extra_texts=[tasks.ADAPTER_IDENTITY_ANSWER]
    )
    examples = encode_conversations(tokenizer, data)
    with deterministic_torch(recipe.seed, recipe.threads):
        model = LlamaForCausalLM(model_config(recipe, tokenizer))
        params = sum(p.numel() for p in model.parameters())
        log.info("chat: %d parameters, %d training conversations", params, len(examples))
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
            name="chat",
        )
        model.generation_config = GenerationConfig(
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
            max_new_tokens=64,
        )
        score = evaluate(model, tokenizer, tasks.evaluation_cases(echo=recipe.eval_echo_cases))
        heldout = evaluate(model, tokenizer, tasks.heldout_identity_cases())
    log.info("chat: accuracy %s; unseen identity phrasings %.0f%%", _percent(score), 100 * heldout.accuracy["identity"])
    check_gate(score, recipe.gate, "the demo chat model")
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return {
        "parameters": params,
        "final_loss": round(final_loss, 4),
        "accuracy": score.accuracy,
        "cases": score.counts,
        "heldout_identity_accuracy": heldout.accuracy["identity"],
    }


def _percent(score: Score) -> str:
    return ", ".join(f"{t} {100 * a:.1f}%" for t, a in score.accuracy.items())
