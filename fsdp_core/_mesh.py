"""What ``fully_shard(mesh=...)`` shards over: a 1-D group, or a 2-D (replicate, shard) mesh (HSDP).

``ShardMesh`` is the sharder's own view of either: the *shard group* (the ranks a unit's flat
buffer is split over; size S), the *replicate group* (the ranks holding the same shard; size R,
``None`` when R = 1), and this rank's coordinates. A 1-D mesh or a process group is the case
R = 1. The data-parallel index of a rank is ``r * S + s`` (row-major mesh order), the index a
deterministic run uses to pick its micro-batches, and W = R * S divides the gradient.

``hsdp_mesh(group, replicate, shard)`` builds a 2-D ``DeviceMesh`` over the ranks of an existing
group; ``prepare_hsdp_groups`` lets it do so on a subset of the ranks (the rank pool runs a case
on ranks 0..W-1 of 8).

Besides ``_collectives``, this is the one module that calls ``torch.distributed`` itself: to
build process groups and meshes and to ask which ranks they hold (no communication).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from . import _collectives as C

__all__ = ["ShardMesh", "resolve_mesh", "hsdp_mesh", "prepare_hsdp_groups"]


@dataclass(frozen=True, eq=False)
class ShardMesh:
    shard_group: Any                 # ProcessGroup of S ranks (a unit's shards)
    replicate_group: Any             # ProcessGroup of R ranks holding the same shard; None if R == 1
    R: int
    S: int
    r: int                           # this rank's index in the replicate group
    s: int                           # this rank's index in the shard group
    device_mesh: Any = None          # the DeviceMesh it came from, if any

    @property
    def world(self) -> int:
        """W = R * S: the data-parallel size (the gradient is divided by it)."""
        return self.R * self.S

    @property
    def rank(self) -> int:
        """The data-parallel index ``r * S + s`` (row-major mesh order)."""
        return self.r * self.S + self.s

    @property
    def is_hsdp(self) -> bool:
        return self.R > 1

    @property
    def key(self) -> tuple:
        """Identifies the mesh on this rank (global ranks of both groups)."""
        rep = () if self.replicate_group is None else tuple(dist.get_process_group_ranks(self.replicate_group))
        return tuple(dist.get_process_group_ranks(self.shard_group)), rep

    def describe(self) -> str:
        if not self.is_hsdp:
            return f"a 1-D mesh of ranks {list(self.key[0])}"
        return f"a ({self.R}, {self.S}) mesh (shard ranks {list(self.key[0])}, replicate ranks {list(self.key[1])})"

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj``, in data-parallel order (collective over the whole mesh): a gather
        in the shard group, then a gather of those lists in the replicate group."""
        row = C.all_gather_object(obj, self.shard_group)
        if self.replicate_group is None:
            return row
        rows = C.all_gather_object(row, self.replicate_group)
        return [x for rw in rows for x in rw]


