"""The demo vision model: a tiny LLaVA (CLIP vision tower + Llama, text head size 64 for vLLM) trained from scratch
on CPU to name the shape and colour in synthetic pictures (``stoker.demo.vision_tasks``).

It is saved as a regular LLaVA checkpoint: ``AutoProcessor`` + ``AutoModelForImageTextToText`` load it offline, and
its chat template (ChatML) writes ``<image>`` into user turns, images before text as LLaVA-1.5 does.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.demo.evaluate import Score, check_gate
from stoker.demo.tokenizer import IM_END, save_tokenizer, train_tokenizer
from stoker.demo.training import IGNORE, deterministic_torch, encode_conversations
from stoker.demo.vision_tasks import (
    COLORS,
    IMAGE_TOKEN,
    SHAPES,
    VisionCase,
    VisionExample,
    evaluation_cases,
    random_picture,
    training_examples,
)

log = logging.getLogger(__name__)

# ChatML; a list content renders its images first, each as "<image>\n", then its text, as LLaVA-1.5's template does.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ('image', 'image_url') %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class VisionRecipe:
    seed: int = 0
    threads: int = 2  # fixed: float reductions (and so the weights) depend on the thread count
    vocab_size: int = 384  # enough merges that every answer is a few tokens
    # Vision tower: 32x32 pixels in 8x8 patches -> 16 image tokens per picture.
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_layers: int = 2
    vision_heads: int = 2
    # Text model. Head size 64 (128 / 2) is what real vLLM's CPU attention accepts.
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2
    max_positions: int = 256
    # Stage 1: the vision tower alone learns to classify shape and colour (a ViT from scratch learns far faster
    # with a direct signal than through the language model's answers).
    tower_steps: int = 300
    tower_lr: float = 3e-3
    # Stage 2: the projector and language model learn to answer, the tower frozen (as LLaVA-1.5 keeps CLIP frozen).
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 30
    system_rate: float = 0.2
    no_image_rate: float = 0.08
    # Accuracy every task must reach on held-out pictures, or the build fails.
    gate: float = 0.95
    eval_per_task: int = 100


# --------------------------------------------------------------------------------------------------------------------
def build_processor(recipe: VisionRecipe, tokenizer: Any) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    side = recipe.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped again by the "default" strategy
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def model_config(recipe: VisionRecipe, tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        head_dim=recipe.hidden_size // recipe.num_heads,
        max_position_embeddings=recipe.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden_size,
        intermediate_size=recipe.vision_intermediate_size,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        projection_dim=recipe.vision_hidden_size,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(recipe.image_size // recipe.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,  # a two-layer tower has no penultimate layer worth reading
        tie_word_embeddings=True,
        dtype="float32",
    )


def make_tokenizer(recipe: VisionRecipe, examples: Sequence[VisionExample]) -> Any:
    """The demo's byte-level BPE, learnt on the vision conversations, plus ``<image>`` as a special token."""
    from tokenizers import AddedToken

    plain = [[{**m, "content": m["content"].replace(IMAGE_TOKEN, "")} for m in e.messages] for e in examples]
    tokenizer = train_tokenizer(plain, recipe.vocab_size, max_length=recipe.max_positions)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_examples(
    tokenizer: Any, examples: Sequence[VisionExample], image_tokens: int
) -> list[tuple[list[int], list[int]]]:
    """Ids and labels (assistant replies only), each ``<image>`` expanded to the tower's ``image_tokens`` slots."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for ids, labels in encode_conversations(tokenizer, [e.messages for e in examples]):
        new_ids: list[int] = []
        new_labels: list[int] = []
        for token, label in zip(ids, labels, strict=True):
            repeat = image_tokens if token == image_id else 1
            new_ids += [token] * repeat
            new_labels += [label if repeat == 1 else IGNORE] * repeat
        out.append((new_ids, new_labels))
    return out


def _pixel_values(processor: Any, examples: Sequence[VisionExample]) -> Any:
    pictures = [e.picture.render() for e in examples if e.picture is not None]
    if not pictures:
        return None
    return processor.image_processor(pictures, return_tensors="pt")["pixel_values"]


def _schedule(steps: int, warmup: int) -> Any:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def pretrain_tower(model: Any, processor: Any, recipe: VisionRecipe) -> float:
    """Stage 1: train the vision tower, through a throwaway linear head on its mean patch feature (what LLaVA reads),
    to classify shape and colour of fresh pictures. Returns the last 20 steps' mean loss."""
    import torch
    import torch.nn.functional as F

    tower = model.model.vision_tower
    head = torch.nn.Linear(recipe.vision_hidden_size, len(SHAPES) + len(COLORS))
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.tower_lr, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe.tower_steps, recipe.warmup_steps))
    rng = random.Random(f"vision-tower-{recipe.seed}")
    colors = list(COLORS)
    recent: list[float] = []
    started = time.monotonic()
    tower.train()
    for step in range(recipe.tower_steps):
        pictures = [random_picture(rng) for _ in range(recipe.batch_size)]
        pixels = processor.image_processor([p.render() for p in pictures], return_tensors="pt")["pixel_values"]
        shapes = torch.tensor([SHAPES.index(p.shape) for p in pictures])
        hues = torch.tensor([colors.index(p.color) for p in pictures])
        logits = head(tower(pixel_values=pixels).last_hidden_state[:, 1:].mean(1))
        loss = F.cross_entropy(logits[:, : len(SHAPES)], shapes) + F.cross_entropy(logits[:, len(SHAPES) :], hues)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == recipe.tower_steps:
            log.info("vision tower: step %d/%d, loss %.4f, %.0f s", step + 1, recipe.tower_steps, loss.item(),
                     time.monotonic() - started)
    tower.eval()
    return sum(recent) / len(recent)


