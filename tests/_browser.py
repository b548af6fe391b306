"""Headless Chromium for the human teacher's web app: Selenium through Debian's chromedriver
(named explicitly: Selenium Manager would try to download a driver, and these machines have no
internet), the keyboard as a person uses it, and a scripted person correcting items in the page.
Shared by ``test_human_browser.py`` and the training run fed through the browser in
``test_human_app.py``; a test that needs the browser is marked ``needs_browser`` and says what is
missing when it is skipped."""

from __future__ import annotations

import json
import shutil
import threading
import time
from contextlib import contextmanager

import pytest

from correction_rl.types import Prompt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:
    SELENIUM = False
_MISSING = [what for what, ok in (("chromium (apt-get install chromium)", CHROMIUM),
                                  ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER),
                                  ("selenium (pip install -e '.[dev]')", SELENIUM)) if not ok]
needs_browser = pytest.mark.skipif(bool(_MISSING), reason="headless browser test needs " + ", ".join(_MISSING))


@contextmanager
def chrome(width: int = 900, height: int = 640):
    """Headless Chromium under Selenium, with the Debian binaries named explicitly (Selenium
    Manager would try to download a driver; these machines have no internet)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(20)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the screenshot's exact size
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


def wait_js(driver, expression: str, timeout_s: float = 20.0):
    """Polls a JavaScript expression until it is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return ({expression});"), message=f"page never satisfied {expression!r}")


SHOWN_ITEM = "!document.getElementById('work').hidden && document.body.dataset.item"
STATUS = "document.getElementById('status').textContent"


def keys(driver, *chord: str, modifier: str | None = None) -> None:
    """Types into the focused element like a person at the keyboard (real key events)."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver)
    if modifier is not None:
        actions.key_down(modifier)
    actions.send_keys(*chord)
    if modifier is not None:
        actions.key_up(modifier)
    actions.perform()


def fetch_status(driver, path: str, token: str | None, body: dict) -> int:
    """The HTTP status of a POST the page's own origin makes (with the CSRF header)."""
    return driver.execute_async_script(
        "const [path, token, body, done] = arguments;"
        "const headers = {'Content-Type': 'application/json', 'X-CRL-Request': '1'};"
        "if (token) headers['Authorization'] = 'Bearer ' + token;"
        "fetch(path, {method: 'POST', headers, body: JSON.stringify(body)}).then(r => done(r.status), e => done(String(e)));",
        path, token, body)


def browser_annotator(page_url: str, stop: threading.Event, saved: list[str]) -> None:
    """A person in Chromium: reads each item, types the oracle's minimal correction over the
    response (or presses "correct as is"), and submits with the keyboard."""
    from selenium.webdriver.common.keys import Keys

    from correction_rl.tasks import get_task

    with chrome() as d:
        d.get(page_url)
        while not stop.is_set():
            shown = d.execute_script(f"return {SHOWN_ITEM};")
            if not shown:
                time.sleep(0.2)
                continue
            prompt, response, task = d.execute_script(
                "return [document.getElementById('prompt').textContent, document.getElementById('edit').value,"
                " document.getElementById('task').textContent];")
            task = task.removeprefix("task: ")
            fixed = get_task(task).minimal_correction(Prompt(prompt_id="b", text=prompt, task=task), response)
            d.execute_script("document.getElementById('status').textContent = '';")
            if fixed == response:
                keys(d, "a", modifier=Keys.ALT)  # Alt+A: correct as is
            else:
                d.execute_script("const e = document.getElementById('edit'); e.focus(); e.select();")
                keys(d, fixed)
                keys(d, Keys.ENTER, modifier=Keys.CONTROL)  # Ctrl+Enter: submit
            status = wait_js(d, STATUS)
            assert status.startswith("saved"), status
            saved.append(fixed)
            wait_js(d, f"document.body.dataset.item !== {json.dumps(shown)}")
