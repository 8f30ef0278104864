"""Commands over a topic's history: ``tail`` it live, ``replay`` a time range, ``trim`` it now."""

from __future__ import annotations

__all__: list[str] = []
