"""Debian's Chromium under selenium, as the web benchmarks measure it and the web e2e test drives it.

One flag list for ``web_encode``, ``web_parity`` and ``tests/e2e/test_web.py``, so what is timed
is what is tested. Debian's packages: ``apt-get install chromium chromium-driver``. selenium (a
dev dependency) is imported only when a browser starts.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm is small
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)
SINGLE_THREADED = "--js-flags=--single-threaded"  # V8 without its helper threads (compiler, GC)


def flags(single_threaded: bool = False) -> list[str]:
    """:data:`FLAGS`, plus :data:`SINGLE_THREADED` when asked: what a result records."""
    return [*FLAGS, *([SINGLE_THREADED] if single_threaded else [])]


def options(user_data_dir: Path, single_threaded: bool = False) -> Options:
    """Selenium options for headless :data:`CHROMIUM` with its profile in ``user_data_dir`` and
    the page's console kept (``driver.get_log("browser")``)."""
    from selenium.webdriver.chrome.options import Options

    chosen = Options()
    chosen.binary_location = CHROMIUM
    for flag in (*flags(single_threaded), f"--user-data-dir={user_data_dir}"):
        chosen.add_argument(flag)
    chosen.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return chosen


@contextmanager
def chromium(user_data_dir: Path, single_threaded: bool = False) -> Iterator[WebDriver]:
    """A driver of :func:`options` under :data:`CHROMEDRIVER`; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options(user_data_dir, single_threaded))
    try:
        yield driver
    finally:
        driver.quit()


def installed() -> bool:
    return Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()


def _last_line(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1] if lines else None


def versions() -> dict[str, str | None]:
    """selenium's, Chromium's and chromedriver's versions, for a result's ``versions``."""
    try:
        selenium = metadata.version("selenium")
    except metadata.PackageNotFoundError:
        selenium = None
    return {
        "selenium": selenium,
        "chromium": _last_line([CHROMIUM, "--version"]),
        "chromedriver": _last_line([CHROMEDRIVER, "--version"]),
    }
