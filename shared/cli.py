"""Helpers shared by the click CLIs: every option is also settable as GENFL_<OPTION> (containers)."""

from __future__ import annotations

import json
import logging
import sys
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key in ("phase", "round", "client_id"):
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
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s {name} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
