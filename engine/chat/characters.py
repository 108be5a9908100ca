"""Characters: a name, a picture, a greeting, who they are (the system message) and example dialogue.

A conversation may be with a character: its greeting opens the chat, its name and picture show on
its replies, and its description is the system message the model reads (the conversation's own
system message, when set, wins). Characters are files like conversations: one JSON file each in
``<data dir>/characters/<login>/<id>.json``, written atomically, with a small PNG thumbnail of
the picture inside. Extensions add their own through the ``register_characters`` hook (read-only).

Imported from what people already have, all treated as untrusted input:
- text-generation-webui's YAML (``name``, ``greeting``, ``context``; its older ``char_*`` keys too);
- character cards as JSON (V1's flat fields; V2/V3: ``{"spec": "chara_card_v2", "data": {...}}``);
- character cards as PNG: the card is base64 JSON in a ``chara`` (or ``ccv3``) text chunk, and the
  image itself is the picture;
- Loadstar's own export (the same JSON as the stored file).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadstar.engine.atomic import login_folder_name, private_folder, write_atomic
from loadstar.engine.errors import BadRequestError, LoadstarError, problem_line
from loadstar.engine.untrusted_json import UntrustedJsonError, parse_untrusted_json

FORMAT = "loadstar-character/1"
MAX_IMPORT_BYTES = 20 * 1024 * 1024  # a card PNG with a large picture
MAX_CARD_BYTES = 2 * 1024 * 1024  # the card's JSON inside it
MAX_PICTURE_PIXELS = 40_000_000  # refused before the image is decoded
THUMBNAIL = 128  # px, the longer side of the stored picture
MAX_THUMBNAIL_BYTES = 256 * 1024
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_PNG = b"\x89PNG\r\n\x1a\n"
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class Character(BaseModel):
    """One character. ``picture``: a small PNG, base64 (None: no picture)."""

    model_config = ConfigDict(extra="ignore")

    format: str = FORMAT
    id: str = Field("", max_length=64, description="Its file name: made from the name when saved.")
    name: str = Field(min_length=1, max_length=100)
    greeting: str = Field("", max_length=20_000, description="The first message of a new conversation with it.")
    context: str = Field("", max_length=100_000, description="Who it is: the system message the model reads.")
    example_dialogue: str = Field("", max_length=50_000, description="Example exchanges, added to the system message.")
    picture: str | None = Field(None, max_length=MAX_THUMBNAIL_BYTES * 2, description="A small PNG, base64.")
    source: str = Field("", max_length=200, description="Where it came from: created here, a file, an extension.")

    @field_validator("picture")
    @classmethod
    def _base64_png(cls, value: str | None) -> str | None:
        """Only base64 of a PNG: the page puts it in a style sheet, so nothing else may pass."""
        if value is None or value == "":
            return None
        if not _BASE64.match(value) or not base64.b64decode(value[:16] + "=" * (-len(value[:16]) % 4)).startswith(_PNG):
            raise ValueError("the picture is not a base64 PNG")
        return value

    def system_message(self, user: str = "You") -> str:
        """What the model reads before the conversation: the context, then the example dialogue."""
        parts = [self.context.strip()]
        examples = re.sub(r"(?im)^\s*<START>\s*$", "", self.example_dialogue).strip()
        if examples:
            parts.append("Example dialogue:\n" + re.sub(r"\n{3,}", "\n\n", examples))
        return self.fill("\n\n".join(p for p in parts if p), user)

    def opening(self, user: str = "You") -> str:
        return self.fill(self.greeting, user).strip()

    def fill(self, text: str, user: str = "You") -> str:
        """Cards write ``{{char}}`` and ``{{user}}`` (text-generation-webui also ``<BOT>``, ``<USER>``)."""
        for mark, value in (("{{char}}", self.name), ("{{user}}", user), ("<BOT>", self.name), ("<USER>", user)):
            text = re.sub(re.escape(mark), value.replace("\\", "\\\\"), text, flags=re.IGNORECASE)
        return text


def character_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.casefold()).strip("-")[:48]
    return slug or "character"


class CharacterStore:
    """The characters of each login, one file each."""

    def __init__(self, root: Path, provided: Callable[[], Iterable[tuple[str, Character]]] | None = None) -> None:
        self.root = root
        self._provided: Callable[[], Iterable[tuple[str, Character]]] = provided or tuple  # (plugin, character) from the register_characters hook

    def folder(self, user: str | None) -> Path:
        return private_folder(self.root, login_folder_name(user))

    def all(self, user: str | None) -> list[Character]:
        """The login's characters by name, then the extensions' (ids ``plugin:id``); bad files are skipped."""
        found = []
        for path in sorted(self.folder(user).glob("*.json")):
            try:
                found.append(Character.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError, ValueError):
                continue
        own = sorted(found, key=lambda c: (c.name.casefold(), c.id))
        return own + [c for _, c in self._extension_characters()]

    def get(self, user: str | None, character_id: str | None) -> Character | None:
        if not character_id:
            return None
        if ":" in character_id:
            return next((c for _, c in self._extension_characters() if c.id == character_id), None)
        if not _ID.match(character_id):
            return None
        try:
            return Character.model_validate_json((self.folder(user) / f"{character_id}.json").read_bytes())
        except (OSError, ValidationError, ValueError):
            return None

    def find(self, user: str | None, name_or_id: str) -> Character:
        """A character by id, else by name (case ignored); one line when there is none."""
        wanted = (name_or_id or "").strip()
        found = self.get(user, wanted) or next(
            (c for c in self.all(user) if c.name.casefold() == wanted.casefold()), None)
        if found is None:
            raise BadRequestError(f"no character named {wanted[:100]!r}")
        return found

    def save(self, user: str | None, character: Character, replace: str | None = None) -> Character:
        """Write ``character``; ``replace``: the id of the one it updates (else a new id from its name)."""
        if replace is not None and (":" in replace or not _ID.match(replace)):
            raise BadRequestError("characters from extensions cannot be changed: save a copy under another name")
        try:
            saved = Character.model_validate({**character.model_dump(), "id": replace or character_id(character.name),
                                              "format": FORMAT})
        except ValidationError as error:
            raise BadRequestError(f"the character is not valid: {problem_line(error)}") from None
        claimed = None
        try:
            folder = self.folder(user)
            if replace is None:  # (a slug of at most 48 characters: a suffix keeps it within the id's 64)
                claimed = folder / f"{_free_id(folder, saved.id)}.json"
                saved = saved.model_copy(update={"id": claimed.stem})
            write_atomic(folder / f"{saved.id}.json", saved.model_dump_json(indent=1).encode("utf-8"))
        except OSError as error:  # a full or refusing disk: nothing half-written stays
            if claimed is not None:
                claimed.unlink(missing_ok=True)
            raise LoadstarError(f"{saved.name} could not be saved: {error.strerror or error}") from None
        return saved

    def delete(self, user: str | None, character_id: str) -> None:
        if not _ID.match(character_id or ""):
            raise BadRequestError("characters from extensions cannot be deleted")
        try:
            (self.folder(user) / f"{character_id}.json").unlink()
        except FileNotFoundError:
            raise BadRequestError(f"no character {character_id}") from None
        except OSError as error:
            raise LoadstarError(f"{character_id} could not be deleted: {error.strerror or error}") from None

    def export(self, user: str | None, character_id: str) -> bytes:
        found = self.get(user, character_id)
        if found is None:
            raise BadRequestError(f"no character {character_id}")
        return found.model_dump_json(indent=1).encode("utf-8")

    def import_file(self, user: str | None, path: Path, name: str | None = None) -> Character:
        """Import a YAML, JSON or PNG character file as a new character (never overwrites one)."""
        try:
            if path.stat().st_size > MAX_IMPORT_BYTES:
                raise BadRequestError(f"the file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")
            data = path.read_bytes()
        except OSError as error:
            raise BadRequestError(f"cannot read the file: {error.strerror or error}") from None
        return self.save(user, read_character(data, name or path.name))

    def _extension_characters(self) -> list[tuple[str, Character]]:
        found = []
        for plugin, character in self._provided():
            try:
                checked = Character.model_validate({**character.model_dump(), "format": FORMAT,  # ids become file names
                                                    "id": f"{character_id(plugin)}:{character_id(character.name)}",
                                                    "source": f"extension {plugin}"})
            except ValidationError:
                continue
            found.append((plugin, checked))
        return found


def _free_id(folder: Path, wanted: str) -> str:
    """A new id from ``wanted`` (``wanted-2``, ``-3``... when taken), claimed by creating its file, empty
    until the save replaces it: two saves of one name at once get two ids, never one file."""
    candidate, number = wanted, 2
    while True:
        try:
            os.close(os.open(folder / f"{candidate}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return candidate
        except FileExistsError:
            candidate, number = f"{wanted}-{number}", number + 1


# -- reading what people have ---------------------------------------------------------------------

def read_character(data: bytes, file_name: str = "") -> Character:
    """A character from a file's bytes (PNG card, JSON card or export, YAML); one line when it is none."""
    if len(data) > MAX_IMPORT_BYTES:
        raise BadRequestError(f"the file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")
    if data.startswith(_PNG):
        card, picture = card_from_png(data), thumbnail(data)
        return character_from(card, f"card {file_name}".strip(), picture)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadRequestError("the file is neither a PNG card nor text (YAML or JSON)") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return character_from(_json(text, "the file"), f"card {file_name}".strip())
    return character_from(_yaml(text), f"text-generation-webui {file_name}".strip())


