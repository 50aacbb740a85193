"""Sharded checkpoints that load at any world size: ``save(path, model, optimizer)`` and
``load(path, model, optimizer)``. Both are collective over the model's mesh (its process group,
or every rank of a 2-D HSDP mesh).

On disk a checkpoint is a ``torch.distributed.checkpoint`` (DCP) directory, so standard tools
read it (``dcp.load`` into an unsharded model, ``format_utils.dcp_to_torch_save``)::

    <path>/.metadata          DCP metadata (pickled): every key with its full shape, dtype and
                              the chunks each file holds; written by rank 0
    <path>/__<r>_0.distcp     rank r's own chunks: its real elements of every sharded tensor,
                              plus the replicated tensors DCP assigned to it
    <path>/fsdp_core.json     our manifest: format version, world size (ranks that wrote),
                              mesh shape, size and CRC-32 of every file, which optimizer-state
                              keys are sharded

On a 2-D (replicate, shard) mesh only replica row 0 writes (over its shard group): the other
rows hold the same shards, so a checkpoint saved at (R, S) is the one saved at 1-D W = S, and
it loads at any mesh shape or 1-D world size like any other.

Keys and the chunk layout are described in [Note: checkpoint keys] (``_state``) and
[Note: flat slices as chunks] (``_layout``); the directory handling in ``_files``, the DCP
glue in ``_dcp``.
Every rank must see the same ``path`` (one machine, or a shared file system).

Writing is one collective ``dcp.save`` (rank 0 merges the plans into ``.metadata``). Reading needs
no collectives at all: each rank reads the chunks that overlap its own shards with DCP in
single-process mode, which is what makes any world size (and any wrapping) load any checkpoint.
A checkpoint is data, never code: ``.metadata`` is unpickled with an allowlist of DCP's own
types (``_unpickle``) and every value with ``torch.load(weights_only=True)``, with or
without our manifest (a checksum, not a signature).

[Note: atomic publish]
``save`` writes into a fresh sibling ``.<name>.tmp-<token>``; when every rank has written and
fsynced its file, rank 0 writes the manifest and swaps the directory into place: one
``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else rename the old checkpoint to
``.<name>.old-<token>``, rename the new one in, delete the old. A crash before the swap leaves
the previous checkpoint untouched; a crash between the two fallback renames leaves it under the
``.old`` name, which ``load`` falls back to and the next ``save`` renames back. The next ``save``
also deletes leftovers of crashed saves (``.<name>.tmp-*``).

Every step that can fail locally (building the state, writing, checking files, reading) runs
under ``_collectives.agree`` (see [Note: agreeing on failure] there): if any rank failed, every
rank raises, the failing ranks with their own exception and the others with a
``CheckpointError`` naming the failing rank and its message.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from .. import _collectives as C
from .._traverse import check_materialized, model_mesh, units_of
from . import _files as F
from . import _state as S
from ._dcp import LoadPlanner, Reader, SavePlanner, Writer
from ._errors import CheckpointError, CheckpointNotFoundError
from ._files import FORMAT, FORMAT_VERSION, MANIFEST

__all__ = ["save", "load", "CheckpointError", "CheckpointNotFoundError", "MANIFEST", "FORMAT_VERSION"]


# ---------------------------------------------------------------------------------------- save
def save(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Collective. Write ``model``'s (and ``optimizer``'s) state to the directory ``path``,
    replacing any checkpoint there atomically. Every rank writes only its own shards."""
    mesh = model_mesh(model)
    rank = _rank(mesh)
    # On a 2-D mesh the R replica rows hold the same shards: only row 0 writes (a checkpoint
    # saved at (R, S) is the one saved at 1-D W = S), and every rank of the mesh agrees.
    writes = mesh is None or mesh.r == 0
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)

    def stage():
        check_materialized(model, "checkpoint.save")
        state: dict[str, Any] = {"model": S.model_leaves(model)}
        sharded_optim: list = []
        if optimizer is not None:
            state["optim"], sharded_optim = S.optim_save_state(model, optimizer)
        tmp = None
        if rank == 0:
            os.makedirs(parent, exist_ok=True)
            F.recover_and_clean(target)
            F.check_replaceable(target)
            tmp = F.make_tmp_dir(target)
            made.append(tmp)
        return (state, sharded_optim), tmp

    made: list[str] = []   # the temp dir rank 0 created, for cleanup if another rank failed
    (state, sharded_optim), tmps = _agree(
        mesh, f"checkpoint.save({target})", stage,
        on_failure=lambda: [shutil.rmtree(d, ignore_errors=True) for d in made])
    tmp = tmps[0]
    cleanup = (lambda: shutil.rmtree(tmp, ignore_errors=True)) if rank == 0 else None

    def write():
        if not writes:
            return None, {}
        try:
            with _quiet_no_dist():
                dcp.save(state, storage_writer=Writer(tmp), planner=SavePlanner(),
                         process_group=None if mesh is None else mesh.shard_group, no_dist=mesh is None)
        except CheckpointException as e:  # raised on every rank (DCP shares failures)
            raise CheckpointError(
                f"checkpoint.save({target}): writing failed on {_ranks(e)}: {_first_failure(e)}; "
                f"the previous checkpoint at {target}, if any, is unchanged") from None
        dcp_rank = 0 if mesh is None else mesh.s  # DCP names files by rank in its group
        own = [f for f in os.listdir(tmp) if f.startswith(f"__{dcp_rank}_") and f.endswith(".distcp")]
        if rank == 0:
            own.append(F.METADATA)
        return None, {f: F.file_record(os.path.join(tmp, f)) for f in own}

    _, file_records = _agree(mesh, f"checkpoint.save({target}): writing", write, on_failure=cleanup)

    def publish():
        if rank == 0:
            manifest = dict(format=FORMAT, version=FORMAT_VERSION,
                            world_size=1 if mesh is None else mesh.S,  # ranks that wrote files
                            mesh=[1, 1] if mesh is None else [mesh.R, mesh.S],
                            torch=torch.__version__, has_optimizer=optimizer is not None,
                            sharded_optim_state=sharded_optim,
                            files={k: v for rec in file_records for k, v in sorted(rec.items())})
            F.write_json(os.path.join(tmp, MANIFEST), manifest)
            F.fsync_dir(tmp)
            F.swap_into_place(tmp, target)
            F.fsync_dir(parent)
        return None, None

    _agree(mesh, f"checkpoint.save({target}): publishing", publish, on_failure=cleanup)


