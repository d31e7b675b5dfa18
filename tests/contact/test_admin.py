"""The admin API: access, listing with filters, triage transitions, rescue, erasure."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from collector import appkeys
from tests.contact.conftest import PNG_BYTES, ContactHarness


async def submit_id(h: ContactHarness, **fields: Any) -> str:
    resp = await h.submit(**fields)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def patch(h: ContactHarness, sid: str, body: dict[str, Any]) -> Any:
    return await h.client.patch(f"/v1/contact/{sid}", json=body, headers=h.admin)


async def test_only_admin_tokens_reach_the_admin_api(make_contact: Any) -> None:
    h = await make_contact()
    sid = await submit_id(h)
    others = [h.tokens.create(kind) for kind in ("service", "user", "logs", "ingest")]
    await h.client.app[appkeys.TOKENS].load()
    requests = [("GET", "/v1/contact"), ("GET", f"/v1/contact/{sid}"), ("PATCH", f"/v1/contact/{sid}"),
                ("POST", f"/v1/contact/{sid}/respond"), ("GET", f"/v1/contact/{sid}/attachments/0")]
    for method, path in requests:
        anonymous = await h.client.request(method, path, json={})
        assert anonymous.status == 401, (method, path)
        for token in others:
            resp = await h.client.request(method, path, json={}, headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 403, (method, path)
    assert (await h.client.get("/v1/contact", headers=h.admin)).status == 200


async def test_list_filters_by_status_assignee_date_and_text(make_contact: Any) -> None:
    h = await make_contact()
    a = await submit_id(h, email="alice@example.org", subject="Invoice missing", message="I need my invoice "
                        "for order 1234, please.")
    h.clock.advance(3600)
    b = await submit_id(h, email="bob@example.org", phone="+1 (555) 010-2000", subject="Where is my parcel?",
                        message="Tracking says delivered but nothing here.")
    h.clock.advance(3600)
    c = await submit_id(h, email="carol@example.org", subject="Pricing", message="Do you have charity pricing?",
                        website="filled by a bot")
    assert (await patch(h, b, {"assigned_to": "agent-7"})).status == 200

    async def ids(**params: Any) -> list[str]:
        resp = await h.client.get("/v1/contact", params=params, headers=h.admin)
        assert resp.status == 200, await resp.text()
        return [s["id"] for s in (await resp.json())["submissions"]]

    assert await ids() == [c, b, a]  # newest first
    assert await ids(status="NEW") == [a]
    assert await ids(status="NEW,SPAM") == [c, a]
    assert await ids(status="SPAM") == [c]
    assert await ids(assigned_to="agent-7") == [b]
    assert await ids(assigned_to="none") == [c, a]
    start = dt.datetime.fromtimestamp(h.clock.now - 5400, dt.UTC).isoformat()
    assert await ids(start=start) == [c, b]
    end = dt.datetime.fromtimestamp(h.clock.now - 1800, dt.UTC).isoformat().replace("+00:00", "Z")
    assert await ids(start=start, end=end) == [b]
    assert await ids(q="INVOICE") == [a]
    assert await ids(q="charity") == [c]
    assert await ids(q="bob@example.org") == [b]
    assert await ids(email="Carol@example.org") == [c]
    assert await ids(phone="+15550102000") == [b]
    bad = await h.client.get("/v1/contact", params={"status": "OPEN"}, headers=h.admin)
    assert bad.status == 400 and "status" in (await bad.json())["error"]["message"]
    bad = await h.client.get("/v1/contact", params={"start": "yesterday"}, headers=h.admin)
    assert bad.status == 400


async def test_list_pages_with_a_cursor(make_contact: Any) -> None:
    h = await make_contact(contact={"rate_limits": {"per_ip": 50, "per_email": 50, "hard_per_ip": 60}})
    made = []
    for i in range(5):
        made.append(await submit_id(h, email=f"u{i}@example.org", message=f"Question {i} " + "about x " * i))
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = await (await h.client.get("/v1/contact", params=params, headers=h.admin)).json()
        seen.extend(s["id"] for s in page["submissions"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))
    bad = await h.client.get("/v1/contact", params={"cursor": "garbage"}, headers=h.admin)
    assert bad.status == 400


async def test_status_moves_new_in_progress_responded_closed_and_reopens(make_contact: Any) -> None:
    h = await make_contact()
    sid = await submit_id(h)
    assigned = await (await patch(h, sid, {"assigned_to": "agent-1"})).json()
    assert assigned["status"] == "IN_PROGRESS" and assigned["assigned_to"] == "agent-1"
    responded = await (await patch(h, sid, {"status": "RESPONDED"})).json()
    assert responded["status"] == "RESPONDED" and responded["responded_at"] is not None
    assert (await (await patch(h, sid, {"status": "CLOSED"})).json())["status"] == "CLOSED"
    illegal = await patch(h, sid, {"status": "RESPONDED"})
    assert illegal.status == 409
    assert "CLOSED" in (await illegal.json())["error"]["message"]
    assert (await (await patch(h, sid, {"status": "in_progress"})).json())["status"] == "IN_PROGRESS"
    unassigned = await (await patch(h, sid, {"assigned_to": None})).json()
    assert unassigned["assigned_to"] is None and unassigned["status"] == "IN_PROGRESS"
    audit = await h.client.app[appkeys.STORAGE].query(
        "SELECT action, actor, details FROM audit_log WHERE target = {t:String} ORDER BY at", {"t": sid})
    assert [r["action"] for r in audit] == ["contact.update"] * 5
    assert audit[0]["actor"] == "support-admin"


async def test_patch_rejects_unknown_fields_bad_values_and_unknown_ids(make_contact: Any) -> None:
    h = await make_contact()
    sid = await submit_id(h)
    assert (await patch(h, sid, {"colour": "red"})).status == 400
    assert (await patch(h, sid, {"status": "DONE"})).status == 400
    assert (await patch(h, sid, {"assigned_to": ""})).status == 400
    assert (await patch(h, sid, {"spam": False})).status == 409  # not spam: nothing to rescue
    missing = await h.client.patch("/v1/contact/00000000-0000-0000-0000-000000000000", json={"status": "CLOSED"},
                                   headers=h.admin)
    assert missing.status == 404
    assert (await h.client.get("/v1/contact/not-a-uuid", headers=h.admin)).status == 404


async def test_marking_spam_and_rescuing_publishes_the_event_after_all(make_contact: Any) -> None:
    h = await make_contact(contact={"admin_recipients": ["support-lead"]})
    ham = await submit_id(h)
    spam = await submit_id(h, email="promo@yopmail.com", message="Cheap SEO services, first page of Google! "
                           "https://bit.ly/seo")
    assert [e["id"] for e in h.events] == [ham]
    marked = await (await patch(h, ham, {"spam": True})).json()
    assert marked["status"] == "SPAM"
    rescued = await (await patch(h, spam, {"spam": False})).json()
    assert rescued["status"] == "NEW"
    assert [e["id"] for e in h.events] == [ham, spam]
    event = h.events[-1]
    assert event["rescued"] is True and event["email"] == "promo@yopmail.com"
    assert event["admins"] == ["support-lead"]


async def test_rescue_publishes_nothing_when_configured_so(make_contact: Any) -> None:
    h = await make_contact(contact={"publish_on_rescue": False})
    sid = await submit_id(h, website="bot")
    assert (await (await patch(h, sid, {"status": "NEW"})).json())["status"] == "NEW"
    assert h.events == []


async def test_erase_by_email_removes_submissions_attachments_and_counters(make_contact: Any) -> None:
    h = await make_contact(contact={"rate_limits": {"per_email": 1}})
    png = base64.b64encode(PNG_BYTES).decode()
    mine = [await submit_id(h, email="erase.me@example.org", message="first",
                            attachments=[{"filename": "a.png", "content_type": "image/png", "content": png}]),
            await submit_id(h, email="ERASE.ME@example.org", message="second")]
    other = await submit_id(h, email="keep.me@example.org", message="third")
    erased = await h.service.erase_by_email("Erase.Me@EXAMPLE.org")
    assert erased == 2
    storage = h.client.app[appkeys.STORAGE]
    rows = await storage.query("SELECT toString(id) AS id FROM contact_submissions")
    assert [r["id"] for r in rows] == [other]
    files = await storage.query("SELECT count() AS n FROM contact_attachments WHERE submission_id IN "
                                "{ids:Array(String)}", {"ids": mine})
    assert files[0]["n"] == 0
    for sid in mine:
        assert (await h.client.get(f"/v1/contact/{sid}", headers=h.admin)).status == 404
    # The per-email counter is gone too: a new message is not "too many from this address".
    again = await h.stored(await submit_id(h, email="erase.me@example.org", message="fourth"))
    assert "rate_email" not in {s["name"] for s in again["spam_signals"]}
    assert await h.service.erase_by_email("nobody@example.org") == 0
