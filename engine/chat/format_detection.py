"""Which prompt format a model folder wants, and how we know.

Tried in this order; the first that answers wins and is named to the user (``ChosenFormat.why``):

1. the user's pin for this model (Parameters panel);
2. the model's own chat template (``chat_template.jinja``, ``tokenizer_config.json``, GGUF metadata);
3. the model card: a "Prompt template: X" line, as a markdown heading, bold text or plain text
   (cards are often copied as rendered text), with the template block that follows it; a block
   that matches no named format becomes a format of its own; the YAML front matter's
   ``prompt_template`` when the card has no such line;
4. the tokenizer's added tokens (``<|im_start|>`` means ChatML, ``[INST]`` Llama-2, ...);
5. the folder name (which holds the repo name).

A model none of these place gets plain completion with ``known=False``: a chat request then
carries the notice "no chat format known for this model: pick one in Parameters".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadstar.engine.chat.prompt_formats import (
    AUTO,
    COMPLETION,
    DEFAULT_SYSTEM_MESSAGE,
    NAMED_FORMATS,
    PromptFormat,
    own_format,
)
from loadstar.engine.errors import BadRequestError

CARD_BYTES = 200_000
TOKENIZER_BYTES = 32 * 1024 * 1024  # tokenizer.json of a large vocabulary is ~10-20 MB
NO_FORMAT_NOTICE = "no chat format known for this model: pick one in Parameters"


@dataclass(frozen=True)
class ChosenFormat:
    """The format a model uses and why (shown in the UI next to the prompt, and in the API)."""

    format: PromptFormat
    why: str
    own_template: bool = False  # the model's own chat template
    known: bool = True  # False: nothing said which format; plain completion is a fallback
    source: str = "card"  # pinned | own | card | tokens | name | none
    system_message: str | None = None  # the model folder's default, used when a chat has none


def choose_format(
    *, own_template: str | None, own_source: str | None, folder: Path | None, pinned: str | None = None
) -> ChosenFormat:
    """Pick the prompt format: the user's pin, else the model's template, else what the folder says."""
    if pinned and pinned != AUTO:
        if pinned not in NAMED_FORMATS:
            raise BadRequestError(f"unknown prompt format '{pinned}' (known: {', '.join(NAMED_FORMATS)})")
        return ChosenFormat(NAMED_FORMATS[pinned], "chosen by you for this model", source="pinned")
    if own_template:
        chosen = own_format(own_template, own_source)
        return ChosenFormat(chosen, chosen.description, own_template=True, source="own")
    found = guess_format(folder) if folder is not None else None
    if found is not None:
        return found
    return ChosenFormat(COMPLETION, f"plain completion: {NO_FORMAT_NOTICE}", known=False, source="none")


def guess_format(folder: Path) -> ChosenFormat | None:
    """A format from the model card, else the tokenizer's added tokens, else the folder name."""
    return format_from_card(read_card(folder)) or format_from_tokens(folder) or format_from_name(folder.name)


# -- 3. the model card -----------------------------------------------------------------------------

# What each named format's template looks like, strongest evidence first.
_SIGNATURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ChatML", re.compile(r"<\|im_start\|>")),
    ("Zephyr", re.compile(r"<\|user\|>|<\|assistant\|>")),
    ("Llama-2 chat", re.compile(r"\[INST\]")),
    ("Alpaca", re.compile(r"### Instruction:")),
    ("Vicuna v1.1", re.compile(r"USER:.{0,80}ASSISTANT:", re.S)),
)
# The names cards give formats (TheBloke's set and common spellings).
_TITLES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ChatML", re.compile(r"chat-?ml", re.I)),
    ("Zephyr", re.compile(r"zephyr|tinyllama", re.I)),
    ("Llama-2 chat", re.compile(r"llama-?2[- ]?chat|mistral|\binst\b", re.I)),
    ("Alpaca", re.compile(r"alpaca", re.I)),
    ("Vicuna v1.1", re.compile(r"vicuna", re.I)),
)
_NO_FORMAT_TITLES = re.compile(r"^(none|unknown|completion|base|\{prompt\})\b", re.I)
_TEMPLATE_LINE = re.compile(
    r"^[ \t>#*_]*prompt[ \t]+(?:template|format)[*_ \t]*:[*_ \t]*(?P<title>[^\n]*)$", re.I | re.M
)
_FRONT_MATTER = re.compile(r"\A---\n(?P<yaml>.*?)\n---\n", re.S)
_WINDOW = 1500  # how far after a "Prompt template" line its block may be


