"""Downloads with the real huggingface_hub client against a local Hub stand-in."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from loadstar.engine.hub.downloads import METADATA_FILE, DownloadError, HubClient, download
from loadstar.engine.hub.names import BadModelNameError, ModelRef, parse_model_name
from loadstar.engine.models.folder import inspect_model_folder, list_model_folders
from tests.helpers import ROOT, assert_one_line_error, run_server
from tests.hub_standin import HubStandIn

REPO = "TheBloke/Tiny-Chat-GPTQ"
TOKEN = "hf_test_token"


def safetensors_bytes(rows: int, seed: int) -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"model.layers.0.mlp.weight": rng.standard_normal((rows, 256)).astype(np.float32)})


def gptq_branch(bits: int, group: int, act: bool, seed: int) -> dict[str, bytes]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 2048}
    return {
        "config.json": json.dumps(config).encode(),
        "quantize_config.json": json.dumps({"bits": bits, "group_size": group, "desc_act": act}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "generation_config.json": b'{"temperature": 0.7}',
        "model.safetensors": safetensors_bytes(2048, seed),  # 2 MiB
        "README.md": b"# Tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
    }


@pytest.fixture
def hub():
    hub = HubStandIn(token=TOKEN).start()
    repo = hub.repo(REPO)
    repo.add_commit("main", gptq_branch(4, 128, False, 1))
    repo.add_commit("gptq-4bit-32g-actorder_True", gptq_branch(4, 32, True, 2))
    repo.add_commit("gptq-8bit--1g-actorder_True", gptq_branch(8, -1, True, 3))
    both = gptq_branch(4, 128, False, 4)
    both["vicuna-7B-GPTQ-4bit-128g.no-act-order.pt"] = b"\x80" * 1000
    hub.repo("TheBloke/Both-GPTQ").add_commit("main", both)
    hub.repo("TheBloke/Tiny-GGUF").add_commit("main", {
        "config.json": b"{}", "tiny.Q4_K_M.gguf": b"G" * 5000, "tiny.Q8_0.gguf": b"H" * 9000})
    gated = hub.repo("meta/Gated")
    gated.add_commit("main", gptq_branch(4, 128, False, 5))
    gated.gated = True
    yield hub
    hub.stop()


def new_main_weights(hub, rows: int, seed: int) -> int:
    """Commit bigger weights to the repo's main branch; their size in bytes."""
    files = dict(hub.repo(REPO).commits[hub.repo(REPO).branches["main"]])
    files["model.safetensors"] = safetensors_bytes(rows, seed)  # rows * 1 KiB
    hub.repo(REPO).add_commit("main", files)
    return len(files["model.safetensors"])


def client_for(hub, token=None):
    return HubClient(hub.url, token)


@pytest.mark.parametrize("text,expected", [
    ("TheBloke/Tiny-GPTQ", ModelRef("TheBloke/Tiny-GPTQ")),
    ("  TheBloke/Tiny-GPTQ:gptq-4bit-32g-actorder_True \n", ModelRef("TheBloke/Tiny-GPTQ", "gptq-4bit-32g-actorder_True")),
    ("https://huggingface.co/TheBloke/Tiny-GPTQ", ModelRef("TheBloke/Tiny-GPTQ")),
    ("https://huggingface.co/TheBloke/Tiny-GPTQ/", ModelRef("TheBloke/Tiny-GPTQ")),
    ("https://huggingface.co/TheBloke/Tiny-GPTQ/tree/gptq-8bit--1g-actorder_True",
     ModelRef("TheBloke/Tiny-GPTQ", "gptq-8bit--1g-actorder_True")),
    ("TheBloke/Tiny-GPTQ/", ModelRef("TheBloke/Tiny-GPTQ")),
])
def test_names_accepted(text, expected):
    assert parse_model_name(text) == expected


@pytest.mark.parametrize("text,problem", [
    ("a/b:c:d", "more than one ':'"), ("TheBloke/", "both parts"), ("/repo", "both parts"), ("repo", "both parts"),
    ("org/re..po", "not a valid repo id"), ("org/repo:feature/x", "contains '/'"), ("org/my repo", "space"),
    ("org/repo:bad branch", "space"), ("org/repo:", "empty branch"), ("", "give a model name"),
    ("https://example.com/org/repo", "not a huggingface.co"), ("org/repo:..", "not a valid git branch"),
])
def test_names_refused_with_a_reason(text, problem):
    with pytest.raises(BadModelNameError, match=problem):
        parse_model_name(text)


