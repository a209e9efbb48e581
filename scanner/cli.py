"""Thin click layer. Commands parse flags, call scanner.api, and print; `main` maps domain
errors to exit codes and one-line messages (tracebacks only with --debug)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import click

from . import __version__
from .errors import Interrupted, ShapscanError, UsageError, internal_error, out_of_memory

EXAMPLES = """
\b
Examples:
  shapscan scan vendor.onnx --data few_shot/ --out safe.onnx --html report.html
  shapscan scan vendor.onnx --data-free --fail-on high
  shapscan inspect vendor.onnx
  shapscan eval safe.onnx --data test.npz --attack badnets --target 0
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shapscan")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """shapscan: find and remove backdoors in ONNX models before they ship."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="shapscan: %(levelname)s: %(message)s")


def echo_json(payload: object) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False))


def use_color() -> bool:
    return "NO_COLOR" not in os.environ and sys.stdout.isatty()


from . import commands  # noqa: E402,F401  (registers the subcommands on `cli`)


def _warn_one_line(message: Warning | str, category: type[Warning], filename: str,
                   lineno: int, file: object = None, line: str | None = None) -> None:
    click.echo(f"shapscan: warning: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    with warnings.catch_warnings():
        if not debug:  # our warnings (CUDA fallback) as one line, not Python's file:line
            warnings.showwarning = _warn_one_line
        return _main(argv, debug)


def _main(argv: list[str] | None, debug: bool) -> int:
    try:
        rv = cli.main(args=argv, prog_name="shapscan", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; it is not a refused model (2) but 128 + SIGINT
        if isinstance(exc.__cause__, KeyboardInterrupt):
            click.echo("shapscan: interrupted", err=True)
            return Interrupted.exit_code
        click.echo("shapscan: aborted", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"shapscan: error: {exc.format_message()}", err=True)
        return UsageError.exit_code
    except Interrupted as exc:  # what finished was written; the message says where
        click.echo(f"shapscan: {exc}", err=True)
        return exc.exit_code
    except ShapscanError as exc:
        if debug:
            raise
        click.echo(f"shapscan: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("shapscan: interrupted", err=True)
        return Interrupted.exit_code
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        oom = out_of_memory(exc)
        if oom is not None:
            click.echo(f"shapscan: error: {oom}", err=True)
            return oom.exit_code
        click.echo(f"shapscan: {internal_error(exc)}", err=True)
        return 2
    return rv if isinstance(rv, int) else 0


def run() -> None:
    sys.exit(main())
