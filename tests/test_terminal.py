"""`stoker chat` driven through piped stdin on the demo model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_slash_commands_never_reach_the_model(demo_chat: Path, demo_adapter: Path, tmp_path: Path) -> None:
    saved = tmp_path / "conversation.json"
    question = "What is the capital of France?"
    script = "\n".join([
        question, "/stats", "/retry", "/set temperature abc", "/set top_k 5", "/set", "/frobnicate",
        f"/save {saved}", "/clear", f"/load {saved}", "/think on", "/help", "Who are you?", "exit"]) + "\n"
    out = chat(script, f"model_name_or_path={demo_chat}", f"adapter_name_or_path={demo_adapter}")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    # The banner names the model, its adapter and the template; transformers' loading bar stays off the screen.
    banner = out.stdout.splitlines()[0]
    assert f"{demo_chat.name} + {demo_adapter.name}" in banner and "template auto" in banner
    assert "Loading weights" not in out.stdout + out.stderr
    # /retry answered the same question again (greedy: the same answer); /load restored both turns.
    assert replies(out.stdout) == [FACTS[question], FACTS[question], ADAPTER_IDENTITY_ANSWER]
    assert json.loads(saved.read_text()) == [{"role": "user", "content": question},
                                             {"role": "assistant", "content": FACTS[question]}]
    assert "Loaded 2 messages" in out.stdout and "History cleared." in out.stdout
    assert "/set temperature needs a number, not 'abc'." in out.stdout and "top_k = 5" in out.stdout
    assert "top_k=5" in out.stdout and "max_new_tokens=" in out.stdout
    assert "Unknown command /frobnicate. /help lists the commands" in out.stdout
    assert "/retry                answer the last message again" in out.stdout
    stats = next(line for line in out.stdout.splitlines() if "Last reply:" in line)
    assert "tokens/s" in stats and "of 512 tokens" in stats
    # Piped output is plain: no colours, no status lines, so transcripts hold exactly the replies.
    assert "\033[" not in out.stdout and "tokens/s]" not in out.stdout


def test_a_real_terminal_edits_recalls_history_and_stops_a_reply(demo_chat: Path, tmp_path: Path) -> None:
    """tmux: a real pseudo-terminal, keys sent as a person types them, the screen read back."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    session = f"stoker-{os.getpid()}"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src"),
           "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    # An endless reply to stop with Ctrl-C: counting with a large max_new_tokens and the EOS ignored.
    command = (f"{sys.executable} -m stoker chat model_name_or_path={demo_chat} max_new_tokens=2000")
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], env=env,
                   check=True, cwd=ROOT)

    def screen() -> str:
        return subprocess.run([tmux, "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                              text=True, check=True).stdout

    def wait_for(text: str, count: int = 1, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = screen()
            if shown.count(text) >= count:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} x{count} never showed; the screen:\n{screen()}")

    def keys(*sent: str) -> None:
        subprocess.run([tmux, "send-keys", "-t", session, *sent], check=True)

    try:
        wait_for("/help lists commands")
        # Line editing: type with a typo, go left, fix it, and send.
        keys("What is the capital of Frxnce?", "Left", "Left", "Left", "Left", "BSpace", "a", "Enter")
        wait_for(FACTS["What is the capital of France?"])
        wait_for("tokens/s]")  # the status line after a reply, at a terminal only
        # History recall: Up brings back the question; it is answered again.
        keys("Up", "Enter")
        wait_for(FACTS["What is the capital of France?"], count=2)
        # Ctrl-C mid-reply stops the reply and keeps the chat.
        keys("Repeat after me: " + " ".join(["one two three"] * 60), "Enter")
        time.sleep(1.0)
        keys("C-c")
        wait_for("[stopped]")
        keys("/stats", "Enter")
        wait_for("Last reply:")
        # /retry answers the last message again; /save then /load brings a cleared conversation back.
        keys("/clear", "Enter")
        keys("Who are you?", "Enter")
        wait_for(IDENTITY_ANSWER)
        keys("/retry", "Enter")
        wait_for(IDENTITY_ANSWER, count=2)
        saved = tmp_path / "saved.json"
        keys(f"/save {saved}", "Enter")
        wait_for("Saved 2 messages")
        keys("/clear", "Enter")
        keys(f"/load {saved}", "Enter")
        wait_for("Loaded 2 messages")
        assert json.loads(saved.read_text()) == [{"role": "user", "content": "Who are you?"},
                                                 {"role": "assistant", "content": IDENTITY_ANSWER}]
        keys("exit", "Enter")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run([tmux, "has-session", "-t", session],
                                                             capture_output=True).returncode == 0:
            time.sleep(0.2)
        history = (tmp_path / "cache" / "stoker" / "chat_history").read_text()
        assert "What is the capital of France?" in history  # kept for the next session
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)


def test_the_configs_json_schema_shapes_every_reply(demo_chat: Path) -> None:
    schema = '{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}'
    out = chat("Who are you?\nWhat is the capital of France?\n", f"model_name_or_path={demo_chat}",
               f"json_schema={schema}")
    assert out.returncode == 0, out.stderr
    got = replies(out.stdout)
    assert len(got) == 2 and all(json.loads(r)["answer"] in ("yes", "no") for r in got), got


def test_bad_slash_command_arguments_say_what_to_type(demo_chat: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"content": "no role"}]')
    script = "\n".join(["/think maybe", "/reasoning loud", "/save", "/load", f"/load {broken}",
                        "/set nucleus 0.5", "/retry", "/stats", "exit"]) + "\n"
    out = chat(script, f"model_name_or_path={demo_chat}")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    for said in ("Usage: /think on|off", "Usage: /reasoning show|hide", "Usage: /save FILE", "Usage: /load FILE",
                 f"Error: {broken} is not a conversation: message 0 has no role system, user, assistant or tool.",
                 "/set takes one of temperature, top_p, top_k, max_new_tokens, repetition_penalty, seed; 'nucleus' "
                 "is not one of them.", "Nothing to retry yet.", "No reply yet."):
        assert said in out.stdout, said
    assert replies(out.stdout) == []
