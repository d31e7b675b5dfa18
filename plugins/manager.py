"""The plugin manager: built-ins and third-party plugins, loaded the same way.

Built-in plugins are modules listed in :data:`DEFAULT_PLUGINS`; third-party
plugins are the ``logferry`` entry-point group. Both are registered with one
``pluggy.PluginManager`` and can be blocked by name from
``collector.plugins.block``. A plugin that cannot be imported, implements a
hook that does not exist or registers something malformed stops start-up
with a :class:`PluginLoadError` that names it.

The registries (steps, channels, email providers, spam classifiers, template
filters) are collected once, on first use, by calling each plugin's
``logferry_register_*`` hook with a ``register`` callback, so every entry
knows which plugin it came from.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import pluggy

from plugins import hookspecs

log = logging.getLogger("logferry.plugins")

ENTRY_POINT_GROUP = "logferry"

#: Modules registered as built-in plugins, exactly as a third party's would
#: be. Each feature adds its own module here, one line each.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.builtin.webhook",
    "plugins.builtin.log_record",
    "plugins.builtin.query_logs",
    "plugins.builtin.filters",
    "collector.email.providers.smtp",
    "collector.email.providers.resend",
    "collector.email.providers.mailgun",
    "collector.email.step",
    "collector.notifications.channels.email",
    "collector.notifications.channels.sms",
    "collector.notifications.channels.push",
    "collector.notifications.channels.in_app",
    "collector.notifications.channels.notify",
    "collector.notifications.channels.digest",
    "collector.contact.classifiers",
)


class PluginLoadError(RuntimeError):
    """A plugin could not be loaded or registered something malformed.

    ``str(error)`` is a sentence naming the plugin, fit to print at start-up.
    """

    def __init__(self, plugin: str, reason: str):
        self.plugin = plugin
        self.reason = reason
        super().__init__(f"plugin {plugin!r}: {reason}")


class PluginInfo(msgspec.Struct, frozen=True):
    """One loaded plugin, as ``pipelines check`` and ``/metrics`` describe it."""

    name: str
    module: str
    builtin: bool
    version: str | None = None
    hooks: tuple[str, ...] = ()


class Registered(msgspec.Struct, frozen=True):
    """A registry entry and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str


# What each register_* hook's entries must provide (attribute names).
_REQUIRED_ATTRS: dict[str, tuple[str, ...]] = {
    "steps": ("name", "Options", "run", "describe"),
    "channels": ("name", "Options", "create"),
    "email_providers": ("name", "Options", "create"),
    "spam_classifiers": ("name", "classify"),
}


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


