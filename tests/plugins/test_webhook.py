"""The webhook step against a real HTTP server: signature, body shapes,
which answers are retried, and what a dry run prints."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import orjson

from plugins.builtin.webhook import sign, verify
from plugins.testing import Receiver
from tests.pipelines.conftest import T0, log_event


def pipeline(url: str, options: str = "", retry: int = 3) -> str:
    return f"""\
name: hook
on: log
steps:
  - type: webhook
    retry: {{attempts: {retry}, backoff: 1s}}
    options: {{url: "{url}/in", secret: topsecret{options}}}
"""


async def test_the_signature_is_hmac_sha256_over_timestamp_and_raw_body(
        run_pipeline: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    [run] = await run_pipeline(pipeline(target.url), [log_event(T0, message="héllo")])
    assert run.status == "ok"
    request = target.requests[0]
    header = request["headers"]["X-Logferry-Signature"]
    t, v1 = (part.split("=", 1)[1] for part in header.split(","))
    expected = hmac.new(b"topsecret", f"{t}.".encode() + request["body"], hashlib.sha256).hexdigest()
    assert v1 == expected and abs(int(t) - time.time()) < 60
    assert verify("topsecret", header, request["body"])
    assert not verify("topsecret", header, request["body"] + b" ")
    assert not verify("other", header, request["body"])
    old = sign("topsecret", int(time.time()) - 600, request["body"])
    assert not verify("topsecret", old, request["body"])  # replayed later: refused
    payload = orjson.loads(request["body"])
    assert payload["event"]["message"] == "héllo" and payload["pipeline"] == "hook"
    assert request["headers"]["Content-Type"] == "application/json"


async def test_a_custom_body_headers_and_method(run_pipeline: Callable[..., Any],
                                                http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    text = pipeline(target.url, ', method: PUT, headers: {X-Env: "{{ event.source }}"}, '
                                'body: {text: "{{ event.message | upper }}", n: 1}')
    await run_pipeline(text, [log_event(T0, message="down")])
    request = target.requests[0]
    assert request["method"] == "PUT" and request["headers"]["X-Env"] == "payments"
    assert orjson.loads(request["body"]) == {"text": "DOWN", "n": 1}


async def test_server_errors_are_retried_and_client_errors_are_not(
        run_pipeline: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(502, times=2)
    [run] = await run_pipeline(pipeline(target.url), [log_event(T0)])
    assert (run.status, run.steps[0].attempts) == ("ok", 3)
    target.requests.clear()
    target.respond(404, "gone")
    [run] = await run_pipeline(pipeline(target.url), [log_event(T0)])
    assert (run.status, run.steps[0].attempts, len(target.requests)) == ("failed", 1, 1)
    assert run.steps[0].error == f"{target.url}/in answered 404: gone"


async def test_an_unreachable_target_is_a_transient_failure(run_pipeline: Callable[..., Any]) -> None:
    from tests.conftest import free_port

    [run] = await run_pipeline(pipeline(f"http://127.0.0.1:{free_port()}", retry=2), [log_event(T0)])
    assert run.status == "failed" and run.steps[0].attempts == 2
    assert "ClientConnectorError" in (run.steps[0].error or "")


async def test_a_dry_run_describes_and_sends_nothing(run_pipeline: Callable[..., Any],
                                                     http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    [run] = await run_pipeline(pipeline(target.url), [log_event(T0, message="x")], dry_run=True)
    assert target.requests == []
    description = run.steps[0].description or ""
    assert description.startswith(f"POST {target.url}/in (") and "signed in X-Logferry-Signature" in description
    assert "topsecret" not in description