def test_folder_names():
    assert ModelRef("TheBloke/X").folder_name == "TheBloke_X"
    assert ModelRef("TheBloke/X", "gptq-4bit-32g-actorder_True").folder_name == "TheBloke_X_gptq-4bit-32g-actorder_True"


def test_main_and_branch_download_verified_with_metadata(hub, tmp_path):
    client = client_for(hub)
    main = download(client, ModelRef(REPO), tmp_path)
    branch = download(client, ModelRef(REPO, "gptq-4bit-32g-actorder_True"), tmp_path)
    assert main.folder == tmp_path / "TheBloke_Tiny-Chat-GPTQ"
    assert branch.folder == tmp_path / "TheBloke_Tiny-Chat-GPTQ_gptq-4bit-32g-actorder_True"
    assert list_model_folders(tmp_path) == [main.folder.name, branch.folder.name]
    meta = json.loads((branch.folder / METADATA_FILE).read_text())
    assert (meta["repo"], meta["branch"], meta["commit"]) == (REPO, "gptq-4bit-32g-actorder_True", branch.commit)
    assert set(meta["files"]) == {"config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json", "model.safetensors", "README.md"}
    import hashlib
    assert meta["files"]["model.safetensors"]["sha256"] == hashlib.sha256(
        (branch.folder / "model.safetensors").read_bytes()).hexdigest()
    folder = inspect_model_folder(branch.folder)
    assert (folder.gptq.bits, folder.gptq.group_size, folder.gptq.desc_act) == (4, 32, True)
    assert not (tmp_path / ".downloads" / branch.folder.name).exists()  # staging cleaned up


def test_same_commit_again_transfers_nothing_and_a_new_commit_only_what_changed(hub, tmp_path):
    client = client_for(hub)
    first = download(client, ModelRef(REPO), tmp_path)
    sent = sum(hub.sent.values())
    again = download(client, ModelRef(REPO), tmp_path)
    assert again.up_to_date and sum(hub.sent.values()) == sent
    files = dict(hub.repo(REPO).commits[first.commit])
    files["generation_config.json"] = b'{"temperature": 0.2}'
    hub.repo(REPO).add_commit("main", files)
    hub.sent.clear()
    update = download(client, ModelRef(REPO), tmp_path)
    assert update.fetched == ("generation_config.json",)
    assert set(hub.sent) == {"generation_config.json"}
    assert json.loads((update.folder / "generation_config.json").read_text()) == {"temperature": 0.2}
    assert json.loads((update.folder / METADATA_FILE).read_text())["commit"] == update.commit != first.commit


def test_dropped_connection_mid_file_resumes(hub, tmp_path):
    size = len(hub.repo(REPO).commits[hub.repo(REPO).branches["main"]]["model.safetensors"])
    hub.faults.drop_after["model.safetensors"] = size // 2
    result = download(client_for(hub), ModelRef(REPO), tmp_path)
    assert "model.safetensors" in result.fetched
    assert hub.sent["model.safetensors"] <= size + 128 * 1024  # resumed, not restarted
    assert inspect_model_folder(result.folder).corrupt_weights == ()


def test_corrupted_bytes_are_detected_and_refetched(hub, tmp_path):
    hub.faults.corrupt_once.add("model.safetensors")
    result = download(client_for(hub), ModelRef(REPO), tmp_path)
    size = (result.folder / "model.safetensors").stat().st_size
    assert hub.sent["model.safetensors"] == 2 * size  # fetched twice: the first copy failed its sha256
    hub.faults.corrupt_once.add("config.json")  # small files are checked against their git blob id
    result = download(client_for(hub), ModelRef(REPO, "gptq-8bit--1g-actorder_True"), tmp_path)
    assert json.loads((result.folder / "config.json").read_text())["model_type"] == "llama"


