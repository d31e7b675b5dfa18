"""logferry's plugin system: hook specifications, the manager and the built-ins."""

import pluggy

hookimpl = pluggy.HookimplMarker("logferry")

__all__ = ["hookimpl"]
