"""Contact-form spam scoring: additive, explained signals (SpamAssassin style).

Each check returns :class:`~plugins.types.SpamSignal`\\ s with a score and a
sentence saying why; the scores of every classifier are summed and compared
with the configured threshold. Nothing here knows about HTTP or storage: the
intake gathers the *observations* (honeypot, form-token age, recent counts per
hashed IP / email / content) and the checks turn them and the submitted text
into signals.

The signals are general properties of contact-form spam, not a memory of any
corpus: automated posting (honeypot, speed, missing or forged form token,
rate, repeats), link stuffing (count, shorteners, abused TLDs, markup links,
links in the name field), sales vocabulary of the usual spam families (SEO,
crypto, pharma, gambling, loans, advance-fee fraud, adult), obfuscation
(mixed-script words, invisible characters), shouting (all caps), throwaway
addresses (disposable domains) and text mostly in scripts the site does not
expect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgspec

from collector.contact.config import ContactConfig
from plugins.types import SpamSignal

# --- default signal scores (overridable by name: collector.contact.spam.weights) ---

DEFAULT_WEIGHTS: dict[str, float] = {
    "honeypot": 10.0,
    "form_token_missing": 1.0,
    "form_token_invalid": 3.0,
    "form_token_expired": 1.5,
    "form_token_reused": 2.0,
    "too_fast": 4.0,
    "human_pace": -1.0,
    "rate_ip": 1.5,
    "rate_email": 1.5,
    "duplicate_content": 2.5,
    "links": 1.0,
    "url_shortener": 2.5,
    "suspicious_tld": 1.0,
    "markup_links": 3.0,
    "link_in_name": 3.0,
    "short_message_with_link": 1.5,
    "spam_phrases": 1.0,
    "foreign_script": 2.0,
    "mixed_script_words": 2.0,
    "invisible_characters": 2.0,
    "all_caps": 2.0,
    "shouting_punctuation": 1.0,
    "disposable_email": 3.0,
}

# Caps keep one family of evidence from deciding alone what several should.
PHRASES_CAP = 8.0
RATE_CAP = 6.0
LINKS_CAP = 6.0

URL_SHORTENERS = frozenset({
    "bit.ly", "bitly.com", "tinyurl.com", "goo.gl", "t.co", "ow.ly", "is.gd", "buff.ly", "cutt.ly",
    "rebrand.ly", "shorturl.at", "tiny.cc", "rb.gy", "v.gd", "t.ly", "bl.ink", "s.id", "shorte.st",
    "adf.ly", "clck.ru", "u.to", "qps.ru", "soo.gd", "x.co", "lnkd.in", "tr.im", "bc.vc", "ouo.io",
    "short.io", "shrtco.de", "urlz.fr", "0rz.tw", "tiny.one", "shorturl.asia", "linktr.ee",
})

# The TLDs abuse trackers (Spamhaus, Interisle) list as most abused relative to size.
SUSPICIOUS_TLDS = frozenset({
    "xyz", "top", "click", "loan", "win", "bid", "icu", "buzz", "monster", "rest", "cyou", "sbs",
    "cfd", "quest", "tk", "ml", "ga", "cf", "gq", "work", "casa", "surf", "bar", "lol", "uno",
})

_COMMON_TLDS = (
    "com|net|org|info|biz|ru|su|ua|cn|io|co|me|us|uk|de|fr|it|es|nl|pl|in|br|xyz|top|site|online|shop|"
    "store|club|link|click|live|pro|icu|buzz|win|loan|bid|tk|ml|ga|cf|gq|ly|gd|gl|cc|to|ws|sbs|cfd|cyou|"
    "monster|rest|quest|app|dev|tv|fun|space|website|tech|vip|work|casa|surf|bar|lol|uno"
)
_URL = re.compile(
    r"(?:(?:https?|hxxps?|ftp)://[^\s<>\"'\])]+)"
    r"|(?:\bwww\.[^\s<>\"'\])]+)"
    rf"|(?<![@\w.-])(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)+(?:{_COMMON_TLDS})\b(?:/[^\s<>\"'\])]*)?",
    re.IGNORECASE,
)
_MARKUP_LINK = re.compile(r"<a\s[^>]*href|\[url[=\]]|\[link[=\]]|\]\(https?://", re.IGNORECASE)
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e]")
_SHOUT = re.compile(r"[!?]{3,}")
_WORD = re.compile(r"\w+", re.UNICODE)


# --- spam phrases -------------------------------------------------------------

# (pattern, score, family). Patterns are regexes matched case-insensitively on
# word boundaries; families keep the explanation readable ("crypto: bitcoin, usdt").
_PHRASES: list[tuple[str, float, str]] = [
    # search-engine "optimisation" offers and link selling
    (r"seo|search engine (optimi[sz]ation|rankings?)", 1.5, "seo"),
    (r"(first|1st|top) page (of|on|in) google|page (one|1|#1) (of|on) google|rank(ing)? #?1 (on|in) google|"
     r"première page|ersten seite|primera página|prima pagina|primeira página|ilk sayfa\w*", 2.5, "seo"),
    (r"rank(ing)? (higher |better |well )?(on|in) google|google (rankings?|maps ranking)|top 3 of google", 2.0,
     "seo"),
    (r"back ?links?|link (building|insertion|exchange)|guest post(s|ing)?|sponsored posts?|pbn", 2.0, "seo"),
    (r"domain authority|\bDA\s*\d{2}\+?|do-?follow", 2.0, "seo"),
    (r"(organic|website|web|targeted|real human|real) (traffic|visitors)", 1.5, "seo"),
    (r"(digital|internet|online|social media) marketing (services?|agency|company|expert)", 1.5, "seo"),
    (r"(website|web) (re)?design(ing)? (services?|company|agency)|redesign (it|your (site|website))", 1.5, "seo"),
    (r"white[- ]label|outsourc(e|ing)|dedicated developers?|virtual assistants?|appointment sett(er|ing)", 1.5,
     "marketing"),
    (r"(b2b|business|email|e-mail|contact|targeted) (leads|lists?|database)|lead generation|"
     r"(verified|targeted) (contacts|customers|emails)", 2.0, "marketing"),
    (r"(i|we) (just )?(visited|came across|found|checked|looked at|ran a test on|was analy[sz]ing|analy[sz]ed) "
     r"your (website|site|web ?site|business|profile|page|channel|brand)|i noticed your (website|site|google|"
     r"facebook|instagram|business)", 1.5, "marketing"),
    (r"(reply|respond) (with |me )?[\"']?(yes|stop|unsubscribe|remove|no)\b[\"']?|reply (for|to get|if "
     r"interested)|if you('re| are) not interested|to (unsubscribe|opt[- ]out)", 1.5, "marketing"),
    (r"(dear|hello|hi) (sir|madam|sir/madam|sir or madam|business owner|website owner|site owner|webmaster|"
     r"friend|seller|user|beneficiary)\b|attention beneficiary", 1.0, "marketing"),
    (r"contact form (marketing|blasting)|(blast|send) your (message|ad|advert|promotional email) to", 2.5,
     "marketing"),
    (r"(we are|we're|i am|i'm) a (leading|professional|certified|full[- ]service|top|trusted|reputed) "
     r"([\w-]+ ){0,3}(agency|company|firm|team|expert|consultant|writer|developer)", 1.5, "marketing"),
    (r"(we|i) (offer|provide|sell|build|write|create|generate) ([\w-]+ ){0,4}(services?|solutions|packages|"
     r"leads|backlinks|links|reviews|followers|apps?|websites?|videos?)", 1.0, "marketing"),
    (r"(i|we) (can|will|could|'ll) (help )?([\w-]+ ){0,3}(your|you) (business|website|site|brand|company|store|"
     r"shop|channel|page|profile|rankings?|traffic|sales|leads|ads|reviews)\b|businesses like yours|"
     r"help (businesses|companies|brands) (get|grow|rank)", 1.5, "marketing"),
    (r"free (audit|consultation|trial|analysis|proposal|quote|sample|samples|strategy call|security scan|report)|"
     r"no strings attached", 1.5, "marketing"),
    (r"guarantee(d|s)? (results|rankings?|top|#?1|first page|profits?|returns?)|money back|results guaranteed|"
     r"or your money back", 2.0, "marketing"),
    (r"(for )?only [$€£]\s?\d|starting (at|from) [$€£]|packages? (start(ing)? )?(from|at) [$€£]|"
     r"[$€£]\s?\d+(\.\d+)?\s?(/|per |a )(month|mo|hour|hr|post|article|day)\b|"
     r"(very |the )?(cheap|cheapest|low|lowest|affordable|best) (price|prices|rates?|cost)", 1.5, "sales"),
    (r"(boost|increase|grow|double|triple) (your )?(sales|brand|rankings?|business|traffic|leads|revenue|"
     r"conversions|followers|instagram|authority)|more (leads|traffic|customers|sales|visitors)|"
     r"10x return", 1.5, "sales"),
    (r"(\d+k?|real|targeted|more) (instagram )?(followers|subscribers|likes|views)|watch hours|"
     r"(5-star|google|trustpilot|yelp) reviews", 2.0, "social"),
    (r"whatsapp|telegram|wechat", 2.0, "contact-offsite"),
    # crypto and investment schemes
    (r"bitcoin|btc|ethereum|usdt|crypto ?currenc(y|ies)|crypto|nft|web3|token sale", 1.5, "crypto"),
    (r"binary options|forex|trading (bot|signals|platform|system)|cloud mining|account managers trade", 2.0,
     "crypto"),
    (r"passive income|(guaranteed|daily|weekly|fixed|monthly) (returns?|profits?|income)", 2.5, "crypto"),
    (r"\d+\s?% (daily|weekly|monthly|per day|a day|roi|profit|returns?)|\d+\s?% (a|per) (day|week|month)",
     2.5, "crypto"),
    (r"investment (opportunity|plan|platform|advisor)|double your (money|investment|bitcoin|btc|crypto)|"
     r"early investors", 2.0, "crypto"),
    (r"network fee|withdraw(al)? (fee|instantly|anytime)|to withdraw", 2.0, "crypto"),
    (r"wallet (address|recovery|connect|verification|requires)|seed phrase|airdrop|connect your wallet|"
     r"recover your (crypto|bitcoin|funds)", 2.0, "crypto"),
    # pharmacy and supplements
    (r"viagra|cialis|levitra|kamagra|tramadol|xanax|oxycodone|valium|ambien|phentermine", 3.0, "pharma"),
    (r"(online )?pharmacy|(no|without( a)?) prescription( (needed|required))?", 2.5, "pharma"),
    (r"(male|penis) enhancement|erectile|weight loss (pills?|supplements?)|diet pills|keto (pills|gummies)|"
     r"melt fat|lose (weight|\d+ pounds)|energy pills|doctors (hate|are shocked)", 2.5, "pharma"),
    (r"cbd (oil|gummies)", 1.5, "pharma"),
    # gambling
    (r"casino|free spins|jackpot|slot machines?|online (poker|betting|slots)|sports ?betting|bookmaker|"
     r"deposit bonus|welcome bonus", 2.5, "gambling"),
    # loans and get-rich offers
    (r"(payday|personal|business|instant|quick) loans?( offer)?|bad credit|credit (repair|score)|debt relief|"
     r"cash advance|no credit check|no collateral|fast approval|low interest|pre-?approved", 2.0, "loans"),
    (r"make (money|\$\d+)( \w+)? (fast|online|from home|quickly)|work(ing)? from home|"
     r"earn (up to )?[$€£]?\s?\d[\d,]*( \w+)? (per|a) (day|week|hour)|no experience (needed|required)|"
     r"(part-time|remote) (workers|data entry)|dropshipping", 2.5, "loans"),
    # advance-fee fraud and phishing
    (r"next of kin|beneficiar(y|ies)|inheritance|unclaimed (funds?|deposit)|(million|m) (usd|us dollars|dollars)|"
     r"compensation payment|donation program", 2.5, "fraud"),
    (r"western union|moneygram|wire transfer|bank details|certified cheque|shipping agent", 1.5, "fraud"),
    (r"you (have )?won|lottery|claim your (prize|reward|winnings|donation)|congratulations,? you|lucky winner|"
     r"you (have been|were|are|'ve been) selected|gift card|giveaway", 2.5, "fraud"),
    (r"verify your (identity|account|information|payment|wallet)|(account|order|payment|parcel|package|apple id)"
     r" (has been |is |was )?(suspended|locked|on hold|compromised|frozen)|update your payment (information|"
     r"details)|unpaid (customs|shipping) fee|within 24 hours", 2.5, "phishing"),
    (r"(premium )?domain (name )?(is )?(available|for sale|expir\w+)|buy your domain|search engine registration",
     2.0, "fraud"),
    # adult
    (r"(hot|lonely|horny|sexy|cute) (girls|singles|women|milfs?|photos)|xxx|porn|adult (dating|videos?)|"
     r"meet (local )?(girls|singles|women)|singles in your area|looking for fun|hey (cutie|sweetie|handsome)|"
     r"hi (dear|handsome)|my (hot )?photos", 3.0, "adult"),
    # generic hard-sell vocabulary
    (r"100% (free|guaranteed|satisfaction|safe|natural|original)|risk[- ]free|act now|limited (time|spots|slots|"
     r"stock)|click (here|the link)|order (now|today)|buy now|special promotion|(\d+)% off|"
     r"offer expires|before it expires|only today|register now|sign up (free|now)|join (now|today)|"
     r"apply (now|here)", 1.5, "sales"),
    (r"replica (watches|bags)|rolex|louis vuitton|ray[- ]?ban|iptv|license keys|essay|dissertations|"
     r"academic papers", 2.0, "sales"),
    (r"this is not spam|not a spam", 2.0, "sales"),
    # the same families in Russian and Chinese, the two most common non-Latin
    # scripts of contact-form spam
    (r"заработ\w*|казино|ставк\w+|кредит\w*|займ\w*|прогон\w*|раскрутк\w+|продвижени\w+|"
     r"бесплатн\w+|выигр\w+|криптовалют\w+|биткоин\w*|инвестиц\w+|без вложений|без опыта|без отказа|"
     r"гарант\w+|топ|баз\w* данных|бонус\w*|вращени\w+|недорого|дешево|знакомств\w*|мои фото", 1.5,
     "cyrillic"),
    (r"代开|发票|博彩|娱乐城|加微信|兼职|日赚|刷单|彩票|赌场|百家乐|贷款|优惠|彩金|无抵押|秒批|真实可查", 1.5, "cjk"),
]


@dataclass(frozen=True)
class _Phrase:
    pattern: re.Pattern[str]
    score: float
    family: str


def _compile_phrases(extra: Iterable[str], extra_score: float) -> list[_Phrase]:
    # Chinese is written without spaces: its terms are matched anywhere.
    compiled = [_Phrase(re.compile(p if f == "cjk" else rf"(?<!\w)(?:{p})(?!\w)", re.IGNORECASE), s, f)
                for p, s, f in _PHRASES]
    for phrase in extra:
        compiled.append(_Phrase(re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)", re.IGNORECASE),
                                extra_score, "configured"))
    return compiled


# --- scripts --------------------------------------------------------------------

_SCRIPT_RANGES: list[tuple[int, int, str]] = [
    (0x0041, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"), (0x0370, 0x03FF, "Greek"),
    (0x1F00, 0x1FFF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0590, 0x05FF, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x0900, 0x097F, "Devanagari"),
    (0x0E00, 0x0E7F, "Thai"), (0x1100, 0x11FF, "Hangul"), (0x3040, 0x309F, "Hiragana"),
    (0x30A0, 0x30FF, "Katakana"), (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"),
    (0xAC00, 0xD7AF, "Hangul"), (0xF900, 0xFAFF, "Han"), (0xFF66, 0xFF9F, "Katakana"),
]
# Scripts that share letter shapes with Latin: mixing them inside one word is
# the classic filter-evasion trick ("vіagra" with a Cyrillic і).
_HOMOGLYPH_SCRIPTS = frozenset({"Cyrillic", "Greek"})
# Japanese text mixes these; treat them as one for the expected-script check.
_JAPANESE = frozenset({"Han", "Hiragana", "Katakana"})


def script_of(ch: str) -> str | None:
    """The Unicode script of a letter (the few scripts we reason about), else None."""
    if not ch.isalpha():
        return None
    cp = ord(ch)
    for lo, hi, name in _SCRIPT_RANGES:
        if lo <= cp <= hi:
            return name
    return "Other"


def script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        name = script_of(ch)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


# --- links and addresses --------------------------------------------------------------


def find_links(text: str) -> list[str]:
    """Every URL-looking token (``http://…``, ``www.…`` and bare ``name.tld/…``)."""
    return [m.group(0).rstrip(".,;:!?") for m in _URL.finditer(text)]


def link_host(link: str) -> str:
    rest = re.sub(r"^[a-z]+://", "", link, flags=re.IGNORECASE)
    host = re.split(r"[/?#:]", rest, maxsplit=1)[0].lower()
    return host[4:] if host.startswith("www.") else host


def email_domain(address: str) -> str:
    return address.rpartition("@")[2].strip().lower().rstrip(".")


def load_disposable_domains() -> frozenset[str]:
    """The built-in list of disposable (throwaway) email domains."""
    text = resources.files("collector.contact").joinpath("disposable_domains.txt").read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines()
                     if line.strip() and not line.startswith("#"))


