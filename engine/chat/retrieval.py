"""Fitting attached files into the context: whole when they fit, else cut or searched.

``fit_files`` decides per message. Files that fit go whole; when they do not, the room left in the
context (what the prompt and the reply leave) is shared among the files that are too long, and
each is, by the user's choice, cut to its beginning (with a notice to the model) or searched: split
into chunks that never cross a page, ranked against the user's message by BM25 and, when the
loaded model gives embeddings, by their cosine too (the two rankings fused by reciprocal rank),
and the best chunks that fit (at most ``MAX_PASSAGES``) are sent, most relevant first, each
headed by its file and page.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from loadstar.engine.chat.attachments import Attachment, Quote, ReadFile

Overflow = Literal["cut", "search"]
Counter_ = Callable[[str], int]
Embedder = Callable[[list[str]], list[list[float]]]

CHUNK_WORDS = 120
OVERLAP_WORDS = 20
WRAPPER_TOKENS = 60  # the <attached_file> lines and notice around a file
# Chunks BM25 hands to the embedding ranking at most: embedding is the slow part (a 135M GGUF on
# 2 cores embeds about two chunks a second), and the best few by BM25 hold the answer nearly always.
EMBED_CANDIDATES = 24
MAX_PASSAGES = 8  # a search sends the best few passages, not as many as the context holds
MARGIN = 0.97  # of the room: token counts of pieces do not add up exactly to the count of their sum
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al.)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Chunk:
    page: int | None
    text: str


@dataclass(frozen=True)
class Fitted:
    attachments: tuple[Attachment, ...]
    ranking: str | None  # how searched files were ranked ("embeddings", "BM25"), None when none was


def chunks_of(file: ReadFile, words: int = CHUNK_WORDS, overlap: int = OVERLAP_WORDS) -> list[Chunk]:
    """Overlapping chunks of about ``words`` words; a PDF's never cross a page."""
    found = []
    for number, page in enumerate(file.pages, start=1):
        tokens = page.split()
        step = max(1, words - overlap)
        for start in range(0, max(len(tokens), 1), step):
            piece = " ".join(tokens[start:start + words])
            if piece:
                found.append(Chunk(number if file.kind == "pdf" else None, piece))
            if start + words >= len(tokens):
                break
    return found


def _terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def bm25_scores(query: str, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each text for ``query``."""
    docs = [Counter(_terms(t)) for t in texts]
    if not docs:
        return []
    lengths = [sum(d.values()) for d in docs]
    average = sum(lengths) / len(docs) or 1.0
    wanted = set(_terms(query))
    frequency = {term: sum(1 for d in docs if term in d) for term in wanted}
    scores = []
    for doc, length in zip(docs, lengths, strict=True):
        score = 0.0
        for term in wanted:
            tf = doc.get(term, 0)
            if tf:
                idf = math.log(1 + (len(docs) - frequency[term] + 0.5) / (frequency[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))
        scores.append(score)
    return scores


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def rank(query: str, chunks: Sequence[Chunk], embed: Embedder | None) -> tuple[list[int], str]:
    """Chunk indexes, most relevant first, and the ranking used."""
    lexical = bm25_scores(query, [c.text for c in chunks])
    by_bm25 = sorted(range(len(chunks)), key=lambda i: (-lexical[i], i))
    if embed is None or not query.strip():
        return by_bm25, "BM25"
    # BM25 picks the candidates (all of them when there are few); the order is the reciprocal rank
    # fusion of both rankings: a chunk that names the question's rare words and one that says the
    # same in other words both come first, whichever of the two a small model's vectors favour.
    candidates = by_bm25[:EMBED_CANDIDATES]
    vectors = embed([query, *(chunks[i].text for i in candidates)])
    similarity = {i: cosine(vectors[0], vector) for i, vector in zip(candidates, vectors[1:], strict=True)}
    by_meaning = sorted(candidates, key=lambda i: (-similarity[i], i))
    fused = {i: 1 / (RRF_K + by_meaning.index(i)) + (1 / (RRF_K + r) if lexical[i] > 0 else 0.0)
             for r, i in enumerate(candidates)}
    ordered = sorted(candidates, key=lambda i: (-fused[i], i))
    return ordered + by_bm25[EMBED_CANDIDATES:], "embeddings and BM25"


def cut_to(text: str, tokens: int, budget: int, count: Counter_) -> tuple[str, int]:
    """The start of ``text`` in at most ``budget`` tokens (``tokens``: what all of it takes)."""
    if budget <= 0:
        return "", 0
    keep = int(len(text) * budget / max(tokens, 1))
    for _ in range(6):
        piece = text[:keep]
        used = count(piece)
        if used <= budget:
            return piece, used
        keep = int(keep * budget / used * 0.97)
    return "", 0


def fit_files(
    files: Sequence[ReadFile], room: int, count: Counter_, query: str, overflow: Overflow,
    embed: Embedder | None = None,
) -> Fitted:
    """The files as attachments that together fit in ``room`` tokens."""
    room = int(room * MARGIN)
    sizes = [count(f.text) for f in files]
    need = [size + WRAPPER_TOKENS for size in sizes]
    if sum(need) <= room:
        return Fitted(tuple(_whole(f, s) for f, s in zip(files, sizes, strict=True)), None)
    # The smaller files go whole while each fits in an even share; the others share what is left.
    order = sorted(range(len(files)), key=lambda i: need[i])
    whole: set[int] = set()
    left, waiting = room, len(files)
    for i in order:
        if need[i] <= left / waiting:
            whole.add(i)
            left -= need[i]
            waiting -= 1
    share = max(0, int(left / max(waiting, 1)) - WRAPPER_TOKENS)
    made: list[Attachment] = []
    ranking = None
    for i, file in enumerate(files):
        if i in whole:
            made.append(_whole(file, sizes[i]))
        elif overflow == "cut":
            text, used = cut_to(file.text, sizes[i], share, count)
            made.append(_attachment(file, sizes[i], "cut", text=text, sent=used))
        else:
            quotes, used, ranking = _search(file, query, share, count, embed)
            made.append(_attachment(file, sizes[i], "searched", quotes=quotes, sent=used))
    return Fitted(tuple(made), ranking)


def _search(
    file: ReadFile, query: str, budget: int, count: Counter_, embed: Embedder | None,
) -> tuple[tuple[Quote, ...], int, str]:
    chunks = chunks_of(file)
    order, ranking = rank(query, chunks, embed)
    picked: list[Quote] = []
    used = 0
    for i in order:
        if len(picked) == MAX_PASSAGES:
            break
        cost = count(chunks[i].text) + 8  # its "[file, page n]" heading
        if used + cost > budget:
            if used + 40 > budget:
                break
            continue
        picked.append(Quote(page=chunks[i].page, text=chunks[i].text))
        used += cost
    return tuple(picked), used, ranking


def _whole(file: ReadFile, tokens: int) -> Attachment:
    return _attachment(file, tokens, "whole", text=file.text, sent=tokens)


def _attachment(
    file: ReadFile, tokens: int, fit: Literal["whole", "cut", "searched"], *, text: str = "",
    quotes: tuple[Quote, ...] = (), sent: int = 0,
) -> Attachment:
    return Attachment(name=file.name, kind=file.kind, pages=max(1, len(file.pages)), tokens=tokens, fit=fit,
                      text=text, quotes=quotes, sent_tokens=sent)
