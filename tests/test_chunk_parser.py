"""SubmitResult's request parser (genfl_server/chunk_parser.py + request_messages.parse_result_message): a
canonically encoded chunk is read in place, as a view of the received bytes, and every input, valid
or not, canonical or not, means exactly what protobuf says it means."""

from __future__ import annotations

import os

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from genfl_server.chunk_parser import read_chunk_in_place
from genfl_server.request_messages import Unparsable, parse_result_message
from genfl_server.upload import ChunkedUpdate
from genfl_shared.codec import encode_state_dict
from genfl_shared.proto import genfl_pb2 as pb
from wire_strategies import mutated_bytes

pytestmark = pytest.mark.unit


def _chunk_message(index: int, data: bytes) -> bytes:
    return pb.ResultMessage(chunk=pb.Chunk(index=index, data=data)).SerializeToString()


def _meaning(message):
    """What a parsed request says, comparable between the two parsers."""
    if isinstance(message, Unparsable):
        return ("unparsable",)
    kind = message.WhichOneof("kind")
    if kind == "chunk":
        return ("chunk", message.chunk.index, bytes(message.chunk.data))
    if kind == "header":
        return ("header", message.header.SerializeToString(deterministic=True))
    return (kind,)


def _protobuf_meaning(data: bytes):
    try:
        return _meaning(pb.ResultMessage.FromString(data))
    except DecodeError:
        return ("unparsable",)


@pytest.mark.parametrize("index", [0, 1, 127, 128, 16_383, 16_384, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 1 << 20])
def test_a_canonical_chunk_is_read_in_place_with_protobufs_values(index, size):
    data = os.urandom(size)
    raw = _chunk_message(index, data)
    message = read_chunk_in_place(raw)
    assert message is not None and message.WhichOneof("kind") == "chunk"
    assert message.chunk.index == index and bytes(message.chunk.data) == data
    assert message.chunk.data.obj is raw  # a view of the received message, not a copy
    assert _meaning(parse_result_message(raw)) == _protobuf_meaning(raw)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


NON_CANONICAL = {
    # valid protobuf the fast path leaves to protobuf: the result must still be protobuf's
    "data before index": _field(0x12, _field(0x12, b"abcd") + b"\x08\x05"),
    "unknown field in the chunk": _field(0x12, b"\x08\x05" + _field(0x12, b"abcd") + b"\x18\x01"),
    "unknown field after the chunk": _field(0x12, b"\x08\x05" + _field(0x12, b"abcd")) + b"\x18\x01",
    "chunk field twice (merged)": _field(0x12, b"\x08\x05" + _field(0x12, b"ab")) + _field(0x12, _field(0x12, b"cd")),
    "data twice (last wins)": _field(0x12, b"\x08\x05" + _field(0x12, b"ab") + _field(0x12, b"cd")),
    "index wider than 32 bits (truncated)": _field(0x12, b"\x08" + _varint(2**32 + 7) + _field(0x12, b"ab")),
    "header": pb.ResultMessage(header=pb.ResultHeader(task_id="t", client_id="c")).SerializeToString(),
    "empty message": b"",
}
INVALID = {
    "chunk length past the end": b"\x12\x09\x08\x05\x12\x02ab",
    "data length past the end": _field(0x12, b"\x08\x05\x12\x09ab"),
    "truncated index varint": _field(0x12, b"\x08\x85"),
}


@pytest.mark.parametrize("raw", list(NON_CANONICAL.values()), ids=list(NON_CANONICAL))
def test_other_valid_encodings_are_left_to_protobuf(raw):
    assert read_chunk_in_place(raw) is None
    meaning = _meaning(parse_result_message(raw))
    assert meaning == _protobuf_meaning(raw) and meaning != ("unparsable",)


@pytest.mark.parametrize("raw", list(INVALID.values()), ids=list(INVALID))
def test_bytes_that_are_no_message_are_unparsable(raw):
    assert _protobuf_meaning(raw) == ("unparsable",)
    assert isinstance(parse_result_message(raw), Unparsable)


@st.composite
def _wire_bytes(draw) -> bytes:
    seeds = [_chunk_message(draw(st.sampled_from([0, 3, 200, 2**31])), draw(st.binary(max_size=40))),
             *NON_CANONICAL.values()]
    form = draw(st.sampled_from(["as sent", "mutated", "random"]))
    if form == "random":
        return draw(st.binary(max_size=60))
    raw = draw(st.sampled_from(seeds))
    return raw if form == "as sent" else draw(mutated_bytes([raw]))


@given(raw=_wire_bytes())
@settings(max_examples=600, deadline=None, database=None, print_blob=True)
def test_any_bytes_mean_what_protobuf_says(raw):
    assert _meaning(parse_result_message(raw)) == _protobuf_meaning(raw)


def test_an_upload_of_in_place_chunks_is_the_same_update():
    gen = torch.Generator().manual_seed(3)
    template = {"w": torch.randn(300, 70, generator=gen), "b": torch.randn(17, generator=gen).half(),
                "after": torch.randn(2_000, generator=gen), "n": torch.tensor(4)}
    state = {k: v + 1 for k, v in template.items()}
    payload = encode_state_dict(state, chunk_size=4096)
    updates = []
    for in_place in (False, True):
        update = ChunkedUpdate(payload.manifest, template, max_bytes=1 << 24, chunk_size=4096)
        for index, data in enumerate(payload.chunks):
            message = parse_result_message(_chunk_message(index, data)) if in_place else \
                pb.ResultMessage(chunk=pb.Chunk(index=index, data=data))
            assert isinstance(message.chunk.data, memoryview) == in_place
            update.add(message.chunk)
        updates.append(update.finish())
    protobuf, in_place = updates
    assert in_place.distance == protobuf.distance
    assert all(torch.equal(in_place[k], state[k]) and torch.equal(protobuf[k], state[k]) for k in state)