def is_disposable(domain: str, domains: frozenset[str]) -> bool:
    """True for a listed domain or any subdomain of one."""
    parts = domain.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts) - 1))


def normalised_content(message: str) -> str:
    """The message as repeats are compared: case, whitespace and digits folded,
    so ``Hello 1`` and ``hello 2`` from a template count as the same text."""
    text = unicodedata.normalize("NFKC", message).casefold()
    text = re.sub(r"\d+", "0", text)
    return " ".join(text.split())


def content_fingerprint(message: str) -> str:
    return hashlib.sha256(normalised_content(message).encode("utf-8")).hexdigest()


# --- the signed form token (time to submit) ---------------------------------------------

FORM_TOKEN_VERSION = 1


def issue_form_token(key: bytes, now: float) -> str:
    """A token embedded in the served form: the serving time, signed. Bots that
    post without loading the form have none; bots that reuse one are slow to
    notice it expires; humans take seconds to fill the form."""
    payload = struct.pack(">BQ", FORM_TOKEN_VERSION, int(now * 1000))
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).decode("ascii").rstrip("=")


class FormTiming(msgspec.Struct, frozen=True):
    """What the form token says: ``state`` is ``ok``, ``missing``, ``invalid``
    or ``expired``; ``elapsed`` the seconds between serving and submitting."""

    state: str
    elapsed: float | None = None


