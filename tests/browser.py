"""Helpers for the browser tests: Debian chromium driven by playwright (never `playwright install`)."""

import os
import re
import time
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
MODEL = "SmolLM2-135M-Instruct"
FINISHED = r"^(Done|Reached|Stopped)"  # the chat's status once a reply has ended
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}  # a browser context's options
# Screenshots the browser tests take, to look at (git-ignored).
ARTEFACTS = Path(os.environ.get("LOADSTAR_TEST_ARTEFACTS", Path(__file__).resolve().parent.parent / "test-artefacts"))
ARTEFACTS.mkdir(parents=True, exist_ok=True)


def console_errors(browser) -> list[str]:
    """Errors the pages of ``browser`` logged to their consoles or threw (kept on the browser)."""
    if not hasattr(browser, "loadstar_errors"):
        browser.loadstar_errors = []
    return browser.loadstar_errors


def watch_console(page) -> None:
    """Record the page's console errors, except while it is being left on purpose (see ``reload``):
    the page then aborts its open connections and Gradio logs each one."""
    errors = console_errors(page.context.browser)

    def record(text: str) -> None:
        if not getattr(page, "loadstar_leaving", False):
            errors.append(f"{page.url}: {text}")

    page.on("console", lambda message: record(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: record(f"uncaught {error}"))


def reload(page) -> None:
    """Reload as a user does: what the old page logs while it goes is not an error of the app."""
    page.loadstar_leaving = True
    try:
        page.reload()
        page.locator("#chat-input textarea").wait_for()
    finally:
        page.loadstar_leaving = False


def open_page(browser, url, init_script: str | None = None, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    if init_script is not None:  # runs in the page before its own scripts
        page.add_init_script(init_script)
    watch_console(page)
    page.set_default_timeout(60_000)
    page.goto(url)
    page.locator("#chat-input textarea").wait_for()
    return page


def open_tab(page, name: str) -> None:
    """Click a tab; on a narrow screen the tabs that do not fit are under Gradio's "More tabs" (⋯)."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.is_visible():
        tab.click()
        return
    page.locator("button[aria-label='More tabs']").click()
    page.locator(".overflow-dropdown button").filter(has_text=name).first.click()


def parameters_open(page) -> bool:
    return page.evaluate("document.querySelector('#parameters-panel').classList.contains('open')")


def open_parameters(page, wanted: bool = True) -> None:
    """Open (or close) the Parameters panel beside the chat."""
    if parameters_open(page) != wanted:
        page.locator("#parameters-panel .toggle-button").click()
        wait_until(lambda: parameters_open(page) == wanted, "the Parameters panel " + ("open" if wanted else "closed"))


def set_parameter(page, name: str, value) -> None:
    """Set a parameter in the panel beside the chat, then close it (open, it covers the chat's right edge)."""
    open_parameters(page)
    box = page.locator(f"#param-{name} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()
    open_parameters(page, False)


def send(page, text: str) -> None:
    page.locator("#chat-input textarea").fill(text)
    page.locator("#send").click()


def bot_messages(page):
    return page.locator('#chatbot [data-testid="bot"]')


def reply_text(message) -> str:
    """A message's text as shown, without the lines the chat adds (the character's name above a
    reply, its versions and stats under it)."""
    return message.evaluate("""m => {
        const added = [...m.querySelectorAll('.reply-meta, .speaker')];
        added.forEach(a => { a.style.display = 'none'; });
        const text = m.innerText;
        added.forEach(a => { a.style.display = ''; });
        return text.trim();
    }""")


def start_long_story(page, max_new_tokens: int):
    """Ask for a long greedy story and wait until its reply shows text; returns the bot messages."""
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", max_new_tokens)
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    bot = bot_messages(page)
    wait_until(lambda: bot.count() and len(reply_text(bot.last)) > 5, "a reply to start", timeout=120)
    return bot


def user_messages(page):
    return page.locator('#chatbot [data-testid="user"]')


def wait_until(check, what: str, timeout: float = 60):
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_for_status(page, pattern: str, timeout: float = 120, selector: str = "#chat-status") -> str:
    status = page.locator(selector)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = status.inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"status never matched {pattern!r}; last: {status.inner_text()!r}")
