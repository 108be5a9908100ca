"""A hostile Hub (or mirror, or proxy behind HF_ENDPOINT): nothing is written outside the models
folder, no file is taken that only the operator may write, and lying sizes end in a bounded error."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from loadstar.engine.hub.downloads import RETRIES, DownloadError, HubClient, download
from loadstar.engine.hub.names import parse_model_name
from tests.helpers import run_server
from tests.security.hostile_hub import HostileHub


@pytest.fixture
def hub():
    server = HostileHub().start()
    yield server
    server.stop()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_paths_that_leave_the_folder_are_refused_and_nothing_is_written(hub, tmp_path):
    absolute = f"/tmp/loadstar-abs-{uuid.uuid4().hex}.txt"
    outside = tmp_path / "outside"
    outside.mkdir()
    models = outside / "a" / "b" / "models"
    models.mkdir(parents=True)
    for i, hostile in enumerate(["../../../escape.txt", "sub/../../../../x.txt", absolute, "./config.json",
                                 "a\\..\\..\\win.txt", ".downloads/other/config.json"]):
        hub.repo(f"evil/repo{i}").add_commit("main", {"config.json": b"{}", hostile: b"pwned"})
        with pytest.raises(DownloadError) as refused:
            download(HubClient(hub.url), parse_model_name(f"evil/repo{i}"), models)
        message = str(refused.value)
        assert "\n" not in message and "refused" in message
    assert files_under(outside) == set()  # not even the harmless config.json: the whole repo is refused
    assert not Path(absolute).exists()
    assert sum(hub.gets.values()) == 0  # refused from the listing, before any file was fetched


def test_the_cli_says_one_line_and_fails(hub, tmp_path, monkeypatch):
    hub.repo("evil/cli").add_commit("main", {"config.json": b"{}", "../../escape.txt": b"pwned"})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = run_server("download", "evil/cli", "--models-dir", str(tmp_path / "models"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refused" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "escape.txt").exists() and "verified" not in result.stdout


def test_a_symlink_planted_in_the_staging_folder_is_not_followed(hub, tmp_path):
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    elsewhere.mkdir()
    hub.repo("org/linked").add_commit("main", {"config.json": b"{}", "sub/tokenizer.json": b"{}"})
    staging = models / ".downloads" / "org_linked"
    staging.mkdir(parents=True)
    os.symlink(elsewhere, staging / "sub")
    with pytest.raises(DownloadError, match="outside"):
        download(HubClient(hub.url), parse_model_name("org/linked"), models)
    assert files_under(elsewhere) == set()


def test_operator_files_are_never_downloaded(hub, tmp_path):
    remote = {"base_url": "http://127.0.0.1:9/v1", "model": "x", "api_key_env": "HF_TOKEN"}
    hub.repo("evil/remote").add_commit("main", {
        "config.json": b"{}", "model.safetensors": b"\0" * 8, "remote.json": json.dumps(remote).encode(),
        "loadstar-download.json": b'{"files": {"../../x": {}}}',
    })
    result = download(HubClient(hub.url), parse_model_name("evil/remote"), tmp_path)
    assert not (result.folder / "remote.json").exists()
    record = json.loads((result.folder / "loadstar-download.json").read_text())
    assert record["repo"] == "evil/remote" and "remote.json" not in record["files"]
    assert {"path": "remote.json", "why": "operator-only file: never taken from a download"} in record["skipped"]


def test_a_file_shorter_than_listed_ends_in_a_bounded_error(hub, tmp_path):
    hub.repo("liar/short").add_commit("main", {"config.json": b"{}", "tokenizer.json": b"{}"})
    hub.declared_size["tokenizer.json"] = 100  # served as 2 bytes
    started = time.monotonic()
    with pytest.raises(DownloadError) as failed:
        download(HubClient(hub.url), parse_model_name("liar/short"), tmp_path)
    assert "\n" not in str(failed.value)
    assert hub.gets["tokenizer.json"] <= 2 * (RETRIES + 1)  # was 32,441 GETs in 120 s
    assert time.monotonic() - started < 60
    assert not (tmp_path / "liar_short").exists()  # nothing half-visible


def test_a_file_longer_than_listed_is_cut_off_at_once(hub, tmp_path):
    hub.repo("liar/long").add_commit("main", {"config.json": b"{}", "tokenizer.json": b"{}"})
    hub.endless.add("tokenizer.json")  # listed as 2 bytes, served without end
    with pytest.raises(DownloadError, match="more than the 2 bytes"):
        download(HubClient(hub.url), parse_model_name("liar/long"), tmp_path)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written < 1024 * 1024  # was over 100 MB
    assert hub.gets["tokenizer.json"] == 1
    assert not (tmp_path / "liar_long").exists()


def test_two_repos_that_map_to_one_folder_never_mix(hub, tmp_path):
    hub.repo("a/b_c").add_commit("main", {"config.json": b'{"first": true}'})
    hub.repo("a_b/c").add_commit("main", {"config.json": b'{"second": true}'})
    first = download(HubClient(hub.url), parse_model_name("a/b_c"), tmp_path)
    with pytest.raises(DownloadError) as clash:
        download(HubClient(hub.url), parse_model_name("a_b/c"), tmp_path)
    assert "already holds a/b_c:main" in str(clash.value) and "\n" not in str(clash.value)
    assert json.loads((first.folder / "config.json").read_text()) == {"first": True}
    # a branch whose folder name equals another repo's: org/repo:x and org/repo_x
    hub.repo("org/repo").add_commit("x", {"config.json": b"{}"})
    hub.repo("org/repo_x").add_commit("main", {"config.json": b'{"other": 1}'})
    download(HubClient(hub.url), parse_model_name("org/repo:x"), tmp_path)
    with pytest.raises(DownloadError, match="already holds org/repo:x"):
        download(HubClient(hub.url), parse_model_name("org/repo_x"), tmp_path)


def test_a_listing_larger_than_the_free_disk_is_refused_before_the_first_byte(hub, tmp_path):
    """A file listed at 10^15 bytes was fetched until the disk filled (311 MB of .part in 5 minutes)."""
    hub.repo("liar/huge").add_commit("main", {"config.json": b"{}", "model.safetensors": b"\0" * 64})
    hub.declared_size["model.safetensors"] = 10**15
    models = tmp_path / "models"
    with pytest.raises(DownloadError) as refused:
        download(HubClient(hub.url), parse_model_name("liar/huge"), models)
    message = str(refused.value)
    assert "\n" not in message and "free on the disk of" in message and message.endswith("nothing downloaded"), message
    assert sum(hub.gets.values()) == 0 and not models.exists()  # not a byte, not a folder


def test_a_disk_filled_by_something_else_stops_the_download_in_one_line_and_it_resumes(hub, tmp_path, monkeypatch):
    from loadstar.engine.hub import downloads

    body = os.urandom(8 << 20)
    hub.repo("org/big").add_commit("main", {"config.json": b"{}", "model.safetensors": body})
    models, filler = tmp_path / "models", tmp_path / "filler.bin"
    # A disk of its own, as big as the download plus 16 MiB, that holds only what is written under
    # tmp_path: the suite's other worker writes to the real disk meanwhile, and its free space moved
    # by more than 16 MiB between this test's measure and the download's check.
    disk = len(body) + (16 << 20)
    monkeypatch.setattr(downloads, "free_space", lambda path: disk - sum(
        f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()))
    monkeypatch.setattr(downloads, "DISK_CHECK_EVERY", 1 << 20)
    monkeypatch.setattr(downloads, "DISK_SPARE", 0)

    def something_else_writes(progress):
        if not filler.exists():
            filler.write_bytes(b"\1" * (64 << 20))  # another program takes 64 MiB meanwhile

    with pytest.raises(DownloadError) as stopped:
        download(HubClient(hub.url), parse_model_name("org/big"), models, progress=something_else_writes)
    message = str(stopped.value)
    assert "\n" not in message and "model.safetensors: stopped at" in message and "run the same download again" in message
    part = next((models / ".downloads").rglob("*.part"))
    assert 0 < part.stat().st_size < len(body)  # what arrived is kept for the resume
    filler.unlink()
    done = download(HubClient(hub.url), parse_model_name("org/big"), models)
    assert (done.folder / "model.safetensors").read_bytes() == body