def _json(text: str | bytes, name: str) -> Any:
    try:
        return parse_untrusted_json(text, name)  # bounded in depth: a deep file is one line, not a RecursionError
    except UntrustedJsonError as error:
        raise BadRequestError(str(error)) from None


def _yaml(text: str) -> dict[str, Any]:
    import yaml  # only here: importing the chat must not load it

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raise BadRequestError("the file is not valid YAML or JSON") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise BadRequestError("the file's YAML is nested too deeply") from None
    if not isinstance(raw, dict):
        raise BadRequestError("the file holds no character: expected YAML keys such as name, greeting, context")
    return raw


def _text(raw: dict[str, Any], *keys: str) -> str:
    for key in keys:
        value = raw.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def character_from(raw: Any, source: str, picture: str | None = None) -> Character:
    """A character from a parsed file (a card's fields, text-generation-webui's keys, our own export)."""
    if not isinstance(raw, dict):
        raise BadRequestError("the file holds no character")
    if raw.get("format") == FORMAT:  # our own export
        fields = {k: v for k, v in raw.items() if k != "id"}
        return _validated({**fields, "source": raw.get("source") or source})
    data = raw.get("data")
    card: dict[str, Any] = data if isinstance(data, dict) else raw  # V2/V3 keep the fields in "data"
    name = _text(card, "name", "char_name")
    if not name:
        raise BadRequestError("the file holds no character: it has no name")
    description = _text(card, "description", "char_persona")
    personality = _text(card, "personality")
    scenario = _text(card, "scenario", "world_scenario")
    context = _text(card, "context") or "\n\n".join(part for part in (
        _text(card, "system_prompt"), description, f"Personality: {personality}" if personality else "",
        f"Scenario: {scenario}" if scenario else "") if part)
    return _validated({
        "name": name.strip()[:100],
        "greeting": _text(card, "greeting", "first_mes", "char_greeting"),
        "context": context,
        "example_dialogue": _text(card, "example_dialogue", "mes_example"),
        "picture": picture,
        "source": source,
    })


