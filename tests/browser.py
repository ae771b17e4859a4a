"""A real headless Chromium (Debian's ``chromium``; ``make test`` installs it when missing) that
screenshots a page with every network request sent to a loopback proxy that records them.

Chromium itself calls home whatever the page holds (network time, component updates, accounts:
hosts under google.com and googleapis.com); ``page_requests`` leaves those out, and a page that
loads anything from anywhere else shows up (``test_report.py`` checks that it would)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-domain-reliability",
    "--proxy-bypass-list=<-loopback>",  # loopback goes through the proxy too
)


BROWSER_SERVICES = (".google.com", ".googleapis.com", ".gvt1.com")


def requested_host(line: bytes) -> str:
    """The host of a proxied request line: ``GET http://h/p HTTP/1.1`` or ``CONNECT h:443 ...``."""
    parts = line.decode("latin-1").split()
    if len(parts) < 2:
        return ""
    target = parts[1] if "://" in parts[1] else f"//{parts[1]}"
    return urlsplit(target).hostname or ""


def page_requests(requests: list[bytes]) -> list[bytes]:
    """The requests that are not Chromium's own calls home."""
    return [line for line in requests if not requested_host(line).endswith(BROWSER_SERVICES)]


class CountingProxy:
    """Accepts every connection Chromium makes through its proxy setting, counts it, closes it."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    self.requests.append(connection.recv(4096).split(b"\r\n")[0])
                except OSError:
                    self.requests.append(b"(connection)")

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.socket.close()


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("no chromium on PATH: `make test` installs it (scripts/install_browser.sh)")
    return found


def screenshot(page: Path, png: Path, width: int = 1300, height: int = 3000) -> list[bytes]:
    """Render ``page`` headless into ``png``; returns the requests it tried to make."""
    with CountingProxy() as proxy:
        subprocess.run(
            [
                chromium(),
                *CHROMIUM_FLAGS,
                f"--proxy-server=http://127.0.0.1:{proxy.port}",
                f"--user-data-dir={png.parent / 'chromium-profile'}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return list(proxy.requests)