class LogferryPluginManager:
    """A typed face over ``pluggy.PluginManager`` with one method per use.

    Build one with :func:`build_plugin_manager` (or call :meth:`load`); the
    collector keeps it under ``app[collector.appkeys.PLUGINS]``.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("logferry")
        self.pm.add_hookspecs(hookspecs)
        self._info: dict[str, PluginInfo] = {}
        self._registries: dict[str, dict[str, Registered]] = {}
        self._filters: dict[str, Registered] | None = None
        self.blocked: list[str] = []
        self.observer_failures = 0

    # --- loading ----------------------------------------------------------

    def load(
        self,
        *,
        block: Iterable[str] = (),
        default_plugins: Iterable[str] = DEFAULT_PLUGINS,
        entry_points: bool = True,
        extra: Iterable[tuple[str, object]] = (),
    ) -> LogferryPluginManager:
        """Register the built-ins, then the entry-point plugins, then ``extra``
        ``(name, plugin)`` pairs (tests use these), skipping blocked names.

        A built-in is blocked by its module path or last component
        (``plugins.builtin.webhook`` or ``webhook``); an entry-point plugin by
        its entry-point name or its distribution's name. Validates every hook
        implementation and the registries before returning.
        """
        blocked = set(block)
        matched: set[str] = set()

        def is_blocked(*names: str | None) -> bool:
            hit = {n for n in names if n and n in blocked}
            matched.update(hit)
            return bool(hit)

        for module_name in default_plugins:
            if is_blocked(module_name, _short(module_name)):
                self.blocked.append(module_name)
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                raise PluginLoadError(module_name, f"built-in plugin failed to import: {exc!r}") from exc
            self._register(module_name, module, module=module_name, builtin=True)

        if entry_points:
            for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                dist = ep.dist.name if ep.dist is not None else None
                if is_blocked(ep.name, dist):
                    self.blocked.append(ep.name)
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginLoadError(
                        ep.name, f"entry point `{ep.name} = {ep.value}` failed to load: {exc!r}"
                    ) from exc
                version = ep.dist.version if ep.dist is not None else None
                self._register(ep.name, plugin, module=ep.value, builtin=False, version=version)

        for name, plugin in extra:
            if is_blocked(name):
                self.blocked.append(name)
                continue
            self._register(name, plugin, module=getattr(plugin, "__name__", repr(plugin)), builtin=False)

        for name in sorted(blocked - matched):
            log.warning("blocked plugin %r is not installed", name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(self._name_of(exc.plugin), str(exc)) from exc
        # Collect the registries now, so a malformed registration fails start-up.
        for kind in _REQUIRED_ATTRS:
            self._registry(kind)
        self.template_filters()
        return self

    def _register(self, name: str, plugin: object, *, module: str, builtin: bool,
                  version: str | None = None) -> None:
        if name in self._info:
            raise PluginLoadError(name, f"a plugin named {name!r} is already registered "
                                        f"(from {self._info[name].module})")
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginLoadError(name, f"invalid hook implementation: {exc}") from exc
        hooks = tuple(sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or ()))
        self._info[name] = PluginInfo(name=name, module=module, builtin=builtin, version=version, hooks=hooks)
        self._registries.clear()
        self._filters = None

    def _name_of(self, plugin: object) -> str:
        return self.pm.get_name(plugin) or repr(plugin)

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin, built-ins first."""
        return sorted(self._info.values(), key=lambda p: (not p.builtin, p.name))

    # --- registries ---------------------------------------------------------

    def _impls(self, hook_name: str) -> list[Any]:
        # pluggy calls the last registered first; registries keep load order
        # instead so a later plugin's duplicate name is the one reported.
        return list(getattr(self.pm.hook, hook_name).get_hookimpls())

    def _registry(self, kind: str) -> dict[str, Registered]:
        found = self._registries.get(kind)
        if found is not None:
            return found
        found = {}
        required = _REQUIRED_ATTRS[kind]
        for impl in self._impls(f"logferry_register_{kind}"):
            plugin_name = impl.plugin_name
            entries: list[Any] = []
            try:
                impl.function(register=entries.append)
            except Exception as exc:
                raise PluginLoadError(plugin_name, f"logferry_register_{kind} raised {exc!r}") from exc
            for entry in entries:
                obj: Any = entry() if inspect.isclass(entry) else entry
                missing = [attr for attr in required if not hasattr(obj, attr)]
                if missing:
                    what = kind[:-1].replace("_", " ")
                    raise PluginLoadError(plugin_name, f"registered {what} {obj!r} lacks {', '.join(missing)}")
                options = getattr(obj, "Options", None)
                if options is not None and not (inspect.isclass(options)
                                                and issubclass(options, msgspec.Struct)):
                    raise PluginLoadError(plugin_name, f"{obj.name!r}: Options must be a msgspec.Struct")
                name = obj.name
                if not isinstance(name, str) or not name:
                    raise PluginLoadError(plugin_name, f"registered {kind} entry {obj!r} has no name")
                if name in found:
                    raise PluginLoadError(
                        plugin_name, f"{kind[:-1].replace('_', ' ')} {name!r} is already registered by "
                                     f"plugin {found[name].plugin!r}"
                    )
                found[name] = Registered(name=name, obj=obj, plugin=plugin_name)
        self._registries[kind] = found
        return found

    def steps(self) -> dict[str, Registered]:
        """Pipeline step types by ``type:`` name (``StepType`` objects in ``.obj``)."""
        return self._registry("steps")

    def channels(self) -> dict[str, Registered]:
        """Notification channels by name (``ChannelType`` objects)."""
        return self._registry("channels")

    def email_providers(self) -> dict[str, Registered]:
        """Email providers by ``type:`` name (``EmailProviderType`` objects)."""
        return self._registry("email_providers")

    def spam_classifiers(self) -> dict[str, Registered]:
        """Contact-form spam classifiers by name (``SpamClassifier`` objects)."""
        return self._registry("spam_classifiers")

    def template_filters(self) -> dict[str, Callable[..., Any]]:
        """Jinja2 filters by name, for pipeline templates and email templates."""
        if self._filters is None:
            found: dict[str, Registered] = {}
            for impl in self._impls("logferry_register_template_filters"):
                pairs: list[tuple[str, Callable[..., Any]]] = []
                try:
                    impl.function(register=lambda name, fn, _pairs=pairs: _pairs.append((name, fn)))
                except Exception as exc:
                    raise PluginLoadError(impl.plugin_name,
                                          f"logferry_register_template_filters raised {exc!r}") from exc
                for name, fn in pairs:
                    if not callable(fn):
                        raise PluginLoadError(impl.plugin_name, f"template filter {name!r} is not callable")
                    if name in found:
                        raise PluginLoadError(impl.plugin_name, f"template filter {name!r} is already "
                                              f"registered by plugin {found[name].plugin!r}")
                    found[name] = Registered(name=name, obj=fn, plugin=impl.plugin_name)
            self._filters = found
        return {name: r.obj for name, r in self._filters.items()}

    # --- calling hooks --------------------------------------------------------

    def has_impls(self, hook_name: str) -> bool:
        return bool(self._impls(hook_name))

    async def call(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of a hook (keyword arguments only) and
        await the results that are awaitable; exceptions propagate."""
        results = getattr(self.pm.hook, hook_name)(**kwargs)
        return [await r if inspect.isawaitable(r) else r for r in results]

    async def first(self, hook_name: str, **kwargs: Any) -> Any:
        """Call implementations in pluggy's order until one returns (or, if
        async, resolves to) something other than ``None``; return it.

        pluggy's own ``firstresult`` would stop at the first coroutine, even
        one that resolves to ``None``; this awaits each in turn.
        """
        for impl in reversed(self._impls(hook_name)):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                continue
            result = impl.function(*(kwargs[name] for name in impl.argnames))
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observing hook: every implementation runs even if another
        fails; failures are logged (with the plugin's name) and counted."""
        for impl in reversed(self._impls(hook_name)):
            try:
                result = impl.function(*(kwargs[name] for name in impl.argnames))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.observer_failures += 1
                log.exception("plugin %r failed in %s", impl.plugin_name, hook_name)


def build_plugin_manager(
    *,
    block: Iterable[str] = (),
    entry_points: bool = True,
    default_plugins: Iterable[str] = DEFAULT_PLUGINS,
    extra: Iterable[tuple[str, object]] = (),
) -> LogferryPluginManager:
    """A loaded manager; raises :class:`PluginLoadError` naming a broken plugin."""
    return LogferryPluginManager().load(
        block=block, entry_points=entry_points, default_plugins=default_plugins, extra=extra
    )

