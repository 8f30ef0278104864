"""What the figures were measured on: library versions, the fabric revision, and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import fabric

__all__ = ["machine", "revision", "versions"]

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"redis-py": "redis", "hiredis": "hiredis", "msgspec": "msgspec", "uvloop": "uvloop"}


def versions() -> dict[str, str]:
    """fabric, Python and the client libraries (the Redis server's version is in ``redis``)."""
    found = {"fabric": fabric.__version__, "python": platform.python_version()}
    for name, dist in PACKAGES.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def revision() -> str:
    """The git commit of the work tree, ``+dirty`` when it has uncommitted changes; '' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, kernel."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gb": _memory_gb(), "kernel": platform.release(),
            "system": platform.system(), "arch": platform.machine(), "load_average_at_start": _load()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
