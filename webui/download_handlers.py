"""Model tab, download section: branch picker, start, progress, cancel. Plain functions over the engine."""

from __future__ import annotations

import html

from loadstar.engine.errors import LoadstarError
from loadstar.engine.facade import Engine
from loadstar.engine.hub.branch_picker import list_branches, list_gguf_files, memory_budget
from loadstar.engine.hub.downloads import Progress
from loadstar.engine.hub.names import parse_model_name
from loadstar.engine.models.folder import format_size

BRANCH_COLUMNS = ["Branch", "GGUF file", "Quantization", "Download", "Loader here", "Memory"]


class DownloadHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def branches(self, name: str, token: str | None) -> tuple[list[list[str]], str]:
        """Rows for the branch table and a status line."""
        try:
            ref = parse_model_name(name)
            client = self.engine.hub_client(token or None)
            budget = memory_budget()
            rows = list_branches(client, ref.repo_id, self.engine.loaders(), budget)
            ggufs = list_gguf_files(client, ref.repo_id, self.engine.loaders(), budget)
        except LoadstarError as error:
            return [], f"⚠️ {error}"
        table = []
        for r in rows:
            files = [g for g in ggufs if g.branch == r.branch]
            for g in files:  # a GGUF repo: one row per model file, picked by clicking it
                quant = f"GGUF {g.quant_type or '?'}" + (f" · ~{g.bits_per_weight:g} bits/weight" if g.bits_per_weight else "")
                parts = f" ({g.parts} parts)" if g.parts > 1 else ""
                table.append([r.branch, g.file + parts, quant, format_size(g.size), g.best_loader or "none", g.fits])
            if not files:
                quant = r.quantization + "".join(f"\n⚠️ {w}" for w in r.warnings)
                table.append([r.branch, "", quant, format_size(r.download_bytes), r.best_loader or "none", r.fits])
        what = f"{len(ggufs)} GGUF files" if ggufs else f"{len(rows)} branches"
        return table, f"{what} of {ref.repo_id}: pick one to fill in its name."

    @staticmethod
    def gguf_for_row(row: list[str]) -> str:
        """The GGUF file a table row names ('' for a branch row)."""
        return (row[1] if len(row) > 1 else "").split(" (")[0]

    @staticmethod
    def name_for_branch(name: str, branch: str) -> str:
        try:
            repo_id = parse_model_name(name).repo_id
        except LoadstarError:
            return name
        return repo_id if branch == "main" else f"{repo_id}:{branch}"

    def start(self, name: str, token: str | None, gguf_file: str | None) -> tuple[int | None, str]:
        try:
            job = self.engine.start_download(name, token or None, (gguf_file or "").strip() or None)
        except LoadstarError as error:
            return None, f"⚠️ {error}"
        return job.id, f"Downloading {job.ref}…"

    def poll(self, job_id: int | None) -> tuple[str, str, bool]:
        """(status line, progress bars as HTML, finished?)"""
        job = self.engine.download_job(job_id) if job_id else None
        if job is None:
            return "", "", True
        prefix = {"done": "✅ ", "failed": "⚠️ ", "cancelled": "⏹ "}.get(job.state, "⬇️ ")
        if job.state == "running" and job.progress:  # the numbers are on the bars
            return f"{prefix}Downloading {job.ref}…", progress_bars(job.progress), False
        return prefix + job.describe(), "", job.state != "running"

    def cancel(self, job_id: int | None) -> str:
        job = self.engine.download_job(job_id) if job_id else None
        if job is None or job.state != "running":
            return "Nothing is downloading."
        job.cancel()
        return "Cancelling… (the partial download is kept: start it again to resume)"


def progress_bars(p: Progress) -> str:
    """Two bars: the file being fetched, and all files (bytes, files, speed, time left)."""
    eta = p.eta_seconds
    left = f" · {_duration(eta)} left" if eta is not None else ""
    overall = (f"All: {format_size(p.done)} of {format_size(p.total)} · {p.files_done} of {p.files_total} files"
               f" · {format_size(int(p.bytes_per_second))}/s{left}")
    this_file = f"{p.file}: {format_size(p.file_done)} of {format_size(p.file_total)}"
    return "".join(
        f'<div class="download-bar"><label>{html.escape(text)}</label>'
        f'<progress id="{name}" value="{done}" max="{max(total, 1)}"></progress></div>'
        for name, text, done, total in (
            ("download-file-bar", this_file, p.file_done, p.file_total),
            ("download-all-bar", overall, p.done, p.total),
        )
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
