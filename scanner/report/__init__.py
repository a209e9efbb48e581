"""Report renderers. They read only the result model (scanner/findings.py), never the engine.

- JSON  (`render_json`, schema "shapscan-report/1", rules/schemas/report.schema.json)
- SARIF (`render_sarif`, SARIF 2.1.0 for code-scanning dashboards)
- HTML  (`render_html`, one self-contained page per model for a reviewer)
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from .html import render_html
from .json_report import SCHEMA_ID, render_json, report_dict, to_dict
from .sarif import render_sarif, sarif_dict

__all__ = ["SCHEMA_ID", "render_html", "render_json", "render_sarif", "report_dict",
           "sarif_dict", "to_dict", "write_report"]


def write_report(path: str | Path, text: str) -> Path:
    """Write `text` atomically: a temp file in the same folder, then rename, so a reader
    (or a CI artifact upload) never sees a half-written report. Not mkstemp: its files are
    0600, and a report gets the mode the umask gives, like any other file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
