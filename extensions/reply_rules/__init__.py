"""Reply rules: find-and-replace rules applied to every finished reply (plain text or regular expressions).

What users of chat UIs keep asking for: strip a model's habitual sign-off, turn "As an AI
language model, " into nothing, fix a name it always misspells, cut trailing whitespace. Rules
are edited in a panel under the chat, checked when saved (a bad regular expression is a one-line
error, nothing is half-saved) and kept in ``<data dir>/extensions/reply_rules/rules.json``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loadstar import (
    BadRequestError,
    PluginContext,
    ReplyDraft,
    UIContribution,
    first_problem,
    hookimpl,
    read_store,
    write_atomic,
)

log = logging.getLogger(__name__)
MAX_RULES = 100


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    find: str = Field(min_length=1, max_length=500, description="Text (or a regular expression) to find.")
    replace: str = Field("", max_length=2000, description="What to put instead; \\1 refers to a group in a regex.")
    regex: bool = Field(False, description="Treat 'find' as a Python regular expression.")

    def compiled(self) -> re.Pattern[str]:
        try:
            return re.compile(self.find if self.regex else re.escape(self.find))
        except re.error as error:
            raise BadRequestError(f"rule '{self.find}': not a valid regular expression: {error}") from None

    def apply(self, text: str) -> str:
        replacement = self.replace if self.regex else self.replace.replace("\\", "\\\\")
        try:
            return self.compiled().sub(replacement, text)
        except (re.error, IndexError) as error:
            raise BadRequestError(f"rule '{self.find}': bad replacement: {error}") from None


class RuleBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)

    def apply(self, text: str) -> str:
        for rule in self.rules:
            text = rule.apply(text)
        return text


def rules_from_rows(rows: list[list[Any]]) -> RuleBook:
    """Rules from the panel's table rows (find, replace, regex); blank rows are dropped."""
    rules = []
    for number, row in enumerate(rows, start=1):
        cells = [("" if cell is None else cell) for cell in ([*list(row), "", "", False])[:3]]
        find, replace, regex = str(cells[0]), str(cells[1]), cells[2]
        if not find.strip() and not replace.strip():
            continue
        is_regex = regex if isinstance(regex, bool) else str(regex).strip().lower() in ("true", "yes", "1", "x")
        try:
            rule = Rule(find=find, replace=replace, regex=is_regex)
        except ValidationError as error:
            raise BadRequestError(f"row {number}: {first_problem(error)[1]}") from None
        rule.compiled()  # a bad expression is refused when saved, not when a reply arrives
        rules.append(rule)
    if len(rules) > MAX_RULES:
        raise BadRequestError(f"at most {MAX_RULES} rules")
    return RuleBook(rules=rules)


class ReplyRules:
    """Applies the saved rules to each finished reply."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._book: RuleBook | None = None  # read once, replaced on save: no file read per reply

    def load(self) -> RuleBook:
        if self._book is None:
            self._book = self._read()
        return self._book

    def _read(self) -> RuleBook:
        if self.path is None:
            return RuleBook()
        return read_store(self.path, RuleBook)

    def save(self, book: RuleBook) -> None:
        if self.path is None:
            raise BadRequestError("reply rules are not configured yet")
        write_atomic(self.path, book.model_dump_json(indent=1).encode("utf-8"))
        self._book = book

    @hookimpl
    def configure(self, settings: Any) -> None:
        self.path = Path(settings.data_dir) / "extensions" / "reply_rules" / "rules.json"
        self._book = None

    @hookimpl
    def modify_reply(self, reply: ReplyDraft) -> None:
        reply.text = self.load().apply(reply.text)

    @hookimpl
    def webui_contribution(self, register: Any) -> None:
        register(UIContribution("Reply rules", lambda context: _build_panel(self, context), placement="panel"))


def _build_panel(plugin: ReplyRules, context: PluginContext) -> None:
    import gradio as gr  # only the web UI calls this

    def rows() -> list[list[Any]]:
        return [[r.find, r.replace, r.regex] for r in plugin.load().rules] or [["", "", False]]

    gr.Markdown("Applied in order to every finished reply. Tick *regex* for a regular expression.")
    table = gr.Dataframe(rows(), headers=["find", "replace", "regex"], datatype=["str", "str", "bool"],
                         # gradio 6.31 still honours (count, "fixed"), which its types no longer list (and its
                         # typed column_limits is "not yet implemented"): three columns, rows as many as wanted
                         interactive=True, row_count=(1, "dynamic"), col_count=(3, "fixed"),  # type: ignore[arg-type]
                         elem_id="reply-rules-table")
    with gr.Row():
        sample = gr.Textbox(label="Try on a text", elem_id="reply-rules-sample", scale=3)
        save = gr.Button("Save rules", elem_id="reply-rules-save", scale=1)
    result = gr.Markdown(elem_id="reply-rules-status")

    def save_rules(table_value, text):
        data = table_value.values.tolist() if hasattr(table_value, "values") else table_value or []
        try:
            book = rules_from_rows(data)
            plugin.save(book)
        except BadRequestError as error:
            return f"⚠️ {error}"
        except OSError as error:
            return f"⚠️ could not save the rules: {error.strerror or error}"
        tried = f" “{text}” → “{book.apply(text)}”" if text else ""
        return f"Saved {len(book.rules)} rule(s).{tried}"

    save.click(save_rules, [table, sample], result)


def create_plugin() -> ReplyRules:
    return ReplyRules()
