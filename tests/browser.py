"""A real headless Chromium for the web page's tests, driven by Playwright.

The browser is the system's (Debian's `chromium`; never `playwright install`),
launched once per test module with a fresh profile; each page gets a context
of its own. Nothing it does may leave this machine: host
names resolve to nothing, any other address goes to a dead proxy, and every
request the page makes is recorded so that a test can show it stayed on
127.0.0.1. Without Chromium or Playwright the tests skip, unless
CHATTERBOX_TEST_REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, List, Sequence

import pytest

REQUIRE_ENV = "CHATTERBOX_TEST_REQUIRE_BROWSER"
# Where the test run leaves its screenshots for a person to look at.
SCREENSHOTS = Path(__file__).resolve().parents[1] / ".cache" / "screenshots"

FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    # No way out: names resolve to nothing, other addresses meet a proxy that is
    # not there (loopback never goes through a proxy).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",
]
# A microphone that plays a test tone, allowed without asking.
FAKE_MICROPHONE = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]


def chromium() -> str:
    """The browser's path; skips the test (fails under REQUIRE_ENV=1) without it."""
    reason = None
    path = os.environ.get("CHATTERBOX_TEST_CHROMIUM") or shutil.which("chromium")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (script/setup --dev)"
    else:
        if not path or not os.path.isfile(path):
            reason = f"no Chromium to drive at {path or 'chromium'} (apt-get install chromium)"
    if reason is None:
        return str(path)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 requires the browser tests")
    pytest.skip(reason)


@dataclass
class Page:
    """A page and what it did: every request's URL and every error it reported."""

    page: Any  # playwright.async_api.Page
    requests: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    async def state(self) -> Any:
        """What the page's player did (window.__voxState)."""
        return await self.page.evaluate("() => ({...window.__voxState})")

    async def wait(self, condition: str, timeout: float = 10.0) -> None:
        """Until a JavaScript expression holds, polled every 20 ms."""
        await self.page.wait_for_function(
            f"() => {condition}", polling=20, timeout=timeout * 1000
        )


@contextlib.asynccontextmanager
async def launch(flags: Sequence[str] = ()) -> AsyncIterator[Any]:
    """A headless Chromium (a playwright Browser) with a fresh profile."""
    from playwright.async_api import async_playwright

    executable = chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=[*FLAGS, *flags]
        )
        try:
            yield browser
        finally:
            await browser.close()


@contextlib.asynccontextmanager
async def open_page(
    browser: Any, url: str, init_script: str = ""
) -> AsyncIterator[Page]:
    """The page at `url` in a new browser context (its own storage, cookies
    and cache), recording what it requests and every error it reports."""
    context = await browser.new_context(viewport={"width": 1200, "height": 860})
    try:
        page = await context.new_page()
        record = Page(page)
        page.on("request", lambda request: record.requests.append(request.url))
        page.on("pageerror", lambda error: record.errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                record.errors.append(message.text) if message.type == "error" else None
            ),
        )
        if init_script:
            await page.add_init_script(init_script)
        await page.goto(url)
        yield record
    finally:
        await context.close()


async def screenshot(page: Page, name: str) -> Path:
    """Save a PNG of the whole page under .cache/screenshots."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    await page.page.screenshot(path=str(path), full_page=True)
    return path
