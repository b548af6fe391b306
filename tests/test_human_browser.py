"""The human teacher's web app in headless Chromium (``_browser.py``): model text shown as text,
never markup; a tokenless request refused; an annotator editing and submitting with the
keyboard; a closed tab's lease expiring with the item stored once; a chat prompt's whole
conversation on the page."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from _browser import STATUS, SHOWN_ITEM, chrome, fetch_status, keys, needs_browser, wait_js
from test_human_app import ALICE, BOB, CONVERSATION, EVIL, app_server, chat_rollout, rollouts  # noqa: F401 (fixture)


@needs_browser
def test_headless_chromium_shows_a_script_response_as_text_and_refuses_a_tokenless_request(app_server):
    from selenium.webdriver.common.by import By

    queue, server = app_server
    queue.lease_timeout_s = 60.0
    (item_id,) = queue.enqueue(rollouts([EVIL]))
    with chrome() as d:
        d.get(f"{server.url}/#token={ALICE}")
        assert wait_js(d, SHOWN_ITEM) == item_id and queue.get(item_id).lease_owner == "alice"
        assert "token" not in d.current_url  # the fragment left the address bar
        assert d.find_element(By.ID, "who").text == "annotator: alice"
        assert d.find_element(By.ID, "edit").get_property("value") == EVIL  # as text in the editor
        assert d.find_element(By.ID, "prompt").text == f"Prompt 0: {EVIL}"
        assert d.title == "correction-rl: correct responses"  # the response's script did not run
        assert d.execute_script("return document.querySelectorAll('img, #work script').length") == 0
        assert "&lt;script&gt;" in d.execute_script("return document.getElementById('diff').innerHTML")
        # a fresh tab has no token: the sign-in form, and the API refuses the page's requests
        d.switch_to.new_window("tab")
        d.get(f"{server.url}/")
        wait_js(d, "!document.getElementById('login').hidden")
        assert d.find_element(By.ID, "work").is_displayed() is False
        assert fetch_status(d, "/api/next", None, {}) == 401
        assert fetch_status(d, "/api/next", "wrong-token-0123456789", {}) == 401
    assert queue.counts()["leased"] == 1  # the refused requests leased nothing


@needs_browser
def test_annotator_edits_and_submits_in_headless_chromium(app_server, tmp_path):
    from selenium.webdriver.common.keys import Keys

    queue, server = app_server
    queue.lease_timeout_s = 60.0
    first, second = queue.enqueue(rollouts(["12 + 4 = 15", EVIL]))
    shot = tmp_path / "human_teacher.png"
    with chrome() as d:
        d.get(f"{server.url}/#token={ALICE}")
        assert wait_js(d, SHOWN_ITEM) == first
        assert d.execute_script("return document.getElementById('edit').value") == "12 + 4 = 15"
        # Like a person: put the cursor on the wrong digit and retype it.
        d.execute_script("const e = document.getElementById('edit'); e.focus(); e.setSelectionRange(10, 11);")
        keys(d, Keys.BACKSPACE, "6")
        diff = wait_js(d, "document.querySelector('#diff .ins') && document.getElementById('diff').textContent")
        assert "15" in diff and "16" in diff
        d.save_screenshot(str(shot))
        keys(d, Keys.ENTER, modifier=Keys.CONTROL)  # Ctrl+Enter: submit
        assert wait_js(d, f"{STATUS}.startsWith('saved') && {STATUS}") == "saved (edit distance 1)"
        # the page says "saved" before it asks for the next item: wait until that item is shown
        assert wait_js(d, f"({SHOWN_ITEM}) !== '{first}' && ({SHOWN_ITEM})") == second
        assert d.execute_script("return document.getElementById('edit').value") == EVIL
        assert d.title == "correction-rl: correct responses"
    done = queue.get(first)
    assert (done.state, done.corrected, done.annotator) == ("done", "12 + 4 = 16", "alice")
    assert queue.get(second).lease_owner == "alice" and shot.stat().st_size > 5000
    if os.environ.get("CORRECTION_RL_UPDATE_DOCS_IMG"):  # refresh docs/human-teachers.md's screenshot
        shutil.copy(shot, Path(__file__).resolve().parents[1] / "docs" / "img" / "human_teacher.png")


@needs_browser
def test_a_closed_tabs_lease_expires_and_the_item_is_stored_once(app_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    queue, server = app_server
    queue.lease_timeout_s = 2.0  # the page renews every max(1 s, lease / 3) while it is open
    (item_id,) = queue.enqueue(rollouts(["7 + 1 = 9"]))
    with chrome() as d:
        d.get(f"{server.url}/#token={ALICE}")
        assert wait_js(d, SHOWN_ITEM) == item_id
        alice_tab = d.current_window_handle
        d.switch_to.new_window("tab")
        bob_tab = d.current_window_handle
        d.get(f"{server.url}/")
        wait_js(d, "!document.getElementById('login').hidden")
        d.find_element(By.ID, "token").send_keys(BOB)  # signs in through the form this time
        d.find_element(By.ID, "login-btn").click()
        wait_js(d, "!document.getElementById('empty').hidden")  # alice's open tab keeps her lease
        time.sleep(3.0)
        assert queue.get(item_id).lease_owner == "alice" and d.execute_script(
            "return document.body.dataset.item") == ""
        d.switch_to.window(alice_tab)
        d.close()  # alice closes her tab without saving: nothing renews her lease any more
        d.switch_to.window(bob_tab)
        assert wait_js(d, SHOWN_ITEM, timeout_s=20) == item_id  # bob's page polls every 3 s
        d.execute_script("const e = document.getElementById('edit'); e.focus(); e.select();")
        keys(d, "7 + 1 = 8")
        keys(d, Keys.ENTER, modifier=Keys.CONTROL)
        assert wait_js(d, f"{STATUS}.startsWith('saved') && {STATUS}") == "saved (edit distance 1)"
        # alice's late save (her token, from the page) is refused: the item is stored once
        assert fetch_status(d, "/api/submit", ALICE, {"item_id": item_id, "corrected_text": "late"}) == 409
    item = queue.get(item_id)
    assert (item.state, item.corrected, item.annotator, item.leases) == ("done", "7 + 1 = 8", "bob", 2)
    assert queue.counts() == {"pending": 0, "leased": 0, "done": 1, "cancelled": 0}


@needs_browser
def test_headless_chromium_shows_the_whole_conversation_as_text(app_server):
    """System, user, assistant and user turns, in order, each labelled with its role, markup in
    them shown as text (no element made from it, no script run); then a plain prompt shows as
    before (the conversation list hidden)."""
    from selenium.webdriver.common.by import By

    queue, server = app_server
    queue.lease_timeout_s = 60.0
    chat_id, plain_id = queue.enqueue([chat_rollout(), *rollouts(["5 + 5 = 11"])])
    with chrome() as d:
        d.get(f"{server.url}/#token={ALICE}")
        assert wait_js(d, SHOWN_ITEM) == chat_id
        turns = d.find_elements(By.CSS_SELECTOR, "#conversation > li")
        shown = [(li.get_attribute("data-role"), li.find_element(By.CLASS_NAME, "role").text.lower(),
                  li.find_element(By.TAG_NAME, "pre").text) for li in turns]
        assert shown == [(m["role"], m["role"], m["content"]) for m in CONVERSATION]
        assert d.find_element(By.ID, "conversation").is_displayed() and not d.find_element(By.ID, "prompt").is_displayed()
        assert d.find_element(By.ID, "prompt-heading").text == "Conversation"
        assert d.execute_script("return document.querySelectorAll('#work img, #work script, #work b').length") == 0
        assert "&lt;b&gt;Only&lt;/b&gt;" in d.execute_script("return document.getElementById('conversation').innerHTML")
        assert d.title == "correction-rl: correct responses"
        d.find_element(By.ID, "skip").click()
        assert wait_js(d, f"document.body.dataset.item !== '{chat_id}' && {SHOWN_ITEM}") == plain_id
        assert not d.find_element(By.ID, "conversation").is_displayed()
        assert d.find_element(By.ID, "prompt").text == "Prompt 0: 5 + 5 = 11"
        assert d.find_element(By.ID, "prompt-heading").text == "Prompt"
        assert d.find_elements(By.CSS_SELECTOR, "#conversation > li") == []
