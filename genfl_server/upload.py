"""An upload checked and measured chunk by chunk, and folded in from the chunks themselves.

``ChunkedUpdate`` takes a TRAIN result's chunks as they are read: each one is checked (order,
size) and hashed as every payload is (``genfl_shared.codec.ChunkReceiver``), then its
floating-point values are checked finite and their distance to the round's global model summed,
all on zero-copy views of the chunk's own bytes. No decoded copy of the model is
made: the update is the list of received chunks, and FedAvg folds it in piece by piece
(``fold_into``). Nothing reaches an accumulator before ``finish()`` has checked the digest, so an
update refused for any reason (a wrong digest or a NaN in its last chunk included) leaves the
aggregate exactly as it was.

It is also a read-only ``Mapping[str, Tensor]`` for the consumers that need whole tensors (the
robust strategies, clipping, ``--deterministic``, which holds every update until the round ends):
a tensor that lies in one chunk is a view of it, one that spans chunks is joined on access.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from typing import Iterator

import torch

from genfl_shared.codec import (CHUNK_SIZE, ChunkReceiver, CodecError, all_finite, check_names_match,
                                check_tensor_matches, state_dict_nbytes)
from genfl_shared.proto import genfl_pb2 as pb

from .updates import update_distance

# The views are of the received (immutable) bytes and nothing writes to them: torch's warning that
# it could would be noise.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class ChunkedUpdate(ChunkReceiver, Mapping):
    """One upload against ``template`` (the round's global state): see the module docstring. The
    checks of the manifest and of each chunk are ``ChunkReceiver``'s; this keeps the chunks as they
    arrived and measures them."""

    def __init__(self, manifest: pb.Manifest, template: Mapping[str, torch.Tensor], *, max_bytes: int | None = None,
                 chunk_size: int = CHUNK_SIZE):
        """``max_bytes``: the most the upload may hold; by default the template's own size."""
        if chunk_size % 8:
            raise ValueError("chunk_size must be a multiple of 8 (no aligned element may straddle chunks)")
        super().__init__(manifest, max_bytes=state_dict_nbytes(template) if max_bytes is None else max_bytes,
                         chunk_size=chunk_size)
        # The manifest must have exactly the template's entries, dtypes and shapes (before any
        # payload byte is read).
        check_names_match((slot.name for slot in self.layout), template)
        for name, dtype, shape, _offset, _n in self.layout:
            check_tensor_matches(name, dtype, shape, template[name])
        self.reference = template  # what ``distance`` is measured from
        # name -> (dtype, shape, byte offset, bytes)
        self._slots = {name: (dtype, shape, offset, n) for name, dtype, shape, offset, n in self.layout}
        # Floating entries, with their global model's flat view: checked chunk by chunk when their
        # elements are aligned (always, unless an odd-sized smaller-dtype tensor precedes them).
        self._floating = [(name, template[name].reshape(-1), offset, n, offset % dtype.itemsize == 0)
                          for name, dtype, _shape, offset, n in self.layout if dtype.is_floating_point and n]
        self._chunks: list[bytes | memoryview] = []
        self._squares = 0.0  # sum of (update - global)^2 over the floating entries, in float64
        self._finished = False

    # -- receiving ----------------------------------------------------------------------------
    def _keep(self, index: int, start: int, data: bytes | memoryview) -> None:
        """Keep the chunk as it is (a WireChunk's data, a view of the received message, is not
        copied) and measure its floating-point values."""
        self._chunks.append(data)
        for name, values, reference in self._float_pieces(index, start, start + len(data)):
            self._measure(name, values, reference)

    def _measure(self, name: str, values: torch.Tensor, reference: torch.Tensor) -> None:
        squares = _squared_distance(values, reference)
        # A NaN or Inf value makes its difference, and so the sum of squares, NaN or Inf: only then
        # is the piece searched for one (a finite sum proves every value finite; finite values so
        # huge that the float32 squares overflow are not refused here but measured as infinitely
        # far, which the norm bounds and the aggregate check refuse).
        if not math.isfinite(squares) and not all_finite(values):
            raise CodecError("non_finite", f"tensor {name!r} holds NaN or Inf values")
        self._squares += squares

    def finish(self) -> "ChunkedUpdate":
        """Verify completeness and digest; from here on the update may be folded in."""
        return super().finish()

    def _complete(self) -> "ChunkedUpdate":
        for name, reference, _offset, _n, aligned in self._floating:
            if not aligned:
                for _start, values in self._pieces(name):
                    self._measure(name, values, reference)
        self._finished = True
        return self

    @property
    def distance(self) -> float:
        """||update - global|| over the floating-point entries (as updates.update_distance)."""
        return math.sqrt(self._squares)

    def distance_from(self, reference: Mapping[str, torch.Tensor]) -> float:
        """||update - reference||: the distance measured as the chunks arrived when ``reference``
        is the model they were measured against, else measured now."""
        return self.distance if reference is self.reference else update_distance(self, reference)

    # -- folding ------------------------------------------------------------------------------
    def fold_into(self, sums: Mapping[str, torch.Tensor], weight: float) -> None:
        """sums[name] += weight * update[name] for every entry, piece by piece from the chunks."""
        self._check_finished()
        for name, acc in sums.items():
            flat = acc.reshape(-1)
            for start, piece in self._pieces(name):
                target = flat[start:start + piece.numel()]
                target.add_(piece if piece.dtype == acc.dtype else piece.to(acc.dtype), alpha=weight)

    # -- Mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        self._check_finished()
        dtype, shape, _offset, n = self._slots[name]
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        pieces = [piece for _start, piece in self._pieces(name)]
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return flat.reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    # -- layout -------------------------------------------------------------------------------
    def _check_finished(self) -> None:
        if not self._finished:
            raise RuntimeError("the update is used before finish() checked its digest")

    def _float_pieces(self, index: int, begin: int, end: int):
        """(name, update values, global values) of each floating tensor's part in bytes [begin, end)
        (chunk ``index``)."""
        for name, reference, offset, n, aligned in self._floating:
            low, high = max(begin, offset), min(end, offset + n)
            if low >= high or not aligned:
                continue
            itemsize = self._slots[name][0].itemsize
            values = self._view(index, name, low, high)
            first = (low - offset) // itemsize
            yield name, values, reference[first:first + values.numel()]

    def _pieces(self, name: str):
        """(first element, 1-d tensor) of each chunk's part of tensor ``name``, in order."""
        dtype, _shape, offset, n = self._slots[name]
        itemsize = dtype.itemsize
        if n == 0:
            return
        if offset % itemsize:  # misaligned (after an odd-sized smaller-dtype tensor): joined, rare
            joined = bytearray()
            for index in range(offset // self.chunk_size, (offset + n - 1) // self.chunk_size + 1):
                base = index * self.chunk_size
                joined += self._chunks[index][max(offset, base) - base:min(offset + n, base + self.chunk_size) - base]
            yield 0, torch.frombuffer(joined, dtype=dtype)
            return
        for index in range(offset // self.chunk_size, (offset + n - 1) // self.chunk_size + 1):
            base = index * self.chunk_size
            low, high = max(offset, base), min(offset + n, base + self.chunk_size)
            yield (low - offset) // itemsize, self._view(index, name, low, high)

    def _view(self, index: int, name: str, low: int, high: int) -> torch.Tensor:
        """Bytes [low, high) of the payload, all in chunk ``index`` and element-aligned, as tensor
        ``name``'s dtype (a zero-copy view of the chunk)."""
        dtype = self._slots[name][0]
        base = index * self.chunk_size
        return torch.frombuffer(self._chunks[index], dtype=dtype, count=(high - low) // dtype.itemsize,
                                offset=low - base)


def _squared_distance(values: torch.Tensor, reference: torch.Tensor) -> float:
    """sum((values - reference)^2), the squares summed by BLAS in the tensors' precision (float32
    here: relative error ~1e-6 over a chunk's 262,144 elements, far finer than any bound it is
    compared with) and the pieces' sums in float64. updates.update_distance's float64 squares cost
    three times as much, 1.3 ms of the server's CPU per CVAE update."""
    difference = torch.sub(values, reference, out=_scratch(values.dtype, values.numel()))
    if difference.dtype not in (torch.float32, torch.float64):  # half precisions: too coarse to sum in
        difference = difference.float()
    return float(torch.dot(difference, difference))


_scratch_buffers = threading.local()


def _scratch(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A 1-d buffer of ``numel`` elements, reused by this thread's later pieces: a fresh temporary of
    a chunk's size is, in glibc, an mmap, a page fault per 4 KiB written and a munmap, per piece of
    every upload (about 5 % of the server's CPU at M = 500 clients, seen with perf)."""
    buffers = getattr(_scratch_buffers, "by_dtype", None)
    if buffers is None:
        buffers = _scratch_buffers.by_dtype = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]
