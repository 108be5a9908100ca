"""The real UI in real Chromium against a real server.py with the real default model."""

import re
import time

import pytest

from tests.browser import (
    ARTEFACTS,
    MODEL,
    bot_messages,
    reload,
    reply_text,
    send,
    set_parameter,
    start_long_story,
    wait_for_status,
    wait_until,
    watch_console,
)
from tests.helpers import CAPITAL_QUESTION

pytestmark = [pytest.mark.browser, pytest.mark.slow]

def test_chat_streams_a_greedy_answer_naming_paris(page):
    set_parameter(page, "temperature", 0)
    # Every text the reply shows, recorded in the page as it is drawn (polling from outside can
    # miss the partial texts of a short answer on a busy machine).
    page.evaluate("""() => {
        window.__seen = new Set();
        const chat = document.querySelector('#chatbot');
        new MutationObserver(() => {
            const bots = chat.querySelectorAll('[data-testid="bot"]');
            if (bots.length) window.__seen.add(bots[bots.length - 1].innerText);
        }).observe(chat, {childList: true, subtree: true, characterData: true});
    }""")
    send(page, CAPITAL_QUESTION)
    wait_for_status(page, r"^Done")
    final = reply_text(bot_messages(page).last)
    assert "Paris" in final
    seen = set(page.evaluate("() => [...window.__seen]"))
    partial = {text for text in seen if text.strip() and text.strip() != final.strip()}
    assert partial, "the reply appeared all at once instead of streaming"
    assert re.search(r"Done \(\d+ tokens, [\d.]+ tokens/s, seed \d+\)", page.locator("#chat-status").inner_text())
    assert page.locator('#chatbot [data-testid="user"]').last.inner_text() == CAPITAL_QUESTION


def test_stop_mid_stream_stops_the_stream(page):
    bot = start_long_story(page, 600)
    page.locator("#stop").click()
    status = wait_for_status(page, r"^Stopped")
    stopped_text = reply_text(bot.last)
    time.sleep(2)
    assert reply_text(bot.last) == stopped_text, "text kept growing after Stop"
    tokens = int(re.search(r"(\d+) tokens", status).group(1))
    assert tokens < 300  # far from the 600 it would have written


def test_regenerate_and_new_chat(page):
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", 20)
    send(page, "Say hello.")
    wait_for_status(page, r"^(Done|Reached)")
    first = reply_text(bot_messages(page).last)
    page.locator("#regenerate").click()
    wait_for_status(page, r"^(Done|Reached)")
    assert bot_messages(page).count() == 1  # replaced, not appended
    assert reply_text(bot_messages(page).last) == first  # greedy: the same reply again
    page.locator("#new-chat").click()
    deadline = time.monotonic() + 30
    while bot_messages(page).count() or page.locator('#chatbot [data-testid="user"]').count():
        assert time.monotonic() < deadline, "New chat did not empty the chat"
        time.sleep(0.1)


def test_empty_message_is_refused_politely(page):
    send(page, "   ")
    wait_for_status(page, "Type a message first")
    assert bot_messages(page).count() == 0


def test_model_tab_lists_the_default_model_and_every_loaders_reason(page):
    page.get_by_role("tab", name="Model").click()
    status = page.locator("#model-status")
    status.wait_for()
    assert f"Loaded: {MODEL} with llama.cpp on cpu" in status.inner_text()
    assert page.locator("#model-choice input").input_value() == MODEL
    candidates = page.locator("#loader-candidates")
    deadline = time.monotonic() + 60
    while "Transformers" not in candidates.inner_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    table = candidates.inner_text()
    assert re.search(r"llama\.cpp\s+can load\s+100\s+SmolLM2-135M-Instruct\.Q4_1\.gguf \(Q4_1\), run quantized by llama\.cpp", table)
    assert re.search(r"Transformers\s+can load\s+50\s+GGUF file \(Q4_1\), dequantized by transformers", table)
    assert re.search(r"AutoGPTQ\s+cannot load\s+–\s+not a GPTQ model", table)
    assert re.search(r"ExLlamaV2\s+unavailable\s+–\s+(exllamav2 is not installed|no CUDA device)", table)
    page.locator("#loader-choice input").click()
    loader_options = page.locator("li[role=option]").all_inner_texts()
    assert any("auto → llama.cpp" in option for option in loader_options), loader_options
    assert any("Transformers: can load (priority 50), GGUF file" in option for option in loader_options)
    page.keyboard.press("Escape")
    page.locator("#model-choice input").click()
    options = page.locator("li[role=option]").all_inner_texts()
    assert any(MODEL in option for option in options) and any("hollow" in option for option in options)


