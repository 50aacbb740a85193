"""Nothing reachable from the network, nothing untrusted unpickled (issue #18).

- Every listening TCP socket of a campaign (the parent and every rank of the pool, and the
  freshly spawned ranks of the spawn-per-case measurement) is bound to a loopback address.
- A checkpoint's ``.metadata`` is unpickled with an allowlist: a crafted one (a pickle whose
  ``__reduce__`` would create a file) is refused, with or without our manifest, and the file is
  never created.
"""
from __future__ import annotations

import ipaddress
import os
import stat
import sys

import pytest

from verify.ranks.pool import RankPool
from verify.ranks.spawn import spawn_run

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# -- listening sockets, from /proc ------------------------------------------------------------

def _address(hex_addr: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # IPv6: four 32-bit words, each in host (little-endian) order
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def _listening_by_inode(pid: int) -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every TCP socket in LISTEN state in pid's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], int(cols[9])
            if state == "0A":  # TCP_LISTEN
                addr, port = local.split(":")
                out[inode] = (str(_address(addr)), int(port, 16))
    return out


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket that process ``pid`` holds open."""
    table = _listening_by_inode(pid)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inode = int(target[len("socket:["):-1])
            if inode in table:
                found.append(table[inode])
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _not_loopback(by_process: dict[str, list[tuple[str, int]]]) -> dict[str, list]:
    return {who: [s for s in socks if not _is_loopback(s[0])]
            for who, socks in by_process.items() if any(not _is_loopback(s[0]) for s in socks)}


def own_listening_sockets(payload, ctx):
    import torch
    import torch.distributed as dist
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.group)     # the transport is up and in use
    return listening_sockets(os.getpid())


def test_listening_sockets_are_all_loopback():
    with RankPool(4, timeout_s=60.0) as pool:
        res = pool.run(4, own_listening_sockets, None)   # every rank up, every group in use
        assert res.ok, res.error
        by_process = {f"parent (pid {os.getpid()})": listening_sockets(os.getpid())}
        by_process.update({f"rank {r} (pid {pid})": listening_sockets(pid)
                           for r, pid in enumerate(pool.pids)})
        # the check sees the ranks' gloo listeners (it is not blind) ...
        assert all(by_process[k] for k in by_process if k.startswith("rank")), by_process
        # ... and every one of them, and the parent's, is on loopback
        assert not _not_loopback(by_process), _not_loopback(by_process)

        # the rendezvous is a file in a private directory, not a listener; a fresh one per
        # generation, removed when the generation stops
        store_dir = pool._holder[0].store_dir
        assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700
        pool._restart()
        assert not os.path.exists(store_dir)
        new_dir = pool._holder[0].store_dir
        assert new_dir != store_dir and os.path.isdir(new_dir)
        assert pool.run(2, own_listening_sockets, None).ok
    assert not os.path.exists(new_dir)


def test_spawned_ranks_listen_on_loopback_only():
    _, values = spawn_run(2, own_listening_sockets, None)
    by_rank = {f"spawned rank {r}": socks for r, socks in enumerate(values)}
    assert all(by_rank.values()), by_rank
    assert not _not_loopback(by_rank), _not_loopback(by_rank)


# -- checkpoints are data, not code -----------------------------------------------------------

class CreatesFile:
    """Unpickling this creates the file ``path`` (what a crafted checkpoint could do)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _trained():
    import sharder_cases as sc
    import sharder_models as zm
    m = zm.build_zoo(0)
    opt = sc._opt("adamw", list(m.named_parameters()))
    zm.loss_of(m, zm.batch(0, 0)).backward()
    opt.step()
    opt.zero_grad()
    return m, opt


def _fresh():
    import sharder_cases as sc
    import sharder_models as zm
    m = zm.build_zoo(9)
    return m, sc._opt("adamw", list(m.named_parameters()))


def _forge_metadata(ckpt_dir, marker: str, *, keep_manifest: bool) -> None:
    """Replace ``.metadata`` by a pickle of the real metadata with a file-creating object inside;
    with the manifest kept, its size and CRC-32 are updated, as a forger would."""
    import json
    import pickle

    from fsdp_core.checkpoint import _files as F
    meta_path = os.path.join(ckpt_dir, F.METADATA)
    with open(meta_path, "rb") as f:
        metadata = pickle.load(f)                  # our own, trusted file
    metadata.planner_data = {"x": CreatesFile(marker)}
    with open(meta_path, "wb") as f:
        pickle.dump(metadata, f)
    manifest_path = os.path.join(ckpt_dir, F.MANIFEST)
    if keep_manifest:
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest["files"][F.METADATA] = F.file_record(meta_path)
        F.write_json(manifest_path, manifest)
    else:
        os.remove(manifest_path)


@pytest.mark.parametrize("keep_manifest", [True, False], ids=["with_manifest", "plain_dcp"])
def test_crafted_metadata_is_refused_and_never_runs(tmp_path, keep_manifest):
    import pickle
    import shutil

    import fsdp_core.checkpoint as ckpt
    good = tmp_path / "good"
    ckpt.save(good, *_trained())
    forged = tmp_path / "forged"
    shutil.copytree(good, forged)
    marker = str(tmp_path / "pwned")
    _forge_metadata(forged, marker, keep_manifest=keep_manifest)

    # the forged file is live: a plain unpickler would create the marker
    probe = str(tmp_path / "probe")
    with open(forged / ".metadata", "rb") as f:
        pickle.loads(f.read().replace(marker.encode(), probe.encode()))
    assert os.path.exists(probe)

    with pytest.raises(ckpt.CheckpointError, match=r"(io|builtins)\.open.*refusing to unpickle"):
        ckpt.load(forged, *_fresh())
    assert not os.path.exists(marker)
    ckpt.load(good, *_fresh())                        # the genuine one still loads


# the crafted file is written by plain dcp.save(no_dist=True), which warns that it is one process
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_crafted_non_tensor_value_is_refused_and_never_runs(tmp_path):
    """A plain DCP checkpoint whose optimizer hyperparameter (a non-tensor value, stored with
    torch.save) would create a file: read with weights_only=True, so refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import fsdp_core.checkpoint as ckpt
    m, opt = _trained()
    msd, osd = get_state_dict(m, opt)
    marker = str(tmp_path / "pwned")
    osd["param_groups"][0]["lr"] = CreatesFile(marker)
    path = str(tmp_path / "plain")
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)
    assert not os.path.exists(marker)
    with pytest.raises(ckpt.CheckpointError, match=r"(io|builtins)\.open"):
        ckpt.load(path, *_fresh())
    assert not os.path.exists(marker)


def test_a_killed_process_store_dir_is_removed_by_the_next_one():
    import subprocess
    import tempfile

    from verify.ranks.rank import private_store_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tempfile.mkdtemp(prefix=f"verify-pool-{int(dead.stdout)}-")
    live = tempfile.mkdtemp(prefix=f"verify-pool-{os.getpid()}-")
    try:
        fresh = private_store_dir("spawn")
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
        assert not os.path.exists(stale) and os.path.isdir(live)
    finally:
        for d in (stale, live, fresh):
            if os.path.isdir(d):
                os.rmdir(d)
