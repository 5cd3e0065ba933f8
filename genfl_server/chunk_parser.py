"""SubmitResult's request parser: weight chunks as views of the received bytes, not as protobuf copies.

An upload is mostly ``ResultMessage{chunk: Chunk{index, data}}`` messages of 1 MiB. Parsed by
protobuf, each chunk's bytes are copied twice more after gRPC hands them over: into the message's
arena, and again into a ``bytes`` on every ``.data`` read. For the canonical encoding that every
protobuf serializer writes (``index`` before ``data``, nothing else) the chunk is read here in place:
``data`` is a memoryview into the message gRPC delivered. Anything else (other field order, unknown
fields, a field repeated, a header) goes to protobuf, so the result is always what protobuf would
give: this is a shortcut, not a second, laxer grammar (``request_messages.parse_result_message`` falls back).
"""

from __future__ import annotations

from typing import NamedTuple

# Tags (field number << 3 | wire type) of the fields the fast path reads.
_RESULT_CHUNK = 0x12  # ResultMessage.chunk = 2, length-delimited
_CHUNK_INDEX = 0x08  # Chunk.index = 1, varint
_CHUNK_DATA = 0x12  # Chunk.data = 2, length-delimited
_UINT32_VARINT_BYTES = 5


class WireChunk(NamedTuple):
    """A ``Chunk`` read in place: ``data`` is a read-only view of the received message."""

    index: int
    data: memoryview


class ChunkMessage:
    """A ``ResultMessage`` holding a chunk, as its consumers read one (``WhichOneof``, ``chunk``)."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: WireChunk):
        self.chunk = chunk

    def WhichOneof(self, group: str) -> str:  # noqa: N802 (protobuf's name)
        if group != "kind":
            raise ValueError(f"ResultMessage has no oneof {group!r}")
        return "chunk"


def _varint(data: bytes, position: int, max_bytes: int) -> tuple[int, int] | None:
    """(value, next position) of the varint at ``position``, or None if it is not a varint of at
    most ``max_bytes`` bytes within ``data``."""
    value = shift = 0
    for _ in range(max_bytes):
        if position >= len(data):
            return None
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
    return None


def read_chunk_in_place(data: bytes) -> ChunkMessage | None:
    """The chunk of ``data`` if it is a canonically encoded ``ResultMessage{chunk}``; else None
    (for protobuf to parse, or to refuse)."""
    if not data or data[0] != _RESULT_CHUNK:
        return None
    field = _varint(data, 1, 10)
    if field is None or field[0] != len(data) - field[1]:
        return None  # the chunk field must be the whole message: one field, nothing after it
    position = field[1]
    index = 0
    if position < len(data) and data[position] == _CHUNK_INDEX:  # absent when index is 0
        read = _varint(data, position + 1, _UINT32_VARINT_BYTES)
        if read is None or read[0] >= 1 << 32:
            return None  # protobuf truncates wider values to 32 bits: left to it
        index, position = read
    if position < len(data):  # else no data field: empty data, as protobuf writes it
        if data[position] != _CHUNK_DATA:
            return None
        size = _varint(data, position + 1, 10)
        if size is None or size[0] != len(data) - size[1]:
            return None
        position = size[1]
    return ChunkMessage(WireChunk(index, memoryview(data)[position:]))