def read_form_token(key: bytes, token: str | None, now: float, max_age: float) -> FormTiming:
    if not token:
        return FormTiming("missing")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        return FormTiming("invalid")
    if len(raw) != 9 + 16:
        return FormTiming("invalid")
    payload, mac = raw[:9], raw[9:]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()[:16]):
        return FormTiming("invalid")
    version, issued_ms = struct.unpack(">BQ", payload)
    if version != FORM_TOKEN_VERSION:
        return FormTiming("invalid")
    elapsed = now - issued_ms / 1000
    if elapsed < -5:
        return FormTiming("invalid")  # issued in the future: forged or a broken clock
    if elapsed > max_age:
        return FormTiming("expired", elapsed)
    return FormTiming("ok", max(elapsed, 0.0))


# --- recent activity (rates and repeats) -------------------------------------------------


class RecentActivity:
    """Timestamps per key over a sliding window, in memory (hot state).

    Keys are keyed hashes (of an IP, an email or a message), never the values.
    Bounded: at most ``max_per_key`` timestamps per key (counts saturate there)
    and ``max_keys`` keys (the least recently used are evicted).
    """

    def __init__(self, window: float, *, clock: Callable[[], float], max_keys: int = 100_000,
                 max_per_key: int = 1000):
        self.window = window
        self.max_keys = max_keys
        self.max_per_key = max_per_key
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def set_clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def count(self, key: str) -> int:
        """How many times ``key`` was recorded within the window."""
        times = self._seen.get(key)
        if not times:
            return 0
        self._trim(times, self._clock())
        return len(times)

    def retry_after(self, key: str) -> float:
        """Seconds until the oldest occurrence of ``key`` leaves the window."""
        times = self._seen.get(key)
        if not times:
            return 0.0
        return max(1.0, times[0] + self.window - self._clock())

    def record(self, key: str, at: float | None = None) -> int:
        """Record one occurrence (now, or at a past time when rebuilding); returns the new count."""
        now = self._clock()
        when = now if at is None else at
        if when <= now - self.window:
            return self.count(key)
        times = self._seen.pop(key, None) or deque(maxlen=self.max_per_key)
        self._trim(times, now)
        times.append(when)
        self._seen[key] = times  # re-inserted: dict order is least recently used first
        while len(self._seen) > self.max_keys:
            del self._seen[next(iter(self._seen))]
        return len(times)

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)