def test_unknown_repo_branch_and_file(hub, tmp_path):
    with pytest.raises(DownloadError, match="TheBloke/Nope: no such repository"):
        download(client_for(hub), ModelRef("TheBloke/Nope"), tmp_path)
    with pytest.raises(DownloadError, match="no such branch"):
        download(client_for(hub), ModelRef(REPO, "gptq-3bit"), tmp_path)
    with pytest.raises(DownloadError, match=r"no GGUF file named nope.gguf"):
        download(client_for(hub), ModelRef("TheBloke/Tiny-GGUF"), tmp_path, gguf_file="nope.gguf")
    assert list_model_folders(tmp_path) == []


def test_gguf_repos_need_a_chosen_file(hub, tmp_path):
    with pytest.raises(DownloadError, match="2 GGUF files: choose one with --gguf-file"):
        download(client_for(hub), ModelRef("TheBloke/Tiny-GGUF"), tmp_path)
    result = download(client_for(hub), ModelRef("TheBloke/Tiny-GGUF"), tmp_path, gguf_file="tiny.Q8_0.gguf")
    assert sorted(p.name for p in result.folder.iterdir()) == sorted([METADATA_FILE, "config.json", "tiny.Q8_0.gguf"])


def test_gated_repo_without_and_with_a_token(hub, tmp_path):
    with pytest.raises(DownloadError, match="is gated: accept its license on the Hub and give a token"):
        download(client_for(hub), ModelRef("meta/Gated"), tmp_path)
    with pytest.raises(DownloadError, match="this token has no access"):
        download(client_for(hub, "hf_wrong"), ModelRef("meta/Gated"), tmp_path)
    result = download(client_for(hub, TOKEN), ModelRef("meta/Gated"), tmp_path)
    assert (result.folder / "model.safetensors").is_file()


def test_safetensors_preferred_over_pt(hub, tmp_path):
    result = download(client_for(hub), ModelRef("TheBloke/Both-GPTQ"), tmp_path)
    names = {p.name for p in result.folder.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".pt") for n in names)
    meta = json.loads((result.folder / METADATA_FILE).read_text())
    assert meta["skipped"] == [{"path": "vicuna-7B-GPTQ-4bit-128g.no-act-order.pt", "why": "another weights format is preferred"}]


def test_killed_download_resumes_with_little_transferred_again(hub, tmp_path):
    """The CLI is killed with SIGKILL mid-file; the next run transfers only the missing bytes."""
    size = new_main_weights(hub, 8192, 9)  # 8 MiB
    hub.faults.bytes_per_second = 4 * 1024 * 1024
    env = {**os.environ, "HF_ENDPOINT": hub.url, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "server.py"), "download", REPO, "--models-dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    staging = tmp_path / ".downloads" / "TheBloke_Tiny-Chat-GPTQ"
    deadline = time.monotonic() + 60
    while True:
        parts = list(staging.glob("model.safetensors.*.part")) if staging.exists() else []
        if parts and parts[0].stat().st_size > size * 0.4:
            break
        assert time.monotonic() < deadline and process.poll() is None, process.stdout.read().decode()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list_model_folders(tmp_path) == []  # a partial download is never a model
    before = hub.sent["model.safetensors"]
    hub.faults.bytes_per_second = None
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].endswith("TheBloke_Tiny-Chat-GPTQ")
    again = hub.sent["model.safetensors"] - before
    # Bytes the hub had sent but the killed process never wrote (socket buffers, up to a few hundred
    # KiB under load) come again; a restart from zero would send all `before` bytes again.
    in_flight = 1024 * 1024
    assert before > 2 * in_flight and again < size - before + in_flight, f"re-transferred {again - (size - before)} bytes"
    assert list_model_folders(tmp_path) == ["TheBloke_Tiny-Chat-GPTQ"]


