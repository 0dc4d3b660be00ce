"""Logging of every geomgen process: one handler on stderr, as text for people or
as one JSON object per line for a log shipper (``--log-format json``).

A log call that concerns a job passes ``extra={"job_id": ...}``; the JSON
formatter writes every such extra field beside the standard ones, so a shipper
can follow one job across the broker and its workers.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import click

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "text"
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName",
                                                                   "color_message"}  # uvicorn's, with ANSI colours

_current = {"level": DEFAULT_LEVEL, "format": DEFAULT_FORMAT, "role": None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, role, pid,
    message, the record's ``extra=`` fields (``job_id``, ...) and ``exc_info`` as text."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def level_number(level: str | int) -> int:
    """``"info"`` -> logging.INFO (names as --log-level takes them)."""
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    return number


def setup(level: str = DEFAULT_LEVEL, fmt: str = DEFAULT_FORMAT, role: str | None = None,
          stream: TextIO | None = None) -> None:
    """Send every log record of this process to ``stream`` (stderr) at ``level`` in
    ``fmt`` (text or json), replacing any handler set before; warnings go there too."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number(level))
    logging.captureWarnings(True)
    _current.update(level=level, format=fmt, role=role)


def current_format() -> str:
    """The format setup() last chose in this process (text before any setup())."""
    return str(_current["format"])


def child_env() -> dict[str, str]:
    """Environment for the geomgen processes this one starts, so that they log as it does."""
    return {"GEOMGEN_LOG_LEVEL": str(_current["level"]), "GEOMGEN_LOG_FORMAT": str(_current["format"])}


def say(message: str) -> None:
    """A line for the person at the terminal on stderr; a JSON log record instead when
    this process logs JSON, so that a log shipper reading stderr sees only JSON."""
    if json_active():
        logging.getLogger("geomgen.cli").info("%s", message)
    else:
        click.echo(message, err=True)


def error_line(message: str) -> None:
    """Why this process stops, on stderr: the message for a person, or an error
    record when this process logs JSON."""
    if json_active():
        logging.getLogger("geomgen").error("%s", message)
    else:
        print(message, file=sys.stderr, flush=True)


def default_log_dir(role: str) -> Path:
    """A new folder for a run's logs, kept after it: ``$XDG_STATE_HOME/geomgen/logs/ROLE-DATE-TIME-PID``
    (``~/.local/state`` without XDG_STATE_HOME)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "geomgen" / "logs" / f"{role}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def json_active() -> bool:
    """Whether this process logs JSON lines on stderr (so plain lines would break a shipper)."""
    return _current["format"] == "json"


# --- the command-line options ------------------------------------------------------------


def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.meta[f"geomgen.{param.name}"] = value.lower()
    return value


def log_options(fn):
    """``--log-level`` and ``--log-format``, kept in the click context for setup_from_context()."""
    fn = click.option("--log-format", type=click.Choice(FORMATS, case_sensitive=False), default=DEFAULT_FORMAT,
                      show_default=True, expose_value=False, callback=_remember,
                      help="Log lines on stderr: text for people, json (one object per line: time, level, "
                           "logger, role, pid, message, job_id) for a log shipper.")(fn)
    return click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default=DEFAULT_LEVEL,
                        show_default=True, expose_value=False, callback=_remember,
                        help="Least severe log records written to stderr.")(fn)


def setup_from_context(verbose: int = 0, role: str | None = None) -> None:
    """setup() with the current command's --log-level/--log-format; ``-v`` (info) and
    ``-vv`` (debug) only ever lower the level. ``role`` defaults to the command's name."""
    ctx = click.get_current_context(silent=True)
    meta = ctx.meta if ctx is not None else {}
    level = meta.get("geomgen.log_level", DEFAULT_LEVEL)
    if verbose:
        level = min(level, "info" if verbose == 1 else "debug", key=level_number)
    setup(level, meta.get("geomgen.log_format", DEFAULT_FORMAT),
          role or (ctx.info_name if ctx is not None else None))


def chosen(name: str) -> str | None:
    """The current command's ``log_level`` or ``log_format`` as given (None outside a command)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(f"geomgen.{name}")
