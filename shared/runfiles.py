"""The files a run leaves in its output folder, written and read in one place.

Every writer is atomic (write to a temporary file beside the target, fsync it, rename it over the
target, fsync the folder), so a reader, or a server restarted after a crash, never sees half a file.
Readers are tolerant of a file that is still being appended to (``metrics.jsonl``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

ENDPOINT_JSON = "endpoint.json"  # where a server listens (port 0 resolved) and its run id
METRICS_JSONL = "metrics.jsonl"  # one JSON line per round or server-side step, appended
SUMMARY_JSON = "summary.json"  # the run's results, written once at the end


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", permissions: int = 0o666) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` durably when the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was. ``permissions``
    are filtered by the umask, as with a plain ``open()`` (0o600 for secrets).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (NaN or Inf raise ValueError: other JSON readers refuse them), pretty-printed,
    keys sorted, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_write(path) as f:
        f.write(text)


def read_json(path: Path) -> Any | None:
    """The JSON content of ``path``, or None when it does not exist or is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_events(path: Path) -> list[dict]:
    """Every complete line of a ``metrics.jsonl``; a last line still being written is left out."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now
    return events


def round_events(path: Path) -> list[dict]:
    """The per-round lines of a ``metrics.jsonl``."""
    return [e for e in read_events(path) if e.get("event") == "round"]


class EndpointTimeout(TimeoutError):
    pass


def wait_for_endpoint(out_dir: Path, timeout: float, processes: Sequence[subprocess.Popen] = (),
                      poll_seconds: float = 0.02) -> dict:
    """Wait until the server writing to ``out_dir`` announces where it listens; return endpoint.json.

    Fails early (RuntimeError) when one of ``processes`` (the server) exits before that.
    """
    path = Path(out_dir) / ENDPOINT_JSON
    deadline = time.monotonic() + timeout
    while True:
        endpoint = read_json(path)
        if endpoint is not None:
            return endpoint
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} exited "
                                   f"with code {proc.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise EndpointTimeout(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(poll_seconds)
