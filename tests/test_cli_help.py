"""Every command's ``--help`` ends with an example of its use."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fabric.cli import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in getattr(group, "commands", {}).items():
        if hasattr(command, "commands"):  # typer vendors its own click: a TyperGroup is not a click.Group
            found += _commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


COMMANDS = _commands(typer.main.get_group(app))


def test_the_cli_has_the_commands_the_readme_lists() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {"publish", "worker", "dev"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_an_example(command: tuple[str, ...]) -> None:
    # When a command's help is asked for
    result = CliRunner().invoke(app, [*command, "--help"])

    # Then it exits 0 and shows at least one example invocation of that command
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.stdout
    examples = result.stdout.split("Examples:", 1)[1]
    assert f"fabric {' '.join(command)}" in examples
