"""Provenance records and undo data.

Every output shard carries a ``loratools`` metadata record: the operation and the adapters merged
into that checkpoint now (path, format, sha256 of the weight files, weight, base model). unmerge
and swap read it to refuse adapters that were never merged.

``loratools_undo.safetensors`` sits beside a merge's shards when it is needed:

* ``norm::<tensor>``: DoRA's ‖W+ΔW‖ per output (float32) — DoRA cannot be taken out without it;
* ``original::<tensor>``: a tensor an adapter replaced whole (``modules_to_save``);
* with ``--reversible``: ``patch_idx::<tensor>`` (int32/int64 flat indices, or a uint8 bit mask,
  whichever is smaller)
  and ``patch_val::<tensor>`` — the few original values that round(round(W+ΔW) − ΔW) does not
  give back — plus the sha256 of each original tensor, so unmerge restores it bit for bit and
  proves it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.reader import UNDO_FILE, Checkpoint
from ..checkpoint.safetensors_io import StreamWriter, load_tensor, read_header, save_tensors, tensor_bytes
from ..errors import CorruptFileError
from ..jsonio import load_json
from .plan import UndoData

RECORD_KEY = "loratools"


def read_record(ckpt: Checkpoint) -> dict | None:
    """The provenance record of a checkpoint written by loratools (None for any other). A record
    that is there but broken is a CorruptFileError: unmerge's safety check must not silently
    switch itself off."""
    for shard in ckpt.shards:
        if shard.header is not None and RECORD_KEY in shard.header.metadata:
            where = ckpt.path / shard.filename if not ckpt.is_file else ckpt.path
            record = load_json(shard.header.metadata[RECORD_KEY], where=where, what="the loratools record")
            adapters = record.get("adapters", [])
            if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
                raise CorruptFileError(f"{where}: the loratools record's 'adapters' is not a list of records.",
                                       path=where, hint="The file was changed after loratools wrote it.")
            return record
    return None


def encode_positions(changed: torch.Tensor) -> torch.Tensor:
    """Flat positions of the True entries of a bool tensor: int32 indices when few, else a packed
    bit mask (uint8) — whichever is smaller. Encoded at once so undo data stays small in memory."""
    flat = changed.reshape(-1)
    n = flat.numel()
    count = int(flat.sum())
    index_bytes = count * (4 if n < 2**31 else 8)
    if index_bytes > (n + 7) // 8:
        return torch.from_numpy(np.packbits(flat.numpy().astype(np.uint8)))
    return torch.nonzero(flat).reshape(-1).to(torch.int32 if n < 2**31 else torch.int64)


def decode_positions(encoded: torch.Tensor, numel: int) -> torch.Tensor:
    if encoded.dtype == torch.uint8:
        return torch.from_numpy(np.flatnonzero(np.unpackbits(encoded.numpy())[:numel]))
    return encoded.long()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(bytes(tensor_bytes(t))).hexdigest()


def undo_name(out: Path, single_file: bool) -> str:
    """``loratools_undo.safetensors`` inside a folder output, ``<stem>.loratools_undo.safetensors``
    beside a single-file one."""
    return f"{out.stem}.{UNDO_FILE}" if single_file else UNDO_FILE


def undo_path(ckpt: Checkpoint) -> Path:
    if ckpt.is_file:
        return ckpt.path.parent / undo_name(ckpt.path, True)
    return ckpt.path / UNDO_FILE


def read_undo(ckpt: Checkpoint) -> UndoData | None:
    path = undo_path(ckpt)
    if not path.is_file():
        return None
    header = read_header(path)
    meta = load_json(header.metadata.get(RECORD_KEY, "{}"), where=path, what="the undo record")
    adapters, sha = meta.get("adapters", []), meta.get("sha256", {})
    if not isinstance(adapters, list) or not isinstance(sha, dict):
        raise CorruptFileError(f"{path}: the undo record is damaged.", path=path)
    undo = UndoData(adapters=list(adapters), sha256=dict(sha))
    for key, info in header.tensors.items():
        kind, _, name = key.partition("::")
        t = load_tensor(info)
        if kind == "norm":
            undo.norms[name] = t
        elif kind == "original":
            undo.originals[name] = t
        elif kind == "patch_idx":  # kept encoded (indices or bit mask); decoded where it is applied
            undo.patches[name] = (t, undo.patches.get(name, (None, None))[1])  # type: ignore[arg-type]
        elif kind == "patch_val":
            undo.patches[name] = (undo.patches.get(name, (None, None))[0], t)  # type: ignore[arg-type]
    return undo


def undo_tensors(undo: UndoData) -> dict[str, torch.Tensor]:
    """The file entries of undo data: ``norm::``, ``original::``, ``patch_idx::``, ``patch_val::``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in undo.norms.items():
        tensors[f"norm::{name}"] = t.float().contiguous()
    for name, t in undo.originals.items():
        tensors[f"original::{name}"] = t.contiguous()
    for name, (positions, val) in undo.patches.items():
        tensors[f"patch_idx::{name}"] = positions.contiguous()  # already encoded (encode_positions)
        tensors[f"patch_val::{name}"] = val.contiguous()
    return tensors


class UndoSpill:
    """Undo data written to disk tensor by tensor as it is computed (one small part file each) and
    joined into one file at the end, so that it never accumulates in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts: list[Path] = []
        self.sha256: dict[str, str] = {}

    def add(self, undo: UndoData) -> None:
        """Move what ``undo`` holds to disk and empty it (its sha256 entries are kept here)."""
        self.sha256.update(undo.sha256)
        tensors = undo_tensors(undo)
        undo.norms.clear()
        undo.originals.clear()
        undo.patches.clear()
        undo.sha256.clear()
        if tensors:
            self.folder.mkdir(exist_ok=True)
            part = self.folder / f"part-{len(self.parts):06d}.safetensors"
            save_tensors(part, tensors)
            self.parts.append(part)

    def finish(self, path: Path, adapters: list[dict]) -> int:
        """Join the parts into ``path`` (bytes copied, nothing loaded); returns its size, 0 if empty."""
        if not self.parts:
            return 0
        infos = sorted((info for p in self.parts for info in read_header(p).tensors.values()), key=lambda i: i.name)
        meta = {"adapters": adapters, "sha256": self.sha256}
        writer = StreamWriter(path, [(i.name, i.dtype, i.shape) for i in infos],
                              {RECORD_KEY: json.dumps(meta, separators=(",", ":"))})
        by_name = {i.name: i for i in infos}
        try:
            for name in writer.order:
                writer.copy_range(name, by_name[name])
        except BaseException:
            writer.abort()
            raise
        writer.close()
        for p in self.parts:
            p.unlink()
        self.folder.rmdir()
        return path.stat().st_size
