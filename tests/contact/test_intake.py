"""POST /v1/contact and the hosted form: content types, limits, PII, honeypot,
rate limits, proxies, CORS. Real app, real chDB."""

from __future__ import annotations

import base64
import re
from typing import Any

import aiohttp

from collector import appkeys
from tests.contact.conftest import ContactHarness

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
PDF = b"%PDF-1.7\n" + b"0" * 500 + b"\n%%EOF"
EXE = b"MZ\x90\x00" + b"\x00" * 300


def token_from(html: str) -> str:
    m = re.search(r'name="_form_token" value="([^"]+)"', html)
    assert m, html
    return m.group(1)


async def stored_rows(h: ContactHarness) -> list[dict[str, Any]]:
    return await h.client.app[appkeys.STORAGE].query(
        "SELECT * FROM contact_submissions FINAL ORDER BY submitted_at")


# --- content types -----------------------------------------------------------------------


async def test_json_submission_is_stored_new_and_published_with_the_email_in_the_clear(make_contact: Any) -> None:
    h = await make_contact()
    resp = await h.submit(name="Ada", email="Ada@Example.org", phone="+44 20 7946 0958",
                          headers={"User-Agent": "Mozilla/5.0 test", "Referer": "https://shop.example/help",
                                   "Origin": "https://www.acme.example"})
    assert resp.status == 201
    assert "Access-Control-Allow-Origin" not in resp.headers  # no CORS unless configured
    body = await resp.json()
    assert set(body) == {"id", "received"}
    row = await h.stored(body["id"])
    assert row["status"] == "NEW"
    assert row["email"] == "Ada@example.org"  # the domain is normalised, the local part kept
    assert row["phone"] == "+44 20 7946 0958"
    assert row["user_agent"] == "Mozilla/5.0 test"
    assert row["referrer"] == "https://shop.example/help"
    assert row["ip_address"] == "127.0.0.1"
    assert row["submitted_at"].endswith("Z")
    assert [e["id"] for e in h.events] == [body["id"]]
    event = h.events[0]
    assert event["email"] == "Ada@example.org" and event["status"] == "NEW"
    assert event["message"].startswith("Hello, could you")


async def test_email_and_phone_are_encrypted_at_rest_with_keyed_hashes(make_contact: Any) -> None:
    h = await make_contact()
    await h.submit(email="secret.person@example.org", phone="+1 555 010 9999")
    [raw] = await stored_rows(h)
    assert "secret.person" not in raw["email"] and raw["email"].startswith("v1:")
    assert raw["phone"].startswith("v1:") and "555" not in raw["phone"]
    assert raw["email_hash"] == h.service.cipher.email_hash("secret.person@example.org")
    assert raw["phone_hash"] == h.service.cipher.phone_hash("+15550109999")


