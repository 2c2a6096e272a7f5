"""The built book as a reader's browser shows it: every page opened in headless Chromium.

``python -m madlib.workflow.browsercheck [_build/html]`` serves the HTML build on localhost, opens every
page with Playwright in Debian's Chromium (``/usr/bin/chromium``; the project's set-up installs it
where it can) and reports, one line each: console errors and uncaught exceptions, images that did
not load, internal links and anchors that resolve to nothing, raw log text (progress bars,
tracebacks, warnings) and paths of the building machine in what a page shows, formulas MathJax left
unrendered; and whether the search page finds "Mahalanobis". It exits 1 if anything is reported.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
"""Flags for a machine without network: without the background-networking ones Chromium keeps
trying to reach Google's hosts."""
RAW_LOG = re.compile(r"it/s\]|s/it\]|Traceback \(most recent call last\)|\b\w*Warning: |\[IPKernelApp\]")
"""Text a page must not show: progress bars, tracebacks, warnings, kernel log lines."""
SEARCH_TERM = "Mahalanobis"


def chromium() -> str | None:
    """The Chromium executable, or None if this machine has none."""
    path = os.environ.get("MADLIB_CHROMIUM", CHROMIUM)
    return path if Path(path).is_file() else shutil.which("chromium")


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Ids:
    p = _Ids()
    p.feed(path.read_text(errors="replace"))
    return p


def broken_links(root: Path, page: Path) -> list[str]:
    """Internal links of ``page`` whose file or anchor does not exist in the build at ``root``."""
    out = []
    for href in _parse(page).links:
        url = urlparse(href)
        if url.scheme or href.startswith(("mailto:", "javascript:", "//")):
            continue
        target = page if not url.path else (page.parent / unquote(url.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file() or root.resolve() not in target.resolve().parents:
            out.append(f"{page.relative_to(root)}: link {href!r} points at no file of the build")
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _parse(target).ids:
            out.append(f"{page.relative_to(root)}: link {href!r} points at no anchor of {target.relative_to(root.resolve())}")
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _serve(root: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_site(root: Path | str, forbidden: tuple[str, ...] = (), timeout_ms: int = 20_000, screenshots: Path | str | None = None) -> list[str]:
    """Problems a reader would meet in the HTML build at ``root``, one line each (empty: none).
    ``forbidden`` adds strings no page may show (e.g. the building machine's project path);
    ``screenshots`` names a folder for a full-page PNG of every page at 1,300 px width."""
    from playwright.sync_api import sync_playwright

    root = Path(root)
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    if not pages:
        raise ValueError(f"root={str(root)!r} is not accepted; it holds no HTML pages (build the book first)")
    problems = [line for p in pages for line in broken_links(root, p)]
    forbidden = tuple(f for f in (*forbidden, str(Path.home()) + "/", "site-packages/") if f)
    exe = chromium()
    if exe is None:
        raise FileNotFoundError(f"no Chromium at {CHROMIUM}: install Debian's chromium package (make env does it as root)")
    server = _serve(root)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: errors.append(f"{r.status} for {r.url.replace(base, '')}") if r.status >= 400 else None)
            for path in pages:
                rel = path.relative_to(root).as_posix()
                errors.clear()
                page.goto(urljoin(base, rel), wait_until="load", timeout=timeout_ms)
                if page.locator(".math").count():
                    try:
                        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=timeout_ms)
                        page.evaluate("() => MathJax.startup.promise")
                    except Exception:
                        problems.append(f"{rel}: MathJax did not load, formulas show as TeX")
                    raw = page.evaluate("() => [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length")
                    if raw:
                        problems.append(f"{rel}: {raw} formula(s) not rendered by MathJax")
                for e in errors:
                    problems.append(f"{rel}: console error: {e[:200]}")
                broken = page.evaluate("() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)")
                problems += [f"{rel}: image did not load: {src}" for src in broken]
                page.wait_for_load_state("load", timeout=timeout_ms)  # a redirect page (index.html) navigates on
                text = page.locator("body").inner_text(timeout=timeout_ms)  # waits for the body of the page it lands on
                m = RAW_LOG.search(text)
                if m:
                    problems.append(f"{rel}: shows raw log text {text[max(0, m.start() - 40):m.end() + 40]!r}")
                problems += [f"{rel}: shows a path of the building machine ({f!r})" for f in forbidden if f in text]
                if screenshots:
                    shot = Path(screenshots) / (rel.replace("/", "__").removesuffix(".html") + ".png")
                    shot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shot), full_page=True)
            page.goto(urljoin(base, f"search.html?q={SEARCH_TERM}"), wait_until="load", timeout=timeout_ms)
            try:
                page.wait_for_selector("#search-results li", timeout=timeout_ms)
            except Exception:
                problems.append(f"search.html: no result for {SEARCH_TERM!r}")
            browser.close()
    finally:
        server.shutdown()
    return problems


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m madlib.workflow.browsercheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="_build/html", help="the book's HTML build (default: _build/html)")
    ap.add_argument("--screenshots", metavar="DIR", help="save a full-page screenshot of every page (1,300 px wide) here")
    args = ap.parse_args(argv)
    problems = check_site(Path(args.html), forbidden=(str(Path(args.html).resolve().parent.parent),), screenshots=args.screenshots)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s) in {args.html}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
