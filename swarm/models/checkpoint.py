"""Read selected tensors of a Hugging Face checkpoint without touching the rest.

A peer that hosts 2 of 24 blocks must never materialise the other 22, so every read goes through
`Checkpoint.read(names)`, which opens only the files holding those names and counts what it read
(`statistics()`), so tests can prove it.

Supported layouts: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin` and its sharded index (loaded with `mmap=True, weights_only=True`).
A model is a local directory or a Hugging Face id; an id resolves through the Hugging Face cache and
downloads only the files that hold requested tensors (offline when `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from swarm.errors import ModelError, ModelNotFoundError

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_INDEX, TORCH_SINGLE)


@dataclass(frozen=True, slots=True)
class CheckpointStatistics:
    """What this checkpoint has read so far."""

    tensors_read: int
    bytes_read: int
    files_opened: tuple[str, ...]


class Checkpoint:
    """Names and lazily read tensors of one model checkpoint."""

    def __init__(self, name_or_path: str | os.PathLike[str], *, revision: str | None = None):
        self.name = str(name_or_path)
        self.revision = revision
        local = Path(name_or_path).expanduser()
        self._local_dir: Path | None = local if local.is_dir() else None
        if self._local_dir is None and (local.exists() or _looks_like_path(self.name)):
            reason = "a file, not a directory" if local.exists() else "no such directory"
            raise ModelNotFoundError(f"{self.name} is not a model directory ({reason})")
        self.config_dir = self._resolve_dir()
        self._weight_map = self._read_weight_map()
        self._tensors_read = 0
        self._bytes_read = 0
        self._files_opened: list[str] = []

    @property
    def tensor_names(self) -> list[str]:
        return list(self._weight_map)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, opening only the files that hold them."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self._weight_map:
                raise ModelError(f"{self.name} has no tensor {name!r}")
            by_file.setdefault(self._weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for filename, file_names in by_file.items():
            path = self._fetch(filename)
            self._files_opened.append(filename)
            if filename.endswith(".safetensors"):
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                for name in file_names:
                    tensors[name] = state[name].clone()  # clone: leave the mmap'd file behind
                del state
        for tensor in tensors.values():
            self._tensors_read += 1
            self._bytes_read += tensor.numel() * tensor.element_size()
        return tensors

    def statistics(self) -> CheckpointStatistics:
        return CheckpointStatistics(self._tensors_read, self._bytes_read, tuple(self._files_opened))

    def _resolve_dir(self) -> Path:
        """The directory holding config.json: local, or the cached snapshot of a hub id."""
        if self._local_dir is not None:
            if not (self._local_dir / "config.json").is_file():
                raise ModelNotFoundError(f"{self._local_dir} is not a model directory: it has no config.json")
            return self._local_dir
        return self._fetch("config.json").parent

    def _read_weight_map(self) -> dict[str, str]:
        for filename in WEIGHT_FILES:
            if not self._is_available(filename):
                continue
            path = self._fetch(filename)
            if filename.endswith(".index.json"):
                weight_map = json.loads(path.read_text())["weight_map"]
                return {name: file for name, file in weight_map.items()}
            if filename.endswith(".safetensors"):
                with safe_open(path, framework="pt", device="cpu") as handle:
                    return dict.fromkeys(handle.keys(), filename)
            state = torch.load(path, map_location="meta", mmap=True, weights_only=True)
            return dict.fromkeys(state, filename)
        raise ModelNotFoundError(
            f"{self.name} has no weights: expected one of {', '.join(WEIGHT_FILES)} in {self.config_dir}"
        )

    def _is_available(self, filename: str) -> bool:
        if self._local_dir is not None:
            return (self._local_dir / filename).is_file()
        try:
            self._fetch(filename)
        except ModelNotFoundError:
            return False
        return True

    def _fetch(self, filename: str) -> Path:
        if self._local_dir is not None:
            return self._local_dir / filename
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.name, filename, revision=self.revision))
        except (
            hub_errors.EntryNotFoundError,
            hub_errors.LocalEntryNotFoundError,
            hub_errors.RepositoryNotFoundError,
            hub_errors.RevisionNotFoundError,
            hub_errors.HFValidationError,
            hub_errors.OfflineModeIsEnabled,
        ) as e:
            raise ModelNotFoundError(
                f"{self.name} is neither a local model directory nor a model whose {filename} "
                f"is in the Hugging Face cache or reachable on the hub ({type(e).__name__})"
            ) from e


def _looks_like_path(name: str) -> bool:
    """A Hugging Face id is 'org/name' or 'name'; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
