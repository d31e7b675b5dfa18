"""Open and click tracking: signed tokens, link wrapping, scanner detection.

A tracking token is ``base64url(JSON payload) "." base64url(HMAC-SHA256)``
under a key derived from ``secret_key``. A click token carries the original
URL, so ``/t/c/{token}`` can only ever redirect to a URL we signed: there is
no open redirect to forge. Link wrapping HTML-unescapes ``href`` values
(``&amp;`` → ``&``, Postal #907) before signing, and leaves ``mailto:``,
``tel:``, fragment, unsubscribe and ``data-no-track`` links alone (scanners
pre-fetch links and would consume one-time or unsubscribe links).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from collections.abc import Sequence
from typing import Any

import orjson

# The smallest transparent GIF (43 bytes).
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")

_A_TAG = re.compile(r"<a\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
_NO_TRACK = re.compile(r"""\sdata-no-track(?:[\s=/>]|$)""", re.IGNORECASE)
_UNSUB_ATTR = re.compile(r"""\sdata-unsubscribe(?:[\s=/>]|$)""", re.IGNORECASE)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
MAX_URL = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Signs and verifies small JSON payloads for URLs (tracking, unsubscribe)."""

    def __init__(self, secret_key: str, purpose: str = "email-tracking"):
        self._key = hmac.new(secret_key.encode(), b"logferry:" + purpose.encode(), hashlib.sha256).digest()

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(payload))
        mac = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()[:16]
        return f"{body}.{_b64(mac)}"

    def verify(self, token: str, kind: str) -> dict[str, Any] | None:
        """The payload of a genuine token of ``kind``, else None."""
        body, dot, mac = token.partition(".")
        if not dot or len(token) > 3 * MAX_URL:
            return None
        try:
            expected = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()[:16]
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            payload = orjson.loads(_unb64(body))
        except (ValueError, UnicodeEncodeError):
            return None
        if not isinstance(payload, dict) or payload.get("k") != kind or not isinstance(payload.get("e"), str):
            return None
        return payload


def _is_web_url(url: str) -> bool:
    if not url.lower().startswith(("http://", "https://")) or len(url) > MAX_URL:
        return False
    rest = url.split("://", 1)[1]
    return bool(rest) and rest[0] not in "/\\" and not any(ord(c) < 0x20 or c == "\x7f" for c in url)


def is_trackable(url: str) -> bool:
    # Unsubscribe links must work exactly once, for the person: never wrapped.
    return _is_web_url(url) and "unsubscribe" not in url.lower()


def safe_redirect_target(url: Any) -> str | None:
    """The URL a verified click token may redirect to: http(s) with a host, no control characters."""
    return url if isinstance(url, str) and _is_web_url(url) else None


def wrap_links(markup: str, *, email_id: str, base_url: str, signer: TokenSigner) -> tuple[str, int]:
    """Rewrite trackable ``<a href>`` links to ``{base_url}/t/c/{token}``; returns the HTML and the count."""
    wrapped = 0

    def rewrite_tag(match: re.Match[str]) -> str:
        nonlocal wrapped
        tag = match.group(0)
        if _NO_TRACK.search(tag) or _UNSUB_ATTR.search(tag):
            return tag
        href = _HREF.search(tag)
        if href is None:
            return tag
        raw = next((g for g in href.groups()[1:] if g is not None), "")
        url = html.unescape(raw).strip()
        if not is_trackable(url):
            return tag
        token = signer.sign({"k": "c", "e": email_id, "u": url})
        wrapped += 1
        new_href = f'{href.group(1)}"{base_url}/t/c/{token}"'
        return tag[:href.start()] + new_href + tag[href.end():]

    return _A_TAG.sub(rewrite_tag, markup), wrapped


def add_open_pixel(markup: str, *, email_id: str, base_url: str, signer: TokenSigner) -> str:
    token = signer.sign({"k": "o", "e": email_id})
    pixel = (f'<img src="{base_url}/t/o/{token}" width="1" height="1" alt="" '
             'style="display:block;border:0;width:1px;height:1px;overflow:hidden" />')
    ends = list(_BODY_END.finditer(markup))
    if ends:
        at = ends[-1].start()
        return markup[:at] + pixel + markup[at:]
    return markup + pixel


def looks_automated(user_agent: str | None, method: str, scanner_agents: Sequence[str]) -> bool:
    """A request from a known link scanner, a HEAD request or one without a user agent."""
    if method.upper() == "HEAD" or not user_agent:
        return True
    ua = user_agent.lower()
    return any(fragment in ua for fragment in scanner_agents)


def is_scanner_prefetch(*, user_agent: str | None, method: str, seconds_since_send: float | None,
                        window: float, scanner_agents: Sequence[str]) -> bool:
    """Flag an open/click as a security scanner's prefetch: a known scanner agent
    at any time, or an automated-looking request within ``window`` seconds of the send."""
    ua = (user_agent or "").lower()
    if ua and any(fragment in ua for fragment in scanner_agents):
        return True
    recent = seconds_since_send is not None and seconds_since_send < window
    return recent and looks_automated(user_agent, method, ())
