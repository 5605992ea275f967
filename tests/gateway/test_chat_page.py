"""The chat page at `/`, in headless Chromium: a message typed and sent comes back as a streamed reply equal to
the model's greedy answer. A screenshot is saved in the test's output folder and its path printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser_tools import HeadlessChromium
from tests.gateway.conftest import API_KEY, MODEL_NAME, Gateway, LocalModel

pytestmark = pytest.mark.slow

QUESTION = "What is the sea?"
MAX_TOKENS = 12
REPLY_TIMEOUT = 60.0


def test_chat_page_streams_the_reply(gateway: Gateway, local_model: LocalModel, tmp_path: Path) -> None:
    prompt_ids = local_model.encode(f"User: {QUESTION}\nAssistant:")  # the plain template of one user message
    expected = local_model.greedy_until(prompt_ids, MAX_TOKENS, "\nUser:")

    with HeadlessChromium(tmp_path / "profile") as browser:
        browser.load(f"{gateway.url}/")
        browser.evaluate("document.querySelector('details').open = true")
        browser.fill("#api-key", API_KEY)
        browser.evaluate("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        browser.wait_until(
            f"document.getElementById('model').textContent === {json.dumps('model: ' + MODEL_NAME)}",
            timeout=30, what="the page to list the model",
        )  # fmt: skip
        browser.evaluate(f"document.getElementById('max-tokens').value = '{MAX_TOKENS}'")
        browser.evaluate("document.getElementById('temperature').value = '0'")
        browser.fill("#prompt", QUESTION)
        browser.click("#send")
        browser.wait_until("document.querySelector('.message.assistant') !== null", 10, "the reply to start")
        state = browser.wait_until(
            "['done', 'failed'].includes(document.querySelector('.message.assistant').dataset.state) && "
            "document.querySelector('.message.assistant').dataset.state",
            timeout=REPLY_TIMEOUT, what="the streamed reply to finish",
        )  # fmt: skip
        reply = browser.evaluate(
            "(() => { const m = document.querySelector('.message.assistant');"
            " return {text: m.firstChild ? m.firstChild.textContent : '', chunks: Number(m.dataset.chunks),"
            " finish: m.dataset.finishReason, meta: m.querySelector('.meta').textContent,"
            " user: document.querySelector('.message.user').textContent,"
            " health: document.getElementById('health').textContent}; })()"
        )
        screenshot = browser.screenshot(tmp_path / "chat-page.png")
    print(f"chat page screenshot: {screenshot}")

    assert state == "done", browser.console
    assert reply["user"] == QUESTION
    assert reply["text"] == expected.text.lstrip()  # the page drops the whitespace a reply opens with
    assert reply["chunks"] > 1  # the text arrived in pieces
    assert reply["finish"] == expected.finish_reason
    assert f"{expected.completion_tokens} tokens in" in reply["meta"]
    assert reply["health"] == "swarm: all blocks served"
    assert screenshot.stat().st_size > 10_000


def test_a_model_list_answered_late_does_not_overwrite_a_later_one(gateway: Gateway, tmp_path: Path) -> None:
    """The page lists the model on opening, before a key is typed (refused), and again once the key changes; the
    refusal answered last must not replace the model. The first answer is held back 500 ms to force that order."""
    with HeadlessChromium(tmp_path / "profile") as browser:
        browser.load(f"{gateway.url}/")
        shown = browser.evaluate(
            """(async () => {
                const realFetch = window.fetch;
                let modelLists = 0;
                window.fetch = (url, options) => {
                    const answer = realFetch(url, options);
                    if (!String(url).includes("v1/models") || ++modelLists > 1) return answer;
                    return answer.then((response) => new Promise((ok) => setTimeout(() => ok(response), 500)));
                };
                document.getElementById("api-key").value = "";
                const refused = loadModel();
                document.getElementById("api-key").value = KEY;
                const listed = loadModel();
                await Promise.all([refused, listed]);
                return document.getElementById("model").textContent;
            })()""".replace("KEY", json.dumps(API_KEY))
        )
    assert shown == f"model: {MODEL_NAME}"
