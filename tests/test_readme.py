"""The README's commands work: every `shapscan ...` line parses against the real command
line, and (slow) its Python example runs as printed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from scanner.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str | None = None) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [body for tag, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S)
            if lang is None or tag == lang]


def _commands() -> list[str]:
    found = []
    for block in _blocks():
        for line in block.splitlines():
            m = re.match(r"\s*(entry:\s*)?(shapscan\s.*)$", line)
            if m:
                command = m[2].split(" #", 1)[0].strip()
                # pre-commit's entry gets the staged files appended
                found.append(command + " staged.onnx" if m[1] else command)
    return found


def test_the_readme_shows_commands() -> None:
    commands = _commands()
    assert len(commands) >= 8
    assert "shapscan rules SS302" in " ".join(_commands() + [README.read_text()])


@pytest.mark.parametrize("line", _commands())
def test_every_readme_command_line_parses(line: str) -> None:
    """Subcommand, options and their values as click reads them (files need not exist)."""
    name, *rest = shlex.split(line)[1:]
    ctx = click.Context(cli, info_name="shapscan")
    command = cli.get_command(ctx, name)
    assert command is not None, f"no subcommand {name!r} in: {line}"
    try:
        command.make_context(name, rest, parent=ctx)
    except click.UsageError as exc:
        pytest.fail(f"{line}: {exc.format_message()}")


def test_the_readme_rules_command_explains_ss302(capsys: pytest.CaptureFixture[str]) -> None:
    from scanner.cli import main

    assert "`shapscan rules SS302`" in README.read_text(encoding="utf-8")
    assert main(["rules", "SS302"]) == 0
    assert capsys.readouterr().out.startswith("SS302 repair-target-not-reached\n")


@pytest.mark.slow
def test_the_python_example_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    [example] = [b for b in _blocks("python") if "from scanner.api import" in b]
    (tmp_path / "samples").symlink_to(README.parent / "samples")
    monkeypatch.chdir(tmp_path)  # it writes safe.onnx in the working directory
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "backdoor [0]" and out[-1] == "1"
    assert any(line.startswith("CRITICAL SS201 backdoor towards class 0") for line in out)
    result = namespace["result"]
    # a repair that reached its target is written to out=; one that did not says why not
    written = (tmp_path / "safe.onnx").is_file()
    assert written == (result.repair.output_path is not None)  # type: ignore[attr-defined]
