"""Headless Chromium driven over the DevTools protocol, for the tests that use the Prefect UI as a person does
(type into a form, click, read the page): `--dump-dom` alone cannot fill a login form."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """`with Browser(profile) as page: page.open(url); page.text()`; the browser is stopped on the way out."""

    def __init__(self, profile: Path):
        self.profile = profile
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        self.profile.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        marker = self.profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = marker.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.call("Page.enable")
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def call(self, method: str, **params) -> dict:
        number = next(self._ids)
        self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == number:
                return message.get("result", message)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, check, timeout: float = 60) -> str:
        """The page's text once `check(text)` holds; AssertionError with the last text past `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed what was expected; it shows:\n{text[:2000]}")
            time.sleep(0.5)

    def type_into(self, selector: str, value: str) -> None:
        """Set an input's value the way typing does, so the page's own handlers see it."""
        self.evaluate(f"""(() => {{
            const input = document.querySelector({json.dumps(selector)});
            Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, {json.dumps(value)});
            input.dispatchEvent(new Event('input', {{bubbles: true}}));
        }})()""")

    def click_button(self, label: str) -> None:
        clicked = self.evaluate(f"""(() => {{
            const button = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === {json.dumps(label)});
            if (button) button.click();
            return !!button;
        }})()""")
        assert clicked, f"no button labelled {label!r} on the page:\n{self.text()[:1000]}"
