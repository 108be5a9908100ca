"""Logins: the UI asks for one when --auth is given, and refuses wrong passwords."""

import time

import pytest

from tests.helpers import running_server

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    auth_file = root / "logins.txt"
    auth_file.write_text("# users\nalice:s3cret:with:colons\n")
    with running_server(root, "--no-model", "--auth-file", str(auth_file)) as url:
        yield url + "/"


def test_login_is_required_and_checked(auth_server, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(auth_server)
        assert page.locator("#chat-input").count() == 0
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for()
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("s3cret:with:colons")
        page.get_by_role("button", name="Login").click()
        page.locator("#chat-input textarea").wait_for()
        page.get_by_role("tab", name="Model").click()
        deadline = time.monotonic() + 30
        while "No model is loaded" not in page.locator("#model-status").inner_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        context.close()
