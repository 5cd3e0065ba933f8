"""Crash-safe run state: what an interrupted server needs to continue (``genfl-server --resume``).

Written atomically (write, fsync, rename, fsync the folder) after every completed round and after
each server-side step, as one weights-only file: the global weights of each phase, the pre-trained
start, and a JSON record of progress and results so far, with the settings that change results
(``progress["settings"]``, see ``genfl_server.app.ServerSettings.saved``) that --resume reuses. Client training seeds derive from
(run seed, phase, round, client), and synthetic data from the run seed, so no RNG state needs
saving: redoing an interrupted round from its starting weights repeats it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from genfl_shared.runfiles import atomic_write

FORMAT = "genfl-run-state-v1"
FILE_NAME = "run_state.pt"


class RunStateError(ValueError):
    pass


class RunState:
    def __init__(self, path: Path, progress: dict[str, Any] | None = None,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None):
        self.path = Path(path)
        self.progress: dict[str, Any] = progress or {"completed_rounds": {}, "steps": {}}
        self.tensors: dict[str, dict[str, torch.Tensor]] = tensors or {}

    @classmethod
    def in_dir(cls, out_dir: Path) -> "RunState":
        return cls(Path(out_dir) / FILE_NAME)

    @classmethod
    def load(cls, out_dir: Path) -> "RunState":
        path = Path(out_dir) / FILE_NAME
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RunStateError(f"nothing to resume: {path} does not exist") from None
        except Exception as error:
            raise RunStateError(f"cannot read run state {path}: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunStateError(f"{path} is not a GenFL run state")
        return cls(path, json.loads(data["progress"]), data["tensors"])

    def completed_rounds(self, phase: str) -> int:
        return int(self.progress["completed_rounds"].get(phase, 0))

    def step(self, name: str) -> Any:
        return self.progress["steps"].get(name)

    def save(self, *, recorder_state: Mapping[str, Any], completed: tuple[str, int] | None = None,
             step: tuple[str, Any] | None = None, **tensors: Mapping[str, torch.Tensor]) -> None:
        if completed is not None:
            self.progress["completed_rounds"][completed[0]] = completed[1]
        if step is not None:
            self.progress["steps"][step[0]] = step[1]
        for name, state in tensors.items():
            self.tensors[name] = {k: v.detach().cpu().clone() for k, v in state.items()}
        self.progress["recorder"] = dict(recorder_state)
        with atomic_write(self.path, "wb") as f:
            torch.save({"format": FORMAT, "progress": json.dumps(self.progress), "tensors": self.tensors}, f)
