"""A real headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, for
tests of the status page: console errors, uncaught exceptions and failed loads are collected, the
page's DOM is read with JavaScript, and screenshots are taken. No browser is downloaded."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless=new",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # nothing leaves the machine: no updates, no safe browsing
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1100",
)


def chromium_path() -> str | None:
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class Browser:
    """One Chromium process with one page; `errors` gathers what a user's console would show red."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="bedside-chromium-")
        flags = [*FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen(
            [executable, *flags, "about:blank"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        browser_url = self._devtools_url()
        port = int(re.findall(r":(\d+)/", browser_url)[0])
        self.page = connect(self._page_url(port), max_size=None, open_timeout=30)
        self._next = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def _devtools_url(self) -> str:
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("chromium exited before it listened for DevTools")
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1)
        raise RuntimeError("chromium did not announce its DevTools address within 30 s")

    @staticmethod
    def _page_url(port: int) -> str:
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)  # the first tab is still being made
        raise RuntimeError("chromium opened no page")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        self.page.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.page.recv(timeout=30))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, limit_s: float = 30.0) -> Any:
        """Evaluate until the expression is truthy (the page draws what the server pushes)."""
        deadline = time.monotonic() + limit_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never satisfied {expression!r} within {limit_s} s")
            self._drain(0.1)

    def _drain(self, seconds: float) -> None:
        """Collect events for a moment (console messages arrive between calls)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.page.recv(timeout=left)))
            except TimeoutError:
                return

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, error log entries (CSP, failed loads)."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + str(params["exceptionDetails"].get("text")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append("log: " + str(params["entry"].get("text")))
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                out.append("load failed: " + str(params.get("errorText")))
        return out

    def requested(self, keep: Callable[[str], bool]) -> list[str]:
        """URLs the page asked for (to show it fetched nothing from elsewhere)."""
        urls = [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]
        return [u for u in urls if keep(u)]

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.page.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


__all__ = ["Browser", "ClientConnection", "chromium_path"]
