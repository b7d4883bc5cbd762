"""How many tokens a request may use: the one set of rules every surface's requests are fitted by.

- The context (``max_model_len``) holds the prompt plus at least one generated token; ``max_length`` (LLaMA-Factory's
  cap on prompt + answer) cuts the answer further.
- A default ``max_new_tokens`` is clipped to what is left; a number the client asked for explicitly is refused
  when it cannot fit (OpenAI's rule for ``max_tokens``), never silently cut.
- When a prompt must shrink (a chat history, a dataset row), the answer keeps up to half the context.
"""

from __future__ import annotations

from dataclasses import replace

from stoker.engines.base import SamplingParams
from stoker.errors import RequestError


def tokens_left(prompt_len: int, max_model_len: int, max_length: int | None) -> int:
    """New tokens the context and ``max_length`` leave after a prompt of ``prompt_len`` tokens (may be <= 0)."""
    room = max_model_len - prompt_len
    if max_length is not None:
        room = min(room, max_length - prompt_len)
    return room


def fit_new_tokens(
    prompt_len: int, params: SamplingParams, *, max_model_len: int, max_length: int | None, param: str = "messages"
) -> SamplingParams:
    """Check the prompt fits the context and cap ``max_new_tokens`` by what is left (at least one token).

    ``param`` names the request field an over-long prompt came from (``prompt`` for raw completions)."""
    if prompt_len >= max_model_len:
        raise RequestError(
            f"the prompt is {prompt_len} tokens but the model's context is {max_model_len} tokens: shorten the "
            "conversation.",
            param=param,
            code="context_length_exceeded",
        )
    room = max(1, tokens_left(prompt_len, max_model_len, max_length))
    if params.max_new_tokens > room:
        params = replace(params, max_new_tokens=room)
    return params


def check_text_length(chars: int, what: str, param: str, *, max_model_len: int, max_token_chars: int) -> None:
    """Refuse, before any tokenizing, text that no tokenization could fit into the context.

    A token covers at most ``max_token_chars`` characters (the vocabulary's longest entry), so text longer than
    ``max_model_len`` such tokens cannot fit; twice that is allowed, as room for normalizers that drop characters.
    This turns an 8-million-character body from seconds of tokenizing into an answer in microseconds."""
    limit = 2 * max_model_len * max_token_chars
    if chars > limit:
        raise RequestError(
            f"{what} is {chars:,} characters, more than the model's context of {max_model_len:,} tokens can hold "
            f"(at most {limit:,} characters with this tokenizer): shorten it.",
            param=param,
            code="context_length_exceeded",
        )


def check_requested(
    prompt_len: int, requested: int | None, param: str, *, max_model_len: int, max_length: int | None
) -> None:
    """Refuse an explicit ``max_tokens`` that the context cannot hold (OpenAI errors; it does not clip)."""
    room = tokens_left(prompt_len, max_model_len, max_length)
    if requested is not None and requested > room:
        raise RequestError(
            f"{param}={requested} is more than the context has left: the prompt takes {prompt_len} of the "
            f"model's {max_model_len} tokens, leaving {max(room, 0)}. Ask for at most "
            f"{max(room, 0)} tokens, or shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def check_in_flight(prompt_len: int, params: SamplingParams, param: str, *, max_batch_tokens: int | None) -> None:
    """Refuse a request whose tokens in flight (every choice's prompt and answer) exceed the engine's cap."""
    in_flight = params.n * (prompt_len + params.max_new_tokens)
    if max_batch_tokens is not None and in_flight > max_batch_tokens:
        raise RequestError(
            f"this request needs n x (prompt + {param}) = {params.n} x ({prompt_len} + "
            f"{params.max_new_tokens}) = {in_flight} tokens in flight, more than the server's cap "
            f"(max_batch_tokens={max_batch_tokens}): lower n or {param}.",
            param=param,
        )


def prompt_budget(max_model_len: int, max_new_tokens: int) -> int:
    """Longest prompt that leaves room to answer: the answer keeps up to half the context, the prompt the rest."""
    return max_model_len - min(max_new_tokens, max_model_len // 2)


def prompt_limit(cutoff_len: int, max_model_len: int, max_new_tokens: int) -> int:
    """Longest prompt predict keeps: ``cutoff_len``, and short enough to leave room to answer (``prompt_budget``);
    beyond that the prompt wins and ``max_new_tokens`` is cut to what is left."""
    return max(1, min(cutoff_len, prompt_budget(max_model_len, max_new_tokens)))


def truncate(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last ``limit`` ids (the question and the generation prompt are at the end); a leading BOS stays first."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return [bos_id, *ids[len(ids) - (limit - 1) :]]
    return ids[len(ids) - limit :]
