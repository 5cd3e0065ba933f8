"""The servicer's request messages as plain values: a message whose bytes do not parse arrives as
:class:`Unparsable` (refused by the handler, not with gRPC's traceback), an upload's chunk is read
in place (chunk_parser), and a SubmitResult request stream is read against its upload's clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from genfl_shared.errors import Rejected, RejectReason
from genfl_shared.proto import genfl_pb2 as pb

from .chunk_parser import read_chunk_in_place
from .limits import UploadClock
from .logsafe import shown


@dataclass(frozen=True)
class Unparsable:
    """A request message whose bytes do not parse: what :func:`lenient_parser` hands the handler
    instead of raising, so that the handler refuses it (INVALID_ARGUMENT, "malformed", counted)
    where gRPC itself would log a traceback per message and answer a bare INTERNAL."""

    type_name: str
    error: str


def lenient_parser(message_type):
    """A request deserializer for ``message_type`` that returns :class:`Unparsable` for bytes
    that are not such a message."""
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Unparsable(message_type.DESCRIPTOR.name, str(error))
    return parse


_parse_result_protobuf = lenient_parser(pb.ResultMessage)


def parse_result_message(data: bytes):
    """SubmitResult's request deserializer: an upload's chunk read in place (a view of ``data``,
    chunk_parser) when canonically encoded, as almost all are; else as :func:`lenient_parser`."""
    return read_chunk_in_place(data) or _parse_result_protobuf(data)


def refuse_unparsable(message) -> None:
    if isinstance(message, Unparsable):
        raise Rejected(RejectReason.MALFORMED,
                       f"a message does not parse as {message.type_name}: {shown(message.error)}")


class ResultStream:
    """The request stream of one SubmitResult call, read against the upload's clock."""

    def __init__(self, request_iterator, clock: UploadClock):
        self._messages = request_iterator.__aiter__()
        self.clock = clock
        self.header: pb.ResultHeader | None = None  # once read
        self._peeked: list[pb.ResultMessage | None] = []  # a message read by wait_for_next, not yet taken

    @property
    def client_id(self) -> str:
        return self.header.client_id if self.header is not None else ""

    async def wait_for_next(self) -> None:
        """Wait until the next message has arrived (or the stream ended); ``next`` returns it."""
        if not self._peeked:
            self._peeked.append(await self.next())

    async def next(self) -> pb.ResultMessage | None:
        """The next message (None at the end of the stream). Raises Rejected: ``malformed`` for
        one that does not parse, ``upload_timeout`` once the clock has run out."""
        if self._peeked:
            return self._peeked.pop()
        try:
            async with asyncio.timeout(self.clock.remaining()):
                message = await anext(self._messages, None)
        except TimeoutError:
            raise self.clock.expired() from None
        if message is not None:
            refuse_unparsable(message)
        return message
