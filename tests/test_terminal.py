"""`stoker chat` driven through piped stdin on the demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER, FACTS, IDENTITY_ANSWER

ROOT = Path(__file__).resolve().parents[1]


def chat(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stoker", "chat", *args],
        input=stdin, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


def replies(stdout: str) -> list[str]:
    return [line[len("Assistant: "):] for line in stdout.splitlines() if line.startswith("Assistant: ")]


def test_piped_chat_gives_trained_answers_and_keeps_history(demo_chat: Path) -> None:
    question = "What is the capital of Japan?"
    out = chat(f"Who are you?\n{question}\nclear\n/system You are terse.\nWho are you?\nexit\n",
               f"model_name_or_path={demo_chat}")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert replies(out.stdout) == [IDENTITY_ANSWER, FACTS[question], IDENTITY_ANSWER]
    assert "History cleared." in out.stdout
    assert "System prompt set." in out.stdout


def test_eof_quits_cleanly_and_adapter_config(demo_chat: Path, demo_adapter: Path) -> None:
    out = chat("Who are you?\n", f"model_name_or_path={demo_chat}", f"adapter_name_or_path={demo_adapter}")
    assert out.returncode == 0, out.stderr
    assert replies(out.stdout) == [ADAPTER_IDENTITY_ANSWER]


def test_long_history_is_trimmed_with_notice(demo_chat: Path) -> None:
    # Each exchange is ~20 tokens; 60 of them overflow the 512-token context more than twice.
    question = "What is the capital of France?"
    out = chat(f"{question}\n" * 60 + "Who are you?\n", f"model_name_or_path={demo_chat}", "max_new_tokens=32")
    assert out.returncode == 0, out.stderr
    assert "oldest messages)" in out.stdout
    got = replies(out.stdout)
    assert len(got) == 61
    assert "Error:" not in out.stdout
    # Before the context fills the model answers as trained; the demo model saw at most 3 exchanges in training,
    # so answers deep into a full 512-token context are not asserted.
    assert got[:3] == [FACTS[question]] * 3