def test_branch_listing_shows_quantization_size_loaders_and_memory(hub):
    from loadstar.engine.hub.branch_picker import MemoryBudget, kv_cache_bytes, list_branches
    from loadstar.engine.plugins.host import PluginHost

    rows = list_branches(client_for(hub), REPO, PluginHost().loaders(), MemoryBudget(ram_free=8 << 30, vram_free=None))
    assert [r.branch for r in rows] == ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True"]
    by_branch = {r.branch: r for r in rows}
    act = by_branch["gptq-4bit-32g-actorder_True"]
    assert (act.bits, act.group_size, act.desc_act) == (4, 32, True)
    assert act.quantization == "GPTQ 4-bit group 32 act-order"
    assert act.best_loader == "AutoGPTQ"
    assert any(line.startswith("ExLlamaV2: unavailable") for line in act.loaders)
    eight = by_branch["gptq-8bit--1g-actorder_True"]
    assert eight.quantization == "GPTQ 8-bit no group act-order" and eight.best_loader == "AutoGPTQ"
    weights = len(hub.repo(REPO).commits[act.commit]["model.safetensors"])
    kv = 2 * 4 * 2 * 64 * 2048 * 2  # k and v, 4 layers, 2 kv heads, head dim 64, 2048 positions, 2 bytes
    config = json.loads(hub.repo(REPO).commits[act.commit]["config.json"])
    assert kv_cache_bytes(config) == kv
    assert act.memory_needed == weights + kv
    assert act.fits.startswith("fits: needs") and "RAM free" in act.fits
    tight = list_branches(client_for(hub), REPO, PluginHost().loaders(), MemoryBudget(ram_free=1 << 20, vram_free=None))
    assert tight[0].fits.startswith("too big")


