"""TheBloke-style repos with real weights on the Hub stand-in: the branch picker says what a legacy
branch really is before anyone downloads it, and chat models whose tokenizer has no chat template
get their prompt format from the card or the special tokens, then answer through the API and the UI.
"""

import json
import time
from pathlib import Path

import pytest

from loadstar.engine.hub.downloads import HubClient
from tests.checkpoints import LEGACY_STEM, cached, gptq_checkpoint, legacy_checkpoint, smollm2_safetensors
from tests.helpers import running_server
from tests.hub_standin import HubStandIn
from tests.thebloke_cards import thebloke_card

pytestmark = pytest.mark.slow

LEGACY_REPO = "TheBloke/SmolLM2-135M-GPTQ"
ADMIN_KEY = "admin-key-0123456789"
QUESTION = "What is the capital of France?"
# repo: (weights, card, the prompt format's source as the notice names it)
FORMAT_REPOS = {
    "TheBloke/CausalSmol-135M-GPTQ": ("gptq-8bit-g128-act", "ChatML-plain",
                                      'ChatML, from the model card\'s "Prompt template: ChatML" line'),
    "TheBloke/Smol-135M-fp16": ("bf16", None, "ChatML, from the tokenizer's special tokens (<|im_start|>, <|im_end|>)"),
    "TheBloke/WizardSmol-135M-fp16": ("bf16", "Vicuna", 'Vicuna v1.1, from the model card\'s "Prompt template: Vicuna" line'),
}
BROWSER_REPO = "TheBloke/CausalSmol-135M-GPTQ"  # also asked in the chat, as a user would (the API asks all)


def files_of(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name not in skip}


def without_chat_template(files: dict[str, bytes]) -> dict[str, bytes]:
    """The repo as TheBloke uploaded many: a tokenizer with no chat template."""
    files = {k: v for k, v in files.items() if k != "chat_template.jinja"}
    config = json.loads(files["tokenizer_config.json"])
    config.pop("chat_template", None)
    files["tokenizer_config.json"] = json.dumps(config).encode()
    return files


@pytest.fixture(scope="module")
def hub(checkpoint_cache):
    hub = HubStandIn().start()
    legacy = legacy_checkpoint(checkpoint_cache)
    eight = gptq_checkpoint(checkpoint_cache, 8, 128, True)
    bf16 = cached(checkpoint_cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors)

    repo = hub.repo(LEGACY_REPO)
    main = files_of(legacy, skip=(f"{LEGACY_STEM}.pt",))  # GPTQ-for-LLaMa era: no quantize_config.json
    main["README.md"] = thebloke_card("SmolLM2-135M", "HuggingFaceTB", "ChatML").encode()
    repo.add_commit("main", main)
    repo.add_commit("gptq-8bit-128g-actorder_True", files_of(eight, skip=("quant_log.csv",)))
    liar = {k: v for k, v in main.items() if k != f"{LEGACY_STEM}.safetensors"}
    liar["model.safetensors"] = main[f"{LEGACY_STEM}.safetensors"]
    liar["quantize_config.json"] = json.dumps({"bits": 4, "group_size": 32, "desc_act": True}).encode()
    repo.add_commit("gptq-4bit-32g-actorder_True", liar)

    weights = {"gptq-8bit-g128-act": files_of(eight, skip=("quant_log.csv",)), "bf16": files_of(bf16)}
    for name, (kind, card, _) in FORMAT_REPOS.items():
        files = without_chat_template(weights[kind])
        if card == "ChatML-plain":
            files["README.md"] = thebloke_card("CausalLM-135M", "CausalLM", "ChatML", plain_text=True).encode()
        elif card:
            files["README.md"] = thebloke_card("WizardSmol-135M", "WizardLM", card).encode()
        hub.repo(name).add_commit("main", files)
    yield hub
    hub.stop()


def test_branch_picker_says_what_a_legacy_repo_is_before_download(hub):
    from loadstar.engine.hub.branch_picker import MemoryBudget, list_branches
    from loadstar.engine.plugins.host import PluginHost

    hub.sent.clear()
    rows = {r.branch: r for r in list_branches(HubClient(hub.url), LEGACY_REPO, PluginHost().loaders(),
                                                  MemoryBudget(ram_free=8 << 30, vram_free=None))}
    main = rows["main"]
    assert main.quantization.startswith("GPTQ 4-bit group 128 no act-order (read from the tensors in"), main
    assert (main.bits, main.group_size, main.desc_act) == (4, 128, False)
    assert main.best_loader == "AutoGPTQ" and main.warnings == ()
    # What it took to say so: a ranged read of the header's start and one small g_idx tensor.
    from loadstar.engine.hub.branch_picker import remote_tensor_gptq

    hub.sent.clear()
    tensors = remote_tensor_gptq(HubClient(hub.url), LEGACY_REPO, main.commit, f"{LEGACY_STEM}.safetensors")
    assert (tensors.bits, tensors.group_size, tensors.desc_act) == (4, 128, False)
    header = int.from_bytes(main_header_prefix(hub), "little")
    assert 8 + header <= sum(hub.sent.values()) < 8 + header + 64 * 1024, hub.sent  # its whole header, not the 112 MB of weights

    eight = rows["gptq-8bit-128g-actorder_True"]
    assert eight.quantization == "GPTQ 8-bit group 128 act-order" and eight.warnings == ()
    assert eight.best_loader == "AutoGPTQ"

    liar = rows["gptq-4bit-32g-actorder_True"]
    assert any("quantize_config.json says group_size=32 but the tensors in model.safetensors have group_size=128"
               in w for w in liar.warnings), liar.warnings
    assert any("says act-order but the tensors' g_idx says otherwise" in w for w in liar.warnings), liar.warnings
    assert liar.best_loader is None  # the same refusal a downloaded folder would get


