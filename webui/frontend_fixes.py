"""Fixes to Gradio's own page script, served in place of the files they mend.

Gradio 6.31's status tracker (the spinner and timer each component has while an event runs)
times a pending event with a ``requestAnimationFrame`` loop that ends only when that event's
status changes. The app's own loading tracker is removed from the page while still pending, so
its loop never ends: every open page asks for 60 frames a second forever, about 10 % of a core of
renderer and compositor CPU measured here with the page idle (bench/NOTES.md), taken from the
model when the browser shares its cores. The mended loop also ends once its tracker has left the
page. The file is read from the installed Gradio when the app is built; where the text to mend is
not found (another Gradio), nothing is served in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import Response

log = logging.getLogger(__name__)

ASSETS = "templates/frontend/assets"


@dataclass(frozen=True)
class Mend:
    pattern: str  # a glob for the file under Gradio's assets
    old: str
    new: str


MENDS = (
    Mend("statustracker-*.js",
         "function ze(){me(()=>{F(Pe,(performance.now()-w(de))/1e3),W&&ze()})}",
         "function ze(){me(()=>{F(Pe,(performance.now()-w(de))/1e3),W&&($===void 0||$.isConnected)?ze():W=!1})}"),
)


def mended_assets() -> dict[str, bytes]:
    """``{file name: mended text}`` for the installed Gradio's page files that ``MENDS`` apply to."""
    folder = Path(gr.__file__).parent / ASSETS
    out = {}
    for mend in MENDS:
        for path in sorted(folder.glob(mend.pattern)):
            text = path.read_text(encoding="utf-8")
            if mend.old in text:
                out[path.name] = text.replace(mend.old, mend.new).encode()
    if len(out) < len(MENDS):
        log.info("Gradio's page files differ from the ones mended here: serving them as they are")
    return out


def serve_mended(app: FastAPI) -> None:
    """Serve the mended files at Gradio's asset paths (call before Gradio is mounted at ``/``, so
    these routes come first)."""
    for name, body in mended_assets().items():
        app.add_api_route(f"/assets/{name}", _responder(body), methods=["GET"], include_in_schema=False)


def _responder(body: bytes) -> Callable[[], Awaitable[Response]]:
    async def asset() -> Response:
        return Response(body, media_type="text/javascript")

    return asset