def read_card(folder: Path) -> str:
    try:
        with (folder / "README.md").open(encoding="utf-8", errors="replace") as handle:
            return handle.read(CARD_BYTES)
    except OSError:
        return ""


def format_from_card(card: str) -> ChosenFormat | None:
    """The format a model card names: its "Prompt template: X" lines, else its front matter."""
    for match in _TEMPLATE_LINE.finditer(card):
        title = re.sub(r"[*_`#]+", "", match.group("title")).strip().rstrip(".")
        block = template_block(card[match.end(): match.end() + _WINDOW])
        chosen = _format_for(title, block, f"the model card's \"Prompt template: {title}\" line")
        if chosen is not None:
            return chosen
    front = _FRONT_MATTER.match(card)
    if front is not None:
        block = _front_matter_template(front.group("yaml"))
        if block is not None:
            return _format_for("", block, "the model card's prompt_template (front matter)")
    return None


def _format_for(title: str, block: str | None, where: str) -> ChosenFormat | None:
    if _NO_FORMAT_TITLES.match(title) and (block is None or block.strip() == "{prompt}"):
        return ChosenFormat(COMPLETION, f"plain completion: {where} says the model has no chat format")
    by_block = _signature(block)
    by_title = next((name for name, pattern in _TITLES if pattern.search(title)), None)
    name = by_block or by_title
    if name is not None:
        return ChosenFormat(NAMED_FORMATS[name], f"{name}, from {where}")
    if block and "{prompt}" in block:
        custom = format_from_block(block, title)
        if custom is not None:
            return ChosenFormat(custom, f"{custom.name}: the template block after {where}")
    return None


def _signature(block: str | None) -> str | None:
    if not block:
        return None
    return next((name for name, pattern in _SIGNATURES if pattern.search(block)), None)


def template_block(after: str) -> str | None:
    """The template that follows a "Prompt template" line: a fenced block, else the plain lines
    up to the one holding ``{prompt}`` and the role cue after it."""
    text = after.lstrip("\n")
    fence = re.match(r"[ \t]*(```|~~~)[^\n]*\n(?P<body>.*?)\n[ \t]*\1", text, re.S)
    if fence is not None:
        return fence.group("body")
    if re.match(r"[ \t]*#", text) and not text.lstrip().startswith("###"):
        return None  # the next heading: the line had no block
    lines = text.split("\n")
    for index, line in enumerate(lines[:30]):
        if "{prompt}" not in line:
            continue
        end = index + 1
        # The assistant cue may follow after a blank line ("### Response:", "ASSISTANT:").
        while end < len(lines) and (
            (lines[end].strip() == "" and end + 1 < len(lines) and _is_cue(lines[end + 1])) or _is_cue(lines[end])
        ):
            end += 1
        block = "\n".join(lines[:end])
        return block.strip("\n") + ("\n" if _ends_with_newline_cue(block) else "")
    return None


