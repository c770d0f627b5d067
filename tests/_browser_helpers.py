"""Headless Debian Chromium for the browser tests (selenium with the system chromedriver; no browser downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
#: skip the browser tests only off CI: `.ci/install` installs the browser, so on CI a missing one is a failure
SKIP_WITHOUT_BROWSER = not HAVE_BROWSER and not os.environ.get("CI")


def chromium_driver(profile_dir: Path, *, window_size: str, page_load_timeout: int,
                    browser_logs: bool = False) -> Any:
    """A headless Chromium driven through the system chromedriver, with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--window-size={window_size}",
                 f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    if browser_logs:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(page_load_timeout)
    return browser
