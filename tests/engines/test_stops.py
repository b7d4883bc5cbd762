"""Stop strings over streamed text: cut before the stop, never emit any part of it, hold only what might be one."""

from __future__ import annotations

import pytest

from stoker.engines.stops import StopStringMatcher, held_tail


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    """Feed pieces until a stop; return (emitted per push, stopped, flushed tail)."""
    m = StopStringMatcher(stops)
    emitted = []
    for piece in pieces:
        text, stopped = m.push(piece)
        emitted.append(text)
        if stopped:
            return emitted, True, ""
    return emitted, False, m.flush()


def test_no_stops_passes_text_through() -> None:
    assert run([], ["a", "b<"]) == (["a", "b<"], False, "")
    assert not StopStringMatcher([""])  # empty strings are ignored


def test_stop_inside_one_piece_cuts_before_it() -> None:
    assert run(["</s>"], ["Hello</s>world"]) == (["Hello"], True, "")


def test_stop_across_pieces_is_never_emitted() -> None:
    emitted, stopped, _ = run(["<|end|>"], ["Hi <", "|en", "d|> tail"])
    assert emitted == ["Hi ", "", ""]
    assert stopped


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    emitted, stopped, tail = run(["<|end|>"], ["a<|", "en", "x b"])
    assert emitted == ["a", "", "<|enx b"]
    assert not stopped and tail == ""


def test_held_prefix_is_flushed_at_the_end() -> None:
    emitted, stopped, tail = run(["STOP"], ["go ST"])
    assert emitted == ["go "] and not stopped and tail == "ST"


def test_earliest_stop_wins_and_longest_partial_is_held() -> None:
    assert run(["cd", "b"], ["abcd"]) == (["a"], True, "")
    # "xab" could still grow into "abc": hold "ab", then release it once "d" rules that out.
    emitted, stopped, _ = run(["abc", "zz"], ["xab"])
    assert emitted == ["x"] and not stopped
    emitted, stopped, _ = run(["abc", "zz"], ["xab", "d"])
    assert emitted == ["x", "abd"] and not stopped


@pytest.mark.parametrize("split", range(1, 9))
def test_every_split_point_gives_the_same_text(split: int) -> None:
    text = "one two\nUser: three"
    emitted, stopped, _ = run(["\nUser:"], [text[:split], text[split:]])
    assert "".join(emitted) == "one two" and stopped


def test_partial_markers_are_held_back_while_streaming() -> None:
    def hold_back_partial_marker(text: str, markers: list[str]) -> str:
        return text[: len(text) - held_tail(text, markers)]

    markers = ["<think>", "</think>", "<tool_call>"]
    assert hold_back_partial_marker("Hello <thi", markers) == "Hello "
    assert hold_back_partial_marker("x</", markers) == "x"  # could be </think>
    assert hold_back_partial_marker("a <tool_c", markers) == "a "
    assert hold_back_partial_marker("<think>done", markers) == "<think>done"
    assert hold_back_partial_marker("1 < 2", markers) == "1 < 2"
    assert hold_back_partial_marker("1 <", markers) == "1 "
    assert hold_back_partial_marker("plain", []) == "plain"
