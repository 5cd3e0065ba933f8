"""The one codec for model weights: state_dict <-> (manifest, chunks).

Wire format: the tensors' raw little-endian bytes, concatenated in manifest order, with a manifest
of (name, dtype, shape) per tensor and the SHA-256 of the concatenation, cut into chunks of at most
``CHUNK_SIZE`` bytes. No pickle anywhere: decoding only ever interprets bytes as numbers of a dtype
from a fixed allow-list, so a hostile peer can at worst send wrong numbers, which the server's
validation catches.

Encoding copies every byte once, straight from tensor memory into its chunk; decoding writes chunks into one preallocated buffer and returns tensors that are views of
it, so a decoded model costs its own size in memory and nothing more.

Every receiver of a payload is a ``ChunkReceiver``, which makes all the checks of the manifest and
of the chunks; its subclasses only say what to keep of a checked chunk: ``PayloadAssembler`` copies
it into that buffer, the server's upload receiver keeps the received bytes themselves.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
import torch

from genfl_shared.proto import genfl_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("genfl's wire format is little-endian raw bytes; this host is big-endian")

from genfl_shared.wire import CHUNK_SIZE, MAX_MESSAGE_BYTES  # noqa: F401 (re-exported)

# Channel/server options both sides share: the message limit, and keepalive pings so that a dead
# peer is noticed within half a minute even while a long poll is idle.
TRANSPORT_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

# The only dtypes that may cross the wire. Anything else in a manifest is rejected before a byte
# of payload is interpreted.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CodecError(ValueError):
    """A payload that cannot be decoded. ``reason`` is a short machine-readable label (metrics)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Payload:
    """An encoded state_dict, ready to stream: the manifest and its chunks."""

    manifest: pb.Manifest
    chunks: tuple[bytes, ...]
    wrapped: bool = False  # chunks hold wrap()'s output rather than raw bytes

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (not of the stored, possibly wrapped, chunks)."""
        return self.manifest.total_bytes


def _tensor_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def encode_state_dict(state: Mapping[str, torch.Tensor], chunk_size: int = CHUNK_SIZE,
                      wrap: Callable[[int, bytes], bytes] | None = None) -> Payload:
    """Encode a state_dict (any device) into a manifest plus chunks of at most ``chunk_size`` bytes.

    Each byte is copied once (tensor memory -> chunk) and hashed while the chunk is still in cache.
    ``wrap(index, chunk)``, when given, turns each chunk into what is stored instead (the server
    stores ready-to-send serialized messages, shared by every client's download), so the raw
    chunks never all exist at once.
    """
    specs, views = [], []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"state_dict entry {name!r} has unsupported dtype {tensor.dtype}")
        specs.append(pb.TensorSpec(name=name, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape)))
        # A zero-copy byte view of CPU contiguous tensors; reshape(-1) makes 0-d tensors viewable.
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        views.append(memoryview(flat.view(torch.uint8).numpy()))
    hasher = hashlib.sha256()
    chunks: list[bytes] = []
    pending: list[memoryview] = []
    pending_len = 0
    for view in views:
        pos = 0
        while pos < len(view):
            take = min(chunk_size - pending_len, len(view) - pos)
            pending.append(view[pos:pos + take])
            pending_len += take
            pos += take
            if pending_len == chunk_size:
                chunks.append(_seal(b"".join(pending), len(chunks), hasher, wrap))
                pending, pending_len = [], 0
    if pending_len:
        chunks.append(_seal(b"".join(pending), len(chunks), hasher, wrap))
    manifest = pb.Manifest(tensors=specs, total_bytes=sum(len(v) for v in views),
                           sha256=hasher.digest(), num_chunks=len(chunks))
    return Payload(manifest=manifest, chunks=tuple(chunks), wrapped=wrap is not None)


def _seal(chunk: bytes, index: int, hasher, wrap) -> bytes:
    hasher.update(chunk)
    return chunk if wrap is None else wrap(index, chunk)


class ChunkLike(Protocol):
    """A ``Chunk`` as receivers read one: a protobuf message, or one read in place from the wire."""

    index: int
    data: bytes | memoryview


class TensorSlot(NamedTuple):
    """Where one tensor of a payload lies: its bytes are ``[offset, offset + nbytes)``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def manifest_layout(manifest: pb.Manifest, max_bytes: int, chunk_size: int = CHUNK_SIZE) -> list[TensorSlot]:
    """A hostile peer's manifest checked before a byte of payload is read or a byte of memory
    reserved: its tensors' slots in payload order; raises CodecError."""
    layout, offset, names = [], 0, set()
    for spec in manifest.tensors:
        if spec.dtype not in DTYPES:
            raise CodecError("bad_dtype", f"tensor {spec.name!r}: dtype {spec.dtype!r} is not allowed")
        if spec.name in names:
            raise CodecError("bad_manifest", f"tensor {spec.name!r} appears twice in the manifest")
        if any(d < 0 for d in spec.shape):
            raise CodecError("bad_manifest", f"tensor {spec.name!r}: negative dimension in {list(spec.shape)}")
        names.add(spec.name)
        dtype = DTYPES[spec.dtype]
        # torch refuses shapes whose size overflows int64 even when a 0 dimension makes them
        # empty (e.g. [2**62, 2**62, 0]); refuse them here rather than crash in finish().
        if math.prod(max(d, 1) for d in spec.shape) * _tensor_nbytes(dtype, ()) >= 1 << 63:
            raise CodecError("bad_manifest", f"tensor {spec.name!r}: shape {list(spec.shape)} is too large")
        n = _tensor_nbytes(dtype, spec.shape)
        layout.append(TensorSlot(spec.name, dtype, tuple(spec.shape), offset, n))
        offset += n
        if offset > max_bytes:
            raise CodecError("oversized", f"payload exceeds the limit of {max_bytes} bytes")
    if offset != manifest.total_bytes:
        raise CodecError("bad_manifest", f"manifest says {manifest.total_bytes} bytes but its tensors "
                                         f"need {offset}")
    if manifest.num_chunks != math.ceil(offset / chunk_size):
        raise CodecError("bad_manifest", f"manifest says {manifest.num_chunks} chunks; {offset} bytes "
                                         f"need {math.ceil(offset / chunk_size)} of {chunk_size}")
    if len(manifest.sha256) != 32:
        raise CodecError("bad_manifest", "manifest sha256 must be 32 bytes")
    return layout


class ChunkReceiver:
    """The receiving end of one payload, for every receiver: the manifest checked before any memory
    is reserved (so a hostile one cannot make it allocate more than ``max_bytes``), each chunk's
    order and size checked and its bytes hashed as it arrives, completeness and the SHA-256 checked
    at the end. What becomes of a chunk's bytes is the subclass's: :meth:`_keep` each one, then
    :meth:`_complete` once the digest has matched, which makes what :meth:`finish` returns."""

    def __init__(self, manifest: pb.Manifest, *, max_bytes: int, chunk_size: int = CHUNK_SIZE):
        self.manifest = manifest
        self.chunk_size = chunk_size
        self.layout = manifest_layout(manifest, max_bytes, chunk_size)
        self._received_bytes = 0
        self._next_index = 0
        self._hasher = hashlib.sha256()  # updated per chunk, so hashing overlaps the transfer

    def add(self, chunk: ChunkLike) -> None:
        """Check and hash the next chunk, then hand its bytes to :meth:`_keep`; raises CodecError."""
        index = self._next_index
        if chunk.index != index:
            raise CodecError("chunk_order", f"expected chunk {index}, got chunk {chunk.index}")
        data = chunk.data  # with upb protobuf every .data access copies the bytes: read it once
        size = len(data)
        is_last = index == self.manifest.num_chunks - 1
        expected = (self.manifest.total_bytes - self._received_bytes) if is_last else self.chunk_size
        if index >= self.manifest.num_chunks or size != expected:
            raise CodecError("bad_chunk", f"chunk {index} has {size} bytes, expected {expected} "
                                          f"(of {self.manifest.num_chunks} chunks)")
        self._hasher.update(data)
        start = self._received_bytes
        self._received_bytes += size
        self._next_index += 1
        self._keep(index, start, data)

    @property
    def received_bytes(self) -> int:
        return self._received_bytes

    def finish(self):
        """Verify completeness and digest; then what the subclass made of the payload."""
        if self._next_index != self.manifest.num_chunks:
            raise CodecError("truncated", f"payload truncated: {self._next_index} of "
                                          f"{self.manifest.num_chunks} chunks arrived")
        if self._hasher.digest() != self.manifest.sha256:
            raise CodecError("digest_mismatch", "SHA-256 of the received bytes does not match the manifest")
        return self._complete()

    def _keep(self, index: int, start: int, data: bytes | memoryview) -> None:
        """Chunk ``index``, checked and hashed: payload bytes ``[start, start + len(data))``."""
        raise NotImplementedError

    def _complete(self):
        raise NotImplementedError


class PayloadAssembler(ChunkReceiver):
    """Reassembles one payload into one preallocated buffer and decodes it into tensors that are
    views of that buffer (a decoded model costs its own size in memory and nothing more)."""

    def __init__(self, manifest: pb.Manifest, *, max_bytes: int, chunk_size: int = CHUNK_SIZE):
        super().__init__(manifest, max_bytes=max_bytes, chunk_size=chunk_size)
        # Uninitialised (every byte is written by add(), and finish() refuses a short payload): a
        # zero-filled buffer would cost the server one more pass over each upload.
        self._buffer = np.empty(manifest.total_bytes, dtype=np.uint8)
        self._view = memoryview(self._buffer)

    def _keep(self, index: int, start: int, data: bytes | memoryview) -> None:
        self._view[start:start + len(data)] = data

    def finish(self) -> dict[str, torch.Tensor]:
        """Verify completeness and digest; return the state_dict (tensors view one buffer)."""
        return super().finish()

    def _complete(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, dtype, shape, offset, n in self.layout:
            itemsize = torch.empty((), dtype=dtype).element_size()
            if n == 0:
                tensor = torch.empty(shape, dtype=dtype)
            else:
                tensor = torch.frombuffer(self._buffer, dtype=dtype, count=n // itemsize, offset=offset)
                if offset % itemsize:  # keep every tensor aligned for its element type
                    tensor = tensor.clone()
                tensor = tensor.reshape(shape)
            state[name] = tensor
        return state


def decode_payload(manifest: pb.Manifest, chunks: Iterable[pb.Chunk | bytes], *,
                   max_bytes: int = 1 << 31, chunk_size: int = CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Decode a whole payload; chunks may be ``Chunk`` messages or raw bytes in order."""
    assembler = PayloadAssembler(manifest, max_bytes=max_bytes, chunk_size=chunk_size)
    for index, chunk in enumerate(chunks):
        assembler.add(chunk if isinstance(chunk, pb.Chunk) else pb.Chunk(index=index, data=chunk))
    return assembler.finish()


def check_matches_template(state: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> None:
    """Raise CodecError unless ``state`` has exactly the template's entries, shapes and dtypes and
    only finite floating-point values: the gate every update passes before aggregation."""
    check_names_match(state.keys(), template)
    for name, expected in template.items():
        got = state[name]
        check_tensor_matches(name, got.dtype, got.shape, expected)
        if got.is_floating_point() and not all_finite(got):
            raise CodecError("non_finite", f"tensor {name!r} holds NaN or Inf values")


def check_names_match(names: Iterable[str], template: Mapping[str, torch.Tensor]) -> None:
    """Raise CodecError unless ``names`` are exactly the template's entries."""
    names = set(names)
    missing = template.keys() - names
    if missing:
        raise CodecError("missing_tensor", f"update lacks tensors: {sorted(missing)[:5]}")
    extra = names - template.keys()
    if extra:
        raise CodecError("extra_tensor", f"update has unexpected tensors: {sorted(extra)[:5]}")


def check_tensor_matches(name: str, dtype: torch.dtype, shape: Sequence[int], expected: torch.Tensor) -> None:
    """Raise CodecError unless tensor ``name`` of ``dtype`` and ``shape`` could stand for ``expected``."""
    if dtype != expected.dtype:
        raise CodecError("bad_dtype", f"tensor {name!r}: dtype {dtype} but the model has {expected.dtype}")
    if torch.Size(shape) != expected.shape:
        raise CodecError("bad_shape", f"tensor {name!r}: shape {tuple(shape)} but the model has "
                                      f"{tuple(expected.shape)}")


def all_finite(tensor: torch.Tensor) -> bool:
    # aminmax propagates NaN and surfaces +-Inf without allocating a tensor of the input's size
    # (isfinite(t).all() would, on the server's hot path for every update).
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def state_dict_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def task_frame(index: int, data: bytes) -> bytes:
    """One chunk as a serialized TaskMessage: built once per broadcast (``encode_state_dict(...,
    wrap=task_frame)``) and sent to every client as is, instead of once per client."""
    return pb.TaskMessage(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
