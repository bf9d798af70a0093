"""The web console: `/console` loaded in headless Debian chromium against a live tinkerd, checked
for what it shows (runs, live loss curves, the worker, the queue, checkpoints with size and TTL),
and against a stub API that wants a key: the 401 message, the key box and `#key=`.

Without /usr/bin/chromium and /usr/bin/chromedriver these tests fail, never skip (CI installs
them: `apt-get install -y chromium chromium-driver`). Selenium is given the driver's path, so
Selenium Manager never runs and nothing is downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from test_api_runs import train  # three sequences, cross_entropy, AdamW at lr 0.02

from tinkerd.api import console

pytestmark = pytest.mark.timeout(180)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KEY = "tml-test"
WAIT = 60
SIZE = re.compile(r"^(\d+(?:\.\d)?) (B|KiB|MiB|GiB)$")
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless chromium through /usr/bin/chromedriver, with a fresh profile."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"the console tests need Debian's chromium and chromedriver ({', '.join(missing)} "
            "missing): apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """`condition()`'s first truthy value, polled; on timeout, what the page shows."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            body = driver.execute_script("return document.body.innerText")
            pytest.fail(f"the console did not show {what} within {timeout} s; it shows:\n{body}")
        time.sleep(0.2)


CELL = """
const [table, key, cls] = arguments;
const tr = Array.from(document.querySelectorAll('#' + table + ' tbody tr'))
  .find((r) => r.dataset.key === key);
const td = tr && tr.querySelector('td.' + cls);
if (!td) return null;
const line = td.querySelector('polyline');
return {text: td.textContent, title: td.title, data: Object.assign({}, td.dataset),
        points: line ? line.getAttribute('data-points') : null};
"""


def cell(driver, table: str, key: str, cls: str) -> dict[str, Any] | None:
    """A table cell as the page shows it (read in one script: rows are redrawn every 2 s)."""
    return driver.execute_script(CELL, table, key, cls)


def chart(driver) -> tuple[int, list[tuple[float, float]]]:
    """The big loss chart: its data-points, and the polyline's (x, y) points."""
    count, points = driver.execute_script(
        "const l = document.querySelector('#chart polyline');"
        "return l ? [l.getAttribute('data-points'), l.getAttribute('points') || ''] : ['0', ''];"
    )
    xy = [tuple(float(v) for v in p.split(",")) for p in points.split()]
    return int(count), xy


