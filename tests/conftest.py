"""Shared fixtures: the committed sample zoo and a CLI runner."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from scanner.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
FEWSHOT = SAMPLES / "data" / "fewshot.npz"
TEST_SET = SAMPLES / "data" / "test.npz"


def zoo_entries() -> list[dict]:
    path = SAMPLES / "zoo.json"
    if not path.is_file():
        return []
    return [e for e in json.loads(path.read_text()) if (SAMPLES / e["model"]).is_file()]


def zoo_model(name: str) -> Path:
    path = SAMPLES / "models" / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"zoo model {name} not built")
    return path


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Drive the real entry point; returns exit code and captured stdout/stderr."""

    def _run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return _run
