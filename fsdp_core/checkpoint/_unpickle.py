"""Reading DCP's pickled ``.metadata`` without running a checkpoint's code.

A checkpoint is data from someone else. DCP's ``FileSystemReader.read_metadata`` calls
``pickle.load`` on ``.metadata``, and a pickle can call any importable function (``__reduce__``):
a crafted ``.metadata`` would run whatever it names. ``load_metadata`` unpickles with an
allowlist instead: exactly the globals that the pinned torch's DCP writes into ``.metadata``
(found by unpickling real ones, ours and plain ``dcp.save`` ones, and reading
``torch/distributed/checkpoint/metadata.py`` and ``filesystem.py``):

- DCP's metadata dataclasses (``Metadata``, ``MetadataIndex``, ``StorageMeta``,
  ``TensorStorageMetadata``, ``BytesStorageMetadata``, ``ChunkStorageMetadata``,
  ``TensorProperties``, ``_MEM_FORMAT_ENCODING``) and the file system's ``_StorageInfo``;
- ``torch.Size``, every ``torch.dtype`` (and ``torch.layout``/``torch.memory_format`` objects),
  ``torch.serialization._get_layout`` (how a layout pickles: a lookup by name);
- ``pathlib`` paths (``StorageMeta.checkpoint_id``), and plain containers and scalars
  (``set``, ``frozenset``, ``complex``, ``bytearray``, ``collections.OrderedDict``); everything
  else a pickle holds (dicts, lists, tuples, str, bytes, int, float, bool, None) needs no global.

Anything else is a ``CheckpointError`` that names the refused global. The allowed names are exact
``(module, name)`` pairs, so a dotted name cannot reach through an allowed class to its
attributes. The tensor payloads are read by DCP with ``torch.load(weights_only=True)``; the
non-tensor values (``BytesStorageMetadata`` entries: optimizer hyperparameters and the like)
with the same (``LoadPlanner.load_bytes``, in ``_dcp``).
"""
from __future__ import annotations

import pickle
from typing import IO, Any

import torch

from ._errors import CheckpointError

__all__ = ["load_metadata", "ALLOWED"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),        # how Python 3.13+ names them
    ("pathlib._local", "WindowsPath"),
    ("pathlib._local", "PurePosixPath"),
    ("pathlib._local", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("collections", "OrderedDict"),
})

_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


class _Refused(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.what = f"{module}.{name}"


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name:        # torch.float32, torch.strided, ...
            value = getattr(torch, name, None)
            if isinstance(value, _TORCH_VALUES):
                return value
        raise _Refused(module, name)


def load_metadata(f: IO[bytes], path: str) -> Any:
    """Unpickle DCP metadata from ``f`` (read from ``path``, for messages) with the allowlist.
    Raises ``CheckpointError`` naming a refused global; other failures propagate."""
    try:
        return _AllowlistUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(
            f"checkpoint metadata {path} refers to {e.what}, which is not one of DCP's metadata "
            "types: refusing to unpickle it (a checkpoint is data; this one would run code). "
            "Load only checkpoints written by torch.distributed.checkpoint or fsdp_core") from None
