"""``fabric dlq list | show | replay | purge``: dead letters, their errors, and sending them back."""

from __future__ import annotations

__all__: list[str] = []
