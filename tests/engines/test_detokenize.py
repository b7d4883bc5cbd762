"""Incremental detokenization: whole characters only, spaces right, same text as one decode of everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from stoker.engines.detokenize import IncrementalDetokenizer, TokenTexts

MULTIBYTE = "Hello 你好，世界！😀 wörld 🐈‍⬛ ok"


@pytest.fixture(scope="module")
def stories_tokenizer(shared_dir: Path):
    """The stories260K sentencepiece tokenizer: 512 pieces with byte fallback, so CJK and emoji become bytes."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_dir / "models" / "stories260K" / "hf")


@pytest.fixture(scope="module")
def llama2_tokenizer(shared_dir: Path):
    """Meta's Llama 2 sentencepiece tokenizer (32000 pieces): CJK pieces plus byte fallback for emoji."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(shared_dir / "tokenizers" / "llama2-sentencepiece")


@pytest.fixture(scope="module")
def byte_bpe_tokenizer():
    """A small byte-level BPE (GPT-2 / Llama 3 style) trained here: most CJK characters stay split in bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"],
        show_progress=False)
    tok.train_from_iterator(["Hello world, hello there. The cat sat on the mat. 你好 你好"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def stream(tokenizer, prompt_ids: list[int], gen_ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.push([t]) for t in gen_ids] + [detok.flush()]


@pytest.mark.parametrize("which", ["stories_tokenizer", "llama2_tokenizer", "byte_bpe_tokenizer"])
def test_multibyte_text_is_never_split(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    prompt = tok.encode("Say:", add_special_tokens=False)
    full = tok.encode("Say: " + MULTIBYTE, add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    gen = full[len(prompt) :]
    pieces = stream(tok, prompt, gen)
    expected = tok.decode(full)[len(tok.decode(prompt)) :]
    assert "".join(pieces) == expected == " " + MULTIBYTE
    assert all("\ufffd" not in p for p in pieces)
    # Characters spread over several tokens were held back: fewer non-empty deltas than tokens.
    assert sum(1 for p in pieces if p) < len(gen)


def test_sentencepiece_first_token_keeps_its_space(stories_tokenizer) -> None:
    tok = stories_tokenizer
    prompt = tok.encode("Once upon")  # with BOS
    gen = tok.encode("a time", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(gen) == ["▁a", "▁time"]
    assert stream(tok, prompt, gen) == [" a", " time", ""]
    # Without a prompt, the leading space goes, as in tokenizer.decode.
    assert stream(tok, [], gen) == ["a", " time", ""]


def test_special_tokens_are_skipped_or_kept(stories_tokenizer) -> None:
    tok = stories_tokenizer
    prompt = tok.encode("Once")
    gen = [*tok.encode("upon", add_special_tokens=False), tok.eos_token_id, *tok.encode("a", add_special_tokens=False)]
    assert "".join(stream(tok, prompt, gen)) == " upon a"
    assert "".join(stream(tok, prompt, gen, skip_special_tokens=False)) == " upon</s> a"


def test_flush_releases_an_incomplete_character(stories_tokenizer) -> None:
    tok = stories_tokenizer
    prompt = tok.encode("Hi")
    first_byte = tok.convert_tokens_to_ids("<0xE4>")  # first byte of 你 (E4 BD A0)
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.push([first_byte]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_long_streams_match_one_decode(llama2_tokenizer) -> None:
    tok = llama2_tokenizer
    text = ("The quick brown fox 🦊 jumps over the lazy dog. 日本語のテキストも少し。 " * 12).strip()
    prompt = tok.encode("Story:")
    full = tok.encode("Story: " + text)
    pieces = stream(tok, prompt, full[len(prompt) :])
    assert "".join(pieces) == " " + text
    assert all("\ufffd" not in p for p in pieces)


def test_token_texts_keep_leading_spaces(stories_tokenizer, byte_bpe_tokenizer) -> None:
    spm = TokenTexts(stories_tokenizer)
    assert spm(stories_tokenizer.convert_tokens_to_ids("▁time")) == " time"
    assert spm(stories_tokenizer.convert_tokens_to_ids("ir")) == "ir"
    assert spm(stories_tokenizer.eos_token_id) == "</s>"
    assert spm(stories_tokenizer.convert_tokens_to_ids("<0xE4>")) == "\ufffd"
    bpe = TokenTexts(byte_bpe_tokenizer)
    the = byte_bpe_tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1 and bpe(the[0]) == " the"
