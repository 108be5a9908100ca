"""The chat's controls as a user of Open WebUI or LM Studio expects them, in Chromium with the real
model: Send turns into Stop, buttons act only when they can, notices where the user looks (also on
a phone), a message without a model refused before it is saved, a reply cut by a reload marked,
and characters (an imported card's greeting, name and picture)."""

import base64
import io
import json

import pytest

from tests.browser import (
    ARTEFACTS,
    FINISHED,
    MODEL,
    PHONE,
    bot_messages,
    open_page,
    open_tab,
    reload,
    reply_text,
    send,
    set_parameter,
    start_long_story,
    wait_for_status,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def user_messages(page):
    return page.locator('#chatbot [data-testid="user"]')


def test_send_turns_into_stop_buttons_follow_the_chat_and_a_reload_marks_a_cut_reply(browser, ui_server):
    page = open_page(browser, ui_server, viewport={"width": 1440, "height": 900})
    try:
        for button in ("#regenerate", "#continue", "#remove-last"):  # an empty chat: nothing to act on
            wait_until(lambda b=button: page.locator(b).is_disabled(), f"{button} off on an empty chat")
        assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
        start_long_story(page, 400)
        wait_until(lambda: page.locator("#stop").is_visible() and not page.locator("#send").is_visible(),
                   "Stop in place of Send while the reply streams")
        assert page.locator("#regenerate").is_disabled()
        page.screenshot(path=str(ARTEFACTS / "chat-streaming-1440.png"))
        reload(page)  # the page goes while the reply is written: what came is kept, marked
        wait_until(lambda: bot_messages(page).count() == 1, "the conversation reopened")
        ending = bot_messages(page).last.locator(".reply-meta .ending")
        wait_until(lambda: ending.count() and "interrupted" in ending.inner_text(), "the reply marked interrupted")
        assert reply_text(bot_messages(page).last)  # its text kept
        wait_until(lambda: page.locator("#regenerate").is_enabled() and page.locator("#send").is_visible(),
                   "Regenerate on with a reply, Send back")
        assert page.locator("#remove-last").is_enabled() and not page.locator("#stop").is_visible()
    finally:
        page.context.close()


def test_notices_show_by_the_box_on_a_phone_and_no_model_means_a_refusal_not_a_saved_question(browser, ui_server):
    phone = open_page(browser, ui_server, **PHONE)
    try:
        phone.locator("#send").click()  # nothing typed
        notice = phone.locator("#chat-status")
        wait_for_status(phone, "Type a message first")
        box = notice.bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= 844, box  # on the screen, beside the message box
        buttons = [phone.locator(b).bounding_box() for b in ("#send", "#regenerate", "#continue", "#remove-last")]
        assert len({round(b["y"]) for b in buttons}) == 1, buttons  # one row of buttons on a phone
        tabs = phone.locator("button[role=tab]").all_inner_texts()
        assert tabs == ["Chat", "Notebook", "Model", "Characters", "Extensions"], tabs  # none behind "⋯"
        phone.screenshot(path=str(ARTEFACTS / "chat-notice-390.png"))
        notice.click(position={"x": box["width"] - 12, "y": box["height"] / 2})  # its ×
        wait_until(lambda: not notice.is_visible(), "the notice dismissed")
    finally:
        phone.context.close()
    page = open_page(browser, ui_server)
    try:
        open_tab(page, "Model")
        page.locator("#unload-model").click()
        wait_for_status(page, "Model unloaded|No model was loaded", selector="#model-status")
        open_tab(page, "Chat")
        send(page, "Is anyone there?")
        status = wait_for_status(page, "No model is loaded")
        assert "Model" in status and user_messages(page).count() == 0  # refused before it was saved
        assert page.locator("#chat-input textarea").input_value() == "Is anyone there?"  # nothing lost
        assert not any(o.startswith("Is anyone there") for o in page.locator("#conversation-list label").all_inner_texts())
        open_tab(page, "Model")
        page.locator("#load-model").click()
        wait_for_status(page, f"^Loaded: {MODEL}", selector="#model-status")
    finally:
        page.context.close()


def card_png(path):
    """A character card as the common apps write it: a PNG with the card as base64 JSON in 'chara'."""
    from PIL import Image, ImageDraw, PngImagePlugin

    card = {"spec": "chara_card_v2", "data": {
        "name": "Captain Vex", "description": "{{char}} is a cheerful sky pirate who answers in one sentence.",
        "personality": "bold", "scenario": "", "first_mes": "Ahoy, {{user}}! Welcome aboard the Gull.",
        "mes_example": "<START>\n{{user}}: Hello\n{{char}}: Arr, hello!"}}
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", base64.b64encode(json.dumps(card).encode()).decode())
    image = Image.new("RGB", (300, 300), (30, 90, 160))
    ImageDraw.Draw(image).ellipse((60, 60, 240, 240), fill=(240, 200, 60))
    out = io.BytesIO()
    image.save(out, "PNG", pnginfo=info)
    path.write_bytes(out.getvalue())
    return path


def test_an_imported_character_card_greets_with_its_name_and_picture_and_is_who_answers(page, tmp_path):
    open_tab(page, "Characters")
    with page.expect_file_chooser() as chooser:
        page.locator("#character-import").click()
    chooser.value.set_files(str(card_png(tmp_path / "vex.png")))
    wait_for_status(page, "Imported", selector="#character-status")
    name = page.locator("#character-name input, #character-name textarea").first
    wait_until(lambda: name.input_value() == "Captain Vex", "the card's name in the form")
    assert "{{char}} is a cheerful sky pirate" in page.locator("#character-context textarea").input_value()
    page.locator("#character-picture img").wait_for()
    wait_until(lambda: page.locator("#character-source").inner_text().startswith("From "), "where it came from")
    assert "Imported" in page.locator("#character-status").inner_text()  # picking it did not hide that
    page.screenshot(path=str(ARTEFACTS / "characters-1440.png"))
    page.locator("#character-examples textarea").fill("<START>\n{{user}}: Hello\n{{char}}: Arr, hello!")
    page.locator("#character-save").click()  # an edit of a character with a picture: saved, picture kept
    wait_for_status(page, "Saved Captain Vex", selector="#character-status")
    page.locator("#character-picture img").wait_for()
    open_tab(page, "Chat")
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", 24)
    page.locator("#chat-character input").click()
    page.get_by_role("option", name="Captain Vex").click()
    wait_until(lambda: bot_messages(page).count() == 1, "the character's greeting")
    greeting = bot_messages(page).first
    assert reply_text(greeting) == "Ahoy, You! Welcome aboard the Gull."
    assert greeting.locator(".speaker").inner_text() == "Captain Vex"
    picture = greeting.locator(".speaker-picture").evaluate("p => getComputedStyle(p).backgroundImage")
    assert picture.startswith('url("data:image/png;base64,'), picture[:60]
    send(page, "Who are you?")
    wait_for_status(page, FINISHED)
    assert bot_messages(page).last.locator(".speaker").inner_text() == "Captain Vex"
    page.get_by_text("Prompt sent").click()
    prompt = page.locator("#prompt-text textarea").input_value()
    assert "Captain Vex is a cheerful sky pirate" in prompt and "Captain Vex: Arr, hello!" in prompt
    page.screenshot(path=str(ARTEFACTS / "chat-character-1440.png"))
    reload(page)  # the conversation remembers its character
    wait_until(lambda: bot_messages(page).count() == 2, "the conversation reopened")
    assert bot_messages(page).first.locator(".speaker").inner_text() == "Captain Vex"
    open_tab(page, "Characters")
    listing = page.locator("#character-list")
    listing.get_by_text("Captain Vex").click()
    wait_until(lambda: name.input_value() == "Captain Vex", "the character picked")
    page.locator("#character-delete").click()
    page.locator("#character-keep").click()  # a second thought: nothing is deleted
    assert listing.get_by_text("Captain Vex").count() == 1
    page.locator("#character-delete").click()
    page.locator("#character-confirm-delete").click()
    wait_for_status(page, "Deleted", selector="#character-status")
    wait_until(lambda: name.input_value() == "", "the form emptied")
    assert page.locator("#character-status").inner_text() == "Deleted."  # it stays to be read
    wait_until(lambda: listing.get_by_text("Captain Vex").count() == 0, "the character gone from the list")