def test_the_cli_prints_the_legacy_description_and_the_warnings(hub):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "server.py"), "download", LEGACY_REPO, "--list-branches"],
                            cwd=ROOT, env={**os.environ, "HF_ENDPOINT": hub.url}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "main: GPTQ 4-bit group 128 no act-order (read from the tensors in" in result.stdout
    assert "    warning: quantize_config.json says group_size=32" in result.stdout


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("thebloke")
    (root / "models").mkdir()
    with running_server(root, "--models-dir", str(root / "models"), "--no-model", "--admin-key", ADMIN_KEY,
                        env={"HF_ENDPOINT": hub.url}) as url:
        yield url


def download_and_load(server: str, repo: str) -> dict:
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    job = httpx.post(f"{server}/admin/downloads", json={"name": repo}, headers=admin, timeout=60).json()
    deadline = time.monotonic() + 300
    while (state := httpx.get(f"{server}/admin/downloads/{job['id']}", headers=admin, timeout=60).json())["state"] \
            == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["state"] == "done", state
    loaded = httpx.post(f"{server}/admin/models/load", json={"model": state["folder"]}, headers=admin, timeout=600)
    assert loaded.status_code == 200, loaded.text
    return loaded.json()["loaded"]


@pytest.mark.browser
@pytest.mark.parametrize("repo", list(FORMAT_REPOS))
def test_a_chat_model_without_a_template_finds_its_format_and_answers(server, browser, repo):
    import openai

    from tests.browser import bot_messages, open_page, send, set_parameter, wait_for_status

    expected_source = FORMAT_REPOS[repo][2]
    loaded = download_and_load(server, repo)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)
    reply = client.chat.completions.create(model=loaded["name"], temperature=0, max_tokens=30,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in reply.choices[0].message.content, reply
    extra = reply.model_extra["loadstar"]
    assert extra["prompt_format_source"] == expected_source, extra
    assert not any("no chat format" in n for n in extra["notices"]), extra
    assert "USER:" not in reply.choices[0].message.content  # the format's own turn end stops the reply
    if repo != BROWSER_REPO:
        return  # the API said where each format came from; the chat shows it as it does for any

    page = open_page(browser, server + "/")
    try:
        set_parameter(page, "temperature", 0)
        set_parameter(page, "max_new_tokens", 30)
        send(page, QUESTION)
        status = wait_for_status(page, r"^(Done|Reached)", timeout=300)
        assert f"Prompt format: {expected_source}." in status, status
        assert "Paris" in bot_messages(page).last.inner_text()
    finally:
        page.context.close()


def main_header_prefix(hub) -> bytes:
    """The first 8 bytes of the legacy branch's weights: the length of their safetensors header."""
    return hub.repo(LEGACY_REPO).file("main", f"{LEGACY_STEM}.safetensors")[:8]


def test_a_header_longer_than_the_first_read_is_read_whole_and_never_taken_for_unquantized(hub):
    """A legacy branch whose header starts with 2,000 other entries (a real 13B checkpoint's header
    is larger than the first 48 KiB read): its GPTQ tensors lie past that read."""
    import json
    import struct

    from loadstar.engine.hub.branch_picker import MAX_REMOTE_HEADER, MemoryBudget, list_branches
    from loadstar.engine.plugins.host import PluginHost

    weights = hub.repo(LEGACY_REPO).file("main", f"{LEGACY_STEM}.safetensors")
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8: 8 + length])
    data = weights[8 + length:]
    padding = {f"model.aa_padding.{i:04d}.weight": {"dtype": "F16", "shape": [1], "data_offsets": [len(data) + 2 * i, len(data) + 2 * i + 2]}
               for i in range(2000)}
    padded_header = json.dumps({**padding, **header}).encode()
    assert len(padded_header) > 3 * 48 * 1024
    padded = struct.pack("<Q", len(padded_header)) + padded_header + data + b"\0" * 4000
    files = {"config.json": hub.repo(LEGACY_REPO).file("main", "config.json"), f"{LEGACY_STEM}.safetensors": padded}
    hub.repo("TheBloke/Padded-GPTQ").add_commit("main", files)
    budget = MemoryBudget(ram_free=8 << 30, vram_free=None)
    [row] = list_branches(HubClient(hub.url), "TheBloke/Padded-GPTQ", PluginHost().loaders(), budget)
    assert row.quantization.startswith("GPTQ 4-bit group 128 no act-order (read from the tensors in"), row
    assert row.best_loader == "AutoGPTQ" and row.warnings == ()

    # A header too long to read before download: "could not be read", never "unquantized".
    lying = struct.pack("<Q", MAX_REMOTE_HEADER + 1) + padded_header[: 60 * 1024]
    hub.repo("TheBloke/Lying-GPTQ").add_commit("main", {**files, f"{LEGACY_STEM}.safetensors": lying})
    [row] = list_branches(HubClient(hub.url), "TheBloke/Lying-GPTQ", PluginHost().loaders(), budget)
    assert row.quantization == "unknown (the weights' header could not be read)", row
    assert any("not read before download (at most 16 MiB)" in w for w in row.warnings), row.warnings