async def test_hosted_form_posts_urlencoded_and_shows_the_thank_you_page(make_contact: Any) -> None:
    h = await make_contact(contact={"form_title": "Write to Acme", "thank_you_message": "Merci, à bientôt !"})
    page = await h.client.get("/contact", headers={"Referer": "https://acme.example/pricing"})
    assert page.status == 200
    html = await page.text()
    assert "<script" not in html  # works without JavaScript
    assert 'method="post" action="/v1/contact"' in html
    assert "<title>Write to Acme</title>" in html
    assert 'name="website"' in html and 'tabindex="-1"' in html
    h.clock.advance(25)
    resp = await h.client.post(
        "/v1/contact", allow_redirects=False,
        data={"name": "Zoë", "email": "zoe@example.org", "subject": "Pricing", "message": "Do you have a plan "
              "for charities?", "website": "", "_form_token": token_from(html),
              "_referrer": "https://acme.example/pricing"},
        headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert resp.status == 303
    assert resp.headers["Location"] == "/contact/thanks"
    thanks = await h.client.get("/contact/thanks")
    assert "Merci, à bientôt !" in await thanks.text()
    listing = await (await h.client.get("/v1/contact", headers=h.admin)).json()
    [row] = listing["submissions"]
    assert row["name"] == "Zoë" and row["status"] == "NEW"
    assert row["referrer"] == "https://acme.example/pricing"
    assert [s["name"] for s in row["spam_signals"]] == ["human_pace"]


async def test_multipart_with_attachments_stores_files_an_admin_can_download(make_contact: Any) -> None:
    h = await make_contact()
    form = aiohttp.FormData()
    form.add_field("email", "sam@example.org")
    form.add_field("subject", "Broken mug")
    form.add_field("message", "The mug arrived broken, photo and invoice attached.")
    form.add_field("_form_token", await h.form_token())
    form.add_field("attachments", PNG, filename="photo.png", content_type="image/png")
    form.add_field("attachments", PDF, filename="../../invoice.pdf", content_type="application/pdf")
    h.clock.advance(30)
    resp = await h.client.post("/v1/contact", data=form)
    assert resp.status == 201, await resp.text()
    sid = (await resp.json())["id"]
    row = await h.stored(sid)
    assert [(a["filename"], a["size"], a["content_type"]) for a in row["attachments"]] == [
        ("photo.png", len(PNG), "image/png"), ("invoice.pdf", len(PDF), "application/pdf")]
    assert h.events[0]["attachments"][1]["filename"] == "invoice.pdf"
    download = await h.client.get(row["attachments"][1]["url"], headers=h.admin)
    assert download.status == 200
    assert await download.read() == PDF
    assert download.headers["Content-Disposition"].startswith("attachment;")
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    assert (await h.client.get(row["attachments"][1]["url"])).status == 401


async def test_json_attachments_are_base64(make_contact: Any) -> None:
    h = await make_contact()
    resp = await h.submit(attachments=[{"filename": "p.png", "content_type": "image/png",
                                        "content": base64.b64encode(PNG).decode()}])
    assert resp.status == 201
    row = await h.stored((await resp.json())["id"])
    assert row["attachments"][0]["sha256"]
    bad = await h.submit(attachments=[{"filename": "p.png", "content_type": "image/png", "content": "%%%"}])
    assert bad.status == 400
    assert "attachments[0].content" in (await bad.json())["error"]["message"]


# --- limits -----------------------------------------------------------------------------------


async def test_message_may_be_10_kb_and_not_a_byte_more(make_contact: Any) -> None:
    h = await make_contact()
    ok = await h.submit(message="é" * 5120)  # 10240 bytes of UTF-8
    assert ok.status == 201
    over = await h.submit(message="é" * 5120 + "x")
    assert over.status == 413
    assert "message: at most 10240 bytes" in (await over.json())["error"]["message"]


async def test_invalid_email_is_400_naming_the_field(make_contact: Any) -> None:
    h = await make_contact()
    for email in ("not-an-email", "a@b", "x@@example.com", "user@exa mple.com", ""):
        resp = await h.submit(email=email)
        assert resp.status == 400, email
        assert (await resp.json())["error"]["message"].startswith("email:"), email


async def test_malformed_fields_are_400_and_unknown_body_types_415(make_contact: Any) -> None:
    h = await make_contact()
    xml = await h.client.post("/v1/contact", data=b"<xml/>", headers={"Content-Type": "application/xml"})
    assert xml.status == 415
    for fields, field in (({"message": "  "}, "message"), ({"phone": "call me maybe"}, "phone"),
                          ({"name": {"first": "x"}}, "name"), ({"subject": "s" * 201}, "subject")):
        resp = await h.submit(**fields)
        assert resp.status == 400, fields
        assert (await resp.json())["error"]["message"].startswith(f"{field}:")


async def test_attachment_count_size_total_and_type_limits(make_contact: Any) -> None:
    h = await make_contact(contact={"attachments": {"max_count": 2, "max_size": "1KiB", "max_total": "1500B"}})

    async def post(*files: tuple[str, bytes, str]) -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        form.add_field("email", "a@example.org")
        form.add_field("message", "see attached")
        for name, content, ctype in files:
            form.add_field("attachments", content, filename=name, content_type=ctype)
        return await h.client.post("/v1/contact", data=form)

    small = b"\x89PNG\r\n\x1a\n" + b"\x00" * 500
    too_many = await post(("a.png", small, "image/png"), ("b.png", small, "image/png"), ("c.png", small, "image/png"))
    assert too_many.status == 413 and "at most 2 files" in await too_many.text()
    too_big = await post(("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 1100, "image/png"))
    assert too_big.status == 413 and "attachments[0]" in await too_big.text()
    too_much = await post(("a.png", small + b"\x00" * 300, "image/png"), ("b.png", small + b"\x00" * 300, "image/png"))
    assert too_much.status == 413 and "total" in await too_much.text()
    html_file = await post(("x.html", b"<html></html>", "text/html"))
    assert html_file.status == 415 and "text/html is not accepted" in await html_file.text()
    exe = await post(("invoice.pdf", EXE[:900], "application/pdf"))
    assert exe.status == 415 and "executable" in await exe.text()
    liar = await post(("photo.png", b"GIF89a" + b"\x00" * 100, "image/png"))
    assert liar.status == 415
    assert (await post(("a.png", small, "image/png"))).status == 201
    assert len(await stored_rows(h)) == 1


async def test_attachments_can_be_refused_altogether(make_contact: Any) -> None:
    h = await make_contact(contact={"attachments": {"max_count": 0}})
    resp = await h.submit(attachments=[{"filename": "p.png", "content_type": "image/png",
                                        "content": base64.b64encode(PNG).decode()}])
    assert resp.status == 413
    page = await (await h.client.get("/contact")).text()
    assert 'type="file"' not in page


async def test_html_errors_re_render_the_form_with_the_values_kept(make_contact: Any) -> None:
    h = await make_contact()
    resp = await h.client.post("/v1/contact", data={"name": "Kim <b>", "email": "nope", "message": "hi"},
                               headers={"Accept": "text/html"})
    assert resp.status == 400
    html = await resp.text()
    assert "email: not a valid email address" in html
    assert 'value="Kim &lt;b&gt;"' in html  # kept, and escaped
    assert len(await stored_rows(h)) == 0


# --- spam outcomes look like success --------------------------------------------------------


async def test_honeypot_answers_exactly_like_success_but_is_stored_as_spam_without_event(make_contact: Any
                                                                                         ) -> None:
    h = await make_contact()
    human = await h.submit()
    bot = await h.submit(website="http://seo.example", email="bot@example.org")
    assert bot.status == human.status == 201
    assert set(await bot.json()) == set(await human.json())
    assert {k: v for k, v in bot.headers.items() if k not in ("Date", "Content-Length")} == \
        {k: v for k, v in human.headers.items() if k not in ("Date", "Content-Length")}
    row = await h.stored((await bot.json())["id"])
    assert row["status"] == "SPAM"
    assert "honeypot" in [s["name"] for s in row["spam_signals"]]
    assert [e["id"] for e in h.events] == [(await human.json())["id"]]
    # From the hosted form, a bot filling the honeypot lands on the thank-you page like anyone.
    page = await h.client.post("/v1/contact", allow_redirects=False, headers={"Accept": "text/html"},
                               data={"email": "b2@example.org", "message": "hi", "website": "x"})
    assert page.status == 303 and page.headers["Location"] == "/contact/thanks"
    assert len(h.events) == 1


async def test_honeypot_field_name_is_configurable(make_contact: Any) -> None:
    h = await make_contact(contact={"honeypot_field": "fax_number"})
    assert 'name="fax_number"' in await (await h.client.get("/contact")).text()
    resp = await h.submit(fax_number="123")
    assert (await h.stored((await resp.json())["id"]))["status"] == "SPAM"


async def test_content_spam_is_stored_as_spam_and_publishes_nothing(make_contact: Any) -> None:
    h = await make_contact()
    resp = await h.submit(email="seo@mailinator.com", subject="Rank #1",
                          message="We guarantee first page of Google with our SEO services and backlinks! "
                                  "Visit https://bit.ly/rank1 now")
    assert resp.status == 201
    row = await h.stored((await resp.json())["id"])
    assert row["status"] == "SPAM"
    assert row["spam_score"] >= 4
    assert {"spam_phrases", "url_shortener", "disposable_email"} <= {s["name"] for s in row["spam_signals"]}
    assert all(s["detail"] for s in row["spam_signals"])
    assert h.events == []


async def test_threshold_is_configurable(make_contact: Any) -> None:
    # A disposable address filled in at human pace scores 3.0 − 1.0 = 2.0: below the
    # default threshold (4.0), above this one.
    h = await make_contact(contact={"spam": {"threshold": 1.5}})
    plain = await h.submit()
    assert (await h.stored((await plain.json())["id"]))["status"] == "NEW"
    resp = await h.submit(email="someone@yopmail.com", message="Is the shop open on Sundays?")
    row = await h.stored((await resp.json())["id"])
    assert row["spam_score"] == 2.0 and row["status"] == "SPAM"


# --- rate limits and repeats ----------------------------------------------------------------------


async def test_rate_per_ip_adds_a_signal_then_the_hard_limit_answers_429(make_contact: Any) -> None:
    h = await make_contact(contact={"rate_limits": {"window": "1h", "per_ip": 2, "per_email": 10,
                                                    "hard_per_ip": 4}})
    ids = []
    for i in range(4):
        resp = await h.submit(email=f"p{i}@example.org", message=f"Question number {i}: what are your hours?"
                              + " really" * i)
        assert resp.status == 201
        ids.append((await resp.json())["id"])
    signals = [{s["name"] for s in (await h.stored(i))["spam_signals"]} for i in ids]
    assert ["rate_ip" in s for s in signals] == [False, False, True, True]
    blocked = await h.submit(email="p9@example.org", message="one more")
    assert blocked.status == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 3601
    assert len(await stored_rows(h)) == 4
    h.clock.advance(3601)
    assert (await h.submit(email="p10@example.org", message="after the window")).status == 201


async def test_rate_per_email_counts_across_ips(make_contact: Any) -> None:
    h = await make_contact(trusted_proxies=["127.0.0.1/32"],
                           contact={"rate_limits": {"per_ip": 50, "per_email": 2, "hard_per_ip": 60}})
    ids = []
    for i in range(3):
        resp = await h.submit(email="same@example.org", message=f"message {i} " + "x" * i,
                              headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
        ids.append((await resp.json())["id"])
    last = await h.stored(ids[-1])
    assert "rate_email" in {s["name"] for s in last["spam_signals"]}
    assert "rate_ip" not in {s["name"] for s in last["spam_signals"]}


async def test_repeated_identical_content_from_different_senders_scores(make_contact: Any) -> None:
    h = await make_contact()
    text = "Hello! We would like to offer you a partnership. Please reply with your price list."
    first = await h.submit(email="a1@example.org", message=text)
    second = await h.submit(email="a2@example.org", message=text.upper().lower())
    assert "duplicate_content" not in {s["name"] for s in (await h.stored((await first.json())["id"]))["spam_signals"]}
    assert "duplicate_content" in {s["name"] for s in (await h.stored((await second.json())["id"]))["spam_signals"]}


async def test_counters_survive_a_restart(make_contact: Any, make_client: Any, make_config: Any) -> None:
    h = await make_contact(contact={"rate_limits": {"per_ip": 30, "per_email": 1}})
    await h.submit(email="again@example.org", message="first message")
    restarted = await make_client(make_config(contact={"rate_limits": {"per_ip": 30, "per_email": 1}}))
    h2 = ContactHarness(restarted, h.clock, h.admin_token, h.tokens)
    resp = await h2.submit(email="again@example.org", message="second message")
    row = await h2.stored((await resp.json())["id"])
    assert "rate_email" in {s["name"] for s in row["spam_signals"]}


# --- client IP, CORS, redirects ---------------------------------------------------------------------


async def test_client_ip_comes_through_trusted_proxies_only(make_contact: Any, make_client: Any,
                                                            make_config: Any) -> None:
    trusting = await make_contact(trusted_proxies=["127.0.0.1/32"])
    resp = await trusting.submit(headers={"X-Forwarded-For": "203.0.113.7, 127.0.0.1"})
    assert (await trusting.stored((await resp.json())["id"]))["ip_address"] == "203.0.113.7"
    untrusting = await make_contact()
    resp = await untrusting.submit(headers={"X-Forwarded-For": "203.0.113.7"}, email="b@example.org")
    assert (await untrusting.stored((await resp.json())["id"]))["ip_address"] == "127.0.0.1"


async def test_cors_allows_configured_origins_only(make_contact: Any) -> None:
    h = await make_contact(contact={"cors_origins": ["https://www.acme.example"]})
    pre = await h.client.options("/v1/contact", headers={"Origin": "https://www.acme.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://www.acme.example"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    other = await h.client.options("/v1/contact", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    ok = await h.submit(headers={"Origin": "https://www.acme.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://www.acme.example"
    bad = await h.submit(email="nope", headers={"Origin": "https://www.acme.example"})
    assert bad.status == 400
    assert bad.headers["Access-Control-Allow-Origin"] == "https://www.acme.example"
    token = await h.client.get("/v1/contact/form-token", headers={"Origin": "https://www.acme.example"})
    assert token.headers["Access-Control-Allow-Origin"] == "https://www.acme.example"
    page = await h.client.get("/contact")
    assert "frame-ancestors 'self' https://www.acme.example" in page.headers["Content-Security-Policy"]
    assert "X-Frame-Options" not in page.headers


async def test_next_redirects_only_to_local_paths_or_allowed_origins(make_contact: Any) -> None:
    h = await make_contact(contact={"cors_origins": ["https://www.acme.example"]})

    async def post(next_url: str) -> str:
        resp = await h.client.post("/v1/contact", allow_redirects=False, headers={"Accept": "text/html"},
                                   data={"email": "n@example.org", "message": f"hello {next_url}",
                                         "_next": next_url})
        return resp.headers["Location"]

    assert await post("/thanks-page") == "/thanks-page"
    assert await post("https://www.acme.example/merci") == "https://www.acme.example/merci"
    assert await post("https://evil.example/phish") == "/contact/thanks"
    assert await post("//evil.example/x") == "/contact/thanks"


async def test_public_routes_are_absent_when_disabled(make_contact: Any) -> None:
    h = await make_contact(contact={"enabled": False})
    assert (await h.client.get("/contact")).status == 404
    assert (await h.client.post("/v1/contact", json={})).status in (401, 405)


async def test_posting_too_fast_or_replaying_one_form_token_is_spam(make_contact: Any) -> None:
    h = await make_contact()
    quick = await h.form_token()
    h.clock.advance(0.5)
    resp = await h.submit(_form_token=quick, human=False, message="Please call me back about prices, thanks")
    row = await h.stored((await resp.json())["id"])
    assert "too_fast" in {s["name"] for s in row["spam_signals"]}
    assert row["status"] == "SPAM"
    token = await h.form_token()
    h.clock.advance(30)
    statuses = []
    for i in range(3):
        resp = await h.submit(_form_token=token, human=False, email=f"r{i}@example.org",
                              message=f"Hello, question {i}" + "?" * i)
        statuses.append((await h.stored((await resp.json())["id"]))["status"])
    assert statuses == ["NEW", "NEW", "SPAM"]


async def test_bodies_beyond_the_cap_are_refused_declared_or_chunked(make_contact: Any) -> None:
    h = await make_contact(contact={"attachments": {"max_count": 0}})
    declared = await h.client.post("/v1/contact", data=b"x" * 200_000,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert declared.status == 413

    async def body() -> Any:
        yield b"--XyZ\r\nContent-Disposition: form-data; name=\"email\"\r\n\r\na@example.org\r\n"
        for i in range(200):
            yield (f"--XyZ\r\nContent-Disposition: form-data; name=\"junk{i}\"\r\n\r\n".encode()
                   + b"j" * 4000 + b"\r\n")
        yield b"--XyZ--\r\n"

    resp = await h.client.post("/v1/contact", data=body(),
                               headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert resp.status == 413
