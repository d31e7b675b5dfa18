"""Spam classifiers are plugins: a third party's Akismet-style classifier adds
its verdict through ``logferry_register_spam_classifiers``, next to the
built-in ones, and a broken or slow classifier never stops intake."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agent.configfile import convert
from collector.contact.config import ContactConfig
from collector.contact.intake import ContactService, RequestMeta
from collector.contact.submission import ContactInput
from collector.events import CONTACT_FORM, EventBus
from collector.storage import Storage
from plugins import hookimpl
from plugins.manager import build_plugin_manager
from plugins.types import SpamSignal, TransientError
from tests.contact.conftest import FakeClock
from tests.helpers import SECRET

AKISMET_KEY = "123abc456def"


class AkismetApi:
    """``POST /1.1/comment-check`` as Akismet documents it: form-encoded,
    ``api_key`` and ``blog`` required, answers ``true``/``false`` (or
    ``invalid`` with ``X-akismet-debug-help``). The documented test author
    ``akismet-guaranteed-spam`` is always spam."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def comment_check(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        if form.get("api_key") != AKISMET_KEY or not form.get("blog"):
            return web.Response(text="invalid", headers={"X-akismet-debug-help": "Empty \"blog\" value"})
        for required in ("user_ip", "comment_type"):
            if required not in form:
                return web.Response(text="Missing required field: " + required)
        if form.get("comment_author") == "akismet-guaranteed-spam":
            return web.Response(text="true", headers={"X-akismet-pro-tip": "discard"})
        return web.Response(text="false")


@pytest.fixture
async def akismet() -> AsyncIterator[tuple[AkismetApi, str]]:
    api = AkismetApi()
    app = web.Application()
    app.router.add_post("/1.1/comment-check", api.comment_check)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield api, str(server.make_url(""))
    await server.close()


class AkismetClassifier:
    """What an ``logferry-akismet`` package would register."""

    name = "akismet"

    def __init__(self, base_url: str, key: str, blog: str):
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.blog = blog

    async def classify(self, submission: Mapping[str, Any], context: Any) -> list[SpamSignal]:
        data = {
            "api_key": self.key, "blog": self.blog, "comment_type": "contact-form",
            "user_ip": submission["ip_address"], "user_agent": submission["user_agent"] or "",
            "referrer": submission["referrer"] or "", "comment_author": submission["name"],
            "comment_author_email": submission["email"], "comment_content": submission["message"],
        }
        async with context.http.post(f"{self.base_url}/1.1/comment-check", data=data) as resp:
            verdict = await resp.text()
            blatant = resp.headers.get("X-akismet-pro-tip") == "discard"
        if verdict == "true":
            detail = "Akismet: spam (blatant)" if blatant else "Akismet: spam"
            return [SpamSignal("akismet", 10.0 if blatant else 4.0, detail)]
        if verdict == "false":
            return []
        raise TransientError(f"Akismet answered {verdict!r}")


def plugin_registering(*classifiers: Any) -> object:
    class Plugin:
        @staticmethod
        @hookimpl
        def logferry_register_spam_classifiers(register: Callable[[Any], None]) -> None:
            for c in classifiers:
                register(c)

    return Plugin()


def service_with(storage: Storage, plugin: object, http: aiohttp.ClientSession, events: EventBus,
                 **contact: Any) -> ContactService:
    manager = build_plugin_manager(entry_points=False, extra=[("third_party", plugin)])
    classifiers = [(name, entry.obj) for name, entry in manager.spam_classifiers().items()]
    return ContactService(storage, convert(contact, ContactConfig), secret_key=SECRET, events=events,
                          classifiers=classifiers, http=http, clock=FakeClock())


def submission(name: str) -> ContactInput:
    return ContactInput(name=name, email="someone@example.org", subject="Hello",
                        message="I would like to know more about your opening hours.")


async def test_a_third_party_classifier_adds_its_verdict_to_the_built_in_ones(storage: Storage, akismet: Any
                                                                              ) -> None:
    api, url = akismet
    events = EventBus()
    published: list[Any] = []
    events.subscribe(CONTACT_FORM, published.extend)
    async with aiohttp.ClientSession() as http:
        service = service_with(storage, plugin_registering(AkismetClassifier(url, AKISMET_KEY, "https://acme.test")),
                               http, events)
        assert [n for n, _ in service.classifiers] == ["behaviour", "content", "akismet"]
        meta = RequestMeta(ip_address="203.0.113.5", user_agent="Mozilla/5.0", referrer="https://acme.test/c")
        ham = await service.submit(submission("Jo Bloggs"), meta)
        spam = await service.submit(submission("akismet-guaranteed-spam"), meta)
    assert ham.status == "NEW"
    assert spam.status == "SPAM"
    assert ("akismet", 10.0) in [(s.name, s.score) for s in spam.verdict.signals]
    assert "form_token_missing" in [s.name for s in spam.verdict.signals]  # the built-ins still ran
    assert api.requests[0]["user_ip"] == "203.0.113.5"
    assert api.requests[0]["comment_author_email"] == "someone@example.org"
    assert [e["id"] for e in published] == [ham.id]
    stored = await storage.query("SELECT spam_signals FROM contact_submissions FINAL WHERE id = {id:UUID}",
                                 {"id": spam.id})
    assert "Akismet: spam (blatant)" in stored[0]["spam_signals"]


class Exploding:
    name = "exploding"

    async def classify(self, submission: Mapping[str, Any], context: Any) -> list[SpamSignal]:
        raise RuntimeError("the spam service is down")


class Sleepy:
    name = "sleepy"

    async def classify(self, submission: Mapping[str, Any], context: Any) -> list[SpamSignal]:
        await asyncio.sleep(30)
        return [SpamSignal("sleepy", 100.0)]


async def test_failing_or_slow_classifiers_are_skipped_and_intake_goes_on(storage: Storage) -> None:
    events = EventBus()
    async with aiohttp.ClientSession() as http:
        service = service_with(storage, plugin_registering(Exploding(), Sleepy()), http, events,
                               spam={"classifier_timeout": "100ms"})
        accepted = await service.submit(submission("Jo"), RequestMeta(ip_address="198.51.100.1"))
    assert accepted.status == "NEW"
    assert {s.name for s in accepted.verdict.signals} == {"form_token_missing"}


async def test_classifiers_can_be_disabled_by_name(storage: Storage) -> None:
    async with aiohttp.ClientSession() as http:
        service = service_with(storage, plugin_registering(Exploding()), http, EventBus(),
                               spam={"disabled_classifiers": ["exploding", "behaviour"]})
    assert [n for n, _ in service.classifiers] == ["content"]
