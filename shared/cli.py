"""Helpers shared by the click CLIs: every option is also settable as GENFL_<OPTION> (containers)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import click


def option(*param_decls: str, **attrs):
    """``click.option`` whose environment variable is GENFL_<LONG_NAME> (dashes -> underscores)."""
    long_names = [d for d in param_decls if d.startswith("--")]
    name = long_names[0].split("/")[0][2:] if long_names else param_decls[-1]
    attrs.setdefault("envvar", "GENFL_" + name.upper().replace("-", "_"))
    attrs.setdefault("show_envvar", True)
    return click.option(*param_decls, **attrs)


log_level_option = option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                          default="info", show_default=True, help="Logging verbosity.")
log_format_option = option("--log-format", type=click.Choice(["text", "json"]), default="text",
                           show_default=True, help="Log line format (json: one object per line).")


# Where a process is in its run (phase, round): stamped onto every log record, so that every line
# logged during a round, from any thread, says which round it belongs to.
LOG_CONTEXT: dict[str, object] = {}
CONTEXT_KEYS = ("phase", "round", "client_id")


def set_log_context(**fields: object) -> None:
    """Update the run position stamped on log records; a value of None removes that field."""
    for key, value in fields.items():
        if value is None:
            LOG_CONTEXT.pop(key, None)
        else:
            LOG_CONTEXT[key] = value


# The same for one thread only, over LOG_CONTEXT: a client host runs one client per thread, each
# in its own phase and round, and their lines must not take each other's.
_THREAD_CONTEXT = threading.local()


def set_thread_log_context(**fields: object) -> None:
    """Like set_log_context, for the records the calling thread logs."""
    context = _THREAD_CONTEXT.__dict__
    for key, value in fields.items():
        if value is None:
            context.pop(key, None)
        else:
            context[key] = value


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (*LOG_CONTEXT.items(), *_THREAD_CONTEXT.__dict__.items()):
            setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, name: str):
        super().__init__(f"%(asctime)s %(levelname)-7s {name} %(context)s%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{key}={getattr(record, key)}" for key in CONTEXT_KEYS if hasattr(record, key)]
        record.context = f"[{' '.join(parts)}] " if parts else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key in CONTEXT_KEYS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text", name: str = "genfl") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(name))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
