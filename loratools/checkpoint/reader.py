"""Open a base checkpoint lazily: a single ``.safetensors`` file, a folder holding one, a sharded
folder with ``*.safetensors.index.json``, or PyTorch pickles read only with ``weights_only=True``.

Nothing here loads a whole model: safetensors headers are parsed up front, tensors are read one at
a time from their byte range.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dtypes import BY_TORCH
from ..errors import CheckpointNotFoundError, CorruptFileError, UnsupportedAdapterError
from ..jsonio import SourcedDict, clip, get_field, read_json
from .safetensors_io import Header, TensorInfo, load_tensor, load_tensors, read_header
from .stream import mapped

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
    non-weight files (config, tokenizer, generation config…) an output copies — never a link that
    leads out of the folder (:func:`link_escapes`); ``warnings`` says what was left out and why,
    for the command to show.
    """

    path: Path
    is_file: bool
    shards: list[Shard]
    tensors: dict[str, TensorInfo]
    index_name: str | None = None
    index_metadata: dict = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _pickled: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now, on the CPU in its stored dtype."""
        if name in self._pickled:
            return self._pickled[name].clone()
        return load_tensor(self.tensors[name])

    @contextmanager
    def view(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor as a read-only view of the page cache (no copy), unmapped when the block ends;
        drop every view of it by then. Pickled tensors are already in memory."""
        if name in self._pickled:
            yield self._pickled[name]
            return
        info = self.tensors[name]
        dtype = info.torch_dtype
        with mapped(info.file, info.begin, info.nbytes, dtype) as flat:
            t = flat.view(info.shape)
            del flat
            try:
                yield t
            finally:
                del t

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
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path} is neither a file nor a folder.", path=path)
    return _open_folder(path)


def link_escapes(entry: Path, folder: Path) -> Path | None:
    """Where a link in ``folder`` leads when that is outside it, else None (not a link, or one
    that stays inside). A Hub cache snapshot is the one exception: its files are links into the
    repository's ``blobs/`` folder (``models--org--name/snapshots/<rev>/f -> ../../blobs/<sha>``)."""
    if not entry.is_symlink():
        return None
    target = Path(os.path.realpath(entry))
    home = Path(os.path.realpath(folder))
    if target.is_relative_to(home):
        return None
    parts = home.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        repo = Path(*parts[:i])
        if i + 1 < len(parts) and repo.name.count("--") >= 1 and target.is_relative_to(repo / "blobs"):
            return None
    return target


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


def _shard_name(fname: str, index_path: Path) -> str:
    """A shard named by an index: a plain file name in the index's folder, nothing else."""
    if not fname or "/" in fname or "\\" in fname or "\x00" in fname or fname.startswith(".") or ":" in fname:
        raise CorruptFileError(f"{index_path} names a shard outside its folder: {clip(repr(fname))}.",
                               path=index_path, hint="An index names shard files in its own folder; this one may have "
                               "been made to read other files.")
    return fname


def _open_index(folder: Path, index_path: Path) -> Checkpoint:
    index = read_json(index_path, what="the index")
    weight_map = get_field(index, "weight_map", dict, None, where=index_path, what="the index",
                           check=lambda m: all(isinstance(v, str) for v in m.values()),
                           must="a JSON object of tensor names to file names")
    if weight_map is None:
        raise CorruptFileError(f"{index_path} is not a valid index: it has no 'weight_map' of file names.",
                               path=index_path)
    order = list(dict.fromkeys(_shard_name(f, index_path) for f in weight_map.values()))
    for fname in order:
        try:
            present = (folder / fname).is_file()
        except OSError:  # a name the file system refuses (too long…)
            present = False
        if not present:
            raise CheckpointNotFoundError(
                f"Shard {clip(fname)} named by {index_path.name} is missing from {folder}.", path=folder / fname
            )
    ckpt = _open_files(folder, [folder / f for f in order], is_file=False, index=index_path)
    for name, fname in weight_map.items():
        info = ckpt.tensors.get(name)
        if info is None or info.file.name != fname:
            raise CorruptFileError(
                f"{index_path} maps {clip(repr(name))} to {clip(fname)}, but that file does not hold it.",
                path=index_path
            )
    # tensors in a shard that the index does not name are not part of the model (transformers ignores them)
    for shard in ckpt.shards:
        shard.names = [n for n in shard.names if weight_map.get(n) == shard.filename]
    ckpt.tensors = {n: ckpt.tensors[n] for s in ckpt.shards for n in s.names}
    ckpt.index_metadata = dict(get_field(index, "metadata", dict, {}, where=index_path, what="the index"))
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
                    raise CorruptFileError(f"Tensor {clip(repr(n))} appears in two shards ({tensors[n].file.name}, "
                                           f"{f.name}).", path=f)
            tensors.update(header.tensors)
            shards.append(Shard(f.name, header, names))
        elif f.suffix in PICKLE_SUFFIXES:
            sd = load_pickle(f)
            names = list(sd)
            for n, t in sd.items():
                if n in tensors:
                    raise CorruptFileError(f"Tensor {clip(repr(n))} appears in two shards ({tensors[n].file.name}, "
                                           f"{f.name}).", path=f)
                row = BY_TORCH.get(t.dtype)
                if row is None or t.layout != torch.strided:
                    raise UnsupportedAdapterError(
                        f"{f}: tensor {clip(repr(n))} is a {'' if t.layout == torch.strided else 'sparse '}"
                        f"{str(t.dtype).removeprefix('torch.')} tensor, which loratools cannot write to safetensors.",
                        path=f, tensor=n)
                pickled[n] = t
                tensors[n] = TensorInfo(n, f, row.st, tuple(t.shape), -1, -1 + t.numel() * t.element_size())
            shards.append(Shard(f.name, None, names))
        else:
            raise CheckpointNotFoundError(f"{f} is not a .safetensors file or a PyTorch checkpoint.", path=f)
    extra: list[Path] = []
    notes: list[str] = []
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
            outside = link_escapes(p, folder)
            if outside is not None:
                notes.append(f"left out {clip(p.name)} of {folder}: it is a link to {clip(str(outside))}, outside the "
                             "base folder")
                continue
            extra.append(p)
    cfg_path = folder / "config.json"
    if cfg_path.is_file() and link_escapes(cfg_path, folder) is None:
        config = read_model_config(cfg_path)
    return Checkpoint(
        path=files[0] if is_file else folder,
        is_file=is_file,
        shards=shards,
        tensors=tensors,
        index_name=index.name if index else None,
        extra_files=extra,
        config=config,
        warnings=notes,
        _pickled=pickled,
    )