def _length_batches(encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, rng: random.Random
                    ) -> list[list[int]]:
    """Every example once, in batches of similar length (less padding for the CPU to compute), in random order."""
    batches: list[list[int]] = []
    pool = batch_size * 16
    for at in range(0, len(encoded), pool):
        chunk = sorted(range(at, min(at + pool, len(encoded))), key=lambda i: len(encoded[i][0]))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def train_vision(
    model: Any, processor: Any, examples: Sequence[VisionExample], encoded: Sequence[tuple[list[int], list[int]]],
    recipe: VisionRecipe,
) -> float:
    """Stage 2: AdamW on the projector and language model (tower frozen), warmup then cosine decay; each example is
    seen once. Returns the last 20 steps' mean loss."""
    import torch
    import torch.nn.functional as F

    tower = model.model.vision_tower
    tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe.steps, recipe.warmup_steps))
    pad = processor.tokenizer.pad_token_id
    model.train()
    tower.eval()
    recent: list[float] = []
    started = time.monotonic()
    for step, chosen in enumerate(_length_batches(encoded, recipe.batch_size, random.Random(recipe.seed))):
        width = max(len(encoded[i][0]) for i in chosen)
        # Right padding needs no attention mask: padding only ever follows the real tokens.
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, : len(encoded[i][0])] = torch.tensor(encoded[i][0])
            labels[row, : len(encoded[i][1])] = torch.tensor(encoded[i][1])
        pixels = _pixel_values(processor, [examples[i] for i in chosen])
        logits = model(input_ids=ids, pixel_values=pixels).logits[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        loss = F.cross_entropy(logits[keep], targets[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-20:]
        if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
            log.info("vision: step %d/%d, loss %.4f, %.0f s", step + 1, recipe.steps, loss.item(),
                     time.monotonic() - started)
    tower.requires_grad_(True)
    model.eval()
    return sum(recent) / len(recent)


def greedy_vision_replies(model: Any, processor: Any, cases: Sequence[VisionCase], *, batch_size: int = 50) -> list[str | None]:
    """The model's greedy reply to each case through the processor (as serving expands images), or None where it
    did not end its turn."""
    import torch

    tokenizer = processor.tokenizer
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    longest = max(len(tokenizer.encode(c.answer, add_special_tokens=False)) for c in cases)
    replies: list[str | None] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its end
    try:
        for start in range(0, len(cases), batch_size):
            batch = cases[start : start + batch_size]
            texts = [tokenizer.apply_chat_template(list(c.messages), add_generation_prompt=True, tokenize=False)
                     for c in batch]
            pictures = [c.picture.render() for c in batch if c.picture is not None]
            inputs = processor(text=texts, images=pictures or None, padding=True, return_tensors="pt",
                               add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=longest + 4, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id)
            for row in out[:, inputs["input_ids"].shape[1] :].tolist():
                replies.append(tokenizer.decode(row[: row.index(eos)], skip_special_tokens=True) if eos in row else None)
    finally:
        tokenizer.padding_side = padding_side
    return replies


def evaluate_vision(model: Any, processor: Any, cases: Sequence[VisionCase]) -> Score:
    """Per-task exact-match accuracy of greedy replies."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    failures = []
    for case, reply in zip(cases, greedy_vision_replies(model, processor, cases), strict=True):
        total[case.task] = total.get(case.task, 0) + 1
        right[case.task] = right.get(case.task, 0) + (reply == case.answer)
        if reply != case.answer:
            failures.append((case, reply if reply is not None else "<no end of turn>"))
    return Score({t: right[t] / total[t] for t in total}, total, failures)


def save_published_layout(weights: Path) -> None:
    """Rename the vision tower's weights to the layout llava-hf's checkpoints have (``vision_tower.vision_model.*``).

    transformers 5 keeps CLIPVisionModel's modules flat and saves them as ``vision_tower.embeddings.*``; it reads
    both names, but vLLM's loader knows only the published one.
    """
    from safetensors.torch import load_file, save_file

    tower, nested = "vision_tower.", "vision_tower.vision_model."
    state = load_file(str(weights))
    renamed = {nested + k[len(tower):] if k.startswith(tower) and not k.startswith(nested) else k: v
               for k, v in state.items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})


def build_vision(out: Path, recipe: VisionRecipe) -> dict[str, Any]:
    """Train the vision model, its tokenizer and processor into ``out``; returns the metrics. Raises
    ``DemoBuildError`` when a task misses the accuracy gate on held-out pictures."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    examples = training_examples(
        recipe.steps * recipe.batch_size,
        seed=f"vision-{recipe.seed}",
        system_rate=recipe.system_rate,
        no_image_rate=recipe.no_image_rate,
    )
    tokenizer = make_tokenizer(recipe, examples)
    processor = build_processor(recipe, tokenizer)
    image_tokens = (recipe.image_size // recipe.patch_size) ** 2
    encoded = encode_examples(tokenizer, examples, image_tokens)
    with deterministic_torch(recipe.seed, recipe.threads):
        model = LlavaForConditionalGeneration(model_config(recipe, tokenizer))
        params = sum(p.numel() for p in model.parameters())
        log.info("vision: %d parameters, %d training conversations", params, len(examples))
        tower_loss = pretrain_tower(model, processor, recipe)
        final_loss = train_vision(model, processor, examples, encoded, recipe)
        model.generation_config = GenerationConfig(
            do_sample=False,
            eos_token_id=model.config.text_config.eos_token_id,
            pad_token_id=model.config.text_config.pad_token_id,
            max_new_tokens=32,
        )
        score = evaluate_vision(model, processor, evaluation_cases(recipe.eval_per_task, seed=recipe.seed))
    log.info("vision: held-out accuracy %s", ", ".join(f"{t} {100 * a:.1f}%" for t, a in score.accuracy.items()))
    check_gate(score, recipe.gate, "the demo vision model")
    model.save_pretrained(out)
    save_published_layout(out / "model.safetensors")
    processor.save_pretrained(out)
    save_tokenizer(tokenizer, out)  # after the processor: the chat template goes into tokenizer_config.json too
    return {
        "parameters": params,
        "tower_loss": round(tower_loss, 4),
        "final_loss": round(final_loss, 4),
        "accuracy": score.accuracy,
        "cases": score.counts,
        "image_tokens": image_tokens,
    }