def _validated(fields: dict[str, Any]) -> Character:
    try:
        return Character.model_validate(fields)
    except ValidationError as error:
        raise BadRequestError(f"the character is not valid: {problem_line(error)}") from None


def png_chunks(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    """(type, payload) of a PNG's chunks, checked against the file's length; stops at IEND."""
    if not data.startswith(_PNG):
        raise BadRequestError("not a PNG file")
    at = len(_PNG)
    while at + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        end = at + 8 + length
        if end + 4 > len(data):
            raise BadRequestError("the PNG file is cut short")
        yield kind, data[at + 8 : end]
        if kind == b"IEND":
            return
        at = end + 4
    raise BadRequestError("the PNG file is cut short")


def card_from_png(data: bytes) -> dict[str, Any]:
    """The card a PNG carries: base64 JSON in a ``ccv3`` or ``chara`` text chunk (tEXt, zTXt or iTXt)."""
    found: dict[str, bytes] = {}
    for kind, payload in png_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        keyword, _, rest = payload.partition(b"\0")
        key = keyword.decode("latin-1").casefold()
        if key not in ("chara", "ccv3"):
            continue
        try:
            if kind == b"zTXt":
                rest = _inflate(rest[1:])
            elif kind == b"iTXt":
                compressed, rest = rest[:1] == b"\1", rest[2:]
                rest = rest.split(b"\0", 2)[-1]  # after the language tag and translated keyword
                rest = _inflate(rest) if compressed else rest
        except zlib.error:
            continue
        found[key] = rest
    text = found.get("ccv3") or found.get("chara")
    if text is None:
        raise BadRequestError("the PNG carries no character card (no 'chara' text chunk)")
    if len(text) > MAX_CARD_BYTES * 2:
        raise BadRequestError("the card in the PNG is too large")
    try:
        decoded = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise BadRequestError("the PNG's character card is not base64") from None
    card = _json(decoded, "the PNG's character card")
    if not isinstance(card, dict):
        raise BadRequestError("the PNG's character card is not an object")
    return card


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_CARD_BYTES * 2)
    if inflater.unconsumed_tail:
        raise BadRequestError("the card in the PNG is too large")
    return out


def thumbnail(data: bytes) -> str | None:
    """A picture (PNG, JPEG, WebP, GIF) as a small PNG, base64; None when it cannot be read. Its size
    is read from its header and checked before anything is decoded."""
    from PIL import Image  # only here

    try:
        with Image.open(io.BytesIO(data)) as image:  # lazy: the header only
            width, height = image.size
            if width * height > MAX_PICTURE_PIXELS or image.format not in ("PNG", "JPEG", "WEBP", "GIF"):
                return None
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            out = io.BytesIO()
            image.convert("RGBA").save(out, format="PNG", optimize=True)
    except Exception:  # an untrusted image: whatever its decoder raises (PIL raises SyntaxError too), no picture
        return None
    small = out.getvalue()
    return base64.b64encode(small).decode("ascii") if len(small) <= MAX_THUMBNAIL_BYTES else None
