"""The domain exceptions. Each carries the exit code the CLI maps it to."""

from __future__ import annotations


class ShapscanError(Exception):
    """Base class: a problem the user can act on, shown as one line (no traceback)."""

    exit_code = 2


class DataError(ShapscanError):
    """Few-shot/test data missing, unreadable or of the wrong shape."""

    exit_code = 2


class OutputError(ShapscanError):
    """An output (repaired model, report) could not be written: disk full, permissions."""

    exit_code = 2


class ModelRefused(ShapscanError):
    """The model failed a load or security check and will not be run."""

    exit_code = 2

    def __init__(self, message: str, rule_id: str | None = None, location: str | None = None):
        super().__init__(message)
        self.rule_id = rule_id
        self.location = location


class Inconclusive(ShapscanError):
    """The model is valid but cannot be scanned (nothing to scan, op without gradient rule)."""

    exit_code = 3

    def __init__(self, message: str, rule_id: str | None = None, location: str | None = None):
        super().__init__(message)
        self.rule_id = rule_id
        self.location = location


class UsageError(ShapscanError):
    """Bad flag, bad policy file, unknown rule id."""

    exit_code = 4


class Interrupted(ShapscanError):
    """Ctrl-C during a scan, after what finished was written (a partial report)."""

    exit_code = 130  # 128 + SIGINT, what shells report for a process Ctrl-C stopped


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line: ORT and numpy errors run to several."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def internal_error(exc: BaseException) -> str:
    """How a bug is reported when --debug is off."""
    return (f"internal error: {type(exc).__name__}: {first_line(exc)} "
            "(rerun with --debug for a traceback)")


def out_of_memory(exc: BaseException) -> Inconclusive | None:
    """numpy's MemoryError or a failed onnxruntime allocation, as what it means to a user:
    the model is too large for this machine's memory, which is not a bug."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or "Failed to allocate memory" in text
            or "bad_alloc" in text):
        return None
    return Inconclusive("inconclusive: ran out of memory; the model, its input size or its "
                        "class count is too large for this machine")


class OutOfTime(Exception):
    """A stage reported progress past the scan's deadline (Progress.deadline): raised from
    inside its loop, caught by the stage's caller, which says what was not done."""
