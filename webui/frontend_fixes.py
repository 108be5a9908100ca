"""Fixes to Gradio's own page script, served in place of the files they mend.

Each costs CPU that, with the browser beside the model on the same cores, is taken from the model
(bench/NOTES.md has the measurements):

- Gradio 6.31's status tracker (the spinner and timer each component has while an event runs)
  times a pending event with a ``requestAnimationFrame`` loop that ends only when that event's
  status changes. The app's own loading tracker is removed from the page while still pending, so
  its loop never ran out: every open page asked for 60 frames a second forever. The mended loop
  also ends once its tracker has left the page.
- The animated logo a tracker shows over a component while its event runs went on through its
  cycle of four moves (seconds) after it was taken off the page, each move asking for every frame.
  The mended logo stops when it is taken off.
- On every status message of every event (each streamed update of a reply is one), the page hands
  the loading status of *every* component that ever had one to the app state again, each a search
  of the whole component tree and a deep copy of that component's value (the chat's whole
  history, among them), though only the running event's outputs changed and, while a reply
  streams, not even those. The mended ``update_state`` skips a loading status equal, field by
  field, to the last one it applied to that component (what it remembers is dropped when the
  page's components are made again).

The files are read from the installed Gradio when the app is built; a file where a mend's text is
not found (another Gradio) is served as it is.
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


# A loading status equal to the one last applied to that component is not applied again (a copy is
# remembered, in case Gradio changes a status in place; dropped when the components are made
# again: reload, rerender).
_SAME_STATUS = (
    "__ls=new Map;__same_status(e,t){if(!(`loading_status`in t))return!1;let s=t.loading_status,p=this.__ls.get(e);"
    "if(this.__ls.set(e,s&&{...s}),Object.keys(t).length!==1||!p||!s)return!1;let a=Object.keys(s);"
    "return a.length===Object.keys(p).length&&a.every(k=>s[k]===p[k])}"
)

MENDS = (
    Mend("statustracker-*.js",
         "function ze(){me(()=>{F(Pe,(performance.now()-w(de))/1e3),W&&ze()})}",
         "function ze(){me(()=>{F(Pe,(performance.now()-w(de))/1e3),W&&($===void 0||$.isConnected)?ze():W=!1})}"),
    # Gradio's animated logo (the Loader) went on through its whole cycle of four moves (seconds)
    # after it was taken off the page: it now stops at once, and between moves once off the page.
    Mend("statustracker-*.js",
         "async function h(){await Promise.all([f.set([125,140]),p.set([-125,-140])]),"
         "await Promise.all([f.set([-125,140]),p.set([125,-140])]),await Promise.all([f.set([-125,0]),p.set([125,-0])]),"
         "await Promise.all([f.set([125,0]),p.set([-125,0])])}",
         "async function h(){for(let[a,b]of[[[125,140],[-125,-140]],[[-125,140],[125,-140]],[[-125,0],[125,-0]],"
         "[[125,0],[-125,0]]]){if(w(m)||!y.isConnected)return;await Promise.all([f.set(a),p.set(b)])}}"),
    Mend("statustracker-*.js",
         "async function _(){await h(),w(m)||_()}",
         "async function _(){await h(),w(m)||!y.isConnected||_()}"),
    Mend("statustracker-*.js",
         "O(()=>(v(),()=>{F(m,!0)}));var y=fe();",
         "O(()=>(v(),()=>{F(m,!0),f.set([0,0],{hard:!0}),p.set([0,0],{hard:!0})}));var y=fe();"),
    Mend("core-*.js",
         "async update_state(e,t,n=!0){let r=Z(this.root,e),i=!1;",
         _SAME_STATUS + "async update_state(e,t,n=!0){if(!n&&this.__same_status(e,t))return;let r=Z(this.root,e),i=!1;"),
    Mend("core-*.js", "rerender(e,t){", "rerender(e,t){this.__ls.clear();"),
    Mend("core-*.js", "reload(e,t,n,r){", "reload(e,t,n,r){this.__ls.clear();"),
)


def mended_assets() -> dict[str, bytes]:
    """``{file name: mended text}`` for the installed Gradio's page files that ``MENDS`` apply to:
    a file is mended only when every one of its mends applies once (part of a fix can be worse
    than none)."""
    folder = Path(gr.__file__).parent / ASSETS
    out = {}
    for pattern in dict.fromkeys(mend.pattern for mend in MENDS):
        mends = [mend for mend in MENDS if mend.pattern == pattern]
        for path in sorted(folder.glob(pattern)):
            text = path.read_text(encoding="utf-8")
            if all(text.count(mend.old) == 1 for mend in mends):
                for mend in mends:
                    text = text.replace(mend.old, mend.new)
                out[path.name] = text.encode()
    if len(out) < len({mend.pattern for mend in MENDS}):
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
