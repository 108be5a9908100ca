"""The child process that reads an attached PDF or .docx (started by ``attachments.read_attachment``).

An attached file is untrusted input, and its parsers are not cheap: 13.6 MB of .docx XML (0.67 MB
packed) took 11.5 s and 262 MiB when read in the server. So a PDF or a .docx is read here, under
an address-space limit, with a time limit the parent enforces (it kills this process), page and
XML limits, and the server's memory untouched. It imports only the standard library, pypdf and
python-docx (never the ``loadstar`` package). One JSON request on stdin, one JSON answer on stdout:
``{"ok": {"kind", "pages", "notice"}}`` or ``{"error": "one line"}``.
"""

from __future__ import annotations

import json
import resource
import sys
import zipfile
from typing import Any


class Refused(Exception):
    """The file cannot be read: one line for the user."""


def read_pdf(path: str, name: str, limits: dict[str, int]) -> tuple[list[str], str | None]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise Refused(f"{name}: the PDF is encrypted: save a copy without a password and attach that")
        count = len(reader.pages)
        pages: list[str] = []
        total = 0
        for page in reader.pages:
            if len(pages) >= limits["max_pages"]:
                break
            text = (page.extract_text() or "").strip()
            total += len(text)
            if total > limits["max_chars"]:
                break
            pages.append(text)
    except Refused:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError, AssertionError, ZeroDivisionError) as error:
        raise Refused(f"{name}: this PDF is damaged and cannot be read ({type(error).__name__})") from None
    if not pages or not any(pages):
        raise Refused(f"{name}: this PDF has no text layer (a scan?): nothing to read")
    empty = [str(i + 1) for i, text in enumerate(pages) if not text]
    notice = f"{name}: page{'s' if len(empty) > 1 else ''} {', '.join(empty[:10])} have no text" if empty else None
    if len(pages) < count:
        notice = f"{name}: only its first {len(pages)} of {count} pages were read"
    return pages, notice


def check_zip(path: str, name: str, limits: dict[str, int]) -> None:
    """Refuse a .docx that is no zip, whose parts would unpack to more than the limit, or whose
    document XML alone is larger than the XML limit."""
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for info in archive.infolist():
                total += info.file_size
                bomb = (info.compress_size and info.file_size / info.compress_size > limits["max_ratio"]
                        and info.file_size > 1024 * 1024)
                if total > limits["max_unpacked"] or bomb:
                    raise Refused(f"{name}: refused: its parts unpack to far more than the file's size (a zip bomb?)")
                if info.filename.endswith(".xml") and info.file_size > limits["max_xml"]:
                    raise Refused(f"{name}: refused: its {info.filename} is {info.file_size / 2**20:.1f} MiB of XML, "
                                  f"more than the {limits['max_xml'] / 2**20:.0f} MiB a .docx part may have")
    except zipfile.BadZipFile:
        raise Refused(f"{name}: this is not a Word .docx file (it is no zip archive)") from None


def read_docx(path: str, name: str, limits: dict[str, int]) -> tuple[list[str], str | None]:
    check_zip(path, name, limits)
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(path)
        lines = [p.text for p in document.paragraphs]
        for table in document.tables:
            for row in table.rows:
                lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile, OSError) as error:
        raise Refused(f"{name}: this .docx is damaged and cannot be read ({type(error).__name__})") from None
    except MemoryError:
        raise
    except Exception as error:  # lxml's XMLSyntaxError and kin: an untrusted file's many ways to be wrong
        said = str(error).lower()  # libxml2 out of memory: "Memory allocation failed", or no words at all
        if "memory allocation failed" in said or said.startswith("unknown error"):
            raise MemoryError from None
        raise Refused(f"{name}: this .docx cannot be read ({type(error).__name__})") from None
    text = "\n".join(lines).strip()
    notice = None
    if len(text) > limits["max_chars"]:
        text, notice = text[: limits["max_chars"]], f"{name}: only its first {limits['max_chars']:,} characters were read"
    if not text:
        raise Refused(f"{name}: this .docx holds no text")
    return [text], notice


def answer(request: dict[str, Any]) -> dict[str, Any]:
    path, name, kind, limits = request["path"], request["name"], request["kind"], request["limits"]
    try:
        pages, notice = (read_pdf if kind == "pdf" else read_docx)(path, name, limits)
    except Refused as refused:
        return {"error": str(refused)}
    except MemoryError:
        return {"error": f"{name}: reading it took more than {limits['memory'] / 2**20:.0f} MiB of memory: refused"}
    return {"ok": {"kind": kind, "pages": pages, "notice": notice}}


def main() -> int:
    request = json.loads(sys.stdin.read())
    memory = int(request["limits"]["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    sys.stdout.write(json.dumps(answer(request)))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
