"""Downloads running in the background for the UI and the admin API: start, watch, cancel."""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loadstar.engine.errors import LoadstarError, one_line
from loadstar.engine.hub.downloads import (
    DownloadCancelled,
    DownloadResult,
    HubClient,
    Progress,
    download,
    format_progress,
)
from loadstar.engine.hub.names import ModelRef, parse_model_name

log = logging.getLogger(__name__)

JobState = Literal["running", "done", "failed", "cancelled"]


@dataclass
class DownloadJob:
    id: int
    ref: ModelRef
    state: JobState = "running"
    progress: Progress | None = None
    message: str = "starting…"
    result: DownloadResult | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        self._cancel.set()

    def describe(self) -> str:
        if self.state == "running":
            return format_progress(self.progress) if self.progress else f"{self.ref}: {self.message}"
        return self.message


class DownloadManager:
    def __init__(self, models_dir: Path, endpoint: str, token: str | None = None) -> None:
        self.models_dir = models_dir
        self.endpoint = endpoint
        self._token = token
        self._jobs: dict[int, DownloadJob] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def client(self, token: str | None = None) -> HubClient:
        return HubClient(self.endpoint, token or self._token)

    def start(self, name: str, token: str | None = None, gguf_file: str | None = None) -> DownloadJob:
        """Parse ``name`` (raises BadModelNameError) and download it in a background thread."""
        ref = parse_model_name(name)
        with self._lock:
            busy = [j for j in self._jobs.values() if j.state == "running" and j.ref.folder_name == ref.folder_name]
            if busy:
                return busy[0]  # the same model is already coming: watch that one
            job = DownloadJob(next(self._ids), ref)
            self._jobs[job.id] = job
        client = self.client(token)
        thread = threading.Thread(target=self._run, args=(job, client, gguf_file), name=f"download-{job.id}", daemon=True)
        thread.start()
        return job

    def get(self, job_id: int) -> DownloadJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[DownloadJob]:
        with self._lock:
            return list(self._jobs.values())

    def _run(self, job: DownloadJob, client: HubClient, gguf_file: str | None) -> None:
        def progress(p: Progress) -> None:
            job.progress = p

        try:
            result = download(client, job.ref, self.models_dir, gguf_file=gguf_file, progress=progress, cancel=job._cancel)
        except DownloadCancelled:
            job.state, job.message = "cancelled", f"{job.ref}: cancelled; download it again to resume"
        except LoadstarError as error:
            job.state, job.message = "failed", f"{job.ref}: {error}" if str(job.ref) not in str(error) else str(error)
        except Exception as error:  # never let a download thread die silently
            log.exception("download %s failed", job.ref)
            job.state, job.message = "failed", f"{job.ref}: {one_line(error)}"
        else:
            job.result = result
            state = "already up to date" if result.up_to_date else f"{len(result.fetched)} files verified"
            job.state, job.message = "done", f"{job.ref}: {state} in {result.folder.name}"
