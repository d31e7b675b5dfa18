"""The built-in spam classifiers, registered through the same hook a third
party's Akismet-style classifier uses (``logferry_register_spam_classifiers``).

- ``behaviour``: how the form was posted (honeypot, form-token timing, rate
  per hashed IP and email, repeated content).
- ``content``: what was written (links, shorteners, spam phrases, scripts,
  capitals, disposable domains).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from collector.contact.spam import ClassifierContext, Observations, behaviour_signals, content_signals
from plugins import hookimpl
from plugins.types import SpamSignal


class BehaviourClassifier:
    name: ClassVar[str] = "behaviour"

    async def classify(self, submission: Mapping[str, Any], context: ClassifierContext) -> list[SpamSignal]:
        observations = submission.get("observations")
        if not isinstance(observations, Observations):
            return []
        return behaviour_signals(observations, context.rules)


class ContentClassifier:
    name: ClassVar[str] = "content"

    async def classify(self, submission: Mapping[str, Any], context: ClassifierContext) -> list[SpamSignal]:
        return content_signals(submission, context.rules)


@hookimpl
def logferry_register_spam_classifiers(register: Callable[[Any], None]) -> None:
    register(BehaviourClassifier())
    register(ContentClassifier())