# fields of config.json loratools itself reads (layout: Conv1D architectures, tied embeddings; formats: the
# pipeline component; merge: the Hub id): each must have its type. Counts (heads, layers) are checked where
# they are used, since diffusers' component configs give some of them other types.
_CONFIG_FIELDS = {
    "model_type": (str, ""),
    "architectures": (list, "a list of strings"),
    "tie_word_embeddings": (bool, ""),
    "_name_or_path": (str, ""),
}


def read_model_config(path: Path) -> dict:
    """A base's config.json, the fields loratools reads checked; the dict remembers its file."""
    raw = read_json(path, what="the model config")
    for key, (kind, must) in _CONFIG_FIELDS.items():
        get_field(raw, key, kind, where=path, what="the model config", must=must,
                  check=(lambda v: all(isinstance(x, str) for x in v)) if kind is list else None)
    config = SourcedDict(raw)
    config.source = path
    return config


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint through ``torch.load(weights_only=True)``: a pickle never runs code."""
    try:
        with warnings.catch_warnings():  # torch's own UserWarnings would print before our one message
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # old (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError… for bad files
        why = " ".join(str(e).split()) or type(e).__name__
        raise CorruptFileError(
            f"{path} could not be read as a weights-only PyTorch checkpoint: {clip(why)}",
            path=path,
            hint="loratools never executes pickled code. Convert the file to safetensors with a trusted tool.",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptFileError(f"{path} does not hold a flat dict of tensors.", path=path)
    if not all(isinstance(k, str) for k in obj):
        raise CorruptFileError(f"{path} holds tensors whose names are not strings.", path=path)
    for name, t in obj.items():
        # a view claims its shape; only its storage's bytes exist (a 1-element storage expanded to 2**40
        # elements is a 1.5 KB file): copying it would allocate what the view claims
        held = t.untyped_storage().nbytes() if t.layout == torch.strided else 0
        if t.layout == torch.strided and t.numel() and (t.numel() * t.element_size() > held or _span(t) > held):
            raise CorruptFileError(
                f"{path}: tensor {clip(repr(name))} of shape {tuple(t.shape)} is a view of {held} bytes of data that "
                "repeats or overruns them.", path=path, tensor=name,
                hint="Save the state dict with contiguous tensors (t.contiguous()), or as safetensors.")
        if t.layout == torch.strided and t.numel() and not t.is_contiguous():
            obj[name] = t.contiguous()  # a transposed view: its bytes are there, in another order
    return dict(obj)


def _span(t: torch.Tensor) -> int:
    """Bytes from the first to one past the last element a strided view reaches, or more than any
    storage when it reaches one element twice (a 0 stride on a dimension longer than 1)."""
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        return 2**63
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return (t.storage_offset() + last + 1) * t.element_size()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A small file of tensors (an adapter) read whole: safetensors, or a weights-only pickle."""
    if path.suffix == ".safetensors":
        return load_tensors(list(read_header(path).tensors.values()))
    return load_pickle(path)
