"""The checkpoint directory on disk: temporary directory, atomic publish, recovery from crashed
saves, the manifest, and checking every file before anything is read. Plain files, no
torch.distributed: ``checkpoint`` calls these on the right ranks.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import shutil
import uuid
import zlib
from typing import Optional

from ._dcp import Reader
from ._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointError", "CheckpointNotFoundError", "MANIFEST", "FORMAT", "FORMAT_VERSION", "METADATA"]

MANIFEST = "fsdp_core.json"
FORMAT = "fsdp_core.checkpoint"
FORMAT_VERSION = 1
METADATA = ".metadata"      # DCP's


# ------------------------------------------------------------------------------ atomic publish
def make_tmp_dir(target: str) -> str:
    """A fresh sibling of ``target`` to write the new checkpoint into."""
    parent, name = os.path.split(target)
    path = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    return path


def old_dirs(target: str) -> list[str]:
    parent, name = os.path.split(target)
    return sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*")), key=os.path.getmtime)


def recover_and_clean(target: str) -> None:
    """Undo a crash between the two fallback renames; delete leftovers of crashed saves."""
    parent, name = os.path.split(target)
    olds = old_dirs(target)
    if olds and not os.path.lexists(target):
        os.rename(olds.pop(), target)
    for d in olds + glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(d, ignore_errors=True)


def check_replaceable(target: str) -> None:
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise CheckpointError(f"checkpoint.save: {target} exists and is not a directory; pass a new path")
    entries = os.listdir(target)
    if entries and MANIFEST not in entries and METADATA not in entries:
        raise CheckpointError(
            f"checkpoint.save: refusing to replace {target}: it is a non-empty directory that is not "
            "a checkpoint; pass a new path or remove it"
        )


def swap_into_place(tmp: str, target: str) -> None:
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if exchange(tmp, target):      # atomic: target now holds the new checkpoint, tmp the old
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.old-{uuid.uuid4().hex[:12]}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: str, b: str) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE); False where the OS or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE) failed: {os.strerror(err)}")


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- checks before reading
def resolve_dir(where: str) -> str:
    if os.path.isdir(where):
        return where
    if os.path.lexists(where):
        raise CheckpointError(f"checkpoint.load: {where} is not a directory (a checkpoint is a directory)")
    olds = old_dirs(where)
    if olds:  # a save crashed between its two renames: the previous checkpoint is intact there
        return olds[-1]
    raise CheckpointNotFoundError(f"checkpoint.load: no checkpoint at {where}: the path does not exist")


def read_manifest(ckpt: str) -> Optional[dict]:
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.exists(path):
        if not os.path.exists(os.path.join(ckpt, METADATA)):
            raise CheckpointNotFoundError(
                f"checkpoint.load: {ckpt} is not a checkpoint: it has neither {MANIFEST} nor {METADATA}")
        return None  # a plain DCP checkpoint (written by other tools): no checksums to verify
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)):
            raise ValueError("not a manifest (no 'files' table)")
    except Exception as e:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt or truncated: {type(e).__name__}: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint manifest {path} has format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; this fsdp_core reads {FORMAT!r} up to version {FORMAT_VERSION}")
    return manifest


def read_metadata(ckpt: str):
    path = os.path.join(ckpt, METADATA)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {path} is missing")
    try:
        return Reader(ckpt).read_metadata()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt or truncated: {type(e).__name__}: {e}") from e


def storage_needs(metadata) -> dict[str, int]:
    """Data file -> the bytes the metadata says it must have (at least)."""
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def check_files(ckpt: str, manifest: Optional[dict], rank: int, world: int, *, meta_only: bool,
                storage: Optional[dict[str, int]] = None) -> None:
    """Every file present with the right size; this rank verifies the CRC-32 of its share of them."""
    records = {} if manifest is None else manifest["files"]
    if meta_only:
        names = [METADATA] if METADATA in records else []
    else:
        names = sorted((set(records) | set(storage or {})) - {METADATA})
    for i, fname in enumerate(names):
        fpath = os.path.join(ckpt, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: file {fpath} is missing")
        size = os.path.getsize(fpath)
        rec = records.get(fname)
        need = rec["bytes"] if rec else (storage or {}).get(fname, 0)
        if size < need or (rec and size != need):
            raise CheckpointError(
                f"checkpoint file {fpath} is truncated or was modified: it has {size} bytes, "
                f"the checkpoint needs {need}")
        if rec and (meta_only or i % world == rank):
            crc = crc32(fpath)
            if crc != rec["crc32"]:
                raise CheckpointError(
                    f"checkpoint file {fpath} is corrupt: CRC-32 {crc:08x}, the manifest records {rec['crc32']:08x}")


def file_record(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "crc32": crc32(path)}


def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc
