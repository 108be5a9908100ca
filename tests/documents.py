"""Real documents for attachment tests: PDFs written by hand (a text layer per page), .docx files
written by python-docx, and the bad ones a user may attach (encrypted, damaged, a zip bomb)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def pdf_bytes(pages: list[str]) -> bytes:
    """A valid PDF with one page per string (Helvetica, one line of text per line of the string)."""
    objects: list[bytes] = []
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    font = 3 + 2 * len(pages)
    for i, text in enumerate(pages):
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.splitlines()]
        body = "BT /F1 11 Tf 14 TL 50 760 Td " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        stream = body.encode("latin-1")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def write_pdf(path: Path, pages: list[str]) -> Path:
    path.write_bytes(pdf_bytes(pages))
    return path


def write_encrypted_pdf(path: Path, pages: list[str]) -> Path:
    from pypdf import PdfReader, PdfWriter

    plain = write_pdf(path.with_suffix(".plain.pdf"), pages)
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="AES-128")
    with path.open("wb") as out:
        writer.write(out)
    plain.unlink()
    return path


def write_docx(path: Path, paragraphs: list[str]) -> Path:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    document.save(str(path))
    return path


def write_zip_bomb_docx(path: Path, unpacked_mb: int = 150) -> Path:
    """A .docx whose document part unpacks to ``unpacked_mb`` MB of zeros (it weighs well under 1 MB)."""
    block = b"0" * (1024 * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w", force_zip64=True) as part:
            for _ in range(unpacked_mb):
                part.write(block)
    return path


def write_xml_heavy_docx(path: Path, xml_mb: float) -> Path:
    """A real .docx whose document XML is about ``xml_mb`` MB of tiny paragraphs: it packs to a few
    percent of that (the probe's 13.6 MB of XML weighed 0.67 MB) and every parser pays for it whole."""
    import random

    small = write_docx(path.with_suffix(".small.docx"), ["x"])
    words = ["row", "table", "nobody", "reads", "cell", "total", "north", "south", "q1", "q2", "sum", "net"]
    pick = random.Random(7)
    rows, size = [], 0
    while size < xml_mb * 1024 * 1024:  # varied words: it packs about as well as a real document (~20x)
        row = f"<w:p><w:r><w:t>Row of a table nobody reads: {' '.join(pick.choices(words, k=6))} {pick.randrange(10**6)}</w:t></w:r></w:p>".encode()
        rows.append(row)
        size += len(row)
    with zipfile.ZipFile(small) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "word/document.xml":
                head, _, tail = data.partition(b"<w:body>")
                data = head + b"<w:body>" + b"".join(rows) + tail.split(b"</w:p>", 1)[-1]
            target.writestr(info, data)
    small.unlink()
    return path


def long_text(fact: str = "The vault code is 4417, and the vault is behind the boiler room.", paragraphs: int = 400) -> str:
    """A handbook far longer than a small model's context (~40,000 tokens), with one fact in the middle."""
    topics = ["the parking rules", "the canteen menu", "holiday requests", "printer etiquette", "fire drills",
              "the dress code", "meeting rooms", "the coffee machine", "bicycle storage", "visitor badges"]
    out = []
    for i in range(paragraphs):
        topic = topics[i % len(topics)]
        out.append(f"Section {i + 1}. This section is about {topic}. Staff should read the notes on {topic} "
                   f"carefully, ask their manager about {topic} when unsure, and keep the office tidy while "
                   f"following the usual guidance on {topic} that applies on every floor of the building.")
        if i == paragraphs // 2:
            out.append(f"Security notice. {fact}")
    return "\n\n".join(out)
