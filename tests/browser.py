"""Open a page in a real headless Chromium (Debian's package) through Playwright."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_or_skip() -> str:
    """The Chromium executable; skip (or fail, where CI requires it) when it is missing."""
    executable = os.environ.get("MEMLOC_CHROMIUM") or shutil.which("chromium")
    if executable:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            executable = None
    if executable:
        return executable
    reason = (
        "needs Chromium and Playwright: `apt-get install chromium` and "
        "`pip install -e .[dev]` (.ci/run installs both)"
    )
    if os.environ.get("MEMLOC_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class PageVisit:
    """What a page did when opened: console messages, uncaught errors, requests, DOM facts."""

    console: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind in ("error", "warning")]

    @property
    def network_requests(self) -> list[str]:
        return [url for url in self.requests if not url.startswith(("file:", "data:", "blob:"))]


def visit(path: Path, facts: dict[str, str]) -> PageVisit:
    """Open ``path`` offline; ``facts`` maps names to JavaScript expressions to evaluate."""
    from playwright.sync_api import sync_playwright

    result = PageVisit()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_or_skip(), args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: result.console.append((m.type, m.text)))
            page.on("pageerror", lambda e: result.errors.append(str(e)))
            page.on("request", lambda r: result.requests.append(r.url))
            # Anything that is not the file itself would be a network request: refuse it.
            page.route("http*://**/*", lambda route: route.abort())
            page.goto(path.resolve().as_uri())
            page.wait_for_load_state("networkidle")
            for name, expression in facts.items():
                result.facts[name] = page.evaluate(expression)
        finally:
            browser.close()
    return result
