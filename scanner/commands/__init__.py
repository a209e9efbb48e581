"""CLI subcommands; importing a module registers its command on scanner.cli.cli."""

from . import evaluate, inspect, rules, scan  # noqa: F401
