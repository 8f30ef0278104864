"""The ``fabric`` command: thin verbs that parse, call one library function, and report in one line.

Every command prints a readable table (or line) by default and JSON with ``--json``; errors are one line on
stderr, with an exit code from ``fabric.cli.options.Exit`` (listed in README): 0 done, 1 failed (or unhealthy),
2 bad usage or config, 3 Redis unreachable, 4 credentials or permissions, 5 not found, 6 partly done.
``fabric --debug COMMAND`` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import fabric.cli.demo  # noqa: F401  (adds ``fabric demo`` to ``app``)
import fabric.cli.trace  # noqa: F401  (adds ``fabric trace`` to ``app``)
from fabric.cli import breakers, dlq, history, inspect, run
from fabric.cli.options import app

__all__ = ["app", "main"]

_COMMANDS = (run, inspect, history, dlq, breakers)  # each module adds its commands to ``app`` with ``@app.command``


def main() -> None:
    """Console-script entry point."""
    app()
