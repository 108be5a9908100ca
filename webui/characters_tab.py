"""The Characters tab: create, edit, import and export the characters a chat can be with.

Handlers are plain functions over ``engine.characters`` (``engine/chat/characters.py``); a file
a browser names goes through ``uploaded_file`` first.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from loadstar.engine.atomic import login_folder_name, private_folder, write_atomic
from loadstar.engine.chat.characters import Character, thumbnail
from loadstar.engine.errors import LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.webui.chat_handlers import who
from loadstar.webui.uploads import uploaded_file

NEW = ""  # the list's entry for a character not saved yet


def character_entries(engine: Engine, user: str | None) -> list[tuple[str, str]]:
    """(label, id) of every character ``user`` may pick: their own, then the extensions' (marked)."""
    return [(c.name + (" (extension)" if ":" in c.id else ""), c.id) for c in engine.characters.all(user)]


def choices(engine: Engine, user: str | None) -> list[tuple[str, str]]:
    return [("+ New character", NEW), *character_entries(engine, user)]


def build_characters_tab(engine: Engine) -> CharactersTab:
    gr.Markdown("A character is who the model plays: its description is the system message, its greeting "
                "opens the chat, its name and picture show on its replies. Pick one above the chat.")
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            listing = gr.Radio([("+ New character", NEW)], value=NEW, label="Characters", elem_id="character-list")
            importer = gr.UploadButton("Import (YAML, JSON or PNG card)", file_types=[".yaml", ".yml", ".json", ".png"],
                                       type="filepath", size="sm", elem_id="character-import")
            export_file = gr.File(label="Exported", interactive=False, visible=False, elem_id="character-export-file")
        with gr.Column(scale=3):
            with gr.Row():
                picture = gr.Image(label="Picture", type="filepath", sources=["upload"], height=140, width=140,
                                   scale=0, min_width=140, elem_id="character-picture")
                with gr.Column():
                    name = gr.Textbox(label="Name", elem_id="character-name", max_length=100)
                    greeting = gr.Textbox(label="Greeting (the first message of a new chat)", lines=2,
                                          elem_id="character-greeting")
                    source = gr.Markdown(elem_id="character-source")  # where the picked one came from
            context = gr.Textbox(label="Who it is (the system message; {{char}} and {{user}} are filled in)",
                                 lines=5, max_lines=20, elem_id="character-context")
            examples = gr.Textbox(label="Example dialogue (optional)", lines=3, max_lines=20,
                                  elem_id="character-examples")
            with gr.Row():
                save = gr.Button("Save", variant="primary", elem_id="character-save", min_width=80)
                export = gr.Button("Export", elem_id="character-export", min_width=80)
                delete = gr.Button("Delete", variant="stop", elem_id="character-delete", min_width=80)
            with gr.Row(visible=False) as confirm_row:  # a second click, so one slip loses nothing
                confirm = gr.Button("Yes, delete it", variant="stop", elem_id="character-confirm-delete", size="sm")
                keep = gr.Button("Keep it", elem_id="character-keep", size="sm")
            status = gr.Markdown(elem_id="character-status")
    return CharactersTab(engine, listing, importer, export_file, picture, name, greeting, context, examples, save,
                         export, delete, confirm_row, confirm, keep, status, source)


