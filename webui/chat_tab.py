"""The Chat tab: conversations on the left, the chat on the right, the prompt viewer below."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from loadstar.engine.facade import Engine
from loadstar.webui.characters_tab import character_entries
from loadstar.webui.chat_handlers import (
    ChatHandlers,
    ChatUpdate,
    TurnOptions,
    chat_messages,
    model_line,
    new_state,
    pending_calls,
    who,
)
from loadstar.webui.conversation_handlers import ConversationHandlers
from loadstar.webui.message_display import Speaker, displayed, reply_lines
from loadstar.webui.parameters_tab import ParameterControls
from loadstar.webui.remembered import CLOSE_SIDEBAR_ON_PHONE, remember, remembered
from loadstar.webui.streaming import only_changes

# Chat events run concurrently in Gradio; the engine's own queue orders generation fairly and
# reports positions, and Stop must never wait behind a running reply.
UNLIMITED = None
# Display and inline math in replies: $$…$$, \[…\], and inline $…$ and \(…\).
LATEX: list[dict[str, str | bool]] = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
]


def text_of(value: Any) -> str:
    """The text of the message box (a MultimodalTextbox: {"text", "files"})."""
    return str((value or {}).get("text") or "") if isinstance(value, dict) else str(value or "")


def files_of(value: Any) -> tuple[str, ...]:
    """The paths of the files attached in the message box (Gradio's upload folder; checked again later)."""
    files = (value or {}).get("files") or [] if isinstance(value, dict) else []
    return tuple(str(f.get("path") if isinstance(f, dict) else getattr(f, "path", f)) for f in files)


def controls(state: Any, running: bool) -> list[Any]:
    """Send or Stop, and the buttons that act on the last reply: enabled only when they can act."""
    messages = (state or {}).get("messages") or []
    last = messages[-1] if messages else {}
    answered = last.get("role") == "assistant" and not last.get("tool_calls") \
        and any(m.get("role") == "user" for m in messages)
    idle = not running
    return [gr.update(visible=idle), gr.update(visible=running), gr.update(interactive=idle and answered),
            gr.update(interactive=idle and answered), gr.update(interactive=idle and bool(messages))]


def picture_style(character: Any) -> str:
    """The CSS that shows ``character``'s picture beside its name (nothing without one)."""
    if character is None or not character.picture:
        return ""
    return ("<style>#chatbot .speaker-picture { background-image: url(data:image/png;base64,"
            f"{character.picture}); }}</style>")


def build_chat_tab(engine: Engine) -> ChatTab:
    """Create the tab's components (inside the caller's ``gr.Tab``); ``wire`` connects them later."""
    # The conversations live in a collapsible sidebar: New chat on top, search, the list (titles and
    # dates), and a menu for the open conversation (rename, export, import, delete).
    with gr.Sidebar(open=True, width=300, elem_id="conversation-sidebar", label="Conversations") as sidebar:
        new_button = gr.Button("+ New chat", variant="primary", elem_id="new-chat")
        search = gr.Textbox(show_label=False, placeholder="Search conversations (Enter)", elem_id="conversation-search")
        conversation_list = gr.Radio([], label="Conversations", elem_id="conversation-list")
        with gr.Accordion("⋯ This conversation", open=False, elem_id="conversation-menu") as menu:
            title = gr.Textbox(label="Title", elem_id="conversation-title")
            with gr.Row():
                rename_button = gr.Button("Rename", elem_id="rename-chat", size="sm", min_width=60)
                export_button = gr.Button("Export JSON", elem_id="export-chat", size="sm", min_width=60)
            export_file = gr.File(label="Exported", elem_id="export-file", interactive=False, visible=False)
            import_file = gr.UploadButton("Import a JSON conversation", file_types=[".json"], elem_id="import-chat",
                                          type="filepath", size="sm")
            delete_button = gr.Button("Delete this conversation", variant="stop", elem_id="delete-chat", size="sm")
            with gr.Row(visible=False) as delete_confirm:  # a second click, so one slip loses nothing
                confirm_delete = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete", size="sm")
                keep = gr.Button("Keep it", elem_id="keep-chat", size="sm")
        conversation_status = gr.Markdown(elem_id="conversation-status")
    with gr.Row(elem_id="chat-row"), gr.Column(scale=4):
        with gr.Row(equal_height=True, elem_id="chat-header"):
            model = gr.Markdown(elem_id="chat-model")
            model_switch = gr.Dropdown([], label="Switch model", show_label=False, elem_id="chat-model-switch",
                                       scale=0, min_width=200, interactive=True, container=False)
            character = gr.Dropdown([("No character", "")], value="", label="Character", show_label=False,
                                    elem_id="chat-character", scale=0, min_width=160, interactive=True,
                                    container=False)
        character_style = gr.HTML("", elem_id="character-style", padding=False)  # the character's picture (CSS)
        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot", buttons=["copy", "copy_all"],
                             feedback_options=None, editable="all", latex_delimiters=LATEX)
        # Feedback where the user looks: right above the box (a refusal, an error, the queue), dismissable.
        status = gr.Markdown("", elem_id="chat-status")
        # lines=1 with room to grow: Gradio sends on Enter and leaves Shift+Enter to the textarea
        # (a new line); with lines > 1 it would send on Shift+Enter only. Files: its 📎 button, or
        # dropped onto the box; a chip for each shows above the text before sending.
        message = gr.MultimodalTextbox(
            label="Message", show_label=False, placeholder="Message",
            lines=1, max_lines=10, elem_id="chat-input", file_count="multiple", sources=["upload"],
            submit_btn=False)
        with gr.Column(elem_id="attachment-row"):  # a column: on a phone the line needs the full width
            fit = gr.Markdown("", elem_id="attachment-fit")
            overflow = gr.Radio([("Search it", "search"), ("Cut it", "cut")], value="search", show_label=False,
                                info="A file too long for the context:", elem_id="attachment-overflow", scale=0,
                                min_width=230, container=False, visible=False)  # shown while files are attached
        fitted_files = gr.State(())  # the files the fit line was made for
        with gr.Column(visible=False, elem_id="tool-approval") as approval:
            approval_text = gr.Markdown(elem_id="tool-question")
            with gr.Row():
                approve = gr.Button("Run it", variant="primary", elem_id="tool-approve", size="sm", min_width=90,
                                    scale=0)
                always = gr.Button("Always run this tool", elem_id="tool-always", size="sm", min_width=90, scale=0)
                reject = gr.Button("Reject", variant="stop", elem_id="tool-reject", size="sm", min_width=90, scale=0)
        # Send turns into Stop while the reply streams; the others act only when there is a reply.
        with gr.Row(elem_id="chat-buttons"):
            send_button = gr.Button("Send", variant="primary", elem_id="send", min_width=80)
            stop_button = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80, visible=False)
            regenerate_button = gr.Button("Regenerate", elem_id="regenerate", min_width=80, interactive=False)
            continue_button = gr.Button("Continue", elem_id="continue", min_width=80, interactive=False)
            remove_button = gr.Button("Remove last", elem_id="remove-last", min_width=80, interactive=False)
        # ‹ › under a reply: the page's script writes "index:step" here (webui.message_display).
        version_request = gr.Textbox(visible="hidden", elem_id="version-request")
        version_go = gr.Button(visible="hidden", elem_id="version-go")
        with gr.Accordion("System message", open=False):  # under the buttons: the chat and box fit a phone's screen
            system = gr.Textbox(label="System message", lines=2, elem_id="system-message",
                                placeholder="Empty: the model's default, if it has one")
        with gr.Accordion("Tools", open=False, elem_id="tools-panel"):
            tools_on = gr.Checkbox(False, label="Let the model call tools (each call waits for your approval)",
                                   elem_id="tools-on")
            tool_mode = gr.Radio([("The model decides", "auto"), ("Call a tool first", "required")], value="auto",
                                 label="When", elem_id="tool-mode")
            tools_info = gr.Markdown(elem_id="tools-info")
        with gr.Accordion("Prompt sent", open=False):
            preview_button = gr.Button("Show the prompt for the message above", size="sm", elem_id="preview-prompt")
            prompt_info = gr.Markdown(elem_id="prompt-info")
            prompt_box = gr.Textbox(label="Exact prompt", lines=8, max_lines=30, interactive=False,
                                    elem_id="prompt-text")
        panels = gr.Column()
    state = gr.State(None)
    return ChatTab(
        engine, state, chatbot, conversation_list, new_button, title, rename_button, delete_button, search,
        export_button, export_file, import_file, conversation_status, system, message, send_button, stop_button,
        regenerate_button, continue_button, remove_button, status, preview_button, prompt_info, prompt_box, panels,
        model, version_request, version_go, character, character_style, sidebar, menu, model_switch, delete_confirm, confirm_delete, keep,
        fitted_files, overflow, fit, approval, approval_text, approve, always, reject, tools_on, tool_mode, tools_info,
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
    version_request: Any  # "index:step" from a ‹ › under a reply
    version_go: Any  # clicked by the page's script once version_request holds it
    character: Any  # the character picker above the chat
    character_style: Any  # the character's picture, as CSS
    sidebar: Any
    menu: Any  # the open conversation's menu
    model_switch: Any  # the dropdown beside the model line
    delete_confirm: Any  # the row that asks again before deleting
    confirm_delete: Any
    keep: Any
    fitted_files: Any  # the files the fit line describes (it is redone when they change)
    overflow: Any  # search or cut a file too long for the context
    fit: Any  # each file's tokens against the room left, before sending
    approval: Any  # the row that asks before a tool call runs
    approval_text: Any
    approve: Any
    always: Any
    reject: Any
    tools_on: Any
    tool_mode: Any  # auto, or required (the first reply of a turn calls a tool)
    tools_info: Any  # the tools on offer, and sources that could not be used

    def wire(self, demo: gr.Blocks, parameters: ParameterControls, memory: Any) -> None:
        """``memory``: the browser's kept values (webui.remembered); the open conversation is one."""
        chat = ChatHandlers(self.engine)
        conversations = ConversationHandlers(self.engine)
        w = self

        def character_choices(user):
            return [("No character", ""), *character_entries(self.engine, user)]

        def speaker(state, user, found=None):
            """The character the conversation is with, as its replies show it (None: none)."""
            found = found or self.engine.characters.get(user, (state or {}).get("character"))
            return Speaker(found.name, bool(found.picture)) if found else None

        def view(messages, state, user, waiting=False, said_by=None):
            """The chat as shown: the messages, the line under each reply, the character's name."""
            return displayed(messages, waiting, reply_lines(state, messages), said_by or speaker(state, user))

        def shown(state, user):
            """Everything that shows one conversation: chat, system, title, character, its picture, the buttons."""
            found = self.engine.characters.get(user, state.get("character"))
            said_by = speaker(state, user, found)
            return (view(chat_messages(state), state, user, bool(pending_calls(state)), said_by), state.get("system", ""),
                    state.get("title", ""), found.id if found else "", picture_style(found), *controls(state, False))

        def listing(request: gr.Request, state=None):
            user = who(request).user
            choices = conversations.choices(user)
            value = state["id"] if state and any(cid == state["id"] for _, cid in choices) else None
            return gr.update(choices=choices, value=value)

        def listing_and_title(request: gr.Request, state=None):
            """After a turn: the list, and the Title box in step with the saved title (the automatic
            one after a first message, so that Rename starts from it). Only after turns: elsewhere
            the box may hold a title the user is typing."""
            title = state.get("title", "") if state else gr.update()
            return listing(request, state), title, model_line(self.engine)  # (a worker that stopped responding shows)

        # -- turns ------------------------------------------------------------------------------
        def asking(state) -> tuple[Any, str]:
            """The approval row: shown while the last message is a tool call that waits."""
            calls = pending_calls(state or {})
            if not calls:
                return gr.update(visible=False), ""
            names = ", ".join(dict.fromkeys(c["name"] for c in calls))
            return gr.update(visible=True), f"Run **{names}** with the arguments shown above?"

        @only_changes
        def stream(updates, clear_message: bool, user: str | None, drawn: int | None = None):
            """The outputs of a turn's updates. The chat is drawn again only when its messages or
            state changed (a queue position or "Generating…" redraws the status alone: a chat of
            many messages costs the browser, beside the model, to lay out). ``drawn``: the messages
            ``begin`` already shows (the user's own bubble): the turn's first drawing of that same
            chat is not sent again."""
            empty = None  # the box cleared (text and files); None is one object: only_changes sends it once
            said_by, made_of, chat_view = None, None, None
            for update in updates:
                assert isinstance(update, ChatUpdate)
                said_by = said_by or speaker(update.state, user)
                waiting = bool(pending_calls(update.state)) if update.asking is None else update.asking
                row, question = asking(update.state) if waiting else (gr.update(visible=False), "")
                if made_of is None or made_of[0] is not update.chatbot or made_of[1] is not update.state \
                        or made_of[2] != waiting:
                    first = made_of is None
                    made_of = (update.chatbot, update.state, waiting)
                    chat_view = view(update.chatbot, update.state, user, waiting, said_by)
                    if first and drawn is not None and update.running and len(update.chatbot) == drawn:
                        chat_view = gr.skip()  # begin drew exactly this
                out = [chat_view, update.state, update.status,
                       gr.update() if update.prompt is None else update.prompt, row, question,
                       *controls(update.state, update.running)]
                cleared = [gr.update()] * 3 if update.keep_input else [empty, "", ()]
                yield (cleared if clear_message else []) + out

        def options(data) -> TurnOptions:
            return TurnOptions(files=files_of(data[w.message]),
                               overflow=data[w.overflow] or "search", tools=tool_choice(data))

        def tool_choice(data):
            return (data[w.tool_mode] or "auto") if data[w.tools_on] else "off"

        def with_system(data):
            return {**(data[w.state] or {}), "system": data[w.system] or ""}

        def send(data, request: gr.Request):
            values, stops = parameters.read(data)
            drawn = None if files_of(data[w.message]) else len(chat_messages(data[w.state] or {})) + 1
            yield from stream(chat.send(text_of(data[w.message]), with_system(data), who(request), values, stops,
                                        options(data)), True, who(request).user, drawn)

        def regenerate(data, request: gr.Request):
            values, stops = parameters.read(data)
            yield from stream(chat.regenerate(with_system(data), who(request), values, stops,
                                              tools=tool_choice(data)), False, who(request).user)

        def decide(decision: str):
            def handler(data, request: gr.Request):
                values, stops = parameters.read(data)
                yield from stream(chat.decide(with_system(data), who(request), values, stops, decision), False,
                                  who(request).user)
            return handler

        def fit_line(data):
            """The fit line, redone when the attached files (or the overflow choice) change, not per keystroke."""
            files = files_of(data[w.message])
            if not files:
                return "", (), gr.update(visible=False)
            if files == tuple(data[w.fitted_files] or ()):
                return gr.skip(), gr.skip(), gr.skip()
            return refit(data), files, gr.update(visible=bool(files))

        def refit(data):
            values, stops = parameters.read(data)
            return chat.fit_line(files_of(data[w.message]), text_of(data[w.message]), with_system(data), values,
                                 stops, data[w.overflow] or "search")  # (the character's system text aside)

        def tools_listing():
            offered = self.engine.tools.available()
            lines = [f"- **{o.tool.name}** ({o.plugin}): {o.tool.description.splitlines()[0] if o.tool.description else ''}"
                     for o in offered] or ["No tools: enable an extension that offers some (Extensions tab)."]
            lines += [f"- ⚠️ {problem}" for problem in self.engine.tools.problems()]
            return "\n".join(lines)

        def continue_(data, request: gr.Request):
            values, stops = parameters.read(data)
            yield from stream(chat.continue_(with_system(data), who(request), values, stops), False, who(request).user)

        def one_update(update: ChatUpdate, user):
            return [view(update.chatbot, update.state, user), update.state, update.status,
                    *controls(update.state, False)]

        def remove_last(state, request: gr.Request):
            return one_update(chat.remove_last(state, who(request)), who(request).user)

        def edit(data, event: gr.EditData, request: gr.Request):
            """Enter (or ✓) in a message's edit box: saved, and an edited question answered again."""
            index = event.index if isinstance(event.index, int) else event.index[0]
            values, stops = parameters.read(data)
            yield from stream(chat.edit(with_system(data), who(request), index, event.value, values, stops,
                                        tool_choice(data)), False, who(request).user)

        def begin(data, request: gr.Request):
            """At once on Enter: the user's own message in the chat and Stop in place of Send (the
            turn itself follows, and says why when the message cannot be taken)."""
            text, state = text_of(data[w.message]).strip(), data[w.state] or {}
            if not (text or files_of(data[w.message])) or self.engine.has_work(who(request).owner) \
                    or pending_calls(state) or chat.refusal(tool_choice(data)):
                return [gr.skip()] * 4
            messages = [*chat_messages(state), {"role": "user", "content": text or "Read the attached file."}]
            # The status too: the last reply's "Done (…)" must not stand for this one's.
            return [view(messages, state, who(request).user), gr.update(visible=False), gr.update(visible=True),
                    "Sending…"]

        def stop(request: gr.Request):
            status = chat.stop(who(request).owner)
            return gr.skip() if status is None else status  # the stopped reply says "Stopped" itself

        def preview(data, request: gr.Request):
            values, stops = parameters.read(data)
            return chat.preview(text_of(data[w.message]), with_system(data), values, stops, who(request).user)

        def leave(request: gr.Request):
            chat.leave(who(request).owner)

        inputs = {w.message, w.state, w.system, w.fitted_files, w.overflow, w.tools_on, w.tool_mode,
                  *parameters.inputs}
        buttons = [w.send_button, w.stop_button, w.regenerate_button, w.continue_button, w.remove_button]
        turn_outputs = [w.chatbot, w.state, w.status, w.prompt_box, w.approval, w.approval_text, *buttons]
        one_outputs = [w.chatbot, w.state, w.status, *buttons]
        after = dict(fn=listing, inputs=[w.state], outputs=w.conversation_list, show_progress="hidden")
        after_turn = dict(fn=listing_and_title, inputs=[w.state], outputs=[w.conversation_list, w.title, w.model],
                          show_progress="hidden")  # no spinner over the list after each reply
        for trigger in (w.send_button.click, w.message.submit):
            started = trigger(begin, inputs, [w.chatbot, w.send_button, w.stop_button, w.status], queue=False,
                              show_progress="hidden")
            started.then(
                send, inputs, [w.message, w.fit, w.fitted_files, *turn_outputs], concurrency_limit=UNLIMITED,
                show_progress="minimal").then(**after_turn)
        for button, decision in ((w.approve, "approve"), (w.always, "always"), (w.reject, "reject")):
            button.click(decide(decision), inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)
        w.message.change(fit_line, inputs, [w.fit, w.fitted_files, w.overflow], show_progress="hidden",
                         trigger_mode="always_last")
        w.overflow.change(refit, inputs, w.fit, show_progress="hidden")
        w.tools_on.change(lambda on: tools_listing() if on else "", w.tools_on, w.tools_info)
        w.regenerate_button.click(regenerate, inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)
        w.continue_button.click(continue_, inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)
        w.remove_button.click(remove_last, w.state, one_outputs).then(**after)
        w.chatbot.edit(edit, inputs, turn_outputs, concurrency_limit=UNLIMITED).then(**after_turn)

        def switch(request_text, state, request: gr.Request):
            """A ‹ or › under a reply: "index:step[:nonce]" from the page's script."""
            try:
                index, step = (int(part) for part in str(request_text or "").split(":")[:2])
            except ValueError:
                return [gr.skip()] * len(one_outputs)
            return one_update(chat.switch_reply(state, who(request), max(-1, min(1, step)), index), who(request).user)

        w.version_go.click(switch, [w.version_request, w.state], one_outputs, show_progress="hidden")
        w.stop_button.click(stop, None, w.status, concurrency_limit=UNLIMITED)
        w.preview_button.click(preview, inputs, [w.prompt_box, w.prompt_info])
        demo.unload(leave)

        # -- conversations ------------------------------------------------------------------------
        view_outputs = [w.state, w.chatbot, w.system, w.title, w.character, w.character_style, *buttons]
        unchanged = [gr.update()] * len(view_outputs)

        def start(memory_value, request: gr.Request):
            """A page opens the conversation this browser had open last, else a new one."""
            user = who(request).user
            state, choices = conversations.start(user)
            kept = remembered(memory_value, "conversation")
            opened, _ = conversations.open(user, kept if isinstance(kept, str) else None)
            if opened is not None:
                state = opened
            value = state["id"] if any(cid == state["id"] for _, cid in choices) else None
            chat_view, system, title, *rest = shown(state, user)
            # The box is empty when the page opens: writing "" again would wipe what the user typed
            # meanwhile, when this arrives late on a busy server.
            return [state, chat_view, system or gr.update(), title, *rest, gr.update(choices=choices, value=value),
                    gr.update(choices=character_choices(user), value=rest[0])]

        def keep_open(memory_value, state):
            """The browser keeps the open conversation's id (written only when it changes: every
            write is encrypted and stored by the page, beside the model on a busy machine)."""
            wanted = state.get("id") if state else None
            if remembered(memory_value, "conversation") == wanted:
                return gr.skip()
            return remember(memory_value, conversation=wanted)

        def new(request: gr.Request):
            self.engine.stop(who(request).owner)
            state, status = conversations.new(who(request).user)
            return [state, *shown(state, who(request).user), gr.update(value=None), status]

        def open_(conversation_id, state, request: gr.Request):
            if state and conversation_id == state.get("id"):
                return [*unchanged, ""]
            self.engine.stop(who(request).owner)
            opened, status = conversations.open(who(request).user, conversation_id)
            if opened is None:
                return [*unchanged, status]
            return [opened, *shown(opened, who(request).user), status]

        def rename(state, new_title, request: gr.Request):
            renamed, status = conversations.rename(who(request).user, state, new_title)
            return renamed, status

        def delete(state, request: gr.Request):
            self.engine.stop(who(request).owner)
            remaining, status = conversations.delete(who(request).user, state)
            return [remaining, *shown(remaining, who(request).user), status, gr.update(visible=False)]

        def search(query, state, request: gr.Request):
            """Enter in the search box: the list shows the conversations that match (all when empty)."""
            user = who(request).user
            if not (query or "").strip():
                return listing(request, state), ""
            choices = conversations.search(user, query)
            found = f"{len(choices)} conversation{' matches' if len(choices) == 1 else 's match'}; clear the search for all."
            return gr.update(choices=choices, value=None), found

        def export(state, request: gr.Request):
            path, status = conversations.export(who(request).user, state)
            return gr.update(value=path, visible=path is not None), status

        def import_(file, request: gr.Request):
            imported, status = conversations.import_(who(request).user, file)
            if imported is None:
                return [*unchanged, status]
            return [imported, *shown(imported, who(request).user), status]

        def pick_character(character_id, state, request: gr.Request):
            update = chat.pick_character(state or new_state(), who(request), character_id or None)
            return [update.state, *shown(update.state, who(request).user), update.status]

        def refresh_characters(request: gr.Request):
            return gr.update(choices=character_choices(who(request).user))

        demo.load(start, memory, [*view_outputs, w.conversation_list, w.character])
        w.state.change(keep_open, [memory, w.state], memory, show_progress="hidden")
        for trigger in (w.new_button.click, w.chatbot.clear):  # the chat's own trash icon starts anew too
            trigger(new, None, [*view_outputs, w.conversation_list, w.conversation_status]).then(None, js=CLOSE_SIDEBAR_ON_PHONE)
        w.conversation_list.input(open_, [w.conversation_list, w.state], [*view_outputs, w.conversation_status]).then(
            None, js=CLOSE_SIDEBAR_ON_PHONE)
        w.rename_button.click(rename, [w.state, w.title], [w.state, w.conversation_status]).then(**after)
        w.delete_button.click(lambda: gr.update(visible=True), None, w.delete_confirm)
        w.keep.click(lambda: gr.update(visible=False), None, w.delete_confirm)
        w.confirm_delete.click(delete, w.state, [*view_outputs, w.conversation_status, w.delete_confirm]).then(**after)
        w.search.submit(search, [w.search, w.state], [w.conversation_list, w.conversation_status])  # reads every file
        w.export_button.click(export, w.state, [w.export_file, w.conversation_status])
        w.import_file.upload(import_, w.import_file, [*view_outputs, w.conversation_status]).then(**after)
        w.character.focus(refresh_characters, None, w.character, queue=False)
        w.character.input(pick_character, [w.character, w.state], [*view_outputs, w.status]).then(**after)
