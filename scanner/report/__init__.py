"""Report renderers. They read only the result model (scanner/findings.py), never the engine.

- JSON  (`render_json`, schema "shapscan-report/1", rules/schemas/report.schema.json)
- SARIF (`render_sarif`, SARIF 2.1.0 for code-scanning dashboards)
- HTML  (`render_html`, one self-contained page per model for a reviewer)
"""

from __future__ import annotations

from pathlib import Path

from ..files import write_atomic
from .html import render_html
from .json_report import SCHEMA_ID, render_json, report_dict, to_dict
from .sarif import render_sarif, sarif_dict

__all__ = ["SCHEMA_ID", "render_html", "render_json", "render_sarif", "report_dict",
           "sarif_dict", "to_dict", "write_report"]


def write_report(path: str | Path, text: str) -> Path:
    """Write a report atomically (scanner.files.write_atomic), UTF-8."""
    return write_atomic(path, text.encode("utf-8"))