def test_cli_lists_branches_and_reports_errors_in_one_line(hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    listing = subprocess.run([sys.executable, str(ROOT / "server.py"), "download", REPO, "--list-branches"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "gptq-4bit-32g-actorder_True: GPTQ 4-bit group 32 act-order" in listing.stdout
    for name, message, code in [("org/repo:a:b", "more than one ':'", 2),
                                ("TheBloke/Nope", "no such repository", 1),
                                ("meta/Gated", "is gated", 1)]:
        result = subprocess.run([sys.executable, str(ROOT / "server.py"), "download", name, "--models-dir", str(tmp_path)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, message, code)
        assert TOKEN not in result.stderr


def test_cancel_leaves_a_resumable_partial_and_the_app_free(hub, tmp_path):
    from loadstar.engine.hub.jobs import DownloadManager

    size = new_main_weights(hub, 4096, 7)  # 4 MiB
    hub.faults.bytes_per_second = 2 * 1024 * 1024
    manager = DownloadManager(tmp_path, hub.url)
    job = manager.start(REPO)
    assert manager.start(REPO) is job  # the same model twice: one download
    deadline = time.monotonic() + 30
    while not (job.progress and job.progress.file == "model.safetensors" and job.progress.file_done > size // 4):
        assert time.monotonic() < deadline and job.state == "running", job.message
        time.sleep(0.02)
    assert job.progress.eta_seconds is not None and job.progress.bytes_per_second > 0
    job.cancel()
    while job.state == "running":
        time.sleep(0.02)
    assert job.state == "cancelled" and "resume" in job.message
    assert list_model_folders(tmp_path) == []
    partial = list((tmp_path / ".downloads" / "TheBloke_Tiny-Chat-GPTQ").glob("model.safetensors.*.part"))
    kept = partial[0].stat().st_size
    assert kept > size // 4
    first = hub.sent["model.safetensors"]
    hub.faults.bytes_per_second = None
    again = manager.start(REPO)
    while again.state == "running":
        time.sleep(0.02)
    assert again.state == "done", again.message
    assert hub.sent["model.safetensors"] - first <= size - kept + 2 * 1024 * 1024  # only the rest (+ in-flight)


def test_the_stand_in_serves_huggingface_hubs_own_snapshot_download(hub, tmp_path):
    from huggingface_hub import snapshot_download

    path = snapshot_download(REPO, revision="gptq-4bit-32g-actorder_True", cache_dir=tmp_path, endpoint=hub.url)
    expected = hub.repo(REPO).commits[hub.repo(REPO).branches["gptq-4bit-32g-actorder_True"]]
    for name, data in expected.items():
        assert (tmp_path / path / name).read_bytes() == data


def test_an_unreachable_hub_and_a_bad_models_dir_are_one_line_errors(hub, tmp_path):
    from loadstar.engine.hub.jobs import DownloadManager
    from tests.helpers import free_port

    nowhere = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cases = [
        (["download", REPO, "--models-dir", str(tmp_path)], nowhere, "cannot reach", 1),
        (["download", REPO, "--list-branches"], nowhere, "cannot reach", 1),
        (["download", REPO, "--models-dir", str(not_a_folder)], {**os.environ, "HF_ENDPOINT": hub.url}, "is not a folder", 2),
    ]
    for args, env, message, code in cases:
        result = subprocess.run([sys.executable, str(ROOT / "server.py"), *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, message, code)
    job = DownloadManager(not_a_folder, hub.url).start(REPO)  # the UI's path: the job must end, not hang
    deadline = time.monotonic() + 30
    while job.state == "running":
        assert time.monotonic() < deadline, "the download job never ended"
        time.sleep(0.05)
    assert job.state == "failed" and "cannot create" in job.message


def gguf_bytes(tmp_path, padding: int) -> bytes:
    """A real GGUF header (llama, context 4096) followed by ``padding`` bytes standing for tensors."""
    from tests.folders import gguf_folder

    folder = gguf_folder(tmp_path / f"gguf-{padding}", "g")
    return next(folder.glob("*.gguf")).read_bytes() + b"\0" * padding


def test_a_gguf_repo_lists_every_quant_file_and_downloads_split_parts_together(hub, tmp_path):
    from loadstar.engine.hub.branch_picker import GGUF_HEAD_BYTES, MemoryBudget, list_gguf_files
    from loadstar.engine.plugins.host import PluginHost

    big = gguf_bytes(tmp_path, 300_000)
    hub.repo("TheBloke/Some-GGUF").add_commit("main", {
        "README.md": b"# card", "config.json": b"{}",
        "some.Q2_K.gguf": gguf_bytes(tmp_path, 2000), "some.Q4_K_M.gguf": gguf_bytes(tmp_path, 4000),
        "some.Q8_0.gguf": gguf_bytes(tmp_path, 8000),
        "big.Q6_K-00001-of-00002.gguf": big, "big.Q6_K-00002-of-00002.gguf": b"e" * 3000,
    })
    hub.sent.clear()
    rows = list_gguf_files(client_for(hub), "TheBloke/Some-GGUF", PluginHost().loaders(),
                           MemoryBudget(ram_free=len(big) + 6000, vram_free=None))
    by_file = {r.file: r for r in rows}
    assert list(by_file) == ["big.Q6_K-00001-of-00002.gguf", "some.Q2_K.gguf", "some.Q4_K_M.gguf", "some.Q8_0.gguf"]
    assert (by_file["some.Q4_K_M.gguf"].quant_type, by_file["some.Q4_K_M.gguf"].bits_per_weight) == ("Q4_K_M", 4.5)
    assert by_file["some.Q8_0.gguf"].bits_per_weight == 8.5 and by_file["some.Q2_K.gguf"].bits_per_weight == 2.62
    first = by_file["big.Q6_K-00001-of-00002.gguf"]
    assert (first.parts, first.size) == (2, len(big) + 3000)
    assert {r.best_loader for r in rows} == {"llama.cpp"}  # the architecture came from a remote header read
    assert sum(hub.sent.values()) <= GGUF_HEAD_BYTES  # one header's first bytes, not the weights
    assert by_file["some.Q2_K.gguf"].fits.startswith("fits") and first.fits.startswith("too big")
    result = download(client_for(hub), parse_model_name("TheBloke/Some-GGUF"), tmp_path / "models",
                      gguf_file="big.Q6_K-00001-of-00002.gguf")
    assert sorted(p.name for p in result.folder.glob("*.gguf")) == [
        "big.Q6_K-00001-of-00002.gguf", "big.Q6_K-00002-of-00002.gguf"]


def test_the_cli_lists_gguf_files_with_their_quantization(hub, tmp_path, monkeypatch):
    hub.repo("TheBloke/Cli-GGUF").add_commit("main", {"some.Q2_K.gguf": b"a" * 2000, "some.Q5_K_S.gguf": b"b" * 5000})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = run_server("download", "TheBloke/Cli-GGUF", "--list-branches")
    assert result.returncode == 0, result.stderr
    assert "main: 2 GGUF files" in result.stdout
    assert "some.Q5_K_S.gguf: GGUF Q5_K_S, ~5.5 bits/weight, 4.9 KiB, loader none" in result.stdout
