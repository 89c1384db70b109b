"""`xmodal serve` end to end in a real headless browser (Debian `chromium` + `chromium-driver`, driven by selenium).

The test starts the server, opens the page, types a query, submits, and waits for the result thumbnails to be in the
page *and loaded* (``naturalWidth > 0``); then it uploads an image through the file input and drops one on the drop
zone. The shown results must be those of `Retriever.search` for the same query, in the same order.
"""
from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

import pytest

from _requires import IN_CI, importorskip, missing  # skip without what bootstrap installs; fail in CI

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                               else None)
NO_BROWSER = None if CHROMIUM and CHROMEDRIVER else (
    "Debian chromium / chromium-driver are not installed (scripts/bootstrap.sh installs them: apt-get install "
    "chromium chromium-driver)")
if NO_BROWSER and not IN_CI:  # outside CI: skip the module; in CI (.ci/run bootstraps both) the browser fixture fails
    missing(NO_BROWSER, allow_module_level=True)
webdriver = importorskip("selenium.webdriver", "selenium, the dev extra: pip install -e .[dev]")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from xmodal.retrieval.retriever import Retriever  # noqa: E402
from xmodal.retrieval.service import make_server  # noqa: E402

from test_service import built, start, stop  # noqa: E402,F401  (the module fixture `built`: tiny model + index)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]

THUMBS_LOADED = """
const imgs = Array.from(document.querySelectorAll('#results .hit img.thumb'));
return {n: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
        ids: Array.from(document.querySelectorAll('#results .hit')).map(c => parseInt(c.dataset.indexId, 10)),
        status: document.getElementById('status').textContent};
"""


@pytest.fixture(scope="module")
def browser():
    if NO_BROWSER:
        missing(NO_BROWSER)
    profile = tempfile.mkdtemp(prefix="xmodal-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def server(built):  # noqa: F811
    srv = start(make_server(built[0], "127.0.0.1", 0))
    yield srv
    stop(srv)


def wait_for_results(driver, expected_ids, timeout=15):
    """Wait until the grid shows exactly `expected_ids` (in order) and every thumbnail has loaded."""
    state = {}

    def done(d):
        state.update(d.execute_script(THUMBS_LOADED))
        return state["ids"] == expected_ids and state["n"] == state["loaded"] == len(expected_ids)

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(done)
    except Exception:
        raise AssertionError(f"results never appeared as expected: {state} (wanted ids {expected_ids})") from None
    return state


def test_type_a_query_then_upload_and_drop_an_image(browser, server, built):  # noqa: F811
    index_dir, _, rows = built
    retriever = Retriever(index_dir)
    browser.get(server.url + "/")
    WebDriverWait(browser, 10).until(lambda d: "items" in d.find_element(By.ID, "info").text)
    assert f"{len(rows)} image items" in browser.find_element(By.ID, "info").text

    # type a query, choose k, submit
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    box = browser.find_element(By.ID, "q")
    box.send_keys("a drawing of a cat")
    browser.find_element(By.ID, "search").click()
    expected = [h.id for h in retriever.search("a drawing of a cat", "text", k=5)]
    state = wait_for_results(browser, expected)
    assert state["n"] == 5 and state["status"].startswith("5 results")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    first = retriever.index.metadata(expected[0])
    assert first["id"] in cards[0].text and f"{retriever.search('a drawing of a cat', 'text', k=1)[0].score:.4f}" \
        in cards[0].text

    # upload an image through the file input
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("10")
    path = rows[5]["image"]
    browser.find_element(By.ID, "file").send_keys(str(Path(path).absolute()))
    expected = [h.id for h in retriever.search(path, "image", k=10)]
    state = wait_for_results(browser, expected)
    assert state["n"] == 10
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 0

    # drop an image file on the drop zone (a real `drop` event carrying a File, as a drag from the desktop makes)
    path = rows[9]["image"]
    data = base64.b64encode(Path(path).read_bytes()).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    """, data)
    expected = [h.id for h in retriever.search(path, "image", k=10)]
    wait_for_results(browser, expected)

    # an error from the API is shown, not swallowed: k out of range (a crafted option)
    browser.execute_script("const o = document.createElement('option'); o.text = '500'; "
                           "document.getElementById('k').append(o);")
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("500")
    box.clear()
    box.send_keys("a red car")
    browser.find_element(By.ID, "search").click()
    WebDriverWait(browser, 10).until(lambda d: "error 400" in d.find_element(By.ID, "status").text)
    assert "k must be an integer from 1 to 100" in browser.find_element(By.ID, "status").text

    # nothing was blocked by the page's Content-Security-Policy and no script failed
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "status of 400" not in e["message"]]
    assert not severe, severe


def test_a_text_search_lives_in_the_address_and_a_link_runs_it(browser, server, built):  # noqa: F811
    from urllib.parse import parse_qs, quote, urlsplit

    index_dir, _, _ = built
    retriever = Retriever(index_dir)
    # a shared link: the page opens with the query typed in, k chosen, and its results shown
    browser.get(server.url + "/?q=" + quote("a drawing of a cat") + "&k=5")
    expected = [h.id for h in retriever.search("a drawing of a cat", "text", k=5)]
    assert wait_for_results(browser, expected)["n"] == 5
    assert browser.find_element(By.ID, "q").get_attribute("value") == "a drawing of a cat"
    assert Select(browser.find_element(By.ID, "k")).first_selected_option.text == "5"
    # a typed search puts itself in the address, ready to share
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a red car & a bus")
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("10")
    browser.find_element(By.ID, "search").click()
    wait_for_results(browser, [h.id for h in retriever.search("a red car & a bus", "text", k=10)])
    assert parse_qs(urlsplit(browser.current_url).query) == {"q": ["a red car & a bus"], "k": ["10"]}
    # a link with a k the list does not offer runs that k (the list gains it)
    browser.get(server.url + "/?q=" + quote("a blue bird") + "&k=7")
    assert wait_for_results(browser, [h.id for h in retriever.search("a blue bird", "text", k=7)])["n"] == 7
    assert Select(browser.find_element(By.ID, "k")).first_selected_option.text == "7"
