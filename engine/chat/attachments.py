"""Files attached to a chat message: read into text, and the record a conversation keeps of each.

A file is read once, when its message is sent: plain text and code (UTF-8), PDF (pypdf, text per
page) and Word ``.docx`` (python-docx: paragraphs and tables). What the model reads is stored with
the message (``Attachment.text``), so a saved or exported conversation shows and replays exactly
what was sent, whether the whole file, its cut beginning or the chunks a search picked.

Attached files are untrusted input: more than ``MAX_FILE_BYTES``, an encrypted or broken PDF, a
``.docx`` whose parts unpack to more than ``MAX_DOCX_UNPACKED`` bytes (a zip bomb), a binary file
under a text name: each is one ``BadRequestError`` line, and the message is not sent.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loadstar.engine.errors import BadRequestError

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_DOCX_UNPACKED = 100 * 1024 * 1024  # what the parts of a .docx may unpack to, together
MAX_DOCX_RATIO = 200  # and how much bigger than it is packed one part may be
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
    name = Path(name).name or "file"
    try:
        size = path.stat().st_size
    except OSError:
        raise BadRequestError(f"{name}: the file could not be read: attach it again") from None
    if size > MAX_FILE_BYTES:
        raise BadRequestError(f"{name}: {size / 1024 / 1024:.1f} MiB is more than the 20 MiB a file may have")
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(path, name)
    if suffix == ".docx":
        return _read_docx(path, name)
    if suffix in TEXT_SUFFIXES or Path(name).name.lower() in TEXT_NAMES or not suffix:
        return _read_text(path, name)
    raise BadRequestError(
        f"{name}: {suffix} files cannot be attached (text, code, Markdown, PDF and .docx files can)")


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


def _read_pdf(path: Path, name: str) -> ReadFile:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise BadRequestError(f"{name}: the PDF is encrypted: save a copy without a password and attach that")
        pages = []
        total = 0
        for page in reader.pages:
            text = (page.extract_text() or "").strip()
            total += len(text)
            if total > MAX_TEXT_CHARS:
                break
            pages.append(text)
    except BadRequestError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, AssertionError, ZeroDivisionError) as error:
        raise BadRequestError(f"{name}: this PDF is damaged and cannot be read ({type(error).__name__})") from None
    if not pages or not any(pages):
        raise BadRequestError(f"{name}: this PDF has no text layer (a scan?): nothing to read")
    empty = [str(i + 1) for i, text in enumerate(pages) if not text]
    notice = f"{name}: page{'s' if len(empty) > 1 else ''} {', '.join(empty[:10])} have no text" if empty else None
    if len(pages) < len(reader.pages):
        notice = f"{name}: only its first {len(pages)} of {len(reader.pages)} pages were read"
    return ReadFile(name, "pdf", tuple(pages), notice)


def _check_zip(path: Path, name: str) -> None:
    """Refuse a .docx that is no zip, or whose parts would unpack to far more than it weighs."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for info in archive.infolist():
                total += info.file_size
                if total > MAX_DOCX_UNPACKED or (
                        info.compress_size and info.file_size / info.compress_size > MAX_DOCX_RATIO
                        and info.file_size > 1024 * 1024):
                    raise BadRequestError(
                        f"{name}: refused: its parts unpack to far more than the file's size (a zip bomb?)")
    except zipfile.BadZipFile:
        raise BadRequestError(f"{name}: this is not a Word .docx file (it is no zip archive)") from None


def _read_docx(path: Path, name: str) -> ReadFile:
    _check_zip(path, name)
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(str(path))
        lines = [p.text for p in document.paragraphs]
        for table in document.tables:
            for row in table.rows:
                lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise BadRequestError(f"{name}: this .docx is damaged and cannot be read ({type(error).__name__})") from None
    except Exception as error:  # lxml's XMLSyntaxError and kin: an untrusted file's many ways to be wrong
        raise BadRequestError(f"{name}: this .docx cannot be read ({type(error).__name__})") from None
    text, notice = _cut(name, "\n".join(lines).strip())
    if not text:
        raise BadRequestError(f"{name}: this .docx holds no text")
    return ReadFile(name, "docx", (text,), notice)