class Observations(msgspec.Struct, kw_only=True):
    """What the intake saw besides the text, for the behaviour checks."""

    honeypot_filled: bool = False
    form: FormTiming = msgspec.field(default_factory=lambda: FormTiming("missing"))
    # Submissions from this hashed IP / email within the rate window, this one included.
    ip_count: int = 1
    email_count: int = 1
    # Earlier submissions with the same normalised message within the duplicate window.
    duplicates: int = 0
    # Earlier submissions that carried the same form token (one token per served form).
    token_reuses: int = 0


# --- rules: the configured checks -------------------------------------------------------


@dataclass
class SpamRules:
    """The checks' parameters, built once from ``SpamConfig`` and limits."""

    threshold: float = 4.0
    min_time_to_submit: float = 3.0
    per_ip: int = 5
    per_email: int = 3
    expected_scripts: frozenset[str] = frozenset({"Latin"})
    disposable_domains: frozenset[str] = frozenset()
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    phrases: list[_Phrase] = field(default_factory=lambda: _compile_phrases((), 1.5))
    honeypot_field: str = "website"

    @classmethod
    def build(cls, *, threshold: float, min_time_to_submit: float, per_ip: int, per_email: int,
              expected_scripts: Iterable[str], disposable_domains: Iterable[str], phrases: Iterable[str],
              phrase_score: float, weights: Mapping[str, float], honeypot_field: str) -> SpamRules:
        unknown = set(weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ValueError(f"weights: unknown signal(s) {', '.join(sorted(unknown))}")
        expected = set(expected_scripts)
        if expected & _JAPANESE:
            expected |= _JAPANESE
        return cls(
            threshold=threshold, min_time_to_submit=min_time_to_submit, per_ip=per_ip, per_email=per_email,
            expected_scripts=frozenset(expected),
            disposable_domains=load_disposable_domains() | frozenset(disposable_domains),
            weights={**DEFAULT_WEIGHTS, **weights},
            phrases=_compile_phrases(phrases, phrase_score), honeypot_field=honeypot_field,
        )

    @classmethod
    def from_config(cls, config: ContactConfig) -> SpamRules:
        spam = config.spam
        return cls.build(
            threshold=spam.threshold, min_time_to_submit=spam.min_time_to_submit,
            per_ip=config.rate_limits.per_ip, per_email=config.rate_limits.per_email,
            expected_scripts=spam.expected_scripts, disposable_domains=spam.disposable_domains,
            phrases=spam.phrases, phrase_score=spam.phrase_score, weights=spam.weights,
            honeypot_field=config.honeypot_field,
        )

    def w(self, name: str) -> float:
        return self.weights[name]


def _signal(rules: SpamRules, name: str, factor: float, detail: str) -> SpamSignal:
    return SpamSignal(name=name, score=round(rules.w(name) * factor, 2), detail=detail)


# --- behaviour checks ------------------------------------------------------------------


def behaviour_signals(obs: Observations, rules: SpamRules) -> list[SpamSignal]:
    """Signals from how the form was posted: honeypot, form token and timing, rates, repeats."""
    out: list[SpamSignal] = []
    if obs.honeypot_filled:
        out.append(_signal(rules, "honeypot", 1, f"the hidden field {rules.honeypot_field!r} was filled in"))
    form = obs.form
    if form.state == "missing":
        out.append(_signal(rules, "form_token_missing", 1, "posted without a form token (not from the form page)"))
    elif form.state == "invalid":
        out.append(_signal(rules, "form_token_invalid", 1, "the form token is forged or corrupted"))
    elif form.state == "expired":
        hours = (form.elapsed or 0) / 3600
        out.append(_signal(rules, "form_token_expired", 1, f"the form was served {hours:.0f} h before posting"))
    elif form.elapsed is not None and form.elapsed < rules.min_time_to_submit:
        out.append(_signal(rules, "too_fast", 1, f"submitted {form.elapsed:.1f} s after the form was served "
                                                 f"(humans need at least {rules.min_time_to_submit:g} s)"))
    elif form.elapsed is not None and obs.token_reuses == 0:
        out.append(_signal(rules, "human_pace", 1, f"filled in over {form.elapsed:.0f} s, as people do"))
    if form.state == "ok" and obs.token_reuses > 0:
        out.append(_signal(rules, "form_token_reused", min(obs.token_reuses, 3),
                           f"this form token was already used {obs.token_reuses} time(s)"))
    if obs.ip_count > rules.per_ip:
        excess = obs.ip_count - rules.per_ip
        out.append(SpamSignal("rate_ip", round(min(rules.w("rate_ip") * excess, RATE_CAP), 2),
                              f"{obs.ip_count} submissions from this IP within the window (limit {rules.per_ip})"))
    if obs.email_count > rules.per_email:
        excess = obs.email_count - rules.per_email
        out.append(SpamSignal("rate_email", round(min(rules.w("rate_email") * excess, RATE_CAP), 2),
                              f"{obs.email_count} submissions from this address within the window "
                              f"(limit {rules.per_email})"))
    if obs.duplicates > 0:
        factor = min(1 + 0.4 * (obs.duplicates - 1), 2.4)
        out.append(_signal(rules, "duplicate_content", factor,
                           f"the same message was submitted {obs.duplicates} time(s) before"))
    return out


# --- content checks ----------------------------------------------------------------------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def content_signals(submission: Mapping[str, Any], rules: SpamRules) -> list[SpamSignal]:
    """Signals from what was written: links, phrases, scripts, caps, address."""
    name = _text(submission.get("name"))
    subject = _text(submission.get("subject"))
    message = _text(submission.get("message"))
    email = _text(submission.get("email"))
    body = f"{subject}\n{message}"
    out: list[SpamSignal] = []

    links = find_links(body)
    hosts = [link_host(link) for link in links]
    n = len(links)
    if n >= 2:
        factor = 1.0 if n == 2 else 2.5 if n <= 4 else 4.0 if n <= 9 else LINKS_CAP
        out.append(SpamSignal("links", round(min(rules.w("links") * factor, LINKS_CAP), 2),
                              f"{n} links in the message"))
    shorteners = sorted({h for h in hosts if h in URL_SHORTENERS})
    if shorteners:
        factor = 1 + 0.4 * (len([h for h in hosts if h in URL_SHORTENERS]) - 1)
        out.append(_signal(rules, "url_shortener", min(factor, 2.0),
                           f"links through URL shorteners ({', '.join(shorteners)})"))
    bad_tlds = sorted({h for h in hosts if h.rpartition(".")[2] in SUSPICIOUS_TLDS})
    if bad_tlds:
        out.append(_signal(rules, "suspicious_tld", min(len(bad_tlds), 2),
                           f"links to often-abused domains ({', '.join(bad_tlds[:3])})"))
    if _MARKUP_LINK.search(body):
        out.append(_signal(rules, "markup_links", 1, "HTML, BBCode or Markdown links in a plain-text form"))
    if find_links(name):
        out.append(_signal(rules, "link_in_name", 1, "the name field holds a link"))
    if links and len(message.strip()) < 60:
        out.append(_signal(rules, "short_message_with_link", 1, "a very short message that is mostly a link"))

    hits: dict[str, list[str]] = {}
    phrase_total = 0.0
    searched = deobfuscate(f"{name}\n{body}")
    for phrase in rules.phrases:
        terms = list(dict.fromkeys(m.group(0).strip().lower() for m in phrase.pattern.finditer(searched)))
        if terms:
            # More distinct terms of one pattern (viagra *and* cialis) weigh more, up to double.
            phrase_total += phrase.score * rules.w("spam_phrases") * (1 + 0.5 * (min(len(terms), 3) - 1))
            hits.setdefault(phrase.family, []).extend(terms)
    if hits:
        detail = "; ".join(f"{family}: {', '.join(dict.fromkeys(words))}" for family, words in hits.items())
        out.append(SpamSignal("spam_phrases", round(min(phrase_total, PHRASES_CAP), 2), detail))

    counts = script_counts(f"{name} {body}")
    letters = sum(counts.values())
    if letters >= 10:
        foreign = sum(c for s, c in counts.items() if s not in rules.expected_scripts)
        ratio = foreign / letters
        if ratio >= 0.3:
            main = sorted((s for s in counts if s not in rules.expected_scripts), key=lambda s: -counts[s])
            out.append(_signal(rules, "foreign_script", ratio,
                               f"{ratio:.0%} of letters in {', '.join(main[:2])}, not in the expected scripts"))
    mixed = _mixed_script_words(f"{name} {body}")
    if mixed:
        out.append(_signal(rules, "mixed_script_words", 1.0 if len(mixed) == 1 else 1.75,
                           f"words mixing Latin with look-alike letters ({', '.join(mixed[:3])})"))
    if _INVISIBLE.search(f"{name}{body}"):
        out.append(_signal(rules, "invisible_characters", 1, "zero-width or invisible characters in the text"))

    cased = [ch for ch in body if ch.isalpha() and (ch.isupper() or ch.islower())]
    if len(cased) >= 20:
        upper = sum(1 for ch in cased if ch.isupper()) / len(cased)
        if upper >= 0.7:
            out.append(_signal(rules, "all_caps", 1.25 if upper >= 0.9 else 1.0,
                               f"{upper:.0%} of letters are capitals"))
    shouts = len(_SHOUT.findall(body))
    bangs = body.count("!") + body.count("！")
    if shouts >= 2 or bangs >= 4:
        out.append(_signal(rules, "shouting_punctuation", 1,
                           f"{bangs} exclamation marks, {shouts} runs of !!! or ???"))

    domain = email_domain(email)
    if domain and is_disposable(domain, rules.disposable_domains):
        out.append(_signal(rules, "disposable_email", 1, f"{domain} is a disposable email service"))
    return out


# Cyrillic and Greek letters that look like Latin ones (a subset of Unicode's
# confusables), to read "Саsinо" as "Casino" when a word mixes scripts.
_HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t",
    "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "У": "Y", "Х": "X", "І": "I", "Ј": "J", "Ѕ": "S",
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "χ": "x", "υ": "u",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})


