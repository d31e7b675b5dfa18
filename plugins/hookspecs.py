"""Every hook logferry calls, in one place.

Plugins implement these with ``@hookimpl`` (``from plugins import hookimpl``)
and are registered either as built-ins (``plugins.manager.DEFAULT_PLUGINS``)
or through the ``logferry`` entry-point group; both go through the same
manager, so logferry's own steps, channels and providers prove the API.

Hooks are always called with keyword arguments. The ``register_*`` hooks
receive a ``register`` callback (as in simonw/llm): call it once per thing
your plugin provides. Hooks documented as "may be async" may return an
awaitable; the host awaits it.

``docs/plugins.md`` documents each hook; a test fails when one is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("logferry")


# --- registries: called once at start-up ----------------------------------


@hookspec
def logferry_register_steps(register: Callable[[Any], None]) -> None:
    """Register pipeline step types.

    :param register: call ``register(step_type)`` with an object (or a class
        with a no-argument constructor) that has a ``name`` (used as ``type:``
        in a pipeline step), an ``Options`` msgspec Struct validating the step's
        parameters, and ``async run(event, options, context)`` plus
        ``describe(event, options, context) -> str`` for dry runs. See
        ``plugins.types.StepType`` and ``plugins.types.StepContext``.

    Called once, when the manager loads. A name another plugin registered, a
    missing attribute or an exception stops start-up naming this plugin.
    """


@hookspec
def logferry_register_channels(register: Callable[[Any], None]) -> None:
    """Register notification channels (``email``, ``sms``, ``push``, ``in_app``, …).

    :param register: call ``register(channel_type)``; see
        ``plugins.types.ChannelType``: ``name``, ``Options`` Struct (the channel's
        config section ``collector.notifications.channels.<name>``), and
        ``create(options, context)`` returning a sender with
        ``async send(message) -> ChannelResult``. A sender raises
        ``TransientError`` for errors worth retrying and ``PermanentError``
        otherwise.
    """


@hookspec
def logferry_register_email_providers(register: Callable[[Any], None]) -> None:
    """Register email providers (``smtp``, ``resend``, ``mailgun``, …).

    :param register: call ``register(provider_type)``; see
        ``plugins.types.EmailProviderType``: ``name`` (the ``type:`` of an entry
        in ``collector.email.providers``), ``Options`` Struct, and
        ``create(options, context)`` returning a client with
        ``async send(email) -> ProviderResult`` and ``async close()``.
    """


@hookspec
def logferry_register_spam_classifiers(register: Callable[[Any], None]) -> None:
    """Register contact-form spam classifiers.

    :param register: call ``register(classifier)``; see
        ``plugins.types.SpamClassifier``: ``name`` and
        ``async classify(submission, context) -> list[SpamSignal]``. Scores of
        every classifier's signals are added; the configured threshold decides.
    """


@hookspec
def logferry_register_template_filters(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register Jinja2 filters available in pipeline step templates and email templates.

    :param register: call ``register(name, function)``.
    """


# --- lifecycle ---------------------------------------------------------------


@hookspec
def logferry_startup(app: Any) -> Any:
    """The collector app has started and storage is migrated. May be async.

    Take resources here and keep them under an ``AppKey`` of your own. An
    exception stops start-up.

    :param app: the ``aiohttp.web.Application``; typed state lives under the
        ``AppKey``\\ s of ``collector.appkeys``.
    """


@hookspec
def logferry_shutdown(app: Any) -> Any:
    """The collector is stopping; release what ``logferry_startup`` took. May be async.

    Exceptions are logged; every implementation is called.

    :param app: the ``aiohttp.web.Application``.
    """


# --- observing events (fire-and-forget; exceptions are logged, never raised) -


@hookspec
def logferry_logs_stored(records: list[Mapping[str, Any]]) -> Any:
    """A batch of log records was durably stored. May be async.

    Called from a background queue, off the ingest path: ingest never waits
    for it. Exceptions are logged and counted, never raised into ingest.

    :param records: the stored rows, each a mapping with the ApplicationLog
        field names (``timestamp`` a timezone-aware datetime, ``level`` a name).
    """


@hookspec
def logferry_notification_sent(notification: Mapping[str, Any], delivery: Mapping[str, Any]) -> Any:
    """A notification was delivered to one channel. May be async.

    :param notification: the notification's fields.
    :param delivery: the NotificationDelivery's fields (``channel``, ``status``,
        ``provider_message_id``, …).
    """


@hookspec
def logferry_email_event(event: Mapping[str, Any]) -> Any:
    """An email event arrived (delivered, bounced, complained, opened, clicked). May be async.

    :param event: the normalised event: ``type``, ``email_id``, ``provider``,
        ``occurred_at``, ``recipient_hash`` and provider ``raw`` fields.
    """


# --- answering questions -----------------------------------------------------


@hookspec(firstresult=True)
def logferry_resolve_user_address(user_id: str, channel: str) -> Any:
    """Where to reach a user on a channel, when the host application knows better
    than the collector's users directory. First non-None result wins; may be async.

    :param user_id: the notification's recipient.
    :param channel: ``email``, ``sms``, ``push`` or ``in_app``.
    :return: an email address or phone number (``str``), a list of push
        subscriptions, or ``None`` to fall back to the users directory.
    """
