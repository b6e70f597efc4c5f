"""The playground page (GET /) driven in a real headless Chromium against the real server.

One browser and one server per module; the tiny random model makes every generation fast. The
streamed text the page shows is checked against the non-streamed API answer for the same seed.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

# Playwright's own browser download does not work offline; a system Chromium does. The README
# says how it is found: $CHROMIUM, else the first of these on PATH.
CHROMIUM = os.environ.get("CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
if not CHROMIUM:
    pytest.skip("no Chromium found ($CHROMIUM, or chromium on PATH): apt-get install chromium",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")

from server_helpers import running_server  # noqa: E402

from gpt2kit.server.app import create_app  # noqa: E402
from gpt2kit.server.settings import ServerConfig  # noqa: E402

pytestmark = pytest.mark.slow

# The machine's network is closed: without these Chromium keeps trying to reach Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(), "tiny-model")) as url:
        yield url


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server + "/")
    sync_api.expect(page.locator("#context-size")).to_have_text("64")
    yield page
    page.close()


def fill_options(page, **options: str) -> None:
    """Fill inputs by id, e.g. max_tokens="30" fills #max-tokens."""
    for name, value in options.items():
        page.fill("#" + name.replace("_", "-"), value)


def generate(page) -> None:
    """Click Generate and wait until the request is over (Generate is enabled again)."""
    page.click("#generate")
    sync_api.expect(page.locator("#generate")).to_be_enabled()


def completion(page, index: int) -> str:
    return page.locator(f'#output [data-choice="{index}"] .completion').text_content()


def test_page_shows_the_served_model(page):
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny-model")
    sync_api.expect(page.locator("#context-size")).to_have_text("64")
    for id_ in ("prompt", "max-tokens", "temperature", "top-k", "top-p", "n", "seed", "api-key"):
        assert page.locator(f'label[for="{id_}"]').count() == 1, f"#{id_} has no label"


def test_streamed_text_equals_the_api_answer(page, server):
    page.fill("#prompt", PROMPT)
    fill_options(page, max_tokens="30", seed="1234", temperature="0.9", top_k="40", top_p="0.95")
    generate(page)
    assert page.locator("#error").text_content() == ""
    assert page.locator("#output [data-choice]").count() == 1
    choice = page.locator('#output [data-choice="0"]')
    assert choice.locator(".prompt").text_content() == PROMPT
    assert "Done" in page.locator("#status").text_content()

    body = {"prompt": PROMPT, "max_tokens": 30, "seed": 1234, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    expected = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert completion(page, 0) == expected["text"]
    assert expected["text"]  # the tiny model's 30 tokens are never all empty text
    assert expected["finish_reason"] in choice.locator(".finish").text_content()


def test_n_choices_get_one_box_each(page, server):
    page.fill("#prompt", PROMPT)
    fill_options(page, max_tokens="12", n="2", seed="7")
    generate(page)
    assert page.locator("#error").text_content() == ""
    boxes = page.locator("#output [data-choice]")
    assert [boxes.nth(i).get_attribute("data-choice") for i in range(boxes.count())] == ["0", "1"]

    body = {"prompt": PROMPT, "max_tokens": 12, "n": 2, "seed": 7}
    expected = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [completion(page, i) for i in (0, 1)] == [c["text"] for c in expected]


@pytest.mark.parametrize("options, message", [
    ({"temperature": "0", "n": "2"}, "must be 1 with greedy decoding"),
    ({"max_tokens": "64"}, "max_tokens is too large"),
])
def test_server_errors_are_shown(page, options, message):
    page.fill("#prompt", PROMPT)
    fill_options(page, **options)
    generate(page)
    sync_api.expect(page.locator("#error")).to_contain_text(message)
    assert page.locator("#output [data-choice]").count() == 0


def test_an_error_in_the_stream_is_shown_after_the_text_so_far(page):
    """The server reports a failure after the response started as an error event; the event is
    stood in here, since the real server only sends one when decoding itself fails."""
    chunk = ('{"id":"cmpl-1","object":"text_completion","created":1,"model":"tiny-model",'
             '"choices":[{"index":0,"text":" jumped","logprobs":null,"finish_reason":null}]}')
    error = '{"error":{"message":"decoding failed","type":"server_error","param":null,"code":null}}'
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=f"data: {chunk}\n\ndata: {error}\n\ndata: [DONE]\n\n"))
    page.fill("#prompt", PROMPT)
    generate(page)
    sync_api.expect(page.locator("#error")).to_have_text("decoding failed")
    assert completion(page, 0) == " jumped"


def test_stop_aborts_a_request_that_has_not_answered(page):
    """The server's answer is held back, so Stop is sure to land while the request is open."""
    held = []

    def hold(route):  # never answered
        held.append(route)

    page.route("**/v1/completions", hold)
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    sync_api.expect(page.locator("#generate")).to_be_disabled()
    for _ in range(200):  # the sync API runs route handlers while it waits
        if held:
            break
        page.wait_for_timeout(25)
    assert len(held) == 1, "the request never reached the route"
    page.click("#stop")
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    sync_api.expect(page.locator("#status")).to_have_text("Stopped.")
    assert page.locator("#error").text_content() == ""


