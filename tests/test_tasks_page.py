"""The /tasks page in a real browser: headless Chromium (Debian's package) against a live app.

Needs ``chromium-headless-shell`` (or ``chromium``); CI installs it. Without it the browser
test is skipped locally and fails in CI (CI=true).
"""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from asynctrace.export.tasks_page import wants_html
from tests.test_task_view import APP


def _browser() -> str:
    for name in ("chromium-headless-shell", "chromium"):
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get("CI"):
        pytest.fail("no headless Chromium; .ci/run installs chromium-headless-shell")
    pytest.skip("no headless Chromium (apt-get install chromium-headless-shell)")


@pytest.fixture
def live_app() -> Iterator[str]:
    """The app of test_task_view (a handler awaiting two TaskGroup children); its /tasks."""
    app = subprocess.Popen(
        [sys.executable, "-c", APP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert app.stdout is not None
        url = app.stdout.readline().strip()
        assert url.endswith("/metrics"), url
        yield url.removesuffix("/metrics")
    finally:
        app.kill()
        app.wait(10)
        for stream in (app.stdin, app.stdout):
            if stream is not None:
                stream.close()


class _Page(html.parser.HTMLParser):
    """The rendered DOM's text by element id and class, and the tree's nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict[str, str | None]]] = []
        self.text: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self.nodes: list[tuple[int, str]] = []  # (depth in the tree, label)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.stack.append((tag, attributes))
        if attributes.get("class") == "row":
            self.rows.append([])
        if tag == "td" and self.rows:
            self.rows[-1].append("")
        if attributes.get("class") == "node":
            depth = sum(1 for t, a in self.stack if t == "ul" and a.get("class") == "tree")
            self.nodes.append((depth, ""))

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, attributes in self.stack:
            if attributes.get("id"):
                key = str(attributes["id"])
                self.text[key] = self.text.get(key, "") + data
        if any(tag == "td" for tag, _ in self.stack) and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data
        if self.stack and self.stack[-1][1].get("class") == "node" and self.nodes:
            depth, label = self.nodes[-1]
            self.nodes[-1] = (depth, label + data)


def test_page_in_headless_chromium(live_app: str) -> None:
    browser = _browser()
    dom = subprocess.run(
        [
            browser, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
            "--dump-dom", f"{live_app}/tasks.html",
        ],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    page = _Page()
    page.feed(dom)
    assert "refreshes every 2 s" in page.text["status"], page.text.get("status")
    assert page.text["summary"].startswith("4 task(s) in flight")  # and asyncio.run's main
    (handler,) = [r for r in page.rows if r and r[0] == "handler"]
    assert handler[1:3] == ["handle", "req-live"]
    assert "TaskGroup." in handler[6]  # where it waits
    groups = {r[0]: r[1] for r in page.rows if len(r) == 3}
    assert groups["handle"] == "1"
    # the tree: the handler's two children one level below it
    (depth,) = [d for d, label in page.nodes if label.startswith("handler [handle]")]
    at = [label for d, label in page.nodes].index(
        next(label for d, label in page.nodes if label.startswith("handler"))
    )
    below = page.nodes[at + 1 : at + 3]
    assert [d for d, _ in below] == [depth + 1, depth + 1], page.nodes


def test_tasks_negotiates_html_for_browsers(live_app: str) -> None:
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for accept, kind in [
        (browser_accept, "text/html"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
    ]:
        request = urllib.request.Request(f"{live_app}/tasks", headers={"Accept": accept})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Content-Type"].startswith(kind), accept
            assert response.headers["Vary"] == "Accept"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html", True),
        ("text/html;q=0.5, application/json", False),
        ("application/json;q=0.5, text/html", True),
        ("*/*", False),
        ("", False),
        ("text/html;q=oops", False),
    ],
)
def test_wants_html(accept: str, html: bool) -> None:
    assert wants_html(accept) is html