def deobfuscate(text: str) -> str:
    """The text as a filter should read it: invisible characters removed and
    look-alike letters folded to Latin inside words that mix scripts (text
    written wholly in Cyrillic or Greek is left as it is)."""
    text = _INVISIBLE.sub("", text)

    def fold(m: re.Match[str]) -> str:
        word = m.group(0)
        scripts = {script_of(ch) for ch in word} - {None}
        return word.translate(_HOMOGLYPHS) if "Latin" in scripts and scripts & _HOMOGLYPH_SCRIPTS else word

    return _WORD.sub(fold, text)


def _mixed_script_words(text: str) -> list[str]:
    found = []
    for word in _WORD.findall(text):
        scripts = {script_of(ch) for ch in word} - {None}
        if "Latin" in scripts and scripts & _HOMOGLYPH_SCRIPTS:
            found.append(word)
    return found


# --- what classifiers receive ------------------------------------------------------------


@dataclass
class ClassifierContext:
    """The ``context`` every spam classifier's ``classify(submission, context)`` gets.

    ``submission`` is a mapping with the submitted fields (``name``, ``email`` in
    the clear, ``phone``, ``subject``, ``message``, ``attachments`` metadata) and
    the request's ``ip_address``, ``user_agent``, ``referrer`` (what Akismet-style
    services ask for), plus ``observations`` (:class:`Observations`).
    """

    rules: SpamRules
    #: The collector's aiohttp Application (``None`` outside one).
    app: Any = None
    #: The shared aiohttp ClientSession, for classifiers that call a service.
    http: Any = None


# --- the verdict ------------------------------------------------------------------------------


class Verdict(msgspec.Struct, frozen=True):
    score: float
    is_spam: bool
    signals: list[SpamSignal]


def decide(signals: Sequence[SpamSignal], threshold: float) -> Verdict:
    """Sum every classifier's signals; at or above ``threshold`` it is spam."""
    score = round(sum(s.score for s in signals), 2)
    return Verdict(score=score, is_spam=score >= threshold, signals=list(signals))