def _is_cue(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and len(stripped) <= 40 and (
        stripped.endswith(":") or stripped.startswith(("<|", "###", "[/INST]", "</s>")) or stripped.endswith("|>")
    )


def _ends_with_newline_cue(block: str) -> bool:
    last = block.rstrip("\n").rsplit("\n", 1)[-1].strip()
    return last.startswith("###") or last.endswith("|>")


def _front_matter_template(yaml_text: str) -> str | None:
    if "prompt_template" not in yaml_text:
        return None
    try:
        import yaml

        data = yaml.safe_load(yaml_text)
    except Exception:
        return None
    value = data.get("prompt_template") if isinstance(data, dict) else None
    return value if isinstance(value, str) and "{prompt}" in value else None


def format_from_block(block: str, title: str) -> PromptFormat | None:
    """A format from a card's one-turn template block (``{system_message}``, ``{prompt}``).

    The block gives the first turn exactly; later turns repeat the user cue (the text between the
    system message, or the block's last paragraph, and ``{prompt}``) and the assistant cue.
    """
    if any(marker in block for marker in ("{%", "{{", "{#", "%}", "}}", "#}")) or block.count("{prompt}") != 1:
        return None  # not a plain TheBloke-style block; never hand card text to Jinja as code
    head, tail = block.split("{prompt}")
    if "{system_message}" in head:
        before, after = head.split("{system_message}", 1)
        line_end = after.find("\n")
        system_close, user_cue = (after[: line_end + 1], after[line_end + 1:]) if line_end >= 0 else (after, "")
        first = _raw(before) + "{{ system }}" + _raw(system_close) + _raw(user_cue)
        default_system: str | None = DEFAULT_SYSTEM_MESSAGE
    else:
        paragraphs = head.rsplit("\n\n", 1)
        user_cue = paragraphs[-1]
        first = _raw(head)
        default_system = None
    if not user_cue.strip() and not tail.strip():
        return None
    template = (
        "{% for m in turns %}"
        "{% if m.role == 'user' %}"
        "{% if loop.first %}" + first + "{% else %}" + _raw(user_cue) + "{% endif %}"
        "{{ m.content }}" + _raw(tail) +
        "{% else %}{{ m.content }}\n{% endif %}"
        "{% endfor %}"
    )
    name = f"card: {title}"[:60] if title else "the card's template"
    cue = user_cue.strip()
    return PromptFormat(name, template, default_system=default_system,
                        description=f"the one-turn template from the model card ({title or 'front matter'})",
                        stop=(cue,) if cue else ())


def _raw(text: str) -> str:
    return "{% raw %}" + text + "{% endraw %}" if text else ""


# -- 4. the tokenizer's added tokens --------------------------------------------------------------

_TOKEN_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ChatML", ("<|im_start|>", "<|im_end|>")),
    ("Zephyr", ("<|user|>", "<|assistant|>")),
    ("Llama-2 chat", ("[INST]", "[/INST]")),
    ("Vicuna v1.1", ("USER:", "ASSISTANT:")),
    ("Alpaca", ("### Instruction:", "### Response:")),
)


def tokenizer_added_tokens(folder: Path) -> set[str]:
    """Tokens the tokenizer adds to its vocabulary (special and not), from its config files."""
    tokens: set[str] = set()
    config = _read_json(folder / "tokenizer_config.json", 4 * 1024 * 1024)
    if config:
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                tokens.add(entry["content"])
        tokens.update(t for t in config.get("additional_special_tokens") or () if isinstance(t, str))
        tokens.update(v for k, v in config.items() if k.endswith("_token") and isinstance(v, str))
    tokenizer = _read_json(folder / "tokenizer.json", TOKENIZER_BYTES)
    if tokenizer:
        for entry in tokenizer.get("added_tokens") or ():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                tokens.add(entry["content"])
    special = _read_json(folder / "special_tokens_map.json", 1024 * 1024)
    if special:
        for value in special.values():
            values = value if isinstance(value, list) else [value]
            tokens.update(v if isinstance(v, str) else str(v["content"]) for v in values
                          if isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str)))
    return tokens


def format_from_tokens(folder: Path) -> ChosenFormat | None:
    tokens = tokenizer_added_tokens(folder)
    for name, needed in _TOKEN_SIGNATURES:
        if all(token in tokens for token in needed):
            return ChosenFormat(NAMED_FORMATS[name], f"{name}, from the tokenizer's special tokens ({', '.join(needed)})",
                                source="tokens")
    return None


def _read_json(path: Path, limit: int) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.stat().st_size > limit:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


# -- 5. the folder name ---------------------------------------------------------------------------

_NAME_HINTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("ChatML", re.compile(r"chatml|hermes|dolphin", re.I)),
    ("Zephyr", re.compile(r"zephyr", re.I)),
    ("Llama-2 chat", re.compile(r"llama-?2-.*chat", re.I)),
    ("Vicuna v1.1", re.compile(r"vicuna", re.I)),
    ("Alpaca", re.compile(r"alpaca", re.I)),
)


def format_from_name(name: str) -> ChosenFormat | None:
    for format_name, pattern in _NAME_HINTS:
        if pattern.search(name):
            return ChosenFormat(NAMED_FORMATS[format_name], f"{format_name}, guessed from the folder name", source="name")
    return None