@dataclass
class CharactersTab:
    engine: Engine
    listing: Any
    importer: Any
    export_file: Any
    picture: Any
    name: Any
    greeting: Any
    context: Any
    examples: Any
    save: Any
    export: Any
    delete: Any
    confirm_row: Any  # asks again before deleting
    confirm: Any
    keep: Any
    status: Any  # what the last action did (Saved, Imported, Deleted, or why not)
    source: Any  # where the picked character came from: its own line, so that picking never hides a status

    def wire(self, demo: gr.Blocks, chat: Any) -> None:
        """``chat``: the Chat tab, whose character picker follows every change here."""
        engine, w = self.engine, self
        fields = [w.name, w.greeting, w.context, w.examples, w.picture]

        def picture_file(character: Character | None, user: str | None) -> str | None:
            """The character's picture as a file the Image can show (in the login's own folder)."""
            if character is None or not character.picture:
                return None

            # in the exports folder: the one the page may fetch files from (webui.asgi's allowed_paths)
            folder = private_folder(engine.conversations.exports, login_folder_name(user), "pictures")
            path = folder / f"{character.id.replace(':', '_')}.png"
            write_atomic(path, base64.b64decode(character.picture))
            return str(path)

        def show(character_id, request: gr.Request):
            """The picked character's fields and where it came from (the status line is left as it is)."""
            user = who(request).user
            found = engine.characters.get(user, character_id) if character_id else None
            if found is None:
                return ["", "", "", "", None, ""]
            note = f"From {found.source}." if found.source else ""
            return [found.name, found.greeting, found.context, found.example_dialogue, picture_file(found, user), note]

        def listed(user, value):
            return gr.update(choices=choices(engine, user), value=value)

        def pickers(user):
            return gr.update(choices=[("No character", ""), *character_entries(engine, user)])

        def save(character_id, name, greeting, context, examples, picture, request: gr.Request):
            user = who(request).user
            try:
                picked = engine.characters.get(user, character_id) if character_id else None
                drawn = picked.picture if picked else None
                if picture:
                    drawn = thumbnail(uploaded_file(picture).read_bytes())
                    if drawn is None:
                        raise LoadstarError("the picture cannot be read: use a PNG, JPEG, WebP or GIF under 40 megapixels")
                if not (name or "").strip():
                    raise LoadstarError("a character needs a name")
                character = Character(name=name.strip(), greeting=greeting or "", context=context or "",
                                      example_dialogue=examples or "", picture=drawn,
                                      source=picked.source if picked else "created here")
                replace = character_id if character_id and ":" not in character_id else None
                saved = engine.characters.save(user, character, replace=replace)
            except (LoadstarError, ValueError, OSError) as error:  # (OSError: the picture's upload went)
                return gr.update(), f"⚠️ {problem_line(error)}", gr.update()
            return listed(user, saved.id), f"Saved **{saved.name}**.", pickers(user)

        def import_(file, request: gr.Request):
            user = who(request).user
            try:
                character = engine.characters.import_file(user, uploaded_file(file), Path(file).name)
            except LoadstarError as error:
                return gr.update(), f"⚠️ {problem_line(error)}", gr.update()
            return listed(user, character.id), f"Imported **{character.name}**.", pickers(user)

        def delete(character_id, request: gr.Request):
            user = who(request).user
            if not character_id:
                return gr.update(), "Nothing to delete: pick a character first.", gr.update()
            try:
                engine.characters.delete(user, character_id)
            except LoadstarError as error:
                return gr.update(), f"⚠️ {problem_line(error)}", gr.update()
            return listed(user, NEW), "Deleted.", pickers(user)

        def export(character_id, request: gr.Request):
            user = who(request).user
            if not character_id:
                return gr.update(visible=False), "Pick a character to export."
            try:
                data = engine.characters.export(user, character_id)
            except LoadstarError as error:
                return gr.update(visible=False), f"⚠️ {problem_line(error)}"
            try:
                folder = private_folder(engine.conversations.exports, login_folder_name(user), "characters")
                path = folder / f"{character_id.replace(':', '_')}.json"
                write_atomic(path, data)
            except OSError as error:
                return gr.update(visible=False), f"⚠️ the export could not be written: {error.strerror or error}"
            return gr.update(value=str(path), visible=True), "Exported: download it above."

        def opened(request: gr.Request):
            return listed(who(request).user, NEW)

        changed = [w.listing, w.status, chat.character]
        w.listing.change(show, w.listing, [*fields, w.source])
        w.save.click(save, [w.listing, *fields], changed)
        w.importer.upload(import_, w.importer, changed)
        w.delete.click(lambda: gr.update(visible=True), None, w.confirm_row)
        w.keep.click(lambda: gr.update(visible=False), None, w.confirm_row)
        w.confirm.click(delete, w.listing, changed).then(lambda: gr.update(visible=False), None, w.confirm_row)
        w.export.click(export, w.listing, [w.export_file, w.status])
        demo.load(opened, None, w.listing)
