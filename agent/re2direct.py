"""RE2's compiled object, called below the ``google-re2`` binding's Python
layer: its ``search`` wraps every call in a generator, a Match object and
offset conversions, microseconds a call, more than the scan of a line.
``UNANCHORED`` is ``None`` when the binding lacks what this relies on; callers
then use ``search``."""

from __future__ import annotations

from typing import Any

import re2

UNANCHORED: Any = getattr(getattr(getattr(getattr(re2, "_re2", None), "RE2", None), "Anchor", None),
                          "UNANCHORED", None)
