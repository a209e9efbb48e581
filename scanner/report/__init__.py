"""Report renderers. They read only the result model (scanner/findings.py), never the engine.

- JSON  (`render_json`, schema "shapscan-report/1", rules/schemas/report.schema.json)
- SARIF (`render_sarif`, SARIF 2.1.0 for code-scanning dashboards)
- HTML  (`render_html`, one self-contained page per model for a reviewer)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .html import render_html
from .json_report import SCHEMA_ID, render_json, report_dict, to_dict
from .sarif import render_sarif, sarif_dict

__all__ = ["SCHEMA_ID", "render_html", "render_json", "render_sarif", "report_dict",
           "sarif_dict", "to_dict", "write_report"]


def write_report(path: str | Path, text: str) -> Path:
    """Write `text` atomically: a temp file in the same folder, then rename, so a reader
    (or a CI artifact upload) never sees a half-written report."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