# ---------------------------------------------------------------------------------------- load
def load(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
         *, strict: bool = True) -> None:
    """Collective. Load a checkpoint written by ``save`` (at any world size, any wrapping) into
    ``model``'s shards and, if given, ``optimizer``'s state and hyperparameters.

    ``strict=False`` skips model keys missing on either side; shapes must always match."""
    mesh = model_mesh(model)
    rank, world = _rank(mesh), _world(mesh)
    where = os.path.abspath(os.fspath(path))

    def prepare():
        check_materialized(model, "checkpoint.load")
        ckpt = F.resolve_dir(where)
        manifest = F.read_manifest(ckpt)
        F.check_files(ckpt, manifest, rank, world, meta_only=True)
        metadata = F.read_metadata(ckpt)
        F.check_files(ckpt, manifest, rank, world, meta_only=False, storage=F.storage_needs(metadata))
        view = S.CheckpointView(metadata, ckpt)
        model_dest = _check_model(model, view, ckpt, strict)
        dest: dict[str, Any] = {"model": model_dest}
        plan = None
        if optimizer is not None:
            groups = _read_param_groups(ckpt, view)
            _check_groups(model, optimizer, view, groups, ckpt)
            sharded = None if manifest is None else {tuple(x) for x in manifest.get("sharded_optim_state", [])}
            optim_dest, local = S.optim_dest_state(model, optimizer, view, sharded)
            dest.update(optim_dest)
            plan = (groups, local)
        return (ckpt, dest, plan), None

    (ckpt, dest, plan), _ = _agree(mesh, f"checkpoint.load({where})", prepare)

    def read():
        for unit in units_of(model):
            unit.reshard()
        _local_load(dest, ckpt)
        if optimizer is not None:
            groups, local = plan
            native = S.optim_native_state(optimizer, model, dest["optim"]["state"], local, groups)
            optimizer.load_state_dict(native)
        for unit in units_of(model):
            unit.zero_padding()
        return None, None

    _agree(mesh, f"checkpoint.load({ckpt})", read)


