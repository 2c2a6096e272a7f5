"""The browser check finds what a reader would meet on a broken page (headless Chromium)."""

import pytest

from madlib.workflow import browsercheck

pytestmark = pytest.mark.skipif(browsercheck.chromium() is None, reason="no Chromium on this machine (make env installs it as root)")


def _page(body: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'>{head}</head><body>{body}</body></html>"


def test_a_clean_site_passes_and_a_broken_one_is_reported(tmp_path):
    pytest.importorskip("playwright")
    good, bad = tmp_path / "good", tmp_path / "bad"
    for site in (good, bad):
        site.mkdir()
        (site / "search.html").write_text(_page("<ul id='search-results'></ul><script>"
                                                "if (location.search.includes('Mahalanobis')) document.getElementById('search-results').innerHTML = '<li>hit</li>';"
                                                "</script>"))  # fmt: skip
    (good / "index.html").write_text(_page("<h1 id='top'>Mahalanobis</h1><a href='#top'>up</a> <a href='search.html'>search</a>"))
    assert browsercheck.check_site(good) == []

    (bad / "index.html").write_text(_page(
        "<a href='missing.html'>x</a> <a href='#nowhere'>y</a> <img src='missing.png'>"
        "<pre>100%|██████| 3/3 [00:01<00:00,  2.10it/s]</pre><p>/home/builder/project/_build</p>"
        "<span class='math'>\\\\(x^2\\\\)</span><script>console.error('boom')</script>"))  # fmt: skip
    (bad / "search.html").write_text(_page("<ul id='search-results'></ul>"))
    problems = "\n".join(browsercheck.check_site(bad, forbidden=("/home/builder/project",), timeout_ms=3000))
    for expected in ("'missing.html' points at no file", "'#nowhere' points at no anchor", "console error: boom",
                     "image did not load", "raw log text", "path of the building machine", "MathJax did not load",
                     "no result for 'Mahalanobis'"):  # fmt: skip
        assert expected in problems, expected
