"""The web page at GET /: in a real browser (Debian's chromium driven by selenium) against the
real server on the starter model. LOCALSWARM_SCREENSHOTS=DIR saves the README's screenshots."""
import json
import os
import re
import shutil
import threading
import time
import urllib.request

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import localswarm as ls

SHOTS = os.environ.get("LOCALSWARM_SCREENSHOTS")


# Offline: no background traffic (updates, sync, metrics, first-run pages), and every name but
# loopback fails to resolve, so the browser can never reach an outside host whatever it tries.
OFFLINE_FLAGS = ("--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--no-default-browser-check", "--disable-sync", "--disable-default-apps",
                 "--disable-domain-reliability", "--disable-client-side-phishing-detection",
                 "--metrics-recording-only", "--disable-features=Translate,OptimizationHints,MediaRouter",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")


@pytest.fixture(scope="module")
def browser():
    """Headless chromium; a machine without it fails here (./install.sh --test installs it)."""
    os.environ["SE_OFFLINE"] = "true"       # Selenium Manager never downloads a driver or browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                *OFFLINE_FLAGS):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver") or "chromedriver"))
    yield driver
    driver.quit()


def wait(driver, condition, timeout=120):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def health(url):
    with urllib.request.urlopen(url + "/health") as r:
        return json.loads(r.read())


def ask(driver, prompt, voters=4, max_tokens=80):
    for field, value in (("voters", voters), ("max-tokens", max_tokens)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "send").click()


def lanes_with_text(driver):
    return [l for l in driver.find_elements(By.CSS_SELECTOR, "#lanes .lane") if l.find_element(By.CSS_SELECTOR, ".lane-text").text]


def test_the_page_is_one_self_contained_document(live_server):
    url, _ = live_server
    with urllib.request.urlopen(url + "/") as r:
        page, headers = r.read().decode(), dict(r.headers)
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe" not in csp
    assert headers["Content-Type"].startswith("text/html") and headers["X-Content-Type-Options"] == "nosniff"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "nothing loads from another origin"


def test_chat_fills_a_lane_per_voter_and_marks_the_winner(browser, live_server):
    url, _ = live_server
    browser.get(url + "/")
    ask(browser, "Write a Python function add(a, b) that returns the sum.")
    wait(browser, lambda d: len(lanes_with_text(d)) == 4)            # all four voters write, live
    winner = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lanes .lane.winner"))
    assert len(winner) == 1 and "winner" in winner[0].text
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .body")[-1]
    wait(browser, lambda d: answer.text.strip())
    assert "confidence" in browser.find_element(By.ID, "verdict").text
    for lane in browser.find_elements(By.CSS_SELECTOR, "#lanes .lane"):     # each says how it fared
        assert lane.find_element(By.CSS_SELECTOR, ".tag").text not in ("", "writing…")
    csp_errors = [e for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not csp_errors, csp_errors
    if SHOTS:
        os.makedirs(SHOTS, exist_ok=True)
        browser.save_screenshot(os.path.join(SHOTS, "web-desktop.png"))


def test_stop_cancels_the_voters(browser, live_server):
    url, app = live_server
    browser.get(url + "/")
    ask(browser, "Write a very long story about a dragon.", max_tokens=1500)
    wait(browser, lambda d: lanes_with_text(d))
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda d: "stopped" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text, 10)
    t0 = time.monotonic()
    while app.swarm.status()["busy_voters"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert app.swarm.status()["busy_voters"] == 0, "the server stopped the voters when the page hung up"
    assert browser.find_element(By.ID, "send").is_enabled()


def test_the_status_panel_shows_what_health_says(browser, live_server):
    url, _ = live_server
    browser.get(url + "/")
    value = lambda d, key: d.find_element(By.CSS_SELECTOR, f'#status-list dd[data-key="{key}"]').text
    h = health(url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#status-list dd[data-key="requests"]')
         and value(d, "requests") == str(health(url)["requests"]), 10)
    for key in ("model", "voters", "healthy_voters", "queue_depth"):
        assert value(browser, key) == str(h[key]), key
    assert "hits" in value(browser, "prompt_cache")


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_in_the_tab(browser, live_server):
    _, app = live_server
    cfg = ls.load_config({"server.api_key": "s3cret"}, env={}, read_file=False)
    server = ls.make_server(ls.App(cfg, app.swarm), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        browser.get(url + "/")
        box = browser.find_element(By.ID, "key-box")
        wait(browser, lambda d: box.is_displayed(), 10)
        browser.find_element(By.ID, "key").send_keys("s3cret")
        browser.find_element(By.ID, "key-ok").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#status-list dd[data-key="model"]'), 10)
        assert not box.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('localswarm-key')") == "s3cret"
        assert browser.execute_script("return localStorage.length") == 0
        ask(browser, "Say hello.", max_tokens=16)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lanes .lane.winner"))
    finally:
        server.shutdown()
        server.server_close()
        browser.execute_script("sessionStorage.clear()")


def test_a_phone_sized_screen_needs_no_sideways_scrolling(browser, live_server):
    url, _ = live_server
    browser.set_window_size(390, 844)
    try:
        browser.get(url + "/")
        ask(browser, "Write a Python function that reverses a string.", max_tokens=60)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#lanes .lane.winner"))
        width = browser.execute_script("return document.documentElement.clientWidth")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        if SHOTS:
            browser.save_screenshot(os.path.join(SHOTS, "web-phone.png"))
    finally:
        browser.set_window_size(1280, 1000)


def test_the_browser_resolves_no_name_but_loopback(browser):
    """The tests' chromium resolves no host name but localhost: even a name that would reach
    loopback (Chrome maps *.localhost there) fails, so an outside host never can be reached."""
    import http.server
    hits = []

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):
            browser.get(f"http://outside.localhost:{port}/")
        assert hits == []
        browser.get(f"http://127.0.0.1:{port}/")          # the page itself is reachable
        assert hits == [f"127.0.0.1:{port}"] or hits[0] == f"127.0.0.1:{port}"
    finally:
        srv.shutdown()
        srv.server_close()
