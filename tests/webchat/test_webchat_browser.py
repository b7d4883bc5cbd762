"""`stoker webchat` end to end: the real command in a subprocess, driven by headless Chromium through Playwright.

Debian's chromium is used (Playwright cannot download its own browser here). Without it the tests skip, except under
CI=true, where they fail: CI must run them. Screenshots of conversations are saved to artifacts/ (webchat.png, webchat-vision.png).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, free_port, under_ci
from stoker.demo.tasks import ADAPTER_IDENTITY_ANSWER, FACTS, IDENTITY_ANSWER

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = os.environ.get("STOKER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
START_TIMEOUT_S = 240
REPLY_TIMEOUT_MS = 60_000

INPUT = "#stoker-input textarea"
USER = "#stoker-chat [data-testid=user]"
BOT = "#stoker-chat [data-testid=bot]"


def require_browser() -> None:
    problem = None
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        problem = f"{CHROMIUM} is missing: install Debian's 'chromium' package (make setup-test does)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed: pip install playwright (make setup-test does)"
    if problem:
        if under_ci():
            pytest.fail(f"browser tests cannot run under CI: {problem}")
        pytest.skip(problem)


@contextlib.contextmanager
def serve(model: Path, name: str, *extra: str) -> Iterator[str]:
    """`python -m stoker webchat` for ``model`` on a free port of 127.0.0.1, until the block ends; its output goes
    to artifacts/webchat-``name``.log. Checks it stops cleanly on SIGTERM and logged no traceback."""
    require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    env.pop("GRADIO_SHARE", None)
    log_path = ARTIFACTS / f"webchat-{name}.log"
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stoker", "webchat", f"model_name_or_path={model}", *extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"stoker webchat exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"stoker webchat did not answer on {url} within {START_TIMEOUT_S} s:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    log_text = log_path.read_text()
    assert code == 0, f"stoker webchat did not stop cleanly on SIGTERM (exit {code}):\n{log_text[-3000:]}"
    assert "Traceback" not in log_text, log_text[-3000:]


@pytest.fixture(scope="module")
def server(demo_chat: Path) -> Iterator[str]:
    with serve(demo_chat, "chat") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


class Page:
    """One browser session on the chat page, recording every request that leaves the server."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.outside: list[str] = []
        self.page.on("request", self._record)
        self.page.goto(url)
        self.page.wait_for_selector(INPUT)

    def _record(self, request) -> None:
        if not request.url.startswith((self.url, "data:", "blob:")):
            self.outside.append(request.url)

    def send(self, text: str, *, wait: bool = True) -> None:
        """Type ``text`` and press Enter; ``wait``: until it shows as the last user message."""
        box = self.page.locator(INPUT)
        box.fill(text)
        box.press("Enter")
        if wait:
            self.page.wait_for_function(
                "([sel, want]) => { const m = document.querySelectorAll(sel); "
                "return m.length && m[m.length - 1].innerText.trim() === want }",
                arg=[USER, text], timeout=REPLY_TIMEOUT_MS,
            )

    def texts(self, selector: str) -> list[str]:
        return [t.strip() for t in self.page.locator(selector).all_inner_texts()]

    def wait_for_reply(self, answer: str, index: int) -> None:
        """Until the bot message number ``index`` reads ``answer``."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(
                "([sel, i, want]) => { const m = document.querySelectorAll(sel)[i]; return m && m.innerText.trim() === want }",
                arg=[BOT, index, answer], timeout=REPLY_TIMEOUT_MS,
            )
        except PlaywrightTimeout:
            pytest.fail(f"no reply {answer!r} at position {index} within {REPLY_TIMEOUT_MS} ms; the page shows "
                        f"user {self.texts(USER)}, bot {self.texts(BOT)}, input {self.page.locator(INPUT).input_value()!r}")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server: str) -> Iterator[Page]:
    p = Page(browser, server)
    yield p
    p.close()


def test_page_opens_without_outside_requests(page: Page, demo_chat: Path) -> None:
    # The served model name is the model folder's name.
    assert page.page.title() == f"Stoker · {demo_chat.name}"
    assert page.page.locator("#stoker-title").inner_text() == f"Stoker · {demo_chat.name}"
    for label in ("System prompt", "Max new tokens", "Temperature", "Top-p", "Top-k"):
        assert page.page.get_by_text(label, exact=True).first.is_visible(), label
    assert page.page.locator("#stoker-stop").is_visible() and page.page.locator("#stoker-clear").is_visible()
    # The demo model is text-only: no image upload button.
    assert page.page.locator("#stoker-input [data-testid=upload-button]").count() == 0
    # No analytics, fonts or anything else fetched from elsewhere.
    assert page.outside == []


def test_reply_streams_the_trained_answer_and_screenshot(page: Page) -> None:
    # Record every text the reply shows on its way, to see it stream rather than land at once.
    page.page.evaluate(
        """() => { window.__seen = [];
          new MutationObserver(() => { const m = document.querySelectorAll('#stoker-chat [data-testid=bot]');
            if (m.length) window.__seen.push(m[m.length - 1].innerText.trim()); })
          .observe(document.querySelector('#stoker-chat'), {subtree: true, childList: true, characterData: true}); }"""
    )
    page.send("Who are you?")
    page.wait_for_reply(IDENTITY_ANSWER, 0)
    seen = [s for s in dict.fromkeys(page.page.evaluate("window.__seen")) if s]
    assert seen[-1] == IDENTITY_ANSWER
    assert all(IDENTITY_ANSWER.startswith(s) for s in seen), seen
    assert len(seen) >= 2, f"the reply appeared in one piece: {seen}"

    question = "What is the capital of France?"
    page.send(question)
    page.wait_for_reply(FACTS[question], 1)
    assert page.texts(USER) == ["Who are you?", question]
    assert page.texts(BOT) == [IDENTITY_ANSWER, FACTS[question]]
    assert page.page.locator(INPUT).input_value() == ""
    shot = ARTIFACTS / "webchat.png"
    page.page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.outside == []


def test_clear_empties_the_history(page: Page) -> None:
    page.send("Who are you?")
    page.wait_for_reply(IDENTITY_ANSWER, 0)
    page.page.locator("#stoker-clear").click()
    page.page.wait_for_function("sel => document.querySelectorAll(sel).length === 0", arg=USER, timeout=10_000)
    assert page.texts(BOT) == []
    # The next question starts a new conversation: one exchange on the page.
    question = "What is the capital of Egypt?"
    page.send(question)
    page.wait_for_reply(FACTS[question], 0)
    assert page.texts(USER) == [question]
    assert page.texts(BOT) == [FACTS[question]]


def test_message_sent_while_a_reply_streams_goes_next(page: Page) -> None:
    count, question = "Count from one to ten.", "Who are you?"
    page.send(count)
    page.send(question, wait=False)  # Enter while the count is (most likely) still streaming
    page.wait_for_reply(FACTS[count], 0)
    page.wait_for_reply(IDENTITY_ANSWER, 1)
    assert page.texts(USER) == [count, question]
    assert page.texts(BOT) == [FACTS[count], IDENTITY_ANSWER]


def test_user_error_is_shown_and_the_message_kept(page: Page) -> None:
    page.page.get_by_text("Tools", exact=True).click()
    page.page.locator("#stoker-tools textarea").fill('[{"name": "x",}]')
    page.send("Who are you?", wait=False)
    toast = page.page.locator("[data-testid=toast-body]")
    toast.wait_for(timeout=REPLY_TIMEOUT_MS)
    assert "the tool definitions are not valid JSON (line 1, column 15" in toast.inner_text()
    assert page.page.locator(INPUT).input_value() == "Who are you?"
    assert page.texts(USER) == []


def test_script_injection_is_shown_as_text(page: Page) -> None:
    attack = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> <b>bold?</b>'
    page.send(attack)
    page.page.wait_for_selector(BOT, timeout=REPLY_TIMEOUT_MS)
    assert page.texts(USER) == [attack]
    assert page.page.evaluate("window.__pwned") is None
    chat = page.page.locator("#stoker-chat")
    assert chat.locator("script").count() == 0
    assert chat.locator("img[src=x]").count() == 0
    assert chat.locator("b").count() == 0


def test_two_sessions_keep_separate_histories(browser, server: str) -> None:
    first, second = Page(browser, server), Page(browser, server)
    try:
        q1, q2 = "Who are you?", "What is the capital of Kenya?"
        first.send(q1, wait=False)
        second.send(q2, wait=False)  # while the first may still be answering
        first.wait_for_reply(IDENTITY_ANSWER, 0)
        second.wait_for_reply(FACTS[q2], 0)
        q3 = "What is the capital of Japan?"
        first.send(q3)
        first.wait_for_reply(FACTS[q3], 1)
        assert first.texts(USER) == [q1, q3]
        assert first.texts(BOT) == [IDENTITY_ANSWER, FACTS[q3]]
        assert second.texts(USER) == [q2]
        assert second.texts(BOT) == [FACTS[q2]]
        # A reload starts a new session with an empty history.
        second.page.reload()
        second.page.wait_for_selector(INPUT)
        assert second.texts(USER) == []
    finally:
        first.close()
        second.close()


def test_image_upload_with_a_vision_model(browser, demo_models: dict[str, Path], tmp_path: Path) -> None:
    from stoker.demo.vision_tasks import answer, draw_shape

    picture = tmp_path / "shape.png"
    draw_shape("circle", "red", seed=3).save(picture)
    with serve(demo_models["vision"], "vision") as url:
        page = Page(browser, url)
        try:
            page.page.locator("#stoker-input [data-testid=file-upload]").set_input_files(str(picture))
            page.page.locator("#stoker-input [data-testid=container_el] img").wait_for(timeout=10_000)
            page.send("What shape is this?", wait=False)
            page.wait_for_reply(answer("shape", "circle", "red"), 0)
            # The picture stays in the history: a follow-up question about it needs no new upload.
            page.send("What color is the shape?")
            page.wait_for_reply(answer("color", "circle", "red"), 1)
            assert page.page.locator("#stoker-chat [data-testid=user] img").count() == 1
            page.page.screenshot(path=str(ARTIFACTS / "webchat-vision.png"), full_page=True)
            assert page.outside == []
        finally:
            page.close()


STOP = "#stoker-stop"


def test_stop_is_live_only_while_a_reply_streams_and_marks_the_reply(browser, demo_smol: Path) -> None:
    """On SmolLM2, whose story runs for hundreds of tokens: the reply is surely still streaming when Stop is hit."""
    with serve(demo_smol, "smol", "max_new_tokens=160") as url:
        page = Page(browser, url)
        try:
            stop = page.page.locator(STOP)
            assert stop.is_disabled()  # idle: nothing to stop
            page.send("Write a long story about a dragon who learns to read.")
            page.page.wait_for_function("sel => !document.querySelector(sel).disabled", arg=STOP,
                                        timeout=REPLY_TIMEOUT_MS)
            page.page.wait_for_function("sel => { const m = document.querySelectorAll(sel); "
                                        "return m.length && m[0].innerText.trim().length > 20 }", arg=BOT,
                                        timeout=REPLY_TIMEOUT_MS)
            stop.click()
            page.page.wait_for_selector("#stoker-chat .stoker-stopped", timeout=REPLY_TIMEOUT_MS)
            page.page.wait_for_function("sel => document.querySelector(sel).disabled", arg=STOP, timeout=10_000)
            partial, mark = page.texts(BOT)
            assert len(partial) > 20 and mark == "(stopped)"
            # A reply that ends by itself carries no mark, and leaves Stop disabled.
            page.page.locator("#stoker-clear").click()
            page.page.wait_for_function("sel => document.querySelectorAll(sel).length === 0", arg=USER,
                                        timeout=10_000)
            page.send("What is 2 + 2? Answer with the number only.")
            page.page.wait_for_function("sel => document.querySelectorAll(sel).length === 1", arg=BOT,
                                        timeout=REPLY_TIMEOUT_MS)
            page.page.wait_for_function("sel => document.querySelector(sel).disabled", arg=STOP,
                                        timeout=REPLY_TIMEOUT_MS)
            assert page.page.locator("#stoker-chat .stoker-stopped").count() == 0
        finally:
            page.close()


def test_regenerate_edit_copy_and_download(page: Page, tmp_path: Path) -> None:
    question = "What is the capital of France?"
    page.send(question)
    page.wait_for_reply(FACTS[question], 0)
    # Regenerate answers the same message again (greedy: the same answer), in place.
    page.page.locator("#stoker-regenerate").click()
    page.page.wait_for_function("sel => !document.querySelector(sel).disabled", arg=STOP, timeout=REPLY_TIMEOUT_MS)
    page.page.wait_for_function("sel => document.querySelector(sel).disabled", arg=STOP, timeout=REPLY_TIMEOUT_MS)
    page.wait_for_reply(FACTS[question], 0)
    assert page.texts(USER) == [question] and page.texts(BOT) == [FACTS[question]]
    # Edit last: the message goes back into the box and leaves the history; a changed one is answered instead.
    page.page.locator("#stoker-edit").click()
    page.page.wait_for_function("sel => document.querySelectorAll(sel).length === 0", arg=USER, timeout=10_000)
    assert page.page.locator(INPUT).input_value() == question
    other = "What is the capital of Japan?"
    page.send(other)
    page.wait_for_reply(FACTS[other], 0)
    assert page.texts(USER) == [other]
    # Every reply has a copy button.
    assert page.page.locator("#stoker-chat [data-testid=bot] ~ * button, #stoker-chat button[title*=opy], "
                             "#stoker-chat button[aria-label*=opy]").count() >= 1
    # Download: the conversation as OpenAI-style JSON.
    page.page.wait_for_function(
        "() => { const a = document.querySelector('#stoker-download'); return a && !a.disabled }", timeout=10_000)
    with page.page.expect_download(timeout=30_000) as info:
        page.page.locator("#stoker-download").click()
    saved = tmp_path / "conversation.json"
    info.value.save_as(saved)
    import json

    assert json.loads(saved.read_text()) == [{"role": "user", "content": other},
                                             {"role": "assistant", "content": FACTS[other]}]


def test_compare_streams_the_base_and_the_adapter_side_by_side(browser, demo_chat: Path, demo_adapter: Path) -> None:
    with serve(demo_chat, "compare", f"adapter_name_or_path={demo_adapter}") as url:
        page = Page(browser, url)
        try:
            # The chat tab answers as the configured model: the base with its adapter.
            page.send("Who are you?")
            page.wait_for_reply(ADAPTER_IDENTITY_ANSWER, 0)
            assert page.page.title() == f"Stoker · {demo_chat.name} + {demo_adapter.name}"
            page.page.get_by_role("tab", name="Compare").click()
            labels = page.page.locator("#stoker-compare-models label").all_inner_texts()
            assert [t.strip() for t in labels] == [demo_adapter.name, f"{demo_chat}:base"]
            page.page.locator("#stoker-compare-input textarea").fill("Who are you?")
            page.page.locator("#stoker-compare-go").click()
            answers = {0: ADAPTER_IDENTITY_ANSWER, 1: IDENTITY_ANSWER}
            for i, want in answers.items():
                page.page.wait_for_function(
                    "([sel, want]) => { const m = document.querySelectorAll(sel); "
                    "return m.length && m[m.length - 1].innerText.trim() === want }",
                    arg=[f"#stoker-compare-{i} [data-testid=bot]", want], timeout=REPLY_TIMEOUT_MS)
            for i in answers:
                assert page.texts(f"#stoker-compare-{i} [data-testid=user]") == ["Who are you?"]
            page.page.screenshot(path=str(ARTIFACTS / "webchat-compare.png"), full_page=True)
            assert page.outside == []
        finally:
            page.close()
