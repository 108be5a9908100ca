"""Attached files and tools in the chat, in real Chromium against the real server.py with the real
default model (greedy): files answered from, a long file searched with its passage quoted, a tool
call approved and its result used, a call rejected, and a hanging MCP server refused in one line.
The MCP servers are real ones (tests/mcp_test_server.py, over stdio)."""

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from loadstar.webui.remembered import CLOSE_SIDEBAR_ON_PHONE
from tests.browser import (
    ARTEFACTS,
    FINISHED,
    bot_messages,
    open_page,
    reply_text,
    send,
    set_parameter,
    user_messages,
    wait_for_status,
    wait_until,
)
from tests.documents import long_text, write_docx, write_pdf

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SERVER = str(Path(__file__).with_name("mcp_test_server.py"))
TOOLS_MODEL = "smol-tools"


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory):
    """server.py with the tools-capable copy of the default model and two MCP servers: one that
    serves todays_special and one that never answers."""
    from tests.folders import default_and_tools_models
    from tests.helpers import running_server

    root = tmp_path_factory.mktemp("tools-ui")
    models = default_and_tools_models(root / "models", TOOLS_MODEL)
    config = root / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {
        "kitchen": {"command": sys.executable, "args": [SERVER, "--only", "todays_special"]},
        "stuck": {"command": sys.executable, "args": [SERVER, "--hang"]},
    }, "startup_timeout": 5}))
    with running_server(root, "--models-dir", str(models), "--model", TOOLS_MODEL, "--mcp-config", str(config),
                        "--extensions", "mcp_servers") as url:
        # The model loads after the server answers; the fit line needs it (on a busy machine the
        # first test attached its file while it was still loading).
        wait_until(lambda: json.load(urllib.request.urlopen(f"{url}/health", timeout=10))["model_loaded"],
                   "the model to load", timeout=300)
        yield url + "/"


@pytest.fixture
def page(browser, tools_server):
    page = open_page(browser, tools_server, viewport={"width": 1440, "height": 900})
    set_parameter(page, "temperature", 0)
    set_parameter(page, "max_new_tokens", 40)
    yield page
    page.context.close()


def attach(page, *paths: Path) -> str:
    page.locator("#chat-input input[type=file]").set_input_files([str(p) for p in paths])
    return wait_until(lambda: (text := page.locator("#attachment-fit").inner_text().strip()).startswith(("📎", "⚠️"))
                      and text, "the fit line", timeout=120)


def shots(page, name: str, focus=None) -> None:
    """The page at 1440 and at 390 px wide (a phone, the sidebar closed), ``focus`` in view, to look at."""
    if focus is not None:
        focus.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTEFACTS / f"{name}-1440.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    page.evaluate(CLOSE_SIDEBAR_ON_PHONE)
    page.wait_for_timeout(700)
    if focus is not None:
        focus.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTEFACTS / f"{name}-390.png"))
    page.set_viewport_size({"width": 1440, "height": 900})
    page.evaluate("""() => { const s = document.querySelector('#conversation-sidebar');
        if (s && !s.classList.contains('open')) s.querySelector('.toggle-button').click(); }""")
    page.wait_for_timeout(300)


def new_chat(page) -> None:
    page.locator("#new-chat").click()
    wait_until(lambda: user_messages(page).count() == 0, "a new chat")


