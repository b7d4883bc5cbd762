"""``stoker.chat.budget``: the one set of token-budget rules every surface's requests are fitted by."""

from __future__ import annotations

import pytest

from stoker.chat.budget import (
    check_in_flight,
    check_requested,
    fit_new_tokens,
    prompt_budget,
    tokens_left,
)
from stoker.engines.base import SamplingParams
from stoker.errors import RequestError


def test_tokens_left_takes_the_tighter_of_context_and_max_length() -> None:
    assert tokens_left(100, 512, None) == 412
    assert tokens_left(100, 512, 150) == 50
    assert tokens_left(100, 512, 80) == -20  # max_length below the prompt: nothing is left
    assert tokens_left(600, 512, None) == -88


def test_a_default_max_new_tokens_is_clipped_never_below_one() -> None:
    params = SamplingParams(max_new_tokens=500)
    assert fit_new_tokens(100, params, max_model_len=512, max_length=None).max_new_tokens == 412
    assert fit_new_tokens(100, params, max_model_len=512, max_length=120).max_new_tokens == 20
    # max_length already spent by the prompt: still one token, so the request can answer at all.
    assert fit_new_tokens(100, params, max_model_len=512, max_length=90).max_new_tokens == 1
    small = SamplingParams(max_new_tokens=8)
    assert fit_new_tokens(100, small, max_model_len=512, max_length=None) is small  # fits: unchanged


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    with pytest.raises(RequestError) as exc:
        fit_new_tokens(512, SamplingParams(), max_model_len=512, max_length=None, param="prompt")
    assert exc.value.message == ("the prompt is 512 tokens but the model's context is 512 tokens: shorten the "
                                 "conversation.")
    assert (exc.value.param, exc.value.code) == ("prompt", "context_length_exceeded")


def test_an_explicit_max_tokens_that_cannot_fit_is_refused_not_clipped() -> None:
    check_requested(100, 412, "max_tokens", max_model_len=512, max_length=None)  # exactly what is left: fine
    check_requested(100, None, "max_tokens", max_model_len=512, max_length=None)  # not asked for: nothing to check
    with pytest.raises(RequestError) as exc:
        check_requested(100, 413, "max_completion_tokens", max_model_len=512, max_length=None)
    assert exc.value.message == (
        "max_completion_tokens=413 is more than the context has left: the prompt takes 100 of the model's 512 "
        "tokens, leaving 412. Ask for at most 412 tokens, or shorten the prompt.")
    with pytest.raises(RequestError, match="leaving 0. Ask for at most 0 tokens"):
        check_requested(100, 5, "max_tokens", max_model_len=512, max_length=90)


def test_tokens_in_flight_are_capped_by_the_engine() -> None:
    params = SamplingParams(max_new_tokens=100, n=4)
    check_in_flight(100, params, "max_tokens", max_batch_tokens=800)
    check_in_flight(100, params, "max_tokens", max_batch_tokens=None)  # a backend without such a cap
    with pytest.raises(RequestError) as exc:
        check_in_flight(100, params, "max_tokens", max_batch_tokens=799)
    assert exc.value.message == (
        "this request needs n x (prompt + max_tokens) = 4 x (100 + 100) = 800 tokens in flight, more than the "
        "server's cap (max_batch_tokens=799): lower n or max_tokens.")


def test_a_shrinking_prompt_leaves_the_answer_up_to_half_the_context() -> None:
    assert prompt_budget(512, 64) == 448
    assert prompt_budget(512, 1000) == 256
    assert prompt_budget(512, 256) == 256
