"""Files attached to a chat message: read into text, and the record a conversation keeps of each.

A file is read once per upload (``AttachmentReader`` keeps what it read by the file's hash, so
the fit line and Send parse it once): plain text and code (UTF-8) here, PDF (pypdf, text per
page) and Word ``.docx`` (python-docx: paragraphs and tables) in a child process
(``attachment_child.py``) with a memory and a time limit, so a parser's cost never lands on the
server. What the model reads is stored with
the message (``Attachment.text``), so a saved or exported conversation shows and replays exactly
what was sent, whether the whole file, its cut beginning or the chunks a search picked.

Attached files are untrusted input: more than ``MAX_FILE_BYTES``, an encrypted or broken PDF, a
``.docx`` whose parts unpack to more than ``MAX_DOCX_UNPACKED`` bytes (a zip bomb) or whose XML
part is over ``MAX_DOCX_XML``, a binary file under a text name, a file whose reading takes more
than ``READ_SECONDS`` or ``READ_MEMORY``: each is one ``BadRequestError`` line, and the message is
not sent. A PDF is read up to ``MAX_PDF_PAGES`` pages (the rest is left out, with a notice).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loadstar.engine.errors import BadRequestError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_DOCX_UNPACKED = 64 * 1024 * 1024  # what the parts of a .docx may unpack to, together
MAX_DOCX_RATIO = 200  # and how much bigger than it is packed one part may be
MAX_DOCX_XML = 16 * 1024 * 1024  # one XML part of a .docx (a 1,000-page report's is a few MiB)
MAX_PDF_PAGES = 1000  # pages of a PDF that are read
READ_SECONDS = 30.0  # a PDF or .docx whose reading takes longer is refused
READ_MEMORY = 1024 * 1024 * 1024  # the reading child's address space
CACHED_FILES = 32  # files an AttachmentReader remembers (by hash) between the fit line and Send
MAX_FILES = 10  # per message
MAX_TEXT_CHARS = 5_000_000  # text read out of one file; more is cut with a notice

Kind = Literal["text", "pdf", "docx"]
Fit = Literal["whole", "cut", "searched"]

TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini",
    ".cfg", ".conf", ".log", ".xml", ".html", ".htm", ".css", ".svg", ".tex", ".py", ".pyi", ".ipynb", ".js",
    ".mjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs", ".rb",
    ".php", ".swift", ".m", ".r", ".jl", ".lua", ".pl", ".sh", ".bash", ".zsh", ".ps1", ".bat", ".sql", ".scala",
    ".hs", ".ex", ".exs", ".erl", ".clj", ".dart", ".vue", ".svelte", ".proto", ".gradle", ".cmake", ".mk",
    ".dockerfile", ".env.example", ".gitignore", ".diff", ".patch", ".srt", ".vtt",
})
TEXT_NAMES = frozenset({"makefile", "dockerfile", "readme", "license", "changelog", "notice"})
ACCEPTED = sorted(TEXT_SUFFIXES | {".pdf", ".docx"})


@dataclass(frozen=True)
class ReadFile:
    """A file read into text: ``pages`` holds a PDF's pages, one string for the other kinds."""

    name: str
    kind: Kind
    pages: tuple[str, ...]
    notice: str | None = None  # e.g. "pages 3 and 7 have no text layer"

    @property
    def text(self) -> str:
        return "\n\n".join(self.pages)


class Quote(BaseModel):
    """A chunk of a file picked by a search: what the model reads, and where it comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    page: int | None = Field(None, ge=1, description="The PDF page it starts on (None: a file without pages).")
    text: str = Field(max_length=200_000)


class Attachment(BaseModel):
    """One file attached to a user message, as the conversation keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255)
    kind: Kind
    pages: int = Field(1, ge=1, description="Pages of a PDF; 1 for the other kinds.")
    tokens: int = Field(ge=0, description="Tokens the whole file takes in the model that read it.")
    fit: Fit = Field(description="Sent whole, cut to its beginning, or searched for the parts that answer.")
    text: str = Field(max_length=MAX_TEXT_CHARS, description="What the model reads (fit 'whole' or 'cut').")
    quotes: tuple[Quote, ...] = Field((), max_length=1000, description="The chunks sent (fit 'searched').")
    sent_tokens: int = Field(0, ge=0, description="Tokens of what was sent.")

    def for_model(self) -> str:
        """The file as the model reads it, inside the user's message."""
        where = f" ({self.pages} pages)" if self.kind == "pdf" else ""
        if self.fit == "searched":
            parts = [f"[{self.name}{f', page {q.page}' if q.page else ''}]\n{q.text}" for q in self.quotes]
            body = "\n\n".join(parts)
            note = (f"The file is too long for the context ({self.tokens} tokens); these are the parts most "
                    f"relevant to the question, each headed by where it comes from.\n")
        elif self.fit == "cut":
            body = self.text
            note = f"The file is too long for the context: only its first {self.sent_tokens} of {self.tokens} tokens follow.\n"
        else:
            body, note = self.text, ""
        return f'<attached_file name="{self.name}"{where}>\n{note}{body}\n</attached_file>'


