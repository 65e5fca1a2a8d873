"""Logging set-up: human-readable lines by default, JSON lines on request; journald-friendly either way.

Under systemd (JOURNAL_STREAM is set when stderr goes to the journal) no timestamp is written, because the
journal stamps every line itself, and text lines start with a syslog priority prefix (`<3>`) so that
`journalctl -p warning` filters them. Extra fields passed with `log.info(..., extra={"event": ...})` become
keys of the JSON object (and are left out of text lines, which say the same in words).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=` and is an event field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC, omitted under journald), level, logger, message, extras."""

    def __init__(self, timestamps: bool = True):
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {}
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            out["ts"] = f"{stamp}.{int(record.msecs):03d}Z"
        out["level"] = record.levelname
        out["logger"] = record.name
        out["message"] = record.getMessage()
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, default=str)


class JournalTextFormatter(logging.Formatter):
    """`<priority>LEVEL logger: message`: the journal reads the prefix as the line's priority and strips it."""

    def __init__(self):
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # A traceback spans lines; the journal takes each line as its own entry, all at this priority.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def make_formatter(fmt: str = "text", journald: bool | None = None) -> logging.Formatter:
    journald = under_journald() if journald is None else journald
    if fmt == "json":
        return JsonFormatter(timestamps=not journald)
    if journald:
        return JournalTextFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Replace the root logger's handlers with one stderr handler in the requested format.

    Python warnings (warnings.warn, numpy's RuntimeWarning on an overflow) go through logging too, as WARNING
    records of the `py.warnings` logger: in the same format as every other line (a JSON object with format
    json, a priority prefix under journald), never as raw lines in between.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    if _strip_warning_newline not in warnings_log.filters:
        warnings_log.addFilter(_strip_warning_newline)


def _strip_warning_newline(record: logging.LogRecord) -> bool:
    # warnings.formatwarning ends its text with a newline: a blank line after every warning in text format.
    if isinstance(record.msg, str):
        record.msg = record.msg.rstrip()
    return True
