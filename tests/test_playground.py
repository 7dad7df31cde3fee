"""The browser playground of `jblip serve` (GET /): its files and limits over HTTP, then the page
driven in headless Chromium through Selenium on the demo model: upload, streamed answer,
a non-image file's error shown in the page, a dropped image, phone width.

Set JBLIP_SCREENSHOTS=DIR to keep the screenshots (docs/playground.png is made that way)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import tomllib
import urllib.error
import urllib.request
from fnmatch import fnmatch

import pytest

pytest.importorskip("fastapi")

import jblip  # noqa: E402
from jblip.pipeline import DEFAULT_MODEL  # noqa: E402
from jblip.processing import Processor  # noqa: E402
from jblip.serve import BackgroundServer, ServerSettings, build_app  # noqa: E402
from tests.test_demo import EXAMPLES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "jblip", "serve", "static")
RED = os.path.join(EXAMPLES, "red_circle.png")
QUESTION = "What colour is the circle?"

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")


@pytest.fixture(scope="module")
def server():
    model = jblip.load_pretrained(DEFAULT_MODEL)
    settings = ServerSettings(model_name="demo", max_batch=1, max_queue=8)
    with BackgroundServer(build_app(model, Processor.from_pretrained(DEFAULT_MODEL), settings)) as s:
        yield s


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ----------------------------------------------------------------------------- over HTTP

def test_page_and_assets_are_served_with_a_self_only_policy(server):
    status, headers, body = get(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="static/playground.js"' in body and b'href="static/playground.css"' in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css")]:
        status, headers, body = get(f"{server.url}/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 1000
    for name in ("index.html", "../app.py", "%2e%2e%2fapp.py", "nope.js"):
        status, _, body = get(f"{server.url}/static/{name}")
        assert status == 404 and "error" in json.loads(body), name


def test_no_file_of_the_page_reaches_outside_the_server():
    for name in os.listdir(STATIC):
        text = open(os.path.join(STATIC, name), encoding="utf-8").read()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


def test_every_page_file_ships_in_the_wheel():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["jblip.serve"]
    names = sorted(os.listdir(STATIC))
    assert {"index.html", "playground.css", "playground.js"} <= set(names)
    assert all(any(fnmatch("static/" + n, g) for g in globs) for n in names), (names, globs)


def test_limits_are_the_servers(server):
    status, _, body = get(server.url + "/limits")
    limits = json.loads(body)
    # the demo LM has 64 positions; "a" is 2 tokens and the 8 queries are prepended -> 54 left
    assert status == 200 and limits["model"] == "demo" and limits["max_positions"] == 64
    assert limits["max_tokens"] == 54 and limits["default_max_tokens"] == 32  # 64 does not fit: a power of two
    assert limits["max_beams"] == 16 and limits["temperature"] == {"min": 0.0, "max": 2.0}
    assert limits["max_image_bytes"] == 20 << 20 and limits["max_prompt_tokens"] == 128


# ----------------------------------------------------------------------------- in Chromium

def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    found = _browser()
    if found is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,880", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def _ask(driver, question: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question, Keys.ENTER)  # keyboard submit
    count = len(driver.find_elements(By.CSS_SELECTOR, "#history .entry"))
    entry = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#history .entry")[count - 1:],
                  "a history entry for the question")[-1]
    _wait(driver, lambda d: entry.get_attribute("data-state") != "streaming", "the answer to finish")
    return entry


def _screenshot(driver, tmp_path, name: str) -> str:
    folder = os.environ.get("JBLIP_SCREENSHOTS") or str(tmp_path)
    path = os.path.join(folder, name)
    assert driver.save_screenshot(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return path


def _drop(driver, path: str, name: str, mime: str):
    """Drops a file on the drop zone as a user dragging it from their desktop would."""
    data = base64.b64encode(open(path, "rb").read()).decode()
    driver.execute_script("""
        const [data, name, mime] = arguments;
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: mime}));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    """, data, name, mime)


def test_the_page_answers_shows_errors_and_fits_a_phone(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    d = browser
    d.get(server.url + "/")
    _wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", "the limits")
    assert d.find_element(By.ID, "model-name").text == "demo"
    max_tokens = d.find_element(By.ID, "max-tokens")
    assert (max_tokens.get_attribute("max"), max_tokens.get_attribute("value")) == ("54", "32")
    unlabelled = d.execute_script("""return [...document.querySelectorAll('input, button')]
        .filter((e) => !(e.labels && e.labels.length) && !e.textContent.trim() && !e.getAttribute('aria-label'))
        .map((e) => e.id);""")
    assert unlabelled == []

    # pick the image: a thumbnail, then a streamed answer
    d.find_element(By.ID, "image-input").send_keys(RED)
    _wait(d, lambda d: d.execute_script("const t = document.getElementById('thumbnail');"
                                        "return !t.hidden && t.naturalWidth > 0;"), "the thumbnail")
    entry = _ask(d, QUESTION)
    assert entry.get_attribute("data-state") == "done"
    assert entry.find_element(By.CLASS_NAME, "entry-answer").text == "red"
    assert int(entry.get_attribute("data-chunks")) >= 1
    assert "greedy" in entry.find_element(By.CLASS_NAME, "entry-meta").text
    assert not d.find_element(By.ID, "error").is_displayed()

    # a file that is not an image: the server's 400 message is shown in the page
    notes = tmp_path / "notes.txt"
    notes.write_text("just some words, no picture")
    d.find_element(By.ID, "image-input").send_keys(str(notes))
    _wait(d, lambda d: "notes.txt" in d.find_element(By.ID, "file-name").text, "the file's name")
    entry = _ask(d, QUESTION)
    error = d.find_element(By.ID, "error")
    assert entry.get_attribute("data-state") == "error" and error.is_displayed()
    assert "(400)" in error.text and "text/plain, not image/*" in error.text

    # the page still works: drop the image this time, change the decoding, ask again
    _drop(d, RED, "red.png", "image/png")
    _wait(d, lambda d: d.find_element(By.ID, "file-name").text == "red.png", "the dropped file")
    beams = d.find_element(By.ID, "beams")
    beams.clear()
    beams.send_keys("2")
    entry = _ask(d, QUESTION)
    assert entry.get_attribute("data-state") == "done"
    assert entry.find_element(By.CLASS_NAME, "entry-answer").text == "red"
    assert "beam search (2 beams)" in entry.find_element(By.CLASS_NAME, "entry-meta").text
    assert not error.is_displayed()
    assert len(d.find_elements(By.CSS_SELECTOR, "#history .entry")) == 3
    assert not d.find_element(By.ID, "tabs").is_displayed()  # one tab: no tab bar
    _screenshot(d, tmp_path, "playground.png")

    # phone width: one column, nothing wider than the screen
    d.set_window_size(390, 844)
    _wait(d, lambda d: d.execute_script("return window.innerWidth") <= 400, "the phone-width window")
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    form, history = (d.find_element(By.CSS_SELECTOR, s).rect for s in ("#ask-form", ".history"))
    assert history["y"] >= form["y"] + form["height"]  # stacked, not side by side
    d.execute_script("document.querySelector('#history .entry:last-child').scrollIntoView({block: 'end'})")
    _screenshot(d, tmp_path, "playground-phone.png")
    # no script error and nothing the page's policy had to block (the 400 above is logged as a failed load)
    problems = [e["message"] for e in d.get_log("browser")
                if e["level"] == "SEVERE" and "status of 400" not in e["message"]]
    assert problems == []