def test_loading_a_folder_without_weights_says_why_and_keeps_the_model(page):
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-choice input").click()
    page.locator('li[role=option][aria-label="hollow"]').click()
    details = page.locator("#model-details")
    deadline = time.monotonic() + 60
    while "hollow" not in details.inner_text():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    page.locator("#load-model").click()
    status = page.locator("#model-status")
    deadline = time.monotonic() + 60
    while "hollow holds no weight files" not in status.inner_text():
        assert time.monotonic() < deadline, status.inner_text()
        time.sleep(0.1)
    assert f"Loaded: {MODEL}" in status.inner_text()  # the previous model is still there
    page.get_by_role("tab", name="Chat").click()
    set_parameter(page, "temperature", 0)
    send(page, CAPITAL_QUESTION)
    wait_for_status(page, r"^Done")
    assert "Paris" in reply_text(bot_messages(page).last)


def test_two_users_chat_at_once_and_each_stop_is_their_own(browser, ui_server):
    pages = []
    for _ in range(2):
        context = browser.new_context()
        page = context.new_page()
        watch_console(page)
        page.set_default_timeout(60_000)
        page.goto(ui_server)
        page.locator("#chat-input textarea").wait_for()
        set_parameter(page, "temperature", 0)
        pages.append(page)
    alice, bob = pages
    try:
        set_parameter(alice, "max_new_tokens", 600)
        send(alice, "Write a very long story about a lighthouse keeper.")
        set_parameter(bob, "max_new_tokens", 60)
        send(bob, CAPITAL_QUESTION)
        # Bob waits behind Alice, and sees his place in the queue or his reply start.
        wait_for_status(bob, r"Waiting in the queue: position 1|Generating|Done")
        while not (bot_messages(alice).count() and reply_text(bot_messages(alice).last)):
            time.sleep(0.05)
        alice.locator("#stop").click()
        wait_for_status(alice, r"^Stopped")
        bob_status = wait_for_status(bob, r"^(Done|Reached)")
        assert "Paris" in reply_text(bot_messages(bob).last), bob_status
        assert "Stopped" not in bob_status
    finally:
        for page in pages:
            page.context.close()


def test_enter_sends_and_shift_enter_adds_a_line(page):
    box = page.locator("#chat-input textarea")
    assert box.get_attribute("placeholder") == "Message"  # no keyboard advice a phone cannot follow
    set_parameter(page, "max_new_tokens", 5)
    box.click()
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    time.sleep(1)
    assert box.input_value() == "first line\nsecond line"  # Shift+Enter: a new line, nothing sent
    assert page.locator('#chatbot [data-testid="user"]').count() == 0
    box.press("Enter")
    wait_for_status(page, r"^(Done|Reached)")
    assert page.locator('#chatbot [data-testid="user"]').last.inner_text() == "first line\nsecond line"
    assert box.input_value() == ""


