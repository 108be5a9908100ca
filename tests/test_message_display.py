"""How the chat draws files and tool calls: one display message per conversation message."""

from loadstar.engine.chat.attachments import Attachment, Quote
from loadstar.webui.message_display import displayed, without_chips


def test_files_tools_and_results_keep_one_display_message_each():
    searched = Attachment(name="m.pdf", kind="pdf", pages=9, tokens=9000, fit="searched", text="",
                          quotes=(Quote(page=3, text="the vault code is 4417"),), sent_tokens=12).model_dump()
    messages = [
        {"role": "user", "content": "What is the code?", "attachments": [searched]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "lookup", "arguments": '{"q": 1}'}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4417"},
        {"role": "assistant", "content": "It is 4417."},
    ]
    shown = displayed(messages, waiting=False)
    assert len(shown) == len(messages) and all(set(m) <= {"role", "content", "metadata"} for m in shown)
    user, call, result, reply = shown
    assert "m.pdf · 9,000 tokens · searched, 1 passage sent" in user["content"]
    assert "m.pdf, page 3" in user["content"] and "&gt; the vault code is 4417" not in user["content"]
    assert without_chips(user["content"]) == "What is the code?"  # an edit gets the user's own text back
    assert call["metadata"] == {"title": "🔧 Tool call: lookup", "status": "done"} and '"q": 1' in call["content"]
    assert result["metadata"]["title"] == "📋 Result of: lookup" and result["content"] == "4417"
    assert reply == {"role": "assistant", "content": "It is 4417."}
    waiting = displayed(messages[:2], waiting=True)[1]["metadata"]
    assert waiting == {"title": "🔧 Tool call: lookup (waiting for you)", "status": "pending"}
