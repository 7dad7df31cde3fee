"""The browser playground of `jblip serve` (GET /): its files and limits over HTTP, then the page
driven in headless Chromium through Selenium on the demo model: upload, streamed answer,
a non-image file's error shown in the page, a dropped image, phone width; Stop halfway through a
long (scripted) answer; the search tab over an index of generated scenes.

Set JBLIP_SCREENSHOTS=DIR to keep the screenshots (docs/playground.png is made that way)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
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
STEP_S = 0.1  # the scripted answers' seconds per token

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")


@pytest.fixture(scope="module")
def model():
    return jblip.load_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def server(model):
    settings = ServerSettings(model_name="demo", max_batch=1, max_queue=8)
    with BackgroundServer(build_app(model, Processor.from_pretrained(DEFAULT_MODEL), settings)) as s:
        yield s


@pytest.fixture(scope="module")
def search_server(model, tmp_path_factory, private_xla_cache):
    """A server with a search index of generated scenes, whose answers are scripted: "red" once
    per STEP_S seconds up to max_tokens (slow enough to press Stop halfway)."""
    from jblip.commands.retrieval_common import open_index
    from jblip.serve.slot_engine import SlotEngine
    from tests.test_serve_search import build_scene_index
    from tests.test_serve_slots import EOS, ScriptedProgram
    root, index = tmp_path_factory.mktemp("scenes"), tmp_path_factory.mktemp("index")
    build_scene_index(root, index)
    processor = Processor.from_pretrained(DEFAULT_MODEL)
    program = ScriptedProgram(num_slots=2, step_s=STEP_S, token=processor.tokenizer.encode_plain("red")[0])
    engine = SlotEngine(program, max_queue=8, eos_token_ids=(EOS,))
    app = build_app(model, processor, ServerSettings(model_name="demo", max_queue=8), engine=engine,
                    search=open_index(str(index)))
    with BackgroundServer(app) as s:
        yield s, program, engine


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
    for name, kind in [("playground.js", "text/javascript"), ("search.js", "text/javascript"), ("playground.css", "text/css")]:
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
    assert {"index.html", "playground.css", "playground.js", "search.js"} <= set(names)
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


def _submit(driver, question: str):
    """Types the question, presses Enter and returns its history entry (still streaming)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.ID, "question")
    box.clear()
    count = len(driver.find_elements(By.CSS_SELECTOR, "#history .entry"))
    box.send_keys(question, Keys.ENTER)  # keyboard submit
    return _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#history .entry")[count:],
                 "a history entry for the question")[-1]


def _ask(driver, question: str):
    entry = _submit(driver, question)
    _wait(driver, lambda d: entry.get_attribute("data-state") != "streaming", "the answer to finish")
    return entry


def _open(driver, url: str):
    from selenium.webdriver.common.by import By
    driver.set_window_size(1100, 880)
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", "the limits")


def _set(driver, element_id: str, value: str):
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(value)


