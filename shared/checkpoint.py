"""Weights-only checkpoints: plain dicts of tensors, loaded with ``torch.load(weights_only=True)``
so that opening a checkpoint can never execute code."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .runfiles import atomic_write

FORMAT = "genfl-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: Path, model: str, state: Mapping[str, torch.Tensor]) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save({"format": FORMAT, "model": model,
                    "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, f)
    return path


def load_checkpoint(path: Path, model: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Load a checkpoint of the given model kind (or of one of several kinds); accepts a bare
    state_dict too."""
    kinds = (model,) if isinstance(model, str) else model
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # unpickling refused or corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("model") not in kinds:
            raise CheckpointError(f"{path} holds a {data.get('model')!r} model, not a "
                                  f"{' or '.join(repr(kind) for kind in kinds)} model")
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} is not a state_dict checkpoint")
    return data
