"""File inputs: a path a browser hands a handler is trusted only inside Gradio's upload folder.

Under ``mount_gradio_app`` Gradio skips its own check that a file input was really uploaded
(``has_launched`` is False), so a client could name any path on the server. ``asgi.mount_ui``
turns Gradio's check back on; this is the second, independent check every file input goes through.
"""

from __future__ import annotations

from pathlib import Path

from loadstar.engine.errors import BadRequestError


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def uploaded_file(path: str | Path) -> Path:
    """``path`` if it is a regular file that Gradio received as an upload, else a one-line error."""
    candidate = Path(path)
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequestError("that file was not uploaded: choose the file again") from None
    if upload_folder() not in resolved.parents or not resolved.is_file():
        raise BadRequestError("that file was not uploaded: choose the file again")
    return resolved
