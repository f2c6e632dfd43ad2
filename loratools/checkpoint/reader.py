"""Open a base checkpoint lazily: a single ``.safetensors`` file, a folder holding one, a sharded
folder with ``*.safetensors.index.json``, or PyTorch pickles read only with ``weights_only=True``.

Nothing here loads a whole model: safetensors headers are parsed up front, tensors are read one at
a time from their byte range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import BY_TORCH
from ..errors import CheckpointNotFoundError, CorruptFileError
from ..jsonio import read_json
from .safetensors_io import Header, TensorInfo, load_tensor, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
UNDO_FILE = "loratools_undo.safetensors"  # undo data loratools writes beside a merge (ops/undo.py)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Shard:
    filename: str  # relative to the checkpoint folder (or the file's own name)
    header: Header | None  # None for pickles
    names: list[str]  # in data order


@dataclass
class Checkpoint:
    """A base checkpoint opened for streaming.

    ``tensors`` maps every tensor name to where it lives; ``shards`` keeps the files in order;
    ``index_name`` is the index file's name when the checkpoint is sharded; ``extra_files`` are the
    non-weight files (config, tokenizer, generation config…) an output copies.
    """

    path: Path
    is_file: bool
    shards: list[Shard]
    tensors: dict[str, TensorInfo]
    index_name: str | None = None
    index_metadata: dict = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    _pickled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now, on the CPU in its stored dtype."""
        if name in self._pickled:
            return self._pickled[name].clone()
        return load_tensor(self.tensors[name])

    def drop(self, names: set[str]) -> None:
        """Leave tensors out of this checkpoint (LoRA factors stored beside the weights they adapt)."""
        for shard in self.shards:
            shard.names = [n for n in shard.names if n not in names]
        self.shards = [s for s in self.shards if s.names]
        self.tensors = {n: t for n, t in self.tensors.items() if n not in names}

    def is_pickle(self) -> bool:
        return bool(self._pickled)


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(
            f"Checkpoint not found: {path}.", path=path, hint="Check the path (a folder, or a .safetensors file)."
        )
    if path.is_file():
        return _open_files(path.parent, [path], is_file=True, index=None)
    return _open_folder(path)


def _open_folder(folder: Path) -> Checkpoint:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    indexes = [p for p in files if p.name.endswith(".safetensors.index.json")]
    singles = [p for p in files if p.suffix == ".safetensors" and p.name not in ADAPTER_FILES
               and not p.name.endswith(UNDO_FILE)]
    if (folder / "adapter_config.json").exists() and not singles:
        raise CheckpointNotFoundError(
            f"{folder} holds an adapter (adapter_config.json), not a base model.",
            path=folder,
            hint="Pass the base model's folder as BASE and the adapter as ADAPTER.",
        )
    if len(indexes) > 1:
        raise CheckpointNotFoundError(
            f"{folder} holds several safetensors indexes ({', '.join(p.name for p in indexes)}); "
            "loratools cannot tell which is the model.",
            path=folder,
            hint="Point BASE at a folder with one model.",
        )
    if indexes:
        return _open_index(folder, indexes[0])
    if len(singles) == 1:
        return _open_files(folder, singles, is_file=False, index=None)
    if len(singles) > 1:
        raise CheckpointNotFoundError(
            f"{folder} holds several .safetensors files ({', '.join(p.name for p in singles)}) and no index.",
            path=folder,
            hint="Pass one file as BASE, or add the *.safetensors.index.json that names the shards.",
        )
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "adapter_model.bin"]
    bin_index = [p for p in files if p.name.endswith(".bin.index.json")]
    if bin_index:
        return _open_index(folder, bin_index[0])
    if len(pickles) == 1:
        return _open_files(folder, pickles, is_file=False, index=None)
    raise CheckpointNotFoundError(
        f"No model weights found in {folder} (looked for *.safetensors, an index, or one pytorch_model.bin).",
        path=folder,
    )


def _open_index(folder: Path, index_path: Path) -> Checkpoint:
    index = read_json(index_path, what="the index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(
            f"{index_path} is not a valid index (a JSON object with a 'weight_map' of file names).", path=index_path
        )
    order: list[str] = []
    for fname in weight_map.values():
        if fname not in order:
            order.append(fname)
    for fname in order:
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise CorruptFileError(f"{index_path} names a shard outside its folder: {fname!r}.", path=index_path)
        if not (folder / fname).is_file():
            raise CheckpointNotFoundError(
                f"Shard {fname} named by {index_path.name} is missing from {folder}.", path=folder / fname
            )
    ckpt = _open_files(folder, [folder / f for f in order], is_file=False, index=index_path)
    for name, fname in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.file.name != fname:
            raise CorruptFileError(
                f"{index_path.name} maps {name!r} to {fname}, but that file does not hold it.", path=index_path
            )
    # tensors in a shard that the index does not name are not part of the model (transformers ignores them)
    for shard in ckpt.shards:
        shard.names = [n for n in shard.names if weight_map.get(n) == shard.filename]
    ckpt.tensors = {n: ckpt.tensors[n] for s in ckpt.shards for n in s.names}
    meta = index.get("metadata")
    ckpt.index_metadata = dict(meta) if isinstance(meta, dict) else {}
    return ckpt


def _open_files(folder: Path, files: list[Path], *, is_file: bool, index: Path | None) -> Checkpoint:
    shards: list[Shard] = []
    tensors: dict[str, TensorInfo] = {}
    pickled: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            header = read_header(f)
            names = list(header.tensors)
            for n in names:
                if n in tensors:
                    raise CorruptFileError(f"Tensor {n!r} appears in two shards ({tensors[n].file.name}, {f.name}).")
            tensors.update(header.tensors)
            shards.append(Shard(f.name, header, names))
        elif f.suffix in PICKLE_SUFFIXES:
            sd = load_pickle(f)
            names = list(sd)
            for n, t in sd.items():
                pickled[n] = t
                tensors[n] = TensorInfo(n, f, BY_TORCH[t.dtype].st, tuple(t.shape), -1, -1 + t.numel() * t.element_size())
            shards.append(Shard(f.name, None, names))
        else:
            raise CheckpointNotFoundError(f"{f} is not a .safetensors file or a PyTorch checkpoint.", path=f)
    extra: list[Path] = []
    config: dict = {}
    if not is_file:
        weight_names = {s.filename for s in shards} | ({index.name} if index else set())
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name.startswith(".") or p.name in weight_names:
                continue
            if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") or p.name in ADAPTER_FILES:
                continue
            if p.name.lower() == "readme.md":  # the base's card describes the base, not the output
                continue
            extra.append(p)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        config = read_json(cfg_path, what="the model config")
    return Checkpoint(
        path=files[0] if is_file else folder,
        is_file=is_file,
        shards=shards,
        tensors=tensors,
        index_name=index.name if index else None,
        extra_files=extra,
        config=config,
        _pickled=pickled,
    )


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint through ``torch.load(weights_only=True)``: a pickle never runs code."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # old (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError… for bad files
        raise CorruptFileError(
            f"{path} could not be read as a weights-only PyTorch checkpoint: {str(e).splitlines()[0]}",
            path=path,
            hint="loratools never executes pickled code. Convert the file to safetensors with a trusted tool.",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(f"{path} does not hold a flat dict of tensors.", path=path)
    return {str(k): v for k, v in obj.items()}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A small file of tensors (an adapter) read whole: safetensors, or a weights-only pickle."""
    if path.suffix == ".safetensors":
        from .safetensors_io import read_header

        return {name: load_tensor(info) for name, info in read_header(path).tensors.items()}
    return load_pickle(path)
