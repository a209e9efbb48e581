"""CLI subcommands; importing a module registers its command on scanner.cli.cli."""

from . import evaluate  # noqa: F401
from . import inspect  # noqa: F401
from . import rules  # noqa: F401
