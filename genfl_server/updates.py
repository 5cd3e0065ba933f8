"""What a strategy folds: a client's update, declared as the ``Update`` protocol.

An update is the model a client sends back after local training, read as a ``Mapping`` name ->
tensor, that also knows how to fold itself into a running sum (``fold_into``) and how far it
moved from a model (``distance_from``). Two kinds implement it: an upload checked and measured chunk
by chunk as it streamed in (``upload.ChunkedUpdate``, folded piece by piece from the received
bytes), and whole tensors (``TensorUpdate``: a clipped update, one held for a deterministic sum,
or a model made in-process).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Iterator, Protocol, runtime_checkable

import torch

# update_distance works through a tensor this many elements at a time, in two reused scratch
# blocks (cache-sized), instead of float64 copies of whole tensors (three of the largest CVAE
# layer were 10 MB, and 12-40 ms of the server's CPU per update).
DISTANCE_BLOCK_ELEMENTS = 1 << 16


@runtime_checkable
class Update(Protocol):
    """A client's model after local training, as a strategy and the update guard see it."""

    def __getitem__(self, name: str) -> torch.Tensor: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def fold_into(self, sums: Mapping[str, torch.Tensor], weight: float) -> None:
        """sums[name] += weight * update[name] for every entry of ``sums``."""

    def distance_from(self, reference: Mapping[str, torch.Tensor]) -> float:
        """||update - reference|| over the floating-point entries."""


class TensorUpdate(Mapping):
    """An ``Update`` of whole tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def fold_into(self, sums: Mapping[str, torch.Tensor], weight: float) -> None:
        for name, acc in sums.items():
            value = self.tensors[name]
            acc.add_(value if value.dtype == acc.dtype else value.to(acc.dtype), alpha=weight)

    def distance_from(self, reference: Mapping[str, torch.Tensor]) -> float:
        return update_distance(self.tensors, reference)


def as_update(update: Mapping[str, torch.Tensor]) -> Update:
    """``update`` itself when it implements ``Update``, else its tensors as a ``TensorUpdate``."""
    return update if isinstance(update, Update) else TensorUpdate(update)


def update_distance(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """||update - reference|| over the floating-point entries.

    Computed on the tensors as they are (an upload's are views of its received bytes), block by
    block: each difference in the tensors' own precision, the squares summed in float64. No copy
    of the update, no model-sized temporary.
    """
    total = 0.0
    squares = torch.empty(DISTANCE_BLOCK_ELEMENTS, dtype=torch.float64)
    for name, ref in reference.items():
        if not ref.is_floating_point():
            continue
        values, ref_values = update[name].reshape(-1), ref.reshape(-1)
        difference = torch.empty(DISTANCE_BLOCK_ELEMENTS, dtype=torch.promote_types(values.dtype, ref.dtype))
        for start in range(0, values.numel(), DISTANCE_BLOCK_ELEMENTS):
            end = min(start + DISTANCE_BLOCK_ELEMENTS, values.numel())
            block = difference[:end - start]
            torch.sub(values[start:end], ref_values[start:end], out=block)
            wide = squares[:end - start]
            wide.copy_(block)
            total += float(torch.dot(wide, wide))
    return math.sqrt(total)