def resolve_mesh(mesh, what: str = "fully_shard") -> ShardMesh:
    """``None`` (the default group), a ProcessGroup, a 1-D DeviceMesh or a 2-D (replicate,
    shard) DeviceMesh -> ShardMesh. Raises, saying what to pass, for anything else."""
    if not C.initialized():
        raise RuntimeError(
            "fully_shard needs an initialized default process group: call "
            "torch.distributed.init_process_group('gloo' or 'nccl') on every rank first"
        )
    if mesh is None:
        group = dist.group.WORLD
        return ShardMesh(group, None, 1, dist.get_world_size(group), 0, dist.get_rank(group))
    if isinstance(mesh, dist.ProcessGroup):
        return ShardMesh(mesh, None, 1, dist.get_world_size(mesh), 0, dist.get_rank(mesh))
    get_group = getattr(mesh, "get_group", None)
    if get_group is None:
        raise TypeError(
            f"{what}: mesh must be None, a ProcessGroup, a 1-D DeviceMesh or a 2-D (replicate, "
            f"shard) DeviceMesh, got {type(mesh).__name__}")
    ndim = getattr(mesh, "ndim", 1)
    if ndim == 1:
        group = get_group()
        return ShardMesh(group, None, 1, dist.get_world_size(group), 0, dist.get_rank(group), mesh)
    if ndim != 2:
        raise ValueError(
            f"{what}: got a {ndim}-D DeviceMesh {tuple(mesh.shape)}; fully_shard takes a 1-D mesh "
            "(FSDP) or a 2-D one with dims (replicate, shard) (HSDP): flatten the other dims "
            "(e.g. mesh['dp_replicate', 'dp_shard']) or slice the mesh first")
    R, S = (int(x) for x in mesh.shape)
    rep, shard = get_group(0), get_group(1)
    r_size, s_size = dist.get_world_size(rep), dist.get_world_size(shard)
    tensor = mesh.mesh
    me = dist.get_rank()
    where = (tensor == me).nonzero()
    if where.numel() == 0:
        raise ValueError(f"{what}: this rank (global rank {me}) is not in the mesh {tensor.tolist()}")
    i, j = (int(x) for x in where[0])
    row, col = tensor[i].tolist(), tensor[:, j].tolist()
    if (r_size, s_size) != (R, S) or r_size * s_size != mesh.size() \
            or sorted(dist.get_process_group_ranks(shard)) != sorted(row) \
            or sorted(dist.get_process_group_ranks(rep)) != sorted(col):
        raise ValueError(
            f"{what}: the 2-D mesh {tensor.tolist()} (dims replicate x shard = {R} x {S}) does not "
            f"match its process groups: replicate group of {r_size} ranks "
            f"{dist.get_process_group_ranks(rep)}, shard group of {s_size} ranks "
            f"{dist.get_process_group_ranks(shard)}, whose sizes must multiply to the mesh's "
            f"{mesh.size()} ranks; build it with fsdp_core.hsdp_mesh(group, replicate, shard) or "
            "init_device_mesh(device_type, (replicate, shard))")
    return ShardMesh(shard, rep if R > 1 else None, R, S, dist.get_rank(rep), dist.get_rank(shard), mesh)


# [Note: sub-groups inside a pool]
# ``dist.new_group`` must be entered by every rank of the default group, in the same order (the
# group's name is a counter that every rank advances). A rank pool runs a case on ranks 0..W-1
# of 8 while the others idle, so a mesh's sub-groups cannot be created inside the case. Two ways
# out, both here: ``prepare_hsdp_groups(shapes)``, called on every rank (a pool task at the full
# world size), creates the row and column groups of those mesh shapes ahead of time and caches
# them by rank set; ``hsdp_mesh`` then only looks them up. ``hsdp_mesh`` over the whole default
# group creates what is missing itself (every rank calls it). Groups of one rank need no
# agreement and are made on the spot (``use_local_synchronization``: only the member enters).
# (``new_group(use_local_synchronization=True)`` for bigger groups is no way out: its hashed
# name counts the groups each rank already has, which differs between pool ranks.)
_groups: dict[tuple[int, ...], Any] = {}


def _mesh_rank_sets(ranks: list[int], R: int, S: int) -> list[tuple[int, ...]]:
    """The shard groups (rows) then the replicate groups (columns) of the (R, S) mesh over ranks."""
    rows = [tuple(ranks[r * S:(r + 1) * S]) for r in range(R)]
    cols = [tuple(ranks[s::S]) for s in range(S)]
    return rows + cols


def _singleton(rank: int):
    key = (rank,)
    group = _groups.get(key)
    if group is None:
        group = _groups[key] = dist.new_group([rank], use_local_synchronization=True)
    return group


def _check_shape(replicate, shard, W: int, what: str) -> None:
    if not (isinstance(replicate, int) and isinstance(shard, int)) or replicate < 1 or shard < 1 \
            or replicate * shard != W:
        raise ValueError(
            f"{what}: replicate x shard = {replicate} x {shard} does not multiply to the group's "
            f"{W} ranks; pick dims whose product is the group size")