def test_a_text_file_and_a_pdf_are_attached_and_answered_from(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Meeting notes. The project codename is BLUE HERON. The launch date is March 14.\n")
    fit = attach(page, notes)
    assert re.search(r"notes\.txt\*?\*? \d+ tokens: fits", fit), fit
    send(page, "What is the project codename?")
    wait_for_status(page, FINISHED)
    chip = user_messages(page).last.locator(".attachment-chip")
    assert "notes.txt" in chip.inner_text()
    assert "BLUE HERON" in reply_text(bot_messages(page).last).upper()
    assert page.locator("#attachment-fit").inner_text().strip() == ""  # the files went with the message
    assert page.locator("#chat-input textarea").input_value() == ""  # and the box is empty again
    assert page.locator("#chat-input .thumbnail-item, #chat-input .thumbnails button").count() == 0
    shots(page, "attachment-chip", user_messages(page).last)

    new_chat(page)
    report = write_pdf(tmp_path / "report.pdf", ["Quarterly report.", "The warehouse in Lyon holds 4417 crates of olive oil."])
    attach(page, report)
    send(page, "How many crates does the Lyon warehouse hold?")
    wait_for_status(page, FINISHED)
    assert "report.pdf" in user_messages(page).last.inner_text()
    assert "4417" in reply_text(bot_messages(page).last)


def test_an_over_long_file_is_searched_and_the_passage_is_quoted(page, tmp_path):
    handbook = tmp_path / "handbook.txt"
    handbook.write_text(long_text())
    fit = attach(page, handbook)
    assert fit.startswith("⚠️") and "more than the" in fit and "most relevant" in fit, fit
    page.locator("#chat-input textarea").fill("What is the vault code?")
    shots(page, "attachment-fit-warning", page.locator("#attachment-fit"))
    page.locator("#send").click()
    wait_for_status(page, FINISHED, timeout=300)
    message = user_messages(page).last
    assert "searched, 8 passages sent" in message.locator(".attachment-chip").inner_text()
    quotes = message.locator("details.quotes")
    quotes.locator("summary").click()
    assert "4417" in quotes.inner_text() and "handbook.txt" in quotes.inner_text()


def test_a_bad_file_is_one_line_and_the_message_stays(page, tmp_path):
    bomb = tmp_path / "bomb.docx"
    from tests.documents import write_zip_bomb_docx

    write_zip_bomb_docx(bomb)
    fit = attach(page, bomb)
    assert fit.startswith("⚠️ bomb.docx: refused") and "\n" not in fit.strip()
    send(page, "Summarise the file.")
    status = wait_for_status(page, r"^⚠️")
    assert "bomb.docx" in status and user_messages(page).count() == 0
    assert page.locator("#chat-input textarea").input_value() == "Summarise the file."  # nothing lost


def test_a_docx_is_read(page, tmp_path):
    memo = write_docx(tmp_path / "memo.docx", ["Memo to staff.", "The parking lot closes on Friday at noon."])
    fit = attach(page, memo)
    assert "memo.docx" in fit and "fits" in fit


def turn_tools_on(page) -> str:
    page.locator("#tools-panel").get_by_text("Tools").first.click()
    page.locator("#tools-on input").check()
    page.locator("#tool-mode").get_by_text("Call a tool first").click()
    return wait_until(lambda: "kitchen_todays_special" in (text := page.locator("#tools-info").inner_text()) and text,
                      "the tools list", timeout=120)


def test_a_tool_call_is_approved_and_its_result_used_and_a_hanging_server_is_refused(page):
    listed = turn_tools_on(page)
    [refused] = [line for line in listed.splitlines() if "stuck" in line]
    assert refused.strip().endswith("MCP server stuck refused: it did not answer within 5 s"), listed
    send(page, "What is today's special?")
    wait_until(lambda: page.locator("#tool-approval").is_visible(), "the approval row", timeout=180)
    assert "kitchen_todays_special" in page.locator("#tool-question").inner_text()
    assert "Tool call: kitchen_todays_special" in reply_text(bot_messages(page).last)
    shots(page, "tool-call", bot_messages(page).last)
    page.locator("#tool-approve").click()
    wait_for_status(page, FINISHED, timeout=180)
    wait_until(lambda: not page.locator("#tool-approval").is_visible(), "the approval row to go", timeout=30)
    text = page.locator("#chatbot").inner_text()
    assert "Result of: kitchen_todays_special" in text
    assert "mushroom risotto" in reply_text(bot_messages(page).last).lower()
    shots(page, "tool-result", bot_messages(page).last)


def test_a_rejected_call_does_not_run_and_always_runs_the_next_ones_unasked(page):
    turn_tools_on(page)
    send(page, "What is today's special?")
    wait_until(lambda: page.locator("#tool-approval").is_visible(), "the approval row", timeout=180)
    page.locator("#tool-reject").click()
    wait_for_status(page, FINISHED, timeout=180)
    text = page.locator("#chatbot").inner_text()
    assert "Declined: kitchen_todays_special" in text and "Result of" not in text
    assert "mushroom" not in text.lower()

    send(page, "What is today's special?")
    wait_until(lambda: page.locator("#tool-approval").is_visible(), "the approval row", timeout=180)
    page.locator("#tool-always").click()
    wait_for_status(page, FINISHED, timeout=180)
    assert page.locator("#chatbot").inner_text().count("Result of: kitchen_todays_special") == 1
    send(page, "And what is today's special now?")  # allowed always in this conversation: no question
    wait_for_status(page, FINISHED, timeout=240)
    assert page.locator("#chatbot").inner_text().count("Result of: kitchen_todays_special") == 2
    wait_until(lambda: not page.locator("#tool-approval").is_visible(), "no approval row", timeout=30)
