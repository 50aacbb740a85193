"""The ``torch.distributed.checkpoint`` (DCP) glue: a state-dict leaf for "this rank's flat slice
of a full-shape tensor", and the planners and storage classes that read and write it.

DCP already knows how to save rectangular chunks of a tensor of a global shape and how to read
back the overlaps at any other sharding (that is its resharding). What it does not know is our
storage: a parameter's local piece is a 1-D slice of the unit's flat shard, in flat (row-major)
order. ``FlatSlices`` bridges the two (see [Note: flat slices as chunks] in ``_layout``):
it offers DCP's checkpointable hooks (``__create_write_items__``, ``__create_chunk_list__``,
``size``), and the planners below resolve a chunk index to a view of the slice. DCP copies
chunks straight out of and into our storage; nothing here allocates a full tensor.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties)
from torch.distributed.checkpoint.planner import ReadItem, TensorWriteData, WriteItem, WriteItemType

from ._layout import Chunk, flat_range_chunks
from ._unpickle import load_metadata

__all__ = ["FlatSlices", "SavePlanner", "LoadPlanner", "Writer", "Reader"]


class FlatSlices:
    """This rank's elements ``[start, start + local.numel())`` of a tensor of ``shape``, held as
    the 1-D tensor ``local`` (real elements only, no padding). On save it writes one DCP chunk
    per rectangle; on load DCP reads into ``local`` through the same views.

    A tensor with no elements still needs one entry in the checkpoint's metadata: the rank with
    ``owns_empty=True`` writes its (empty) full-shape chunk."""

    def __init__(self, local: torch.Tensor, shape: Sequence[int], start: int, *, owns_empty: bool = False):
        assert local.dim() == 1, local.shape
        self.local = local                                      # 1-D, real elements only
        self.shape = torch.Size(shape)
        self.start = start
        numel = math.prod(self.shape)
        if numel == 0:
            self.chunks: tuple[Chunk, ...] = ()
            self._write = (Chunk(0, 0, (0,) * len(self.shape), tuple(self.shape)),) if owns_empty else ()
        else:  # (an empty local piece may sit past the end: its start is meaningless)
            self.chunks = flat_range_chunks(self.shape, start, start + local.numel()) if local.numel() else ()
            self._write = self.chunks
        self._by_offsets = {c.offsets: c for c in self._write}

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def size(self) -> torch.Size:   # DCP compares this with the saved size before reading
        return self.shape

    def chunk_view(self, offsets: Sequence[int]) -> torch.Tensor:
        c = self._by_offsets[tuple(offsets)]
        return self.local[c.flat_start - self.start: c.flat_end - self.start].view(c.sizes)

    # -- DCP's checkpointable protocol (planner_helpers._create_write_items / _create_chunk_list)
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=props,
                    size=self.shape,
                ),
            )
            for c in self._write
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in self.chunks]

    def __repr__(self) -> str:
        return f"FlatSlices(shape={tuple(self.shape)}, start={self.start}, numel={self.local.numel()}, dtype={self.dtype})"


class SavePlanner(DefaultSavePlanner):
    """DCP's default planner (flattened nested keys, replicated tensors written once), plus
    ``FlatSlices`` leaves."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, FlatSlices):
            return obj.chunk_view(index.offset)
        return super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner (resharding by chunk overlap), plus ``FlatSlices`` leaves."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False, allow_partial_load=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DefaultLoadPlanner.set_up_planner first runs _init_state_dict, which replaces every
        # leaf it does not know (our FlatSlices) with None. Our destinations are never on meta
        # (load() refuses meta models), so that step has nothing to do: flatten and go.
        self.original_state_dict = state_dict
        self.state_dict, self.mappings = flatten_state_dict(state_dict)
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, FlatSlices):
            return obj.chunk_view(index.offset)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # DCP's default unpickles non-tensor values with weights_only=False (any object: code);
        # ours are hyperparameters and plain values, which weights_only=True reads.
        obj = torch.load(value, weights_only=True)
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)


class Writer(FileSystemWriter):
    """One file per rank (``__<rank>_0.distcp``), fsynced. A class of our own so that tests can
    inject a fault into exactly our writes."""

    def __init__(self, path: str):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)


class Reader(FileSystemReader):
    """Unpickles ``.metadata`` with an allowlist (``_unpickle``: a checkpoint is data, not
    code); names the files being read when reading fails (DCP's own error does not)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # FileSystemReader.read_metadata, with load_metadata in place of pickle.load. torch <
        # 2.9 has no _get_metadata_path (and no per-rank metadata): ".metadata" in the folder.
        if hasattr(self, "_get_metadata_path"):
            path = self._get_metadata_path(kwargs.get("rank"))
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as f:
            metadata = load_metadata(f, str(path))
        if not isinstance(metadata, Metadata):
            raise TypeError(f"{path} holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except Exception as e:
            files = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            raise RuntimeError(
                f"reading checkpoint data from {self.path} failed (files {', '.join(files)}): "
                f"{type(e).__name__}: {e}; the file is corrupt or truncated"
            ) from e
