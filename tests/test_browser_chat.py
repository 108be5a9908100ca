"""Chat actions, conversations, presets, the Notebook and extensions, in real Chromium
against the real server.py with the real default model (greedy, so replies are repeatable)."""

import json
import re

import pytest

from tests.browser import (
    ARTEFACTS,
    FINISHED,
    bot_messages,
    open_page,
    open_parameters,
    reload,
    reply_text,
    send,
    set_parameter,
    user_messages,
    wait_for_status,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def chat_once(page, text, max_new_tokens=20):
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", max_new_tokens)
    send(page, text)
    return wait_for_status(page, FINISHED)


def test_continue_edit_copy_and_remove_last(browser, ui_server):
    page = open_page(browser, ui_server, permissions=["clipboard-read", "clipboard-write"])
    try:
        status = chat_once(page, "What is the capital of France?", max_new_tokens=4)
        assert status.startswith("Reached max new tokens (4 tokens")
        short = reply_text(bot_messages(page).last)
        page.locator("#continue").click()
        wait_for_status(page, FINISHED)
        longer = reply_text(bot_messages(page).last)
        assert bot_messages(page).count() == 1 and longer.startswith(short) and len(longer) > len(short)

        bot_messages(page).last.hover()
        page.locator('#chatbot button[aria-label="Copy message"]').last.click()
        assert wait_until(lambda: page.evaluate("navigator.clipboard.readText()") == longer, "the copied reply")

        user_messages(page).last.hover()
        page.locator('#chatbot button[aria-label="Edit"]').first.click()
        page.locator("#chatbot textarea").first.fill("What is the capital of Italy?")
        page.locator("#regenerate").click()  # with the edit box open: the edited text is saved and answered
        wait_for_status(page, FINISHED)  # one step: saved and answered at once
        assert user_messages(page).last.inner_text() == "What is the capital of Italy?"
        assert reply_text(bot_messages(page).last) != longer  # answered the edited question
        assert bot_messages(page).last.locator(".reply-meta .versions").inner_text().replace("\n", "") == "‹2/2›"
        page.get_by_text("Prompt sent").click()
        assert "capital of Italy?<|im_end|>" in page.locator("#prompt-text textarea").input_value()

        page.locator("#remove-last").click()
        wait_for_status(page, "Removed the last exchange")
        wait_until(lambda: user_messages(page).count() == 0 and bot_messages(page).count() == 0, "an empty chat")
    finally:
        page.context.close()


def test_system_message_reaches_the_prompt_shown_with_its_token_count(page):
    page.get_by_text("System message").first.click()
    box = page.locator("#system-message textarea")
    # Typed as soon as the box shows: the page's opening (which restores a conversation's system
    # message) once arrived after the typing on a busy machine and emptied the box again.
    box.fill("You are a pirate. Always say arr.")
    chat_once(page, "Hello", max_new_tokens=5)
    page.get_by_text("Prompt sent").click()
    prompt = page.locator("#prompt-text textarea").input_value()
    assert prompt.startswith("<|im_start|>system\nYou are a pirate. Always say arr.<|im_end|>\n<|im_start|>user\nHello")
    page.locator("#chat-input textarea").fill("And then?")
    page.locator("#preview-prompt").click()
    info = wait_for_status(page, r"\d+ tokens, model's own format", selector="#prompt-info")
    assert int(re.match(r"(\d+) tokens", info).group(1)) > 20
    assert page.locator("#prompt-text textarea").input_value().endswith(
        "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")


def conversation_options(page):
    """The conversation list in the sidebar: each entry's label (title · date)."""
    return [text.strip() for text in page.locator("#conversation-list label").all_inner_texts()]


def open_menu(page):
    menu = page.locator("#conversation-menu")
    if not page.locator("#rename-chat").is_visible():
        menu.get_by_text("This conversation").first.click()
    page.locator("#rename-chat").wait_for()


def test_conversations_are_saved_searched_renamed_reopened_and_deleted(page):
    chat_once(page, "Tell me about zebrafish.", max_new_tokens=8)
    # the list is refreshed by an event chained after the reply
    wait_until(lambda: any(o.startswith("Tell me about zebrafish.") for o in conversation_options(page)),
               "the conversation in the list")
    first_reply = reply_text(bot_messages(page).last)
    open_menu(page)
    title = page.locator("#conversation-title input, #conversation-title textarea").first
    # The Title box follows the automatic title, so Rename starts from it (it used to stay "New chat").
    wait_until(lambda: title.input_value().startswith("Tell me about zebrafish."), "the automatic title in the box")

    page.locator("#new-chat").click()
    wait_until(lambda: user_messages(page).count() == 0, "a new, empty chat")
    search = page.locator("#conversation-search input, #conversation-search textarea").first
    search.fill("zebrafish")
    search.press("Enter")
    wait_for_status(page, "1 conversation match", selector="#conversation-status")
    hits = conversation_options(page)
    assert len(hits) == 1 and "zebrafish" in hits[0].lower(), hits  # the list shows the matches only
    page.locator("#conversation-list label").first.click()
    wait_until(lambda: user_messages(page).count() == 1, "the conversation to reopen")
    assert reply_text(bot_messages(page).last) == first_reply
    search.fill("")
    search.press("Enter")

    title.fill("Fish notes")
    page.locator("#rename-chat").click()
    wait_for_status(page, "Renamed", selector="#conversation-status")
    wait_until(lambda: any(o.startswith("Fish notes") for o in conversation_options(page)), "the new title")

    page.locator("#delete-chat").click()
    page.locator("#keep-chat").click()  # a second thought: nothing is deleted
    assert any(o.startswith("Fish notes") for o in conversation_options(page))
    page.locator("#delete-chat").click()
    page.locator("#confirm-delete").click()
    wait_for_status(page, "Deleted", selector="#conversation-status")
    wait_until(lambda: not any(o.startswith("Fish notes") for o in conversation_options(page)), "it to go")
    assert user_messages(page).count() == 0


def test_export_and_import_a_conversation(page, tmp_path):
    chat_once(page, "Name a colour of the sky.", max_new_tokens=6)
    open_menu(page)
    with page.expect_download() as download:
        page.locator("#export-chat").click()
        page.locator("#export-file a").first.wait_for()
        page.locator("#export-file a").first.click()
    exported = json.loads(download.value.path().read_text())
    assert exported["messages"][0] == {"role": "user", "content": "Name a colour of the sky."}
    exported["title"] = "Imported sky"
    upload = tmp_path / "sky.json"
    upload.write_text(json.dumps(exported))
    page.locator("#new-chat").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#import-chat").click()
    chooser.value.set_files(str(upload))
    wait_for_status(page, "Imported as a new conversation", selector="#conversation-status")
    wait_until(lambda: user_messages(page).count() == 1, "the imported chat")
    wait_until(lambda: any(o.startswith("Imported sky") for o in conversation_options(page)), "the imported title")


def test_preset_save_and_load_changes_the_reply_length(page):
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", 7)
    open_parameters(page)
    assert "changed" in page.locator("#preset-choice").inner_text()  # the values are no preset's now
    page.locator("#preset-name input, #preset-name textarea").first.fill("seven tokens")
    page.locator("#preset-save").click()
    wait_for_status(page, "Saved “seven tokens”", selector="#preset-status")

    page.locator("#preset-choice input").click()
    page.locator('li[role=option][aria-label="Default"]').click()
    page.locator("#preset-load").click()
    wait_for_status(page, "Loaded “Default”", selector="#preset-status")
    assert "changed" not in page.locator("#preset-choice").inner_text()
    assert page.locator("#param-max_new_tokens input[type=number]").input_value() == "512"
    # the generic preset changes nothing the model's generation_config.json sets (temperature 0.2)
    assert page.locator("#param-temperature input[type=number]").input_value() == "0.2"

    page.locator("#preset-choice input").click()
    page.locator('li[role=option][aria-label="seven tokens"]').click()
    page.locator("#preset-load").click()
    wait_for_status(page, "Loaded “seven tokens”", selector="#preset-status")
    assert page.locator("#param-max_new_tokens input[type=number]").input_value() == "7"
    page.get_by_role("tab", name="Chat").click()
    send(page, "Write a poem about the sea.")
    assert wait_for_status(page, FINISHED).startswith("Reached max new tokens (7 tokens")

    open_parameters(page)
    page.locator("#preset-delete").click()
    wait_for_status(page, "Deleted “seven tokens”", selector="#preset-status")


def test_notebook_continues_text_counts_tokens_and_undoes(page):
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", 6)
    page.get_by_role("tab", name="Notebook").click()
    text = page.locator("#notebook-text textarea")
    text.fill("The capital of France is")
    page.locator("#notebook-count").click()
    wait_for_status(page, r"^\d+ tokens\.$", selector="#notebook-status")
    page.locator("#notebook-generate").click()
    wait_for_status(page, FINISHED, selector="#notebook-status")
    grown = text.input_value()
    assert grown.startswith("The capital of France is") and "Paris" in grown
    page.locator("#notebook-undo").click()
    wait_until(lambda: text.input_value() == "The capital of France is", "Undo")


def test_enabling_an_extension_shows_its_tab_and_panel(page):
    example_tab = page.get_by_role("tab", name="Example")
    assert example_tab.count() == 0
    page.get_by_role("tab", name="Extensions").click()
    switches = page.locator("#extension-switches")
    switches.get_by_label("example", exact=True).check()
    switches.get_by_label("reply_rules").check()
    wait_until(lambda: page.get_by_role("tab", name="Example").count() == 1, "the Example tab")
    table = page.locator("#plugin-table")
    wait_until(lambda: re.search(r"example\s+on", table.inner_text()), "example to show as on")
    page.get_by_role("tab", name="Example").click()
    assert "extensions/example" in page.locator("#example-extension-intro").inner_text()
    assert re.search(r"finished \d+ generations", page.locator("#example-extension-count").inner_text())
    page.get_by_role("tab", name="Chat").click()
    assert page.get_by_text("Reply rules").count() >= 1
    send(page, "/ping")
    wait_for_status(page, FINISHED)
    assert reply_text(bot_messages(page).last) == "pong"  # the example's generate hook answered

    page.get_by_role("tab", name="Extensions").click()
    switches.get_by_label("example", exact=True).uncheck()
    switches.get_by_label("reply_rules").uncheck()
    wait_until(lambda: page.get_by_role("tab", name="Example").count() == 0, "the Example tab to go")


def test_an_edit_is_one_step_and_keeps_the_old_reply_as_a_version(page):
    from tests.helpers import CAPITAL_QUESTION

    set_parameter(page, "temperature", 0)
    chat_once(page, "Say hello.", max_new_tokens=8)
    chat_once(page, "Say goodbye.", max_new_tokens=8)
    assert user_messages(page).count() == 2
    first_reply = reply_text(bot_messages(page).first)
    set_parameter(page, "max_new_tokens", 30)
    user_messages(page).first.hover()
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    box = page.locator("#chatbot textarea.edit-textarea").first
    # as wide as the chat, not the old ~150 px
    assert box.bounding_box()["width"] > 0.6 * page.locator("#chatbot").bounding_box()["width"]
    box.fill(CAPITAL_QUESTION)
    page.screenshot(path=str(ARTEFACTS / "chat-edit-1440.png"))
    box.press("Enter")  # Enter saves and answers again (Shift+Enter would add a line)
    wait_for_status(page, FINISHED)
    wait_until(lambda: user_messages(page).count() == 1, "the later messages replaced")
    assert user_messages(page).first.inner_text() == CAPITAL_QUESTION
    reply = bot_messages(page).last
    assert "Paris" in reply_text(reply)  # the new reply answers the edited text
    meta = reply.locator(".reply-meta")
    assert re.search(r"\d+\.\d\d s to first token · \d+\.\d tokens/s · \d+ tokens", meta.inner_text())
    reply.locator(".ls-prev").click()  # the old answer is the reply's first version
    wait_until(lambda: reply_text(bot_messages(page).last) == first_reply, "the earlier version")
    assert bot_messages(page).last.locator(".versions").inner_text().replace("\n", "") == "‹1/2›"
    page.screenshot(path=str(ARTEFACTS / "chat-versions-1440.png"))


def test_regenerate_keeps_the_earlier_replies_and_they_survive_a_reload(browser, ui_server):
    page = open_page(browser, ui_server)
    try:
        chat_once(page, "Name a colour.", max_new_tokens=16)  # greedy
        set_parameter(page, "temperature", 2)  # then replies that differ
        replies = [reply_text(bot_messages(page).last)]
        for count in (2, 3):
            page.locator("#regenerate").click()
            wait_for_status(page, rf"Reply {count}/{count} ")  # the status of this Regenerate, not the last one
            replies.append(reply_text(bot_messages(page).last))
        assert bot_messages(page).count() == 1
        bot_messages(page).last.locator(".ls-prev").click()  # the switcher under the reply
        wait_for_status(page, r"^Reply 2/3")
        assert reply_text(bot_messages(page).last) == replies[1]
        bot_messages(page).last.locator(".ls-prev").click()
        wait_for_status(page, r"^Reply 1/3")
        assert reply_text(bot_messages(page).last) == replies[0]
        reload(page)  # a new page: the browser reopens the conversation it had open
        wait_until(lambda: bot_messages(page).count() == 1, "the conversation to reopen")
        assert page.locator("#conversation-list label.selected").inner_text().startswith("Name a colour.")
        assert reply_text(bot_messages(page).last) == replies[0]  # the version in use was saved
        bot_messages(page).last.locator(".ls-next").click()
        wait_for_status(page, r"^Reply 2/3")
        assert reply_text(bot_messages(page).last) == replies[1]
    finally:
        page.context.close()


def test_a_reasoning_block_shows_collapsed_and_opens_on_a_click(page):
    chat_once(page, "Say yes.", max_new_tokens=3)
    bot_messages(page).last.hover()
    page.locator('#chatbot button[aria-label="Edit"]').last.click()
    # A reply as a reasoning model writes it (edited in, so the default model can stand in for one).
    page.locator("#chatbot textarea").first.fill(
        "<think>The user wants agreement.</think>\nYes.\n\n```python\nprint('yes')\n```")
    page.locator('#chatbot button[aria-label="Submit"]').first.click()
    wait_for_status(page, "Message edited")
    block = bot_messages(page).last.locator("details.reasoning")
    block.wait_for()
    assert block.locator("summary").inner_text() == "Reasoning"
    assert not block.evaluate("b => b.open") and "Yes." in reply_text(bot_messages(page).last)
    # a code block in a reply comes with its own copy button
    code = bot_messages(page).last.locator("pre")
    code.hover()
    assert code.locator("button").count() >= 1 or bot_messages(page).last.locator(".copy_code_button").count() >= 1
    block.locator("summary").click()
    wait_until(lambda: "The user wants agreement." in block.inner_text(), "the reasoning shown")
    page.screenshot(path=str(ARTEFACTS / "reasoning-1440.png"))
    reload(page)  # saved as the model's text, drawn again on opening
    assert bot_messages(page).last.locator("details.reasoning summary").inner_text() == "Reasoning"
