"""The plugin manager: built-ins as plugins, entry points, blocking, broken
plugins that stop start-up with their name, and async hooks."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from plugins import hookimpl
from plugins.manager import DEFAULT_PLUGINS, PluginLoadError, build_plugin_manager


def module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


class EchoOptions(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class EchoStep:
    name = "echo"
    Options = EchoOptions

    async def run(self, event: Any, options: EchoOptions, context: Any) -> dict[str, str]:
        return {"text": options.text}

    def describe(self, event: Any, options: EchoOptions, context: Any) -> str:
        return f"echo {options.text}"


@hookimpl
def logferry_register_steps(register: Any) -> None:
    register(EchoStep)


def test_builtins_are_registered_as_plugins() -> None:
    manager = build_plugin_manager(entry_points=False)
    names = [p.name for p in manager.plugins() if p.builtin]
    assert names == sorted(DEFAULT_PLUGINS)
    steps = manager.steps()
    assert {"webhook", "log", "query_logs"} <= set(steps)
    assert steps["webhook"].plugin == "plugins.builtin.webhook"
    assert {"tojson", "datetime", "duration", "truncate_middle"} <= set(manager.template_filters())


def test_block_by_short_or_full_name_and_unknown_blocks_are_harmless() -> None:
    manager = build_plugin_manager(entry_points=False, block=["webhook", "plugins.builtin.log_record", "nothing"])
    assert "webhook" not in manager.steps() and "log" not in manager.steps()
    assert manager.blocked == ["plugins.builtin.webhook", "plugins.builtin.log_record"]


def test_an_extra_plugin_registers_a_step_class() -> None:
    plugin = module("echo_plugin", logferry_register_steps=logferry_register_steps)
    manager = build_plugin_manager(entry_points=False, extra=[("echo", plugin)])
    assert isinstance(manager.steps()["echo"].obj, EchoStep)
    assert manager.steps()["echo"].plugin == "echo"


def test_a_misspelt_hook_stops_start_up_naming_the_plugin() -> None:
    @hookimpl
    def logferry_register_step(register: Any) -> None:  # one letter short
        pass

    with pytest.raises(PluginLoadError) as info:
        build_plugin_manager(entry_points=False, extra=[("typo", module("typo", logferry_register_step=
                                                                            logferry_register_step))])
    assert info.value.plugin == "typo"
    assert "logferry_register_step" in str(info.value)


def test_a_wrong_hook_argument_stops_start_up() -> None:
    @hookimpl
    def logferry_register_steps(registrar: Any) -> None:
        pass

    with pytest.raises(PluginLoadError) as info:
        build_plugin_manager(entry_points=False, extra=[("badarg", module("badarg",
                                                         logferry_register_steps=logferry_register_steps))])
    assert str(info.value).startswith("plugin 'badarg': invalid hook implementation")
    assert "registrar" in str(info.value)


def test_a_malformed_or_duplicate_registration_stops_start_up() -> None:
    class NoOptions:
        name = "broken"

        async def run(self, event: Any, options: Any, context: Any) -> None: ...

        def describe(self, event: Any, options: Any, context: Any) -> str:
            return ""

    @hookimpl
    def logferry_register_steps(register: Any) -> None:
        register(NoOptions())

    with pytest.raises(PluginLoadError, match=r"plugin 'bad': registered step .* lacks Options"):
        build_plugin_manager(entry_points=False, extra=[("bad", module("bad",
                                                         logferry_register_steps=logferry_register_steps))])

    @hookimpl
    def steals(register: Any) -> None:
        register(EchoStep())

    with pytest.raises(PluginLoadError) as info:
        build_plugin_manager(entry_points=False, extra=[
            ("one", module("one", logferry_register_steps=globals()["logferry_register_steps"])),
            ("two", module("two", logferry_register_steps=steals))])
    assert str(info.value) == "plugin 'two': step 'echo' is already registered by plugin 'one'"


def test_a_register_hook_that_raises_stops_start_up() -> None:
    @hookimpl
    def logferry_register_template_filters(register: Any) -> None:
        raise RuntimeError("no config")

    with pytest.raises(PluginLoadError, match="plugin 'f': logferry_register_template_filters raised"):
        build_plugin_manager(entry_points=False, extra=[("f", module(
            "f", logferry_register_template_filters=logferry_register_template_filters))])


def make_distribution(root: Path, name: str, entry: str) -> None:
    """An installed distribution (its .dist-info) with a `logferry` entry point."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[logferry]\n{entry}\n")


def test_a_broken_entry_point_stops_start_up_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_distribution(tmp_path, "logferry_missing", "missing = logferry_missing_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as info:
        build_plugin_manager()
    assert info.value.plugin == "missing"
    assert "entry point `missing = logferry_missing_module` failed to load: ModuleNotFoundError" in str(info.value)
    # Blocking it by distribution name lets the collector start.
    manager = build_plugin_manager(block=["logferry_missing"])
    assert manager.blocked == ["missing"]


def test_an_entry_point_plugin_loads_with_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "logferry_echo_ep.py").write_text(
        "from plugins import hookimpl\n"
        "from tests.plugins.test_manager import EchoStep\n"
        "@hookimpl\n"
        "def logferry_register_steps(register):\n"
        "    register(EchoStep())\n")
    make_distribution(tmp_path, "logferry_echo_ep", "echo = logferry_echo_ep")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        manager = build_plugin_manager()
        info = next(p for p in manager.plugins() if p.name == "echo")
        assert (info.builtin, info.version, info.hooks) == (False, "1.0", ("logferry_register_steps",))
        assert manager.steps()["echo"].plugin == "echo"
    finally:
        sys.modules.pop("logferry_echo_ep", None)


async def test_async_hooks_are_awaited_and_first_skips_none() -> None:
    calls: list[str] = []

    class Early:
        @hookimpl(tryfirst=True)
        async def logferry_resolve_user_address(self, user_id: str, channel: str) -> None:
            calls.append("early")
            return None

    class Late:
        @hookimpl
        async def logferry_resolve_user_address(self, user_id: str) -> str:
            calls.append("late")
            return f"{user_id}@example.com"

        @hookimpl
        async def logferry_startup(self, app: Any) -> None:
            calls.append(f"startup {app}")

    manager = build_plugin_manager(entry_points=False, extra=[("late", Late()), ("early", Early())])
    assert await manager.first("logferry_resolve_user_address", user_id="u1", channel="email") == "u1@example.com"
    assert calls == ["early", "late"]
    await manager.call("logferry_startup", app="APP")
    assert calls[-1] == "startup APP"


async def test_a_failing_observer_does_not_stop_the_others() -> None:
    seen: list[int] = []

    class Broken:
        @hookimpl
        def logferry_logs_stored(self, records: list[Any]) -> None:
            raise ValueError("bug in a plugin")

    class Fine:
        @hookimpl
        async def logferry_logs_stored(self, records: list[Any]) -> None:
            seen.append(len(records))

    manager = build_plugin_manager(entry_points=False, extra=[("fine", Fine()), ("broken", Broken())])
    await manager.notify("logferry_logs_stored", records=[{}, {}])
    assert seen == [2]
    assert manager.observer_failures == 1
