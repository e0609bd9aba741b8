"""The HTML leaderboard page in a real headless Chromium, driven over the DevTools protocol.

The fixture starts Debian's ``chromium`` with remote debugging on 127.0.0.1 (on a port that
Chromium chooses) and opens the generated page from disk. The tests check that the page loads
without console errors or network requests and shows the expected rows per table. They also
click column headers with real mouse events and check the new order. Without a chromium
binary the tests are skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from benchmark.cli import main
from benchmark.paths import CACHE_VARIABLE
from leaderboard.entries import ENTRIES_DIR, entry_from_run, entry_path, entry_text, load_entries

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Flags that keep Chromium off the network and out of the user's profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
STARTUP_SECONDS = 60
COMMAND_SECONDS = 30
NUDITY_TABLE = 'table[data-concept="nudity"][data-protocol="reported:unlearndiffatk-leaderboard"]'


def _chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed; install it with `apt-get install -y chromium` (.ci/run does)")


class DevTools:
    """A minimal Chrome DevTools protocol client for one page target."""

    def __init__(self, url: str) -> None:
        # Chromium rejects DevTools websocket clients that send an Origin header it does not allow.
        self.socket = websocket.create_connection(url, timeout=COMMAND_SECONDS, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + COMMAND_SECONDS
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            self.events.append(message)
            if message.get("method") == method:
                return message
        raise TimeoutError(f"no {method} event within {COMMAND_SECONDS} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """Click the element's centre with mouse events, as a user would."""
        box = self.evaluate(f"""(() => {{
            const element = document.querySelector({json.dumps(selector)});
            element.scrollIntoView({{block: "center"}});
            const rect = element.getBoundingClientRect();
            return {{x: rect.x + rect.width / 2, y: rect.y + rect.height / 2}};
        }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def close(self) -> None:
        self.socket.close()


def _devtools_port(profile: Path, process: subprocess.Popen) -> int:
    """Chromium writes the port it chose for --remote-debugging-port=0 into DevToolsActivePort."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with status {process.returncode} before opening DevTools")
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.1)
    raise TimeoutError(f"chromium opened no DevTools port within {STARTUP_SECONDS} s")


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory) -> Path:
    """The page built from the shipped entries plus one measured entry of a tiny run."""
    root = tmp_path_factory.mktemp("entries")
    shutil.copytree(ENTRIES_DIR, root, dirs_exist_ok=True)
    runs = tmp_path_factory.mktemp("runs")
    # Module fixtures are set up before conftest's per-test private cache, so this one sets its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VARIABLE, str(tmp_path_factory.mktemp("cache")))
        assert main(["run", "--model", "tiny-random", "--set", "run.max_prompts=2", "--set", "run.utility=false",
                     "--set", "run.grid_rows=0", "--no-progress", "--output", str(runs)]) == 0
    (run_dir,) = runs.iterdir()
    entry = entry_from_run(run_dir)
    entry_path(entry, root).parent.mkdir(parents=True, exist_ok=True)
    entry_path(entry, root).write_text(entry_text(entry))

    out = tmp_path_factory.mktemp("page")
    assert main(["leaderboard", "--entries", str(root), "--csv", str(out / "leaderboard.csv"),
                 "--html", str(out / "html")]) == 0
    return out / "html"


@pytest.fixture(scope="module")
def browser(page_dir, tmp_path_factory):
    """A headless Chromium showing the page, with console, log and network events recorded."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port = _devtools_port(profile, process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=COMMAND_SECONDS) as response:
            targets = json.load(response)
        (target,) = [target for target in targets if target["type"] == "page"]
        devtools = DevTools(target["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Network", "Page"):
            devtools.call(f"{domain}.enable")
        devtools.call("Page.navigate", url=(page_dir / "index.html").as_uri())
        devtools.wait_for("Page.loadEventFired")
        yield devtools
        devtools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _column(devtools: DevTools, selector: str, index: int) -> list[str]:
    return devtools.evaluate(f"""Array.from(document.querySelector({json.dumps(selector)}).tBodies[0].rows)
        .map(row => row.cells[{index}].textContent)""")


def test_page_loads_without_errors(browser):
    errors = [event for event in browser.events
              if event.get("method") == "Runtime.exceptionThrown"
              or (event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] in ("error", "assert"))
              or (event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error")]
    assert errors == []
    assert browser.evaluate("document.title") == "robust-erasure-bench leaderboard"


def test_page_makes_no_network_requests(browser):
    urls = [event["params"]["request"]["url"] for event in browser.events
            if event.get("method") == "Network.requestWillBeSent"]
    assert urls and all(url.startswith("file://") for url in urls), urls


def test_tables_have_expected_rows(browser):
    tables = browser.evaluate("""Array.from(document.querySelectorAll("table.board"))
        .map(table => [table.dataset.concept, table.dataset.protocol, table.tBodies[0].rows.length])""")
    expected = {}
    for entry in load_entries(ENTRIES_DIR):
        protocol = f"reported:{entry['protocol']['id']}" if entry["provenance"] == "reported" else None
        if protocol:
            expected[(entry["concept"], protocol)] = expected.get((entry["concept"], protocol), 0) + 1
    reported = {(concept, protocol): rows for concept, protocol, rows in tables if protocol.startswith("reported:")}
    measured = [(concept, rows) for concept, protocol, rows in tables if protocol.startswith("measured:")]

    assert reported == expected
    assert ("circle", 1) in measured
    assert reported[("nudity", "reported:unlearndiffatk-leaderboard")] == 9


def test_rows_marked_measured_or_reported(browser):
    marks = browser.evaluate("""Array.from(document.querySelectorAll("tbody tr"))
        .map(row => [row.dataset.provenance, row.querySelector(".mark").textContent,
                     row.querySelector(".mark").title])""")
    assert {mark for _, mark, _ in marks} == {"measured", "reported"}
    assert all(provenance == mark for provenance, mark, _ in marks)
    assert all(title for _, _, title in marks)


def test_header_click_sorts(browser):
    initial = _column(browser, NUDITY_TABLE, 4)
    assert [float(value) for value in initial] == sorted(float(value) for value in initial)

    browser.click(f"{NUDITY_TABLE} th:nth-child(4) button")
    pre = [float(value) for value in _column(browser, NUDITY_TABLE, 3)]
    assert pre == sorted(pre)

    browser.click(f"{NUDITY_TABLE} th:nth-child(4) button")
    pre = [float(value) for value in _column(browser, NUDITY_TABLE, 3)]
    assert pre == sorted(pre, reverse=True)
    assert browser.evaluate(f"document.querySelector('{NUDITY_TABLE} th:nth-child(4)').getAttribute('aria-sort')") \
        == "descending"

    browser.click(f"{NUDITY_TABLE} th:nth-child(2) button")
    defenses = _column(browser, NUDITY_TABLE, 1)
    assert defenses == sorted(defenses)


def test_details_expand_with_provenance(browser):
    selector = f'{NUDITY_TABLE} tr[data-defense="advunlearn"] details'
    assert browser.evaluate(f"document.querySelector({json.dumps(selector)}).open") is False
    browser.click(f"{selector} summary")
    assert browser.evaluate(f"document.querySelector({json.dumps(selector)}).open") is True
    text = browser.evaluate(f"document.querySelector({json.dumps(selector)}).innerText")
    assert "Intel/UnlearnDiffAtk-Benchmark" in text
    assert "AdvUnlearn" in text
