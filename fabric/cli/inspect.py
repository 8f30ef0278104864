"""Commands that look without touching: ``streams``, ``groups``, ``consumers``, ``pending``, ``health``."""

from __future__ import annotations

__all__: list[str] = []