def read_attachment(path: Path, name: str) -> ReadFile:
    """Read ``path`` (uploaded as ``name``) into text, or raise a one-line ``BadRequestError``."""
    name, kind = _checked(path, name)
    if kind == "text":
        return _read_text(path, name)
    return _read_in_child(path, name, kind)


class AttachmentReader:
    """``read_attachment`` that remembers the last ``CACHED_FILES`` files it read, by their bytes'
    hash: the fit line and Send read an upload once. ``parsed`` counts the files it really read."""

    def __init__(self, cached: int = CACHED_FILES) -> None:
        self._cached = cached
        self._read: OrderedDict[tuple[str, str], ReadFile] = OrderedDict()
        self._lock = threading.Lock()
        self.parsed = 0

    def read(self, path: Path, name: str) -> ReadFile:
        name, _ = _checked(path, name)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            raise BadRequestError(f"{name}: the file could not be read: attach it again") from None
        key = (digest.hexdigest(), name)
        with self._lock:
            if key in self._read:
                self._read.move_to_end(key)
                return self._read[key]
        read = read_attachment(path, name)
        with self._lock:
            self.parsed += 1
            self._read[key] = read
            while len(self._read) > self._cached:
                self._read.popitem(last=False)
        return read


def _checked(path: Path, name: str) -> tuple[str, Kind]:
    """The file's name (no folders) and kind, after the size check; one line when it cannot be attached."""
    name = Path(name).name or "file"
    try:
        size = path.stat().st_size
    except OSError:
        raise BadRequestError(f"{name}: the file could not be read: attach it again") from None
    if size > MAX_FILE_BYTES:
        raise BadRequestError(f"{name}: {size / 1024 / 1024:.1f} MiB is more than the 20 MiB a file may have")
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        return name, "pdf"
    if suffix == ".docx":
        return name, "docx"
    if suffix in TEXT_SUFFIXES or Path(name).name.lower() in TEXT_NAMES or not suffix:
        return name, "text"
    raise BadRequestError(
        f"{name}: {suffix} files cannot be attached (text, code, Markdown, PDF and .docx files can)")


def _read_in_child(path: Path, name: str, kind: Kind) -> ReadFile:
    """A PDF or .docx read by ``attachment_child.py`` under ``READ_MEMORY`` and ``READ_SECONDS``."""
    limits = {"max_pages": MAX_PDF_PAGES, "max_chars": MAX_TEXT_CHARS, "max_unpacked": MAX_DOCX_UNPACKED,
              "max_ratio": MAX_DOCX_RATIO, "max_xml": MAX_DOCX_XML, "memory": READ_MEMORY}
    request = json.dumps({"path": str(path), "name": name, "kind": kind, "limits": limits})
    here = os.path.dirname(os.path.abspath(__file__))
    boot = ("import sys; sys.path[:0] = [sys.argv[1]] + " + repr([p for p in sys.path if p]) + "; "
            "from attachment_child import main; sys.exit(main())")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}  # nothing of the server's secrets
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", boot, here], input=request.encode(),
                              capture_output=True, timeout=READ_SECONDS, env=env, close_fds=True)
    except subprocess.TimeoutExpired:
        raise BadRequestError(f"{name}: reading it took longer than {READ_SECONDS:g} s: refused") from None
    try:
        answer = json.loads(done.stdout)
        if "error" in answer:
            raise BadRequestError(str(answer["error"]))
        ok = answer["ok"]
        return ReadFile(name, kind, tuple(str(p) for p in ok["pages"]), ok.get("notice"))
    except (ValueError, KeyError, TypeError):
        raise BadRequestError(f"{name}: reading it took more than {READ_MEMORY // 2**20} MiB of memory or "
                              "failed: refused") from None


def _cut(name: str, text: str) -> tuple[str, str | None]:
    if len(text) <= MAX_TEXT_CHARS:
        return text, None
    return text[:MAX_TEXT_CHARS], f"{name}: only its first {MAX_TEXT_CHARS:,} characters were read"


def _read_text(path: Path, name: str) -> ReadFile:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise BadRequestError(f"{name}: this is a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("cp1252")
        except UnicodeDecodeError:
            raise BadRequestError(f"{name}: the file is not UTF-8 text") from None
    text, notice = _cut(name, text.replace("\r\n", "\n"))
    return ReadFile(name, "text", (text,), notice)
