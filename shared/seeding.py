"""Deterministic seeds derived from a run seed, so results do not depend on scheduling order."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that depends only on ``parts`` (e.g. run seed, phase, round, client id)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