def test_stop_mid_stream_keeps_the_text_so_far(page, server):
    """The page's network is slowed (Chrome's own throttling) so the stream is still arriving
    when Stop is clicked; the text shown is then a strict prefix of the whole answer."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {  # ~12 kB of events at 2 kB/s
        "offline": False, "latency": 0, "downloadThroughput": 2000, "uploadThroughput": -1})
    page.fill("#prompt", PROMPT)
    fill_options(page, max_tokens="60", seed="3")
    page.click("#generate")
    text = page.locator('#output [data-choice="0"] .completion')
    sync_api.expect(text).not_to_have_text("")
    page.click("#stop")
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    sync_api.expect(page.locator("#status")).to_have_text("Stopped.")
    assert page.locator("#error").text_content() == ""

    body = {"prompt": PROMPT, "max_tokens": 60, "seed": 3}
    full = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    shown = text.text_content()
    assert full.startswith(shown) and len(shown) < len(full)

    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    generate(page)  # and the page works again
    assert page.locator("#error").text_content() == ""
    assert completion(page, 0) == full


def test_api_key_field_is_sent(browser, tiny_model):
    with running_server(create_app(tiny_model, ServerConfig(api_key="k"), "tiny-model")) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(url + "/")
            sync_api.expect(page.locator("#error")).to_contain_text("missing API key")
            sync_api.expect(page.locator("#model-name")).to_have_text("tiny-model")  # from /health

            page.fill("#prompt", PROMPT)
            fill_options(page, max_tokens="5", seed="1")
            generate(page)
            sync_api.expect(page.locator("#error")).to_contain_text("missing API key")
            assert page.locator("#output [data-choice]").count() == 0

            page.click("summary")
            page.fill("#api-key", "k")
            generate(page)
            assert page.locator("#error").text_content() == ""
            assert completion(page, 0)
            sync_api.expect(page.locator("#context-size")).to_have_text("64")
        finally:
            page.close()


# ---- the chat tab ----------------------------------------------------------------------------

def chat_tab(page) -> None:
    page.click("#tab-chat")
    sync_api.expect(page.locator("#message")).to_be_visible()
    sync_api.expect(page.locator("#generate")).to_have_text("Send")
    assert page.locator("#prompt").is_hidden() and page.locator("#n").is_hidden()


def send(page, text: str) -> None:
    page.fill("#message", text)
    generate(page)


def turns(page) -> list[tuple[str, str]]:
    """(class, text) of each turn in the chat log."""
    log = page.locator("#chat-log .turn")
    return [(log.nth(i).get_attribute("class").split()[1], log.nth(i).locator(".content").text_content())
            for i in range(log.count())]


def chat_answer(server: str, messages: list[dict], **options) -> str:
    body = {"messages": messages, **options}
    return httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


def test_chat_tab_keeps_the_conversation_and_streams_the_api_answer(page, server):
    chat_tab(page)
    for id_ in ("system", "message"):
        assert page.locator(f'label[for="{id_}"]').count() == 1, f"#{id_} has no label"
    page.fill("#system", "Be brief.")
    fill_options(page, max_tokens="8", seed="5")
    send(page, "Hi there")
    assert page.locator("#error").text_content() == "" and "Done" in page.locator("#status").text_content()
    options = {"max_tokens": 8, "seed": 5, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    system = {"role": "system", "content": "Be brief."}
    first = chat_answer(server, [system, {"role": "user", "content": "Hi there"}], **options)
    assert turns(page) == [("user", "Hi there"), ("assistant", first)] and first
    assert page.locator("#message").input_value() == ""

    page.fill("#message", "And then?")
    page.press("#message", "Enter")  # Enter sends
    sync_api.expect(page.locator("#chat-log .turn")).to_have_count(4)
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    history = [system, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert turns(page)[3] == ("assistant", chat_answer(server, history, **options))

    page.click("#reset-chat")
    assert turns(page) == []
    send(page, "Hi there")  # a new chat: the first answer again
    assert turns(page) == [("user", "Hi there"), ("assistant", first)]


def test_a_refused_chat_message_is_shown_and_given_back(page):
    chat_tab(page)
    fill_options(page, max_tokens="64")
    send(page, "Hello")
    sync_api.expect(page.locator("#error")).to_contain_text("max_tokens is too large")
    assert turns(page) == [] and page.locator("#message").input_value() == "Hello"


def test_the_tabs_keep_their_own_output(page, server):
    page.fill("#prompt", PROMPT)
    fill_options(page, max_tokens="5", seed="1")
    generate(page)
    text = completion(page, 0)
    chat_tab(page)
    assert page.locator("#output").is_hidden()
    send(page, "Hi")
    page.click("#tab-completion")
    sync_api.expect(page.locator("#generate")).to_have_text("Generate")
    assert page.locator("#chat-log").is_hidden() and completion(page, 0) == text
    page.click("#tab-chat")
    assert [role for role, _ in turns(page)] == ["user", "assistant"]
