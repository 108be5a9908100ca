"""The chat as a newcomer and a returning user meet it, in real Chromium against the real server.py
with the real default model: the first answer at default settings, what the browser remembers,
the sidebar at both viewports, and switching the model from the chat."""

import re

import pytest

from tests.browser import (
    ARTEFACTS,
    FINISHED,
    MODEL,
    PHONE,
    bot_messages,
    open_page,
    open_parameters,
    open_tab,
    reload,
    reply_text,
    send,
    wait_for_status,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def sidebar_open(page) -> bool:
    return page.evaluate("document.querySelector('#conversation-sidebar').classList.contains('open')")


def test_the_first_question_at_default_settings_names_paris_ten_times_out_of_ten(page):
    # The embedded model's defaults: its card's sampling (temperature 0.2, top_p 0.9) and a system message.
    open_parameters(page)
    temperature = page.locator("#param-temperature input[type=number]")
    wait_until(lambda: temperature.input_value() == "0.2", "the model's own temperature")
    assert page.locator("#param-top_p input[type=number]").input_value() == "0.9"
    page.get_by_role("tab", name="Chat").click()
    answers, seeds = [], []
    for _run in range(10):  # a new chat each time, random seeds, nothing set by hand
        page.locator("#new-chat").click()
        wait_until(lambda: bot_messages(page).count() == 0, "a new chat")
        send(page, "What is the capital of France?")
        wait_for_status(page, FINISHED)
        answers.append(reply_text(bot_messages(page).last))
        seeds.append(re.search(r"seed (\d+)", page.locator("#chat-status").inner_text()).group(1))
    assert all("Paris" in answer for answer in answers), answers
    assert len(set(seeds)) > 1  # sampled, not greedy


def test_a_reload_brings_back_the_conversation_the_parameters_and_the_preset(browser, ui_server):
    page = open_page(browser, ui_server)
    try:
        open_parameters(page)
        page.locator("#preset-choice input").click()
        page.locator('li[role=option][aria-label="Precise"]').click()
        page.locator("#preset-load").click()
        wait_for_status(page, "Loaded “Precise”", selector="#preset-status")
        tokens = page.locator("#param-max_new_tokens input[type=number]")
        tokens.fill("6")
        tokens.press("Enter")
        tokens.blur()
        page.get_by_role("tab", name="Chat").click()
        send(page, "Name a fruit.")
        assert wait_for_status(page, FINISHED).startswith("Reached max new tokens (6 tokens")
        reply = reply_text(bot_messages(page).last)

        reload(page)
        wait_until(lambda: bot_messages(page).count() == 1, "the conversation this browser had open")
        assert reply_text(bot_messages(page).last) == reply
        open_parameters(page)
        wait_until(lambda: tokens.input_value() == "6", "max_new_tokens as this browser left it")
        assert page.locator("#param-temperature input[type=number]").input_value() == "0.3"  # from Precise
        assert page.locator("#preset-choice input").input_value() == "Precise"
    finally:
        page.context.close()
    other = open_page(browser, ui_server)  # another browser remembers nothing of this one
    try:
        open_parameters(other)
        wait_until(lambda: other.locator("#param-temperature input[type=number]").input_value() == "0.2",
                   "the model's defaults")
        assert other.locator("#param-max_new_tokens input[type=number]").input_value() == "512"
        assert bot_messages(other).count() == 0
    finally:
        other.context.close()


def test_the_sidebar_is_open_on_a_desk_closed_on_a_phone_and_stays_as_left(browser, ui_server):
    page = open_page(browser, ui_server)
    try:
        wait_until(lambda: sidebar_open(page), "the sidebar open on a wide screen")
        assert page.locator("#new-chat").is_visible()
        page.screenshot(path=str(ARTEFACTS / "sidebar-1440.png"))
        page.locator("#conversation-sidebar .toggle-button").click()
        wait_until(lambda: not sidebar_open(page), "the sidebar closed")
        reload(page)
        page.wait_for_timeout(1500)  # the page script has run by now
        assert not sidebar_open(page)  # as this browser left it
    finally:
        page.context.close()

    phone = open_page(browser, ui_server, **PHONE)
    try:
        send(phone, "Say hi.")
        wait_for_status(phone, FINISHED)
        wait_until(lambda: not sidebar_open(phone), "the sidebar closed on a phone")
        for selector in ("#chat-input textarea", "#send"):  # on the first screen, no scrolling
            box = phone.locator(selector).bounding_box()
            assert box["y"] + box["height"] <= 844, (selector, box)
        phone.locator("#conversation-sidebar .toggle-button").click()
        wait_until(lambda: phone.locator("#new-chat").is_visible(), "the conversations")
        phone.screenshot(path=str(ARTEFACTS / "sidebar-390.png"))
        phone.locator("#new-chat").click()
        wait_until(lambda: not sidebar_open(phone), "the sidebar to close after New chat")
        phone.locator("#conversation-sidebar .toggle-button").click()
        phone.locator("#conversation-list label").filter(has_text="Say hi.").first.click()
        wait_until(lambda: bot_messages(phone).count() == 1, "the picked conversation")
        wait_until(lambda: not sidebar_open(phone), "the sidebar to close after a pick")
    finally:
        phone.context.close()


def test_the_model_can_be_switched_from_above_the_chat(page):
    switch = page.locator("#chat-model-switch")
    wait_until(lambda: MODEL in switch.locator("input").input_value(), "the loaded model in the switch")
    switch.locator("input").click()
    page.locator('li[role=option][aria-label="hollow"]').click()  # a folder without weights
    status = wait_for_status(page, r"^⚠️")
    assert "hollow" in status and "Traceback" not in status
    assert MODEL in page.locator("#chat-model").inner_text()  # the model in use stays
    switch.locator("input").click()
    page.locator(f'li[role=option][aria-label="{MODEL}"]').click()
    wait_for_status(page, rf"^Loaded: {MODEL} with llama.cpp")
    wait_until(lambda: MODEL in switch.locator("input").input_value(), "the switch to show the model")


@pytest.mark.parametrize("viewport", [{"width": 1440, "height": 900}, {"width": 390, "height": 844}],
                         ids=["1440", "390"])
def test_every_tab_fits_the_screen_width_and_is_saved_as_a_screenshot(browser, ui_server, viewport):
    page = open_page(browser, ui_server, viewport=viewport)
    try:
        for tab in ("Chat", "Notebook", "Model", "Characters", "Extensions"):
            open_tab(page, tab)
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTEFACTS / f"tab-{tab.lower()}-{viewport['width']}.png"), full_page=True)
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"the {tab} tab is {overflow} px wider than the screen"
        open_tab(page, "Chat")
        open_parameters(page)  # the Parameters panel beside the chat (a sheet on a phone)
        page.wait_for_timeout(400)  # its slide in
        page.screenshot(path=str(ARTEFACTS / f"parameters-{viewport['width']}.png"))
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the Parameters panel is {overflow} px wider than the screen"
    finally:
        page.context.close()