def prepare_hsdp_groups(shapes, *, ranks: Optional[list[int]] = None) -> None:
    """Collective over the *default* group: every rank calls it with the same arguments. Creates
    (once per process) the shard and replicate groups of each (replicate, shard) mesh shape over
    ``ranks[:R*S]`` (default: global ranks 0..R*S-1), so that ``hsdp_mesh`` can later build those
    meshes on those ranks alone. See [Note: sub-groups inside a pool]."""
    if not C.initialized():
        raise RuntimeError("prepare_hsdp_groups needs an initialized default process group (init_process_group)")
    world = dist.get_world_size()
    base = list(range(world)) if ranks is None else [int(r) for r in ranks]
    for shape in shapes:
        R, S = (int(x) for x in shape)
        if R * S > len(base):
            raise ValueError(f"prepare_hsdp_groups: a ({R}, {S}) mesh needs {R * S} ranks, only {len(base)} given")
        for rs in _mesh_rank_sets(base[:R * S], R, S):
            if 1 < len(rs) < R * S and rs not in _groups:  # full-size dims reuse the caller's group
                _groups[rs] = dist.new_group(list(rs))


def hsdp_mesh(group=None, replicate: int = 1, shard: Optional[int] = None, *, device_type: Optional[str] = None,
              mesh_dim_names: tuple[str, str] = ("replicate", "shard")):
    """A 2-D ``DeviceMesh`` of shape (replicate, shard) over the ranks of ``group`` (default:
    every rank) in group-rank order, row-major: group rank ``r * shard + s`` sits at (r, s);
    the shard groups are the rows (consecutive ranks), the replicate groups the columns.
    ``fully_shard(module, mesh=...)`` takes it for HSDP, and so does FSDP2's ``fully_shard``.

    Called by every rank of ``group``. Over the whole default group it creates the sub-groups it
    needs (every rank calls it, like ``init_device_mesh``); over a smaller group they must have
    been created by ``prepare_hsdp_groups`` on every rank of the default group first (see
    [Note: sub-groups inside a pool]), else it raises instead of hanging."""
    if not C.initialized():
        raise RuntimeError("hsdp_mesh needs an initialized default process group (init_process_group)")

    group = dist.group.WORLD if group is None else group
    ranks = dist.get_process_group_ranks(group)
    W = len(ranks)
    shard = W // replicate if shard is None and isinstance(replicate, int) and replicate > 0 else shard
    _check_shape(replicate, shard, W, "hsdp_mesh")
    if device_type is None:
        device_type = C.comm_device(group).type
    me = dist.get_rank(group)
    r, s = divmod(me, shard)
    row, col = tuple(ranks[r * shard:(r + 1) * shard]), tuple(ranks[s::shard])
    needed = [rs for rs in (row, col) if 1 < len(rs) < W and rs not in _groups]
    if needed:
        if W == dist.get_world_size():  # every rank is here: create every row and column
            for rs in _mesh_rank_sets(ranks, replicate, shard):
                if 1 < len(rs) < W and rs not in _groups:
                    _groups[rs] = dist.new_group(list(rs))
        else:
            raise RuntimeError(
                f"hsdp_mesh: the ({replicate}, {shard}) mesh over ranks {ranks} needs sub-groups "
                f"{[list(x) for x in needed]} that do not exist yet, and creating a group needs "
                f"every rank of the default group ({dist.get_world_size()}), not only these {W}: "
                f"call fsdp_core.prepare_hsdp_groups([({replicate}, {shard})]) on every rank first")

    def pick(rs):
        if len(rs) == W:
            return group
        if len(rs) == 1:
            return _singleton(rs[0])
        return _groups[rs]

    mesh = torch.tensor(ranks, dtype=torch.int).view(replicate, shard)
    return DeviceMesh.from_group([pick(col), pick(row)], device_type, mesh=mesh,
                                 mesh_dim_names=tuple(mesh_dim_names))
