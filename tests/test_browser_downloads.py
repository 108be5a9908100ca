"""The Model tab's download section in Chromium, against the Hub stand-in."""

import re
import time
from contextlib import contextmanager

import pytest

from tests.browser import ARTEFACTS, wait_until, watch_console
from tests.helpers import running_server
from tests.hub_standin import HubStandIn
from tests.test_downloads import REPO, gptq_branch, safetensors_bytes

pytestmark = pytest.mark.browser

GGUF_REPO = "TheBloke/Tiny-Chat-GGUF"


@pytest.fixture(scope="module")
def hub():
    hub = HubStandIn().start()
    repo = hub.repo(REPO)
    repo.add_commit("main", gptq_branch(4, 128, False, 1))
    branch = gptq_branch(4, 32, True, 2)
    branch["model.safetensors"] = safetensors_bytes(4096, 2)  # 4 MiB, sent at 1 MiB/s: progress shows
    repo.add_commit("gptq-4bit-32g-actorder_True", branch)
    hub.repo(GGUF_REPO).add_commit("main", {
        "some.Q2_K.gguf": b"a" * 2000, "some.Q4_K_M.gguf": b"b" * 4000,
        "big.Q6_K-00001-of-00002.gguf": b"c" * 3000, "big.Q6_K-00002-of-00002.gguf": b"d" * 3000,
    })
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-downloads")
    (root / "models").mkdir()
    with running_server(root, "--models-dir", str(root / "models"), "--no-model", env={"HF_ENDPOINT": hub.url}) as url:
        yield url + "/"


def wait_text(locator, needle, timeout=60):
    deadline = time.monotonic() + timeout
    while needle not in locator.inner_text():
        assert time.monotonic() < deadline, f"{needle!r} never appeared; last: {locator.inner_text()!r}"
        time.sleep(0.05)
    return locator.inner_text()


@contextmanager
def branch_table(browser, server, repo):
    """A new page's Model tab after "List branches" for ``repo``: (page, table)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        watch_console(page)
        page.set_default_timeout(60_000)
        page.goto(server)
        page.get_by_role("tab", name="Model").click()
        page.locator("#download-name textarea, #download-name input").first.fill(repo)
        page.locator("#list-branches").click()
        yield page, page.locator("#branch-table")
    finally:
        context.close()


def test_pick_a_branch_download_it_and_see_it_in_the_model_list(hub, server, browser):
    other = browser.new_context()  # a second user's page, open before the download
    other_page = other.new_page()
    watch_console(other_page)
    other_page.set_default_timeout(60_000)
    other_page.goto(server)
    other_page.get_by_role("tab", name="Model").click()
    with branch_table(browser, server, REPO) as (page, table):
        wait_text(table, "gptq-4bit-32g-actorder_True")
        assert "GPTQ 4-bit group 32 act-order" in table.inner_text() and "AutoGPTQ" in table.inner_text()
        page.locator("#branch-table").get_by_test_id("cell-1-0").click()
        name_box = page.locator("#download-name textarea, #download-name input").first
        deadline = time.monotonic() + 30
        while name_box.input_value() != f"{REPO}:gptq-4bit-32g-actorder_True":
            assert time.monotonic() < deadline, name_box.input_value()
            time.sleep(0.05)
        hub.faults.bytes_per_second = 1024 * 1024
        page.locator("#start-download").click()
        status = page.locator("#download-status")
        bars = page.locator("#download-progress")
        seen = wait_text(bars, "model.safetensors:", timeout=30)  # a bar for the file, one for all files
        assert re.search(r"All: .+ of .+ · \d of \d files · .+/s", seen), seen  # bytes, files, speed
        file_bar = page.locator("#download-file-bar")
        wait_until(lambda: 0 < file_bar.evaluate("b => b.value") < file_bar.evaluate("b => b.max"), "a bar part-way")
        page.locator("#start-download").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTEFACTS / "download-1440.png"))
        wait_text(status, "✅", timeout=60)
        assert bars.inner_text().strip() == ""  # the bars go when it is done
        assert "TheBloke_Tiny-Chat-GPTQ_gptq-4bit-32g-actorder_True" in status.inner_text()
        page.locator("#model-choice input").click()
        options = page.locator("li[role=option]").all_inner_texts()
        assert any("TheBloke_Tiny-Chat-GPTQ_gptq-4bit-32g-actorder_True" in o for o in options), options
    # The other page sees the new model when it opens its list: no Refresh needed.
    other_page.locator("#model-choice input").click()
    deadline = time.monotonic() + 30
    while not any("TheBloke_Tiny-Chat-GPTQ_gptq-4bit-32g-actorder_True" in o
                  for o in other_page.locator("li[role=option]").all_inner_texts()):
        assert time.monotonic() < deadline, other_page.locator("li[role=option]").all_inner_texts()
        time.sleep(0.1)
    other.close()


def test_typing_a_new_name_clears_the_previous_branch_table(server, browser):
    with branch_table(browser, server, REPO) as (page, table):
        wait_text(table, "gptq-4bit-32g-actorder_True")
        page.locator("#download-name textarea, #download-name input").first.press_sequentially("-x")
        deadline = time.monotonic() + 30
        while "gptq-4bit-32g-actorder_True" in table.inner_text():
            assert time.monotonic() < deadline, table.inner_text()
            time.sleep(0.1)


def test_a_gguf_repo_lists_its_files_and_a_click_picks_one(server, browser):
    with branch_table(browser, server, GGUF_REPO) as (page, table):
        text = wait_text(table, "some.Q4_K_M.gguf")
        assert "GGUF Q4_K_M · ~4.5 bits/weight" in text and "GGUF Q2_K · ~2.62 bits/weight" in text
        assert "big.Q6_K-00001-of-00002.gguf (2 parts)" in text and "5.9 KiB" in text
        assert "3 GGUF files of" in page.locator("#download-status").inner_text()
        row = next(i for i in range(3) if "Q4_K_M" in table.get_by_test_id(f"cell-{i}-1").inner_text())
        table.get_by_test_id(f"cell-{row}-1").click()
        gguf_box = page.locator("#download-gguf textarea, #download-gguf input").first
        deadline = time.monotonic() + 30
        while gguf_box.input_value() != "some.Q4_K_M.gguf":
            assert time.monotonic() < deadline, gguf_box.input_value()
            time.sleep(0.05)
        page.locator("#start-download").click()
        status = page.locator("#download-status")
        wait_text(status, "✅", timeout=60)
        assert "TheBloke_Tiny-Chat-GGUF" in status.inner_text()
