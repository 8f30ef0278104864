"""``python -m fabric`` runs the CLI."""

from fabric.cli import main

main()
