"""The Chat tab: conversations on the left, the chat on the right, the prompt viewer below."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.engine import Engine
from webui.chat_handlers import ChatHandlers, ChatUpdate, chat_messages, who
from webui.conversation_handlers import ConversationHandlers
from webui.parameters_tab import ParameterControls

# Chat events run concurrently in Gradio; the engine's own queue orders generation fairly and
# reports positions, and Stop must never wait behind a running reply.
UNLIMITED = None
# Display and inline math in replies: $$…$$, \[…\], and inline $…$ and \(…\).
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
]


def build_chat_tab(engine: Engine) -> "ChatTab":
    """Create the tab's components (inside the caller's ``gr.Tab``); ``wire`` connects them later."""
    with gr.Row(elem_id="chat-row"):
        with gr.Column(scale=1, min_width=240):
            conversation_list = gr.Dropdown([], label="Conversations", elem_id="conversation-list")
            new_button = gr.Button("New chat", elem_id="new-chat")
            title = gr.Textbox(label="Title", elem_id="conversation-title")
            with gr.Row():
                rename_button = gr.Button("Rename", elem_id="rename-chat", size="sm")
                delete_button = gr.Button("Delete", variant="stop", elem_id="delete-chat", size="sm")
            search = gr.Textbox(label="Search all conversations", placeholder="words, then Enter",
                                elem_id="conversation-search")
            hits = gr.Dataframe(headers=["Title", "Match", "id"], interactive=False, elem_id="search-results",
                                wrap=True, column_widths=["35%", "55%", "10%"])
            export_button = gr.Button("Export JSON", elem_id="export-chat", size="sm")
            export_file = gr.File(label="Exported", elem_id="export-file", interactive=False)
            import_file = gr.File(label="Import JSON", file_types=[".json"], elem_id="import-chat", type="filepath")
            conversation_status = gr.Markdown(elem_id="conversation-status")
        with gr.Column(scale=4):
            model = gr.Markdown(elem_id="chat-model")
            chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot", buttons=["copy", "copy_all"],
                                 feedback_options=None, editable="all", latex_delimiters=LATEX)
            with gr.Accordion("System message", open=False):
                system = gr.Textbox(label="System message", lines=2, elem_id="system-message",
                                    placeholder="Empty: the prompt format's default, if it has one")
            # lines=1 with room to grow: Gradio sends on Enter and leaves Shift+Enter to the textarea
            # (a new line); with lines > 1 it would send on Shift+Enter only.
            message = gr.Textbox(label="Message", placeholder="Message (Enter sends, Shift+Enter for a new line)",
                                 lines=1, max_lines=10, elem_id="chat-input")
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", elem_id="send", min_width=90)
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop", min_width=90)
                regenerate_button = gr.Button("Regenerate", elem_id="regenerate", min_width=90)
                continue_button = gr.Button("Continue", elem_id="continue", min_width=90)
                remove_button = gr.Button("Remove last", elem_id="remove-last", min_width=90)
                previous_reply = gr.Button("‹", elem_id="previous-reply", min_width=40, scale=0)
                next_reply = gr.Button("›", elem_id="next-reply", min_width=40, scale=0)
            status = gr.Markdown("", elem_id="chat-status")
            with gr.Accordion("Prompt sent", open=False):
                preview_button = gr.Button("Show the prompt for the message above", size="sm", elem_id="preview-prompt")
                prompt_info = gr.Markdown(elem_id="prompt-info")
                prompt_box = gr.Textbox(label="Exact prompt", lines=8, max_lines=30, interactive=False,
                                        elem_id="prompt-text")
            panels = gr.Column()
    state = gr.State(None)
    return ChatTab(
        engine, state, chatbot, conversation_list, new_button, title, rename_button, delete_button, search, hits,
        export_button, export_file, import_file, conversation_status, system, message, send_button, stop_button,
        regenerate_button, continue_button, remove_button, status, preview_button, prompt_info, prompt_box, panels,
        model, previous_reply, next_reply,
    )


@dataclass
class ChatTab:
    engine: Engine
    state: Any
    chatbot: Any
    conversation_list: Any
    new_button: Any
    title: Any
    rename_button: Any
    delete_button: Any
    search: Any
    hits: Any
    export_button: Any
    export_file: Any
    import_file: Any
    conversation_status: Any
    system: Any
    message: Any
    send_button: Any
    stop_button: Any
    regenerate_button: Any
    continue_button: Any
    remove_button: Any
    status: Any
    preview_button: Any
    prompt_info: Any
    prompt_box: Any
    panels: Any  # where extensions' panels go
    model: Any  # the line above the chat naming the loaded model
    previous_reply: Any  # ‹ and ›: the versions of a regenerated reply
    next_reply: Any

    def wire(self, demo: gr.Blocks, parameters: ParameterControls) -> None:
        chat = ChatHandlers(self.engine)
        conversations = ConversationHandlers(self.engine)
        w = self

        def shown(state):
            """Everything that shows one conversation: chat, system, title."""
            return chat_messages(state), state.get("system", ""), state.get("title", "")

        def listing(request: gr.Request, state=None):
            user = who(request).user
            choices = conversations.choices(user)
            value = state["id"] if state and any(cid == state["id"] for _, cid in choices) else None
            return gr.update(choices=choices, value=value)

        def listing_and_title(request: gr.Request, state=None):
            """After a turn: the list, and the Title box in step with the saved title (the automatic
            one after a first message, so that Rename starts from it). Only after turns: elsewhere
            the box may hold a title the user is typing."""
            return listing(request, state), state.get("title", "") if state else gr.update()

        # -- turns ------------------------------------------------------------------------------
        def stream(updates, clear_message: bool):
            for update in updates:
                assert isinstance(update, ChatUpdate)
                out = [update.chatbot, update.state, update.status,
                       gr.update() if update.prompt is None else update.prompt]
                yield ([gr.update() if update.keep_input else ""] if clear_message else []) + out

        def with_system(data):
            return {**(data[w.state] or {}), "system": data[w.system] or ""}

        def send(data, request: gr.Request):
            values, stops = parameters.read(data)
            yield from stream(chat.send(data[w.message], with_system(data), who(request), values, stops), True)

        def regenerate(data, request: gr.Request):
            values, stops = parameters.read(data)
            yield from stream(chat.regenerate(with_system(data), who(request), values, stops), False)

        def continue_(data, request: gr.Request):
            values, stops = parameters.read(data)
            yield from stream(chat.continue_(with_system(data), who(request), values, stops), False)

        def remove_last(state, request: gr.Request):
            update = chat.remove_last(state, who(request))
            return update.chatbot, update.state, update.status

        def edit(state, event: gr.EditData, request: gr.Request):
            index = event.index if isinstance(event.index, int) else event.index[0]
            update = chat.edit(state, who(request), index, event.value)
            return update.chatbot, update.state, update.status

        def stop(request: gr.Request):
            return chat.stop(who(request).owner)

        def preview(data):
            values, stops = parameters.read(data)
            prompt, info = chat.preview(data[w.message], with_system(data), values, stops)
            return prompt, info

        def leave(request: gr.Request):
            self.engine.stop(who(request).owner)

        inputs = {w.message, w.state, w.system, *parameters.inputs}
        turn_outputs = [w.chatbot, w.state, w.status, w.prompt_box]
        after = dict(fn=listing, inputs=[w.state], outputs=w.conversation_list)
        after_turn = dict(fn=listing_and_title, inputs=[w.state], outputs=[w.conversation_list, w.title])
        for trigger in (w.send_button.click, w.message.submit):
            trigger(send, inputs, [w.message, *turn_outputs], concurrency_limit=UNLIMITED).then(**after_turn)
        w.regenerate_button.click(regenerate, inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)
        w.continue_button.click(continue_, inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)
        w.remove_button.click(remove_last, w.state, [w.chatbot, w.state, w.status]).then(**after)
        w.chatbot.edit(edit, w.state, [w.chatbot, w.state, w.status])

        def switch(step: int):
            def handler(state, request: gr.Request):
                update = chat.switch_reply(state, who(request), step)
                return update.chatbot, update.state, update.status
            return handler

        w.previous_reply.click(switch(-1), w.state, [w.chatbot, w.state, w.status])
        w.next_reply.click(switch(1), w.state, [w.chatbot, w.state, w.status])
        w.stop_button.click(stop, None, w.status, concurrency_limit=UNLIMITED)
        w.preview_button.click(preview, inputs, [w.prompt_box, w.prompt_info])
        demo.unload(leave)

        # -- conversations ------------------------------------------------------------------------
        view = [w.state, w.chatbot, w.system, w.title]

        def start(request: gr.Request):
            state, choices = conversations.start(who(request).user)
            return [state, *shown(state), gr.update(choices=choices, value=None)]

        def new(request: gr.Request):
            self.engine.stop(who(request).owner)
            state, status = conversations.new(who(request).user)
            return [state, *shown(state), gr.update(value=None), status]

        def open_(conversation_id, state, request: gr.Request):
            if state and conversation_id == state.get("id"):
                return [gr.update()] * 4 + [""]
            self.engine.stop(who(request).owner)
            opened, status = conversations.open(who(request).user, conversation_id)
            if opened is None:
                return [gr.update()] * 4 + [status]
            return [opened, *shown(opened), status]

        def rename(state, new_title, request: gr.Request):
            renamed, status = conversations.rename(who(request).user, state, new_title)
            return renamed, status

        def delete(state, request: gr.Request):
            self.engine.stop(who(request).owner)
            remaining, status = conversations.delete(who(request).user, state)
            return [remaining, *shown(remaining), status]

        def search(query, request: gr.Request):
            return conversations.search(who(request).user, query)

        def pick_hit(event: gr.SelectData, state, request: gr.Request):
            row = event.row_value or []
            return open_(row[2], state, request) if len(row) > 2 else [gr.update()] * 4 + [""]

        def export(state, request: gr.Request):
            return conversations.export(who(request).user, state)

        def import_(file, request: gr.Request):
            imported, status = conversations.import_(who(request).user, file)
            if imported is None:
                return [gr.update()] * 4 + [status]
            return [imported, *shown(imported), status]

        demo.load(start, None, [*view, w.conversation_list])
        for trigger in (w.new_button.click, w.chatbot.clear):  # the chat's own trash icon starts anew too
            trigger(new, None, [*view, w.conversation_list, w.conversation_status])
        w.conversation_list.input(open_, [w.conversation_list, w.state], [*view, w.conversation_status])
        w.rename_button.click(rename, [w.state, w.title], [w.state, w.conversation_status]).then(**after)
        w.delete_button.click(delete, w.state, [*view, w.conversation_status]).then(**after)
        w.search.submit(search, w.search, w.hits)  # on Enter: a search reads every saved conversation
        w.hits.select(pick_hit, w.state, [*view, w.conversation_status]).then(**after)
        w.export_button.click(export, w.state, [w.export_file, w.conversation_status])
        w.import_file.upload(import_, w.import_file, [*view, w.conversation_status]).then(**after)
