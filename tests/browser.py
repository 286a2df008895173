"""A real headless Chromium for page tests (Debian's chromium and chromium-driver), or a skip."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Flags that work in containers without a GPU or network; a fresh profile per browser.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)
PAGE_WIDTH = 1400


def chromium() -> Iterator[Any]:
    """Yield a Selenium driver of the system Chromium; skip when it or the driver is absent."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(
            f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}: apt-get install chromium-driver)"
        )
    profile = tempfile.mkdtemp(prefix="mmoffload-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver: Any, page: Path, screenshot: Path) -> list[str]:
    """Load a page, take a full-page screenshot, and return its console errors."""
    driver.get_log("browser")  # Drop what an earlier page logged.
    driver.get(page.resolve().as_uri())
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(PAGE_WIDTH, min(height + 120, 8000))
    assert driver.save_screenshot(str(screenshot))
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def visible(driver: Any, element: Any) -> bool:
    """True when an element has a box on the page (and, for an image, has decoded)."""
    return bool(
        driver.execute_script(
            "const e = arguments[0], r = e.getBoundingClientRect();"
            "const decoded = e.tagName !== 'IMG' || (e.complete && e.naturalWidth > 0);"
            "return r.width > 0 && r.height > 0 && decoded && getComputedStyle(e).visibility !== 'hidden';",
            element,
        )
    )
