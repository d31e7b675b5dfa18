"""The spam signals, one behaviour each (pure domain code, no app)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.configfile import convert
from collector.contact.config import ContactConfig
from collector.contact.spam import (
    FormTiming,
    Observations,
    RecentActivity,
    SpamRules,
    behaviour_signals,
    content_fingerprint,
    content_signals,
    decide,
    deobfuscate,
    find_links,
    issue_form_token,
    read_form_token,
)
from tests.contact.conftest import FakeClock

KEY = b"k" * 32


def rules(**contact: Any) -> SpamRules:
    return SpamRules.from_config(convert(contact, ContactConfig))


def names(signals: list[Any]) -> dict[str, float]:
    return {s.name: s.score for s in signals}


def content(message: str, **fields: Any) -> dict[str, float]:
    sub = {"name": "Jo", "email": "jo@example.org", "subject": "", "message": message, **fields}
    return names(content_signals(sub, rules()))


# --- form token and timing ----------------------------------------------------------------


def test_form_token_reports_the_seconds_between_serving_and_posting() -> None:
    token = issue_form_token(KEY, 1000.0)
    timing = read_form_token(KEY, token, 1012.5, 86400)
    assert timing.state == "ok"
    assert timing.elapsed == pytest.approx(12.5)


def test_form_token_signed_with_another_key_is_invalid() -> None:
    token = issue_form_token(b"x" * 32, 1000.0)
    assert read_form_token(KEY, token, 1010.0, 86400).state == "invalid"


def test_tampered_or_garbage_form_tokens_are_invalid() -> None:
    token = issue_form_token(KEY, 1000.0)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert read_form_token(KEY, flipped, 1010.0, 86400).state == "invalid"
    assert read_form_token(KEY, "not a token!", 1010.0, 86400).state == "invalid"
    assert read_form_token(KEY, None, 1010.0, 86400).state == "missing"


def test_form_token_from_the_future_is_invalid_and_an_old_one_expired() -> None:
    assert read_form_token(KEY, issue_form_token(KEY, 2000.0), 1000.0, 86400).state == "invalid"
    assert read_form_token(KEY, issue_form_token(KEY, 0.0), 90000.0, 86400).state == "expired"


def test_honeypot_alone_is_spam() -> None:
    signals = behaviour_signals(Observations(honeypot_filled=True, form=FormTiming("ok", 30)), rules())
    verdict = decide(signals, 4.0)
    assert verdict.is_spam
    assert "honeypot" in names(signals)
    assert "'website'" in next(s.detail for s in signals if s.name == "honeypot")


def test_posting_faster_than_a_human_scores_and_human_pace_lowers_the_score() -> None:
    fast = names(behaviour_signals(Observations(form=FormTiming("ok", 0.8)), rules()))
    slow = names(behaviour_signals(Observations(form=FormTiming("ok", 45)), rules()))
    assert fast == {"too_fast": 4.0}
    assert slow == {"human_pace": -1.0}


def test_min_time_to_submit_is_configurable() -> None:
    r = rules(spam={"min_time_to_submit": "10s"})
    assert "too_fast" in names(behaviour_signals(Observations(form=FormTiming("ok", 8)), r))


def test_missing_and_forged_tokens_score_differently() -> None:
    missing = names(behaviour_signals(Observations(form=FormTiming("missing")), rules()))
    forged = names(behaviour_signals(Observations(form=FormTiming("invalid")), rules()))
    assert missing == {"form_token_missing": 1.0}
    assert forged == {"form_token_invalid": 3.0}


# --- rates and repeats --------------------------------------------------------------------


def test_rate_signals_start_after_the_configured_counts_and_grow() -> None:
    r = rules(rate_limits={"per_ip": 3, "per_email": 2})
    ok = names(behaviour_signals(Observations(form=FormTiming("ok", 30), ip_count=3, email_count=2), r))
    over = names(behaviour_signals(Observations(form=FormTiming("ok", 30), ip_count=5, email_count=4), r))
    assert "rate_ip" not in ok and "rate_email" not in ok
    assert over["rate_ip"] == 3.0 and over["rate_email"] == 3.0


def test_repeated_identical_content_scores_more_each_time() -> None:
    once = names(behaviour_signals(Observations(form=FormTiming("ok", 30), duplicates=1), rules()))
    often = names(behaviour_signals(Observations(form=FormTiming("ok", 30), duplicates=4), rules()))
    assert 0 < once["duplicate_content"] < often["duplicate_content"]


def test_content_fingerprint_ignores_case_spacing_and_numbers() -> None:
    assert content_fingerprint("Hello  World 1\n") == content_fingerprint("hello world 27")
    assert content_fingerprint("Hello world") != content_fingerprint("Goodbye world")


def test_recent_activity_forgets_after_the_window_and_stays_bounded() -> None:
    clock = FakeClock(1000.0)
    activity = RecentActivity(60, clock=clock, max_keys=2, max_per_key=5)
    for _ in range(8):
        activity.record("a")
    assert activity.count("a") == 5  # saturates at max_per_key
    clock.advance(61)
    assert activity.count("a") == 0
    activity.record("b")
    activity.record("c")
    activity.record("d")
    assert len(activity) == 2 and activity.count("b") == 0


def test_recent_activity_retry_after_is_when_the_oldest_entry_expires() -> None:
    clock = FakeClock(1000.0)
    activity = RecentActivity(60, clock=clock)
    activity.record("ip")
    clock.advance(20)
    assert activity.retry_after("ip") == pytest.approx(40)


# --- content -------------------------------------------------------------------------------


def test_a_plain_customer_question_has_no_signals() -> None:
    assert content("Hi, my order #4821 arrived damaged. Can you send a replacement? Thanks, Jo") == {}


def test_links_count_shorteners_and_abused_tlds() -> None:
    one = content("See the photo at https://imgur.com/a/x7Kp2 - it shows the crack.")
    many = content("http://a.example.com/1 http://b.example.com/2 http://c.example.com/3 and more text here "
                   "to make it long enough for the short-message check")
    short = content("Look at this great offer https://bit.ly/3xYz and https://tinyurl.com/abc for you today ok")
    tld = content("Please visit my page at http://best-offers.xyz/today when you have a minute, thank you")
    assert "links" not in one
    assert many["links"] == 2.5
    assert short["url_shortener"] > 2.5
    assert tld["suspicious_tld"] == 1.0


def test_bare_domains_are_links_but_email_addresses_are_not() -> None:
    assert find_links("visit example.com/page or www.shop.net") == ["example.com/page", "www.shop.net"]
    assert find_links("write to me at jo@example.com please") == []


def test_markup_links_and_links_in_the_name_field() -> None:
    assert "markup_links" in content('<a href="http://x.example.com">cheap</a> is here for you, friend')
    assert "markup_links" in content("[url=http://x.example.com]cheap[/url] hello there friend, visit")
    assert "link_in_name" in content("Hello there", name="Best deals www.deals-today.com")


def test_spam_phrases_are_explained_by_family() -> None:
    signals = content_signals({"message": "Buy viagra and cialis online without prescription", "email": ""},
                              rules())
    phrases = next(s for s in signals if s.name == "spam_phrases")
    assert "pharma" in phrases.detail and "viagra" in phrases.detail and "cialis" in phrases.detail
    assert phrases.score >= 5


def test_configured_phrases_add_their_score() -> None:
    r = rules(spam={"phrases": ["acme gold membership"], "phrase_score": 2.5})
    found = names(content_signals({"message": "Get your ACME Gold Membership today", "email": ""}, r))
    assert found["spam_phrases"] == 2.5


def test_look_alike_letters_are_flagged_and_folded_before_phrase_matching() -> None:
    text = "Buy vіаgrа now"  # Cyrillic і and а inside a Latin word
    assert deobfuscate(text) == "Buy viagra now"
    found = content(text)
    assert "mixed_script_words" in found and "spam_phrases" in found


def test_russian_text_is_not_folded_and_only_scores_as_an_unexpected_script() -> None:
    text = "Здравствуйте! Подскажите, пожалуйста, сколько стоит доставка в Казань?"
    assert deobfuscate(text) == text
    assert set(content(text)) == {"foreign_script"}


def test_expected_scripts_are_configurable() -> None:
    r = rules(spam={"expected_scripts": ["Latin", "Cyrillic"]})
    text = "Здравствуйте! Подскажите, пожалуйста, сколько стоит доставка в Казань?"
    assert names(content_signals({"message": text, "email": ""}, r)) == {}


def test_japanese_counts_as_one_script_when_expected() -> None:
    r = rules(spam={"expected_scripts": ["Latin", "Han"]})
    text = "先日購入したバッグのサイズが合わなかったので返品したいです。"
    assert names(content_signals({"message": text, "email": ""}, r)) == {}


def test_invisible_characters_are_flagged() -> None:
    assert "invisible_characters" in content("Get your f\u200bree gift n\u200bow")


def test_all_caps_needs_enough_letters() -> None:
    assert "all_caps" in content("PLEASE CALL ME BACK ABOUT MY ORDER TODAY")
    assert "all_caps" not in content("OK THANKS")


def test_shouting_punctuation() -> None:
    assert "shouting_punctuation" in content("Amazing!!! Unbelievable!!! Call now")
    assert "shouting_punctuation" not in content("Thank you so much!!")


def test_disposable_email_domains_including_subdomains_and_configured_ones() -> None:
    assert content("hello there", email="x@mailinator.com")["disposable_email"] == 3.0
    assert "disposable_email" in content("hello there", email="x@eu.mailinator.com")
    assert "disposable_email" not in content("hello there", email="x@gmail.com")
    r = rules(spam={"disposable_domains": ["burner.test"]})
    assert "disposable_email" in names(content_signals({"message": "hi", "email": "a@burner.test"}, r))


def test_weights_override_a_signal_by_name() -> None:
    r = rules(spam={"weights": {"disposable_email": 5.0}})
    found = names(content_signals({"message": "hi", "email": "a@yopmail.com"}, r))
    assert found["disposable_email"] == 5.0


def test_unknown_weight_names_are_config_errors() -> None:
    with pytest.raises(Exception, match="unknown signal"):
        rules(spam={"weights": {"no_such_signal": 1.0}})


def test_a_reused_form_token_scores_and_loses_the_human_pace_credit() -> None:
    reused = names(behaviour_signals(Observations(form=FormTiming("ok", 40), token_reuses=2), rules()))
    assert reused == {"form_token_reused": 4.0}