def test_console_page_is_served_without_a_key(server) -> None:
    for path in ("/console", "/console/"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>tinkerd console</title>" in r.text
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # one self-contained page: nothing loaded from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)


def test_inline_fills_the_slots_and_allows_exactly_them() -> None:
    html = "<style>/*STYLE*/</style><p>x</p><script>/*SCRIPT*/</script>"
    page = console.inline(html, "p { color: red; }", "let x = 1;")
    assert page.html == "<style>p { color: red; }</style><p>x</p><script>let x = 1;</script>"
    digest = base64.b64encode(hashlib.sha256(b"let x = 1;").digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page.csp
    with pytest.raises(ValueError, match="SCRIPT"):
        console.inline("<style>/*STYLE*/</style>", "", "")
    with pytest.raises(ValueError, match="</script"):
        console.inline(html, "", "s = '</SCRIPT>';")
    built = console.page()  # the package's own files fit
    assert "/*SCRIPT*/" not in built.html and "X-API-Key" in built.html


def test_console_shows_runs_live_curves_workers_and_checkpoints(
    server, training_client, browser
) -> None:
    tc, driver = training_client, browser
    run = tc.model_id
    losses = train(tc, 3)
    assert losses[-1] < losses[0]
    weights = tc.save_state("console-1", ttl_seconds=3600).result(timeout=WAIT).path
    sampler = tc.save_weights_for_sampler("console-s").result(timeout=WAIT).path
    listed = httpx.get(
        f"{server.url}/api/v1/training_runs/{run}/checkpoints",
        headers={"X-API-Key": KEY},
        timeout=30,
    ).json()["checkpoints"]
    api = {c["tinker_path"]: c for c in listed}

    started = time.monotonic()
    driver.get(f"{server.url}/console#key={KEY}")
    # the key went from the address bar to sessionStorage
    assert "key=" not in driver.current_url
    stored = driver.execute_script("return sessionStorage.getItem('tinkerd-api-key')")
    assert stored == KEY
    row = wait_for(
        driver,
        lambda: driver.execute_script(
            "return Array.from(document.querySelectorAll('#runs tbody tr'))"
            ".find((r) => r.dataset.key === arguments[0])",
            run,
        ),
        f"run {run}",
    )
    row.click()
    wait_for(driver, lambda: chart(driver)[0] == 3, "a 3-point loss curve")
    loaded = time.monotonic() - started

    # the run's row: base model, status, steps, last loss, its sparkline
    assert cell(driver, "runs", run, "base")["text"] == tc.get_info().model_data.model_name
    assert cell(driver, "runs", run, "status")["text"] == "active (local)"
    assert cell(driver, "runs", run, "steps")["text"] == "3"
    assert float(cell(driver, "runs", run, "loss")["title"]) == pytest.approx(losses[-1])
    assert cell(driver, "runs", run, "curve")["points"] == "3"
    # the big chart: 3 points left to right, the falling loss drawn lower (larger y)
    _, xy = chart(driver)
    assert [x for x, _ in xy] == sorted(x for x, _ in xy) and xy[-1][1] > xy[0][1]
    assert driver.find_element("id", "chart-title").text.startswith(run)

    # the worker, its memory and models; the queue
    assert cell(driver, "workers", "local", "device")["text"] == "cpu"
    memory = cell(driver, "workers", "local", "memory")
    assert int(memory["data"]["total"]) >= int(memory["data"]["used"]) > 0
    assert " / " in memory["text"]
    assert int(cell(driver, "workers", "local", "models")["text"]) >= 1
    assert run in cell(driver, "workers", "local", "models")["title"]
    assert int(cell(driver, "workers", "local", "queue")["text"]) >= 0
    assert driver.find_element("id", "queue-depth").text.isdigit()
    assert driver.find_element("id", "mode").text == "embedded"

    # the run's checkpoints: size (human-readable) and TTL
    for path in (weights, sampler):
        size = cell(driver, "checkpoints", path, "size")
        assert int(size["data"]["bytes"]) == api[path]["size_bytes"] > 0
        number, unit = SIZE.match(size["text"]).groups()
        assert float(number) * UNITS[unit] == pytest.approx(api[path]["size_bytes"], rel=0.05)
    ttl = cell(driver, "checkpoints", weights, "ttl")
    assert ttl["data"]["expiresAt"] == api[weights]["expires_at"] is not None
    assert re.fullmatch(r"in (\d+ min|1 h \d+ min)", ttl["text"]), ttl
    assert cell(driver, "checkpoints", sampler, "ttl")["text"] == "never"
    assert cell(driver, "checkpoints", weights, "kind")["text"] == "training"
    assert cell(driver, "checkpoints", weights, "name")["text"] == "console-1"

    # live: two more steps appear without a reload
    driver.execute_script("window.consoleMarker = 42")
    more = train(tc, 2)
    trained = time.monotonic()
    wait_for(driver, lambda: chart(driver)[0] == 5, "the curve grow to 5 points", timeout=15)
    live = time.monotonic() - trained
    assert driver.execute_script("return window.consoleMarker") == 42  # the same document
    assert cell(driver, "runs", run, "steps")["text"] == "5"
    assert float(cell(driver, "runs", run, "loss")["title"]) == pytest.approx(more[-1])
    assert driver.find_element("id", "banner").get_attribute("hidden") is not None
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no script errors, no CSP refusals, no failed requests
    print(f"console: first curve {loaded:.1f} s after load, new steps shown in {live:.1f} s")


# -- API keys, against a stub API that wants one --------------------------------------------


@pytest.fixture
def keyed_api() -> Iterator[tuple[str, list[str | None]]]:
    """The console blueprint and stub JSON routes that answer 401 without `tml-right` (healthz
    stays open, as on tinkerd); yields its URL and the keys that the routes were sent."""
    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    seen: list[str | None] = []
    app = Flask(__name__)
    app.register_blueprint(console.bp)
    bodies = {
        "/api/v1/system/status": {
            "mode": "cluster",
            "workers": [],
            "queue_depth": 0,
            "host": {},
            "models": 0,
            "lost_models": [],
        },
        "/api/v1/training_runs": {
            "training_runs": [],
            "cursor": {"offset": 0, "limit": 100, "total_count": 0},
        },
        "/api/v1/checkpoints": {"checkpoints": []},
    }

    @app.get("/api/v1/healthz")
    def healthz():
        return jsonify({"status": "ok", "queue_depth": 0})

    @app.get("/api/v1/<path:rest>")
    def stub(rest: str):
        key = request.headers.get("X-API-Key")
        seen.append(key)
        if key != "tml-right":
            return jsonify({"error": "a valid API key is required", "category": "user"}), 401
        return jsonify(bodies[request.path])

    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}", seen
    finally:
        http.shutdown()
        thread.join(timeout=10)


def test_console_asks_for_a_key_and_sends_it(browser, keyed_api) -> None:
    driver, (url, seen) = browser, keyed_api

    def banner() -> str:
        node = driver.find_element("id", "banner")
        return "" if node.get_attribute("hidden") is not None else node.text

    def enter(key: str) -> None:
        box = driver.find_element("id", "key-input")
        box.clear()
        box.send_keys(key)
        driver.find_element("id", "key-save").click()

    driver.get(f"{url}/console")
    message = wait_for(driver, banner, "a message on the 401")
    assert "enter your API key" in message and seen[0] is None
    enter("tml-wrong")
    wait_for(driver, lambda: "refused" in banner(), "that the key was refused")
    assert "enter your API key" in banner() and "tml-wrong" in seen
    enter("tml-right")
    wait_for(driver, lambda: banner() == "", "the page without a message")
    assert driver.find_element("id", "mode").text == "cluster"
    assert driver.find_element("id", "runs-empty").is_displayed()

    # a #key= fragment on a first load (no key stored): stored, out of the address bar, sent
    driver.execute_script("sessionStorage.clear()")
    driver.get("about:blank")  # else only the fragment changes, and the page is not loaded again
    seen.clear()
    driver.get(f"{url}/console#key=tml-right")
    assert driver.current_url == f"{url}/console"
    wait_for(driver, lambda: seen and banner() == "" and driver.find_element("id", "mode").text,
             "the page with the key from the fragment")  # fmt: skip
    assert set(seen) == {"tml-right"}


def test_console_lists_stored_records_with_absurd_values(tmp_path, tiny_model_dir, browser) -> None:
    """A checkpoint whose stored expiry and time no datetime holds (an older version took a TTL
    of 10**12 s) once made the console's listings answer 500: it now lists, never expiring."""
    import json

    from test_api_runs import embedded, new_client, sdk

    data_dir = tmp_path / "data"
    with embedded(data_dir) as url, sdk(url) as (client, _):
        tc = new_client(client, tiny_model_dir)
        odd = tc.save_state("odd").result(timeout=WAIT).path
        fine = tc.save_state("fine", ttl_seconds=3600).result(timeout=WAIT).path
    meta = data_dir / "runs" / tc.model_id / "weights" / "odd" / "tinkerd.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "expires_at": 1e300, "created_at": float("nan")}))

    with embedded(data_dir) as url:
        driver = browser
        driver.get_log("browser")  # drop what earlier tests left in the shared browser's log
        driver.get(f"{url}/console#key={KEY}")
        wait_for(driver, lambda: cell(driver, "checkpoints", odd, "ttl"), f"checkpoint {odd}")
        assert cell(driver, "checkpoints", odd, "ttl")["text"] == "never"
        assert cell(driver, "checkpoints", fine, "ttl")["text"].startswith("in ")
        assert cell(driver, "runs", tc.model_id, "status") is not None
        assert driver.find_element("id", "banner").get_attribute("hidden") is not None
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