def _local_load(dest: dict, ckpt: str) -> None:
    """This rank reads its own chunks (no collectives: ``load`` agrees on the outcome itself)."""
    try:
        with _quiet_no_dist():
            dcp.load(dest, storage_reader=Reader(ckpt), planner=LoadPlanner(), no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"checkpoint.load({ckpt}): {_first_failure(e)}") from None


def _check_model(model: nn.Module, view: S.CheckpointView, ckpt: str, strict: bool) -> dict[str, Any]:
    leaves = S.model_leaves(model)
    missing = [k for k in leaves if k not in view.model]
    unexpected = [k for k in view.model if k not in leaves]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint {ckpt} does not match the model: missing keys {_short(missing)}, "
            f"unexpected keys {_short(unexpected)}; load a checkpoint of the same architecture "
            "(or pass strict=False to skip them)")
    for key, leaf in leaves.items():
        md = view.model.get(key)
        if md is None:
            continue
        saved = "a non-tensor value" if isinstance(md, BytesStorageMetadata) else tuple(md.size)
        if saved != tuple(leaf.size()):
            raise CheckpointError(
                f"parameter or buffer {key!r} has shape {tuple(leaf.size())} in the model but "
                f"{saved} in checkpoint {ckpt}")
    return {k: v for k, v in leaves.items() if k in view.model}


def _read_param_groups(ckpt: str, view: S.CheckpointView) -> list[dict]:
    if not view.has_optimizer:
        raise CheckpointError(
            f"checkpoint {ckpt} holds no optimizer state (it was saved without an optimizer); "
            "pass optimizer=None to load only the model")
    dest = view.param_groups_dest()
    _local_load(dest, ckpt)
    return dest["optim"]["param_groups"]


def _check_groups(model: nn.Module, optimizer: torch.optim.Optimizer, view: S.CheckpointView,
                  groups: list[dict], ckpt: str) -> None:
    infos = S.param_infos(model)
    mine = [[infos[id(p)].fqn if id(p) in infos else f"<not in model: {tuple(p.shape)}>" for p in g["params"]]
            for g in optimizer.param_groups]
    theirs = [list(g.get("params") or []) for g in groups]
    if len(mine) != len(theirs):
        raise CheckpointError(
            f"checkpoint {ckpt} has {len(theirs)} optimizer param groups, the optimizer has {len(mine)}: "
            "build the optimizer with the same param groups as the one that was saved")
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            only_a = [n for n in a if n not in b]
            only_b = [n for n in b if n not in a]
            raise CheckpointError(
                f"optimizer param group {i} does not match checkpoint {ckpt}: only in the optimizer "
                f"{_short(only_a)}, only in the checkpoint {_short(only_b)}"
                + ("" if only_a or only_b else " (same parameters, different order)"))
    known = {n for g in mine for n in g}
    stray = [n for n in view.optim_state if n not in known]
    if stray:
        raise CheckpointError(f"checkpoint {ckpt} has optimizer state for parameters the optimizer lacks: {_short(stray)}")


# ------------------------------------------------------------------------------------ plumbing
def _agree(mesh, what: str, fn: Callable[[], tuple[Any, Any]], **kw) -> tuple[Any, list]:
    """``_collectives.agree``, raising ``CheckpointError`` on the ranks that did not fail."""
    return C.agree(mesh, what, fn, error=CheckpointError, **kw)


@contextlib.contextmanager
def _quiet_no_dist():
    """DCP warns on every no_dist call that it assumes a single process; here that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _ranks(e: CheckpointException) -> str:
    ranks = sorted(e.failures)
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _first_failure(e: CheckpointException) -> str:
    rank = sorted(e.failures)[0]
    return C.describe(e.failures[rank][0])


def _rank(mesh) -> int:
    """The data-parallel index on the model's mesh (0 is the coordinator)."""
    return 0 if mesh is None else mesh.rank


def _world(mesh) -> int:
    return 1 if mesh is None else mesh.world


def _short(names: list[str], n: int = 10) -> str:
    return str(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")
