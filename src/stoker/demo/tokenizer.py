"""The demo tokenizer: byte-level BPE trained on the demo corpus, with the plain ChatML chat template."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stoker.demo.tasks import Message

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # the end of every turn, and the model's eos
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# ChatML as Qwen2 and OpenHermes write it, without a default system prompt and without BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_chatml(messages: Iterable[Message], *, add_generation_prompt: bool = False) -> str:
    """What ``CHAT_TEMPLATE`` renders, in Python; the corpus is built from this so training and serving agree."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save with the chat template inside tokenizer_config.json (where every transformers version and vLLM look),
    and under the class name every version resolves."""
    tokenizer.save_pretrained(out, save_jinja_files=False)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def train_tokenizer(
    conversations: Iterable[list[Message]], vocab_size: int, *, max_length: int, extra_texts: Iterable[str] = ()
) -> Any:
    """A ``PreTrainedTokenizerFast`` whose byte-level BPE merges are learnt from the message texts (and
    ``extra_texts``: words that later fine-tunes such as the adapter should find as whole tokens).

    The trainer sees roles and contents, never the special tokens, so no merge is spent on ChatML markup.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (text for conversation in conversations for m in conversation for text in (m["role"], m["content"]))
    bpe.train_from_iterator(itertools.chain(texts, extra_texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
