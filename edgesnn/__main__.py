"""``python -m edgesnn``: the command-line interface."""

from .cli import main

main()
