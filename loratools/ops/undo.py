"""Provenance records and undo data.

Every output shard carries a ``loratools`` metadata record: the operation and the adapters merged
into that checkpoint now (path, format, sha256 of the weight files, weight, base model). unmerge
and swap read it to refuse adapters that were never merged.

Undo data lives where no loader looks — ``OUT/.loratools/undo.safetensors`` for a folder,
``.<name>.loratools/undo.safetensors`` beside a single-file OUT (vLLM loads every root
``*.safetensors``, llama.cpp and MLX glob ``model*``/``*.safetensors``: a hidden folder is seen by
none of them, and ``push`` leaves it out unless asked). Merges written by earlier versions kept
it as ``loratools_undo.safetensors`` beside the shards; it is still read from there. It holds:

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
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.reader import UNDO_FILE, Checkpoint
from ..checkpoint.safetensors_io import StreamWriter, TensorInfo, load_tensor, read_header, save_tensors, tensor_bytes
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


def read_file_record(path: Path) -> dict | None:
    """The loratools record of files loratools wrote at ``path`` — one file, or a folder's
    ``*.safetensors`` / ``*.gguf`` (safetensors metadata, GGUF key ``loratools.record``); None for
    files of any other tool."""
    files = [path] if path.is_file() else sorted([*path.glob("*.safetensors"), *path.glob("*.gguf")]) \
        if path.is_dir() else []
    for f in files:
        if f.suffix == ".gguf":
            return _gguf_record(f)
        if f.suffix == ".safetensors":
            meta = read_header(f).metadata
            if RECORD_KEY in meta:
                return load_json(meta[RECORD_KEY], where=f, what="the loratools record")
    return None


def _gguf_record(f: Path) -> dict | None:
    try:
        import gguf

        field = gguf.GGUFReader(str(f)).get_field("loratools.record")
    except Exception:  # not readable as GGUF: not ours to replace
        return None
    return None if field is None else load_json(str(field.contents()), where=f, what="the loratools record")


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


def encode_indices(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`encode_positions` from sorted flat indices (found block by block) instead of a mask."""
    index_bytes = idx.numel() * (4 if numel < 2**31 else 8)
    if index_bytes > (numel + 7) // 8:
        bits = np.zeros((numel + 7) // 8 * 8, dtype=np.uint8)
        bits[idx.numpy()] = 1
        return torch.from_numpy(np.packbits(bits))
    return idx.to(torch.int32 if numel < 2**31 else torch.int64)


def decode_positions(encoded: torch.Tensor, numel: int) -> torch.Tensor:
    if encoded.dtype == torch.uint8:
        return torch.from_numpy(np.flatnonzero(np.unpackbits(encoded.numpy())[:numel]))
    return encoded.long()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(bytes(tensor_bytes(t))).hexdigest()


# how the low-rank kernel of reversible merges forms its sums (ops/kernels.py apply_products); undo
# data without it was made by addmm (versions before it), and its exact unmerge uses addmm too
KERNEL = "mm-add"
KERNELS = ("addmm", KERNEL)

UNDO_DIR = ".loratools"
UNDO_NAME = "undo.safetensors"


def undo_dir(out: Path, single_file: bool) -> Path:
    """Where loratools keeps its own data for output ``out``: ``OUT/.loratools`` for a folder,
    ``.<name>.loratools`` beside a single file."""
    return out.parent / f".{out.name}{UNDO_DIR}" if single_file else out / UNDO_DIR


def legacy_undo(out: Path, single_file: bool) -> Path:
    """Where versions before the redesign put it (read, and removed when OUT is replaced)."""
    return out.parent / f"{out.stem}.{UNDO_FILE}" if single_file else out / UNDO_FILE


def undo_path(ckpt: Checkpoint) -> Path | None:
    for p in (undo_dir(ckpt.path, ckpt.is_file) / UNDO_NAME, legacy_undo(ckpt.path, ckpt.is_file)):
        if p.is_file():
            return p
    return None


def read_undo(ckpt: Checkpoint) -> UndoData | None:
    path = undo_path(ckpt)
    if path is None:
        return None
    header = read_header(path)
    meta = load_json(header.metadata.get(RECORD_KEY, "{}"), where=path, what="the undo record")
    adapters, sha = meta.get("adapters", []), meta.get("sha256", {})
    if not isinstance(adapters, list) or not isinstance(sha, dict):
        raise CorruptFileError(f"{path}: the undo record is damaged.", path=path)
    kernel = meta.get("kernel", "addmm")
    if kernel not in KERNELS:
        raise CorruptFileError(f"{path}: the undo record names the kernel {kernel!r}, which this version does not know.",
                               path=path, hint="It was written by a newer loratools; unmerge with that version.")
    undo = UndoData(adapters=list(adapters), sha256=dict(sha), kernel=kernel)
    idx: dict[str, TensorInfo] = {}
    val: dict[str, TensorInfo] = {}
    for key, info in header.tensors.items():
        kind, _, name = key.partition("::")
        if kind == "norm":
            undo.norms[name] = load_tensor(info)
        elif kind == "original":
            undo.originals[name] = load_tensor(info)
        elif kind == "patch_idx":  # kept encoded (indices or bit mask); decoded where it is applied
            idx[name] = info
        elif kind == "patch_val":
            val[name] = info
    if set(idx) != set(val):
        odd = sorted(set(idx) ^ set(val))[0]
        raise CorruptFileError(f"{path}: the undo data of {odd} lacks its positions or its values.", path=path)
    undo.patches = StoredPatches(idx, val)  # type: ignore[assignment]
    return undo


class StoredPatches(Mapping):
    """The patches of undo data as a mapping that reads one tensor's (positions, values) from the
    file when it is asked for: an exact unmerge holds one tensor's patches at a time, not all."""

    def __init__(self, idx: dict[str, TensorInfo], val: dict[str, TensorInfo]) -> None:
        self._idx, self._val = idx, val

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_tensor(self._idx[name]), load_tensor(self._val[name])

    def __contains__(self, name: object) -> bool:
        return name in self._idx

    def __iter__(self) -> Iterator[str]:
        return iter(self._idx)

    def __len__(self) -> int:
        return len(self._idx)


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
        self.counts = {"norm": 0, "original": 0, "patch": 0}  # what was kept, for the summary

    def add(self, undo: UndoData) -> None:
        """Move what ``undo`` holds to disk and empty it (its sha256 entries are kept here)."""
        self.sha256.update(undo.sha256)
        self.counts["norm"] += len(undo.norms)
        self.counts["original"] += len(undo.originals)
        self.counts["patch"] += len(undo.patches)
        tensors = undo_tensors(undo)
        undo.norms.clear()
        undo.originals.clear()
        undo.patches.clear()
        undo.sha256.clear()
        if tensors:
            self.folder.mkdir(parents=True, exist_ok=True)
            part = self.folder / f"part-{len(self.parts):06d}.safetensors"
            save_tensors(part, tensors)
            self.parts.append(part)

    def finish(self, path: Path, adapters: list[dict]) -> int:
        """Join the parts into ``path`` (bytes copied, nothing loaded); returns its size, 0 if empty."""
        if not self.parts:
            return 0
        infos = sorted((info for p in self.parts for info in read_header(p).tensors.values()), key=lambda i: i.name)
        meta = {"adapters": adapters, "sha256": self.sha256, "kernel": KERNEL}
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

    def reasons(self) -> list[str]:
        """Why undo data was kept, in words for the summary."""
        why = []
        if self.counts["patch"]:
            why.append(f"--reversible: the values rounding would not give back ({self.counts['patch']} tensor(s))")
        if self.counts["norm"]:
            why.append(f"DoRA: the row norms without which the DoRA merge cannot be undone ({self.counts['norm']} "
                       "tensor(s))")
        if self.counts["original"]:
            why.append(f"tensors replaced whole (modules_to_save): the originals, without which they cannot be "
                       f"restored ({self.counts['original']})")
        return why
