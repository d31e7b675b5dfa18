"""Link wrapping and tracking tokens: no open redirect, `&amp;` handled, scanners flagged."""

from __future__ import annotations

import re

from collector.email.config import SCANNER_AGENTS
from collector.email.tracking import (
    TokenSigner,
    add_open_pixel,
    is_scanner_prefetch,
    safe_redirect_target,
    wrap_links,
)

SIGNER = TokenSigner("s" * 40)
BASE = "https://collector.example"


def wrapped_urls(markup: str) -> list[str]:
    out = []
    for token in re.findall(r"/t/c/([A-Za-z0-9_.-]+)", markup):
        payload = SIGNER.verify(token, "c")
        assert payload is not None
        out.append(payload["u"])
    return out


def test_ampersand_entities_are_unescaped_before_signing() -> None:
    markup, count = wrap_links('<a href="https://shop.example/p?id=1&amp;ref=mail&#38;x=%20y">buy</a>',
                               email_id="e1", base_url=BASE, signer=SIGNER)
    assert count == 1
    assert wrapped_urls(markup) == ["https://shop.example/p?id=1&ref=mail&x=%20y"]


def test_single_quoted_and_unquoted_hrefs_are_wrapped() -> None:
    markup, count = wrap_links("<A class=x HREF='https://a.example/'>a</A> <a href=https://b.example/q>b</a>",
                               email_id="e1", base_url=BASE, signer=SIGNER)
    assert count == 2
    assert wrapped_urls(markup) == ["https://a.example/", "https://b.example/q"]


def test_mailto_unsubscribe_no_track_and_fragments_are_left_alone() -> None:
    source = ('<a href="mailto:help@example.com">m</a>'
              '<a href="tel:+15550100">t</a>'
              '<a href="#top">top</a>'
              '<a href="https://example.com/unsubscribe?u=1">unsub</a>'
              '<a href="https://example.com/prefs" data-unsubscribe>prefs</a>'
              '<a data-no-track href="https://example.com/one-time-login?t=abc">login</a>'
              '<a href="javascript:alert(1)">js</a>')
    markup, count = wrap_links(source, email_id="e1", base_url=BASE, signer=SIGNER)
    assert count == 0 and markup == source


def test_tokens_cannot_be_forged_or_reused_for_another_purpose() -> None:
    markup, _ = wrap_links('<a href="https://example.com/">x</a>', email_id="e1", base_url=BASE, signer=SIGNER)
    token = re.search(r"/t/c/([A-Za-z0-9_.-]+)", markup).group(1)  # type: ignore[union-attr]
    body, _, mac = token.partition(".")
    assert SIGNER.verify(token, "c") is not None
    assert SIGNER.verify(token, "o") is None  # a click token is not an open token
    assert SIGNER.verify(body + "." + mac[:-2] + "AA", "c") is None
    forged = TokenSigner("another-key" * 4).sign({"k": "c", "e": "e1", "u": "https://evil.example/"})
    assert SIGNER.verify(forged, "c") is None
    assert SIGNER.verify("nodot", "c") is None
    assert SIGNER.verify("a.b", "c") is None


def test_redirect_targets_are_web_urls_only() -> None:
    assert safe_redirect_target("https://example.com/x") == "https://example.com/x"
    for bad in ("javascript:alert(1)", "//evil.example", "https:///evil", "https:\\\\evil.example",
                "https://example.com/\r\nSet-Cookie: x", None, 42, "data:text/html,hi"):
        assert safe_redirect_target(bad) is None


def test_the_pixel_goes_before_the_closing_body_tag() -> None:
    markup = add_open_pixel("<html><body><p>x</p></BODY></html>", email_id="e1", base_url=BASE, signer=SIGNER)
    assert re.search(r'<img src="https://collector.example/t/o/[^"]+" width="1" height="1"[^>]*/></BODY>',
                     markup)
    assert add_open_pixel("<p>x</p>", email_id="e1", base_url=BASE, signer=SIGNER).startswith("<p>x</p><img")


def test_scanner_prefetches_are_flagged() -> None:
    agents = [a.lower() for a in SCANNER_AGENTS]
    browser = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 Version/17.0 Safari/605.1.15"
    flag = is_scanner_prefetch
    assert flag(user_agent="Mozilla/5.0 Barracuda", method="GET", seconds_since_send=3600, window=10,
                scanner_agents=agents)
    assert flag(user_agent=None, method="GET", seconds_since_send=2, window=10, scanner_agents=agents)
    assert flag(user_agent=browser, method="HEAD", seconds_since_send=2, window=10, scanner_agents=agents)
    assert not flag(user_agent=browser, method="GET", seconds_since_send=2, window=10, scanner_agents=agents)
    assert not flag(user_agent=None, method="GET", seconds_since_send=60, window=10, scanner_agents=agents)