def _console_problems(driver) -> list[str]:
    """Script errors and blocked loads in the browser's log (a server's 400, shown in the page, is
    logged as a failed load too: not a problem)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "status of 400" not in e["message"]]


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
    _open(d, server.url + "/")
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
    _set(d, "beams", "2")
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
    assert _console_problems(d) == []  # no script error, nothing the page's policy had to block


def _metric(url: str, name: str) -> float:
    text = get(url + "/metrics")[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_stop_ends_a_long_answer_and_the_server_frees_it(browser, search_server, tmp_path):
    from selenium.webdriver.common.by import By
    server, program, engine = search_server
    d = browser
    _open(d, server.url + "/")
    d.find_element(By.ID, "image-input").send_keys(RED)
    _wait(d, lambda d: d.find_element(By.ID, "file-name").text == "red_circle.png", "the chosen file")
    _set(d, "max-tokens", "40")  # 40 scripted tokens: 4 s, if nobody stops it
    entry = _submit(d, QUESTION)
    _wait(d, lambda d: int(entry.get_attribute("data-chunks")) >= 3 or entry.get_attribute("data-state") != "streaming",
          "the answer to stream in")
    assert entry.get_attribute("data-state") == "streaming", (entry.text, d.find_element(By.ID, "error").text)
    d.find_element(By.ID, "stop-button").click()
    _wait(d, lambda d: entry.get_attribute("data-state") == "stopped", "the answer to stop")
    answer = entry.find_element(By.CLASS_NAME, "entry-answer").text
    assert 3 <= len(answer.split()) < 39 and set(answer.split()) == {"red"}, answer
    assert "stopped" in entry.find_element(By.CLASS_NAME, "entry-meta").text
    # the server noticed the closed stream: the request is cancelled and its slot freed
    deadline = time.monotonic() + 30
    while (_metric(server.url, "jblip_requests_cancelled_total") < 1 or json.loads(get(server.url + "/health")[2])
           ["active_slots"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server.url, "jblip_requests_cancelled_total") == 1
    assert json.loads(get(server.url + "/health")[2])["active_slots"] == 0
    time.sleep(2 * STEP_S)  # a step already under way when it was cancelled ends first
    steps = engine.steps_run
    time.sleep(5 * STEP_S)
    assert engine.steps_run == steps  # the engine decodes nothing more for it
    assert entry.find_element(By.CLASS_NAME, "entry-answer").text == answer  # and nothing arrives after Stop
    # the page is usable: Stop is gone, Ask works again and its answer runs to the end
    assert not d.find_element(By.ID, "stop-button").is_displayed()
    assert d.find_element(By.ID, "ask-button").is_enabled()
    _set(d, "max-tokens", "3")
    entry = _ask(d, QUESTION)
    assert entry.get_attribute("data-state") == "done"
    assert entry.find_element(By.CLASS_NAME, "entry-answer").text == "red red"  # 2 tokens, then EOS
    assert program.freed[:1] == [0]  # the stopped answer's slot, freed before the next step
    assert _console_problems(d) == []


def test_the_search_tab_shows_the_best_images(browser, search_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    server = search_server[0]
    d = browser
    _open(d, server.url + "/")
    _wait(d, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-search") == "ready", "the index")
    tabs = d.find_elements(By.CSS_SELECTOR, "#tabs button")
    assert d.find_element(By.ID, "tabs").is_displayed() and [t.text for t in tabs] == ["Ask about an image",
                                                                                       "Search images"]
    assert d.find_element(By.ID, "ask-panel").is_displayed() and not d.find_element(By.ID, "search-panel").is_displayed()
    tabs[1].click()
    assert d.find_element(By.ID, "search-panel").is_displayed() and not d.find_element(By.ID, "ask-panel").is_displayed()
    assert tabs[1].get_attribute("aria-selected") == "true"
    assert "12 images indexed" in d.find_element(By.ID, "search-about").text
    assert d.find_element(By.ID, "search-top-k").get_attribute("max") == "12"

    def search(query: str):
        box = d.find_element(By.ID, "search-query")
        box.clear()
        box.send_keys(query, Keys.ENTER)  # keyboard submit

    def hits_for(query: str):
        _wait(d, lambda d: d.find_element(By.ID, "search-results").get_attribute("data-query") == query, query)
        return d.find_elements(By.CSS_SELECTOR, "#search-results .hit")

    search("red circle")  # the first query of its length compiles (`jblip serve` compiles them at start)
    assert len(hits_for("red circle")) == 8
    # a query the server refuses (too many tokens): its message in the page
    search("blue square " * 20)
    error = d.find_element(By.ID, "search-error")
    _wait(d, lambda d: error.is_displayed(), "the error shown")
    assert "(400)" in error.text and "tokens long" in error.text

    search("blue square")
    hits = hits_for("blue square")
    _wait(d, lambda d: d.execute_script("return [...document.querySelectorAll('#search-results img')]"
                                        ".every((i) => i.complete && i.naturalWidth === 64);"), "the images")
    assert len(hits) == 8 and not error.is_displayed()  # the default top_k
    names = [h.find_element(By.CLASS_NAME, "hit-name").text for h in hits]
    assert names[0].startswith("blue_square"), names
    scores = [float(h.find_element(By.CLASS_NAME, "hit-score").text.split()[-1]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    # the top image is the blue square scene itself: its pixels, as the browser decoded them
    blue = d.execute_script("""const img = document.querySelector('#search-results img');
        const canvas = document.createElement('canvas');
        [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        const px = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let [blue, x0, y0, x1, y1] = [0, 1e9, 1e9, -1, -1];
        for (let i = 0; i < px.length; i += 4) {
          if (px[i + 2] > 150 && px[i] < 100 && px[i + 1] < 100) {
            const [x, y] = [(i / 4) % canvas.width, Math.floor(i / 4 / canvas.width)];
            blue++; x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
          }
        }
        return [blue, (x1 - x0 + 1) * (y1 - y0 + 1)];""")
    # blue pixels filling their bounding box: a square (a circle fills ~79 %, a triangle ~50 %)
    assert blue[0] > 100 and blue[0] / blue[1] > 0.95, blue
    _screenshot(d, tmp_path, "playground-search.png")

    # phone width: the grid fits the screen
    d.set_window_size(390, 844)
    _wait(d, lambda d: d.execute_script("return window.innerWidth") <= 400, "the phone-width window")
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    form, results = (d.find_element(By.CSS_SELECTOR, s).rect for s in ("#search-form", ".results"))
    assert results["y"] >= form["y"] + form["height"]
    _screenshot(d, tmp_path, "playground-search-phone.png")
    assert _console_problems(d) == []
