"""The shapes plugins register through the ``register_*`` hooks.

These are Protocols: a plugin provides any object (a class, a module, an
instance) with these attributes; nothing to inherit from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import msgspec


class TransientError(Exception):
    """A failure worth retrying (timeouts, 5xx, connection errors)."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure retrying cannot fix (rejected address, 4xx, bad config)."""


@runtime_checkable
class StepContext(Protocol):
    """What a step's ``run`` and ``describe`` receive besides the event and options.

    Built by the pipeline engine for each run of a step (see
    ``pipelines.engine.RunContext``); plugin tests get one from the
    ``step_context`` fixture of ``plugins.testing``.
    """

    #: The collector's ``aiohttp.web.Application``: services live under the
    #: ``AppKey``\\ s of ``collector.appkeys`` (``app[appkeys.STORAGE]``, …).
    #: ``None`` in ``pipelines test`` dry runs outside a collector.
    app: Any
    #: The shared ``aiohttp.ClientSession`` (``None`` in dry runs without an app).
    http: Any
    #: The pipeline's name.
    pipeline: str
    #: The step's ``id`` (its output is ``steps.<id>`` for later steps).
    step_id: str
    #: True in ``pipelines test``: ``describe`` is called instead of ``run``.
    dry_run: bool
    #: A logger named ``logferry.pipelines.<pipeline>``.
    logger: logging.Logger
    #: Identifies this run of the pipeline (also stored in ``pipeline_runs``).
    run_id: str
    #: 1 on the first attempt, then 2, 3, … on retries.
    attempt: int
    #: The template variables of this run: ``event``, ``events``, ``group``,
    #: ``group_key``, ``count``, ``rule``, ``steps``, ``pipeline``, ``now``.
    variables: Mapping[str, Any]

    def render(self, template: str, variables: Mapping[str, Any] | None = None) -> str:
        """Render a Jinja2 template string in the pipelines' sandbox (with every
        registered filter); ``variables`` default to :attr:`variables`."""
        ...


@runtime_checkable
class StepType(Protocol):
    """A pipeline step type: ``type: <name>`` in a pipeline's ``steps``."""

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]]

    async def run(self, event: Mapping[str, Any], options: Any,
                  context: StepContext) -> Mapping[str, Any] | None:
        """Do the step with ``options`` (an instance of ``Options``, every string
        already rendered as a template). The returned mapping is available to
        later steps as ``steps.<step id>``. Raise :class:`TransientError` (or let
        ``TimeoutError`` escape) to be retried; anything else fails the step."""
        ...

    def describe(self, event: Mapping[str, Any], options: Any, context: StepContext) -> str:
        """One line saying what ``run`` would do, for ``pipelines test``. Must not
        send or store anything."""
        ...


class ChannelResult(msgspec.Struct):
    provider_message_id: str | None = None
    metadata: dict[str, Any] | None = None


@runtime_checkable
class ChannelType(Protocol):
    """A notification channel: ``email``, ``sms``, ``push``, ``in_app``, …"""

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]]

    def create(self, options: Any, context: Any) -> Any:
        """A sender with ``async send(message) -> ChannelResult`` and ``async close()``."""
        ...


class ProviderResult(msgspec.Struct):
    provider_message_id: str


@runtime_checkable
class EmailProviderType(Protocol):
    """An email provider: ``smtp``, ``resend``, ``mailgun``, …"""

    name: ClassVar[str]
    Options: ClassVar[type[msgspec.Struct]]

    def create(self, options: Any, context: Any) -> Any:
        """A client with ``async send(email) -> ProviderResult`` and ``async close()``."""
        ...


class SpamSignal(msgspec.Struct):
    """One reason a submission looks like spam (or not: scores may be negative)."""

    name: str
    score: float
    detail: str = ""


@runtime_checkable
class SpamClassifier(Protocol):
    name: ClassVar[str]

    async def classify(self, submission: Mapping[str, Any], context: Any) -> list[SpamSignal]:
        ...