def test_the_next_message_can_be_typed_while_a_reply_streams(page):
    """Each streamed redraw used to send the message box "" again, wiping what the user typed."""
    bot = start_long_story(page, 160)
    box = page.locator("#chat-input textarea")
    box.click()
    box.type("And what did the dragon bake next?", delay=20)
    assert not re.match(r"^(Done|Reached)", page.locator("#chat-status").inner_text())  # typed while it streamed
    status = wait_for_status(page, r"^(Done|Reached)")
    assert re.search(r"\((\d{2,}) tokens", status), status  # the reply went on streaming while we typed
    assert box.input_value() == "And what did the dragon bake next?"
    box.press("Enter")
    users = page.locator('#chatbot [data-testid="user"]')
    wait_until(lambda: users.count() == 2, "the typed message to be sent")
    assert users.last.inner_text() == "And what did the dragon bake next?"  # the bubble first, at once
    wait_until(lambda: box.input_value() == "", "the box emptied as the turn starts")
    wait_until(lambda: bot.count() == 2 and reply_text(bot.last).strip(), "the second reply to start")
    page.locator("#stop").click()  # its end is not what this checks
    wait_for_status(page, r"^(Stopped|Done|Reached)")


def test_loading_shows_what_is_loading_then_the_loaded_model(page):
    page.get_by_role("tab", name="Model").click()
    page.evaluate("""() => {
        window.__statuses = [];
        window.__bars = 0;
        const status = document.querySelector('#model-status');
        new MutationObserver(() => {
            window.__statuses.push(status.innerText);
            window.__bars += status.querySelectorAll('progress.load-bar').length;
        })
            .observe(status, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#load-model").click()

    def seen():
        statuses = page.evaluate("window.__statuses")
        return statuses if statuses and statuses[-1].startswith(f"Loaded: {MODEL}") else None

    statuses = wait_until(seen, "the loaded model's name after loading")
    assert any(s.startswith(f"⏳ Loading {MODEL} with llama.cpp… 0 s") for s in statuses), statuses
    assert page.evaluate("window.__bars") > 0  # a bar that says it is busy: no earlier load to time it by
    page.evaluate("window.__statuses = []")
    page.locator("#load-model").click()  # again: now timed against the load before
    statuses = wait_until(seen, "the loaded model's name after loading again")
    assert any(re.match(rf"⏳ Loading {MODEL} with llama.cpp… 0 s of about \d+ s \(its last load\)", s)
               for s in statuses), statuses
    wait_until(lambda: page.locator("#cancel-load").is_disabled(), "Cancel load off once nothing loads")


# Counts the animation frames the page asks for.
COUNT_FRAMES = """
  window.__frames = 0;
  const ask = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => { window.__frames++; return ask(callback); };
"""


def test_the_chat_names_the_model_is_idle_when_idle_renders_math_keeps_dark_mode_and_no_run_history(
        browser, ui_server):
    from tests.browser import open_page

    page = open_page(browser, ui_server, init_script=COUNT_FRAMES)
    try:
        line = page.locator("#chat-model")
        wait_until(lambda: MODEL in line.inner_text(), "the model above the chat")
        assert "llama.cpp" in line.inner_text()
        # Idle, the page asks for no animation frames: Gradio's app-wide loading tracker used to leave
        # a 60-frames-a-second timer running forever (10 % of a core), and the logo shown over each
        # component while the page loaded went on moving for seconds once gone: webui/frontend_fixes.py.
        page.wait_for_timeout(1000)  # the page's own load events are done
        page.evaluate("() => { window.__frames = 0; }")
        page.wait_for_timeout(1000)
        assert page.evaluate("() => window.__frames") < 5  # about 60 before the mends
        from loadstar.webui.frontend_fixes import mended_assets

        for name, body in mended_assets().items():  # the mended files are the ones served
            assert page.request.get(f"{ui_server.rstrip('/')}/assets/{name}").body() == body
        # Inline and display math in a message render with KaTeX (an edited reply is enough: no model needed).
        set_parameter(page, "max_new_tokens", 1)
        send(page, "Inline $x^2$ and display $$\\int_0^1 x\\,dx$$")
        wait_for_status(page, r"^(Done|Reached)")
        user = page.locator('#chatbot [data-testid="user"]').last
        wait_until(lambda: user.locator(".katex").count() >= 2, "KaTeX in the message")
        assert user.locator(".katex-display").count() == 1  # $$…$$ is display math, $…$ inline
        # Gradio's run history would copy each event's inputs and outputs (the whole conversation)
        # into the browser's storage, rewritten on every update (a second of CPU a turn at message
        # 15), and serve a page to send them to a Hugging Face bucket: off.
        stored = page.evaluate("() => Object.keys(localStorage)")
        assert stored and not [key for key in stored if key.startswith("gradio:run-history")], stored
        assert page.request.get(f"{ui_server.rstrip('/')}/gradio_api/runs").status == 404

        assert not page.evaluate("document.body.classList.contains('dark')")
        page.locator("#dark-mode").click()
        wait_until(lambda: page.evaluate("document.body.classList.contains('dark')"), "dark mode")
        reload(page)
        wait_until(lambda: page.evaluate("document.body.classList.contains('dark')"), "dark mode after a reload")
        page.screenshot(path=str(ARTEFACTS / "chat-dark-1440.png"))
    finally:
        page.context.close()


def test_on_a_phone_the_chat_and_message_box_are_on_the_first_screen(browser, ui_server):
    from tests.browser import open_page

    page = open_page(browser, ui_server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        box = page.locator("#chat-input textarea").bounding_box()
        chat = page.locator("#chatbot").bounding_box()
        assert chat["y"] < 844 and box["y"] + box["height"] <= 844, (chat, box)  # no scrolling to reach them
        page.screenshot(path=str(ARTEFACTS / "chat-390.png"), full_page=True)
        page.set_viewport_size({"width": 1440, "height": 900})
        page.screenshot(path=str(ARTEFACTS / "chat-1440.png"))
    finally:
        page.context.close()


def test_loader_options_are_drawn_from_the_loader_and_remembered(browser, ui_server):
    from tests.browser import open_page

    page = open_page(browser, ui_server)
    try:
        page.get_by_role("tab", name="Model").click()
        page.locator("#loader-options").get_by_text("Loader options").first.click()
        context_box = page.locator("#option-llama-cpp-n_ctx input")
        context_box.wait_for()
        assert page.locator("#option-llama-cpp-use_mmap input").is_checked()
        assert not page.locator("#options-autogptq").is_visible()  # only the loader Load would use
        estimate = page.locator("#memory-estimate")
        wait_until(lambda: "of weights" in estimate.inner_text(), "the memory estimate")
        context_box.fill("1024")
        context_box.press("Enter")
        # the estimate follows the option: a KV cache of 1,024 tokens for each of the 4 requests of a batch
        wait_until(lambda: "4 requests × 1,024 tokens" in estimate.inner_text(), "the estimate for 1024 tokens")
        page.locator("#load-model").click()
        status = page.locator("#model-status")
        wait_until(lambda: "context 1024" in status.inner_text(), "the model loaded with context 1024")
        page.screenshot(path=str(ARTEFACTS / "model-options-1440.png"), full_page=True)
    finally:
        page.context.close()
    page = open_page(browser, ui_server)  # a new page shows what the model was loaded with
    try:
        page.get_by_role("tab", name="Model").click()
        page.locator("#loader-options").get_by_text("Loader options").first.click()
        context_box = page.locator("#option-llama-cpp-n_ctx input")
        wait_until(lambda: context_box.input_value() == "1024", "the remembered context length")
        context_box.fill("0")  # back to the default (the model's own context) for the other tests
        context_box.press("Enter")
        page.locator("#load-model").click()
        wait_until(lambda: "context 1024" not in page.locator("#model-status").inner_text()
                   and "Loaded:" in page.locator("#model-status").inner_text(), "the default context again")
    finally:
        page.context.close()
