"""The safetensors file format, read and written a tensor at a time.

A file is: 8 bytes little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``), then the
data; offsets are relative to the end of the header and must tile the data without gaps.

Reading parses the header ourselves (to validate it, and to know byte ranges so untouched tensors
are copied byte for byte) and loads tensors through ``safetensors.safe_open``. Writing streams: the
header is written first from the planned names, dtypes and shapes, then each tensor's bytes in
order, so no more than one tensor is ever held in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..dtypes import BY_ST, st_name
from ..errors import CorruptFileError

MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return BY_ST[self.dtype].torch


@dataclass(frozen=True)
class Header:
    file: Path
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; raise CorruptFileError naming the file."""

    def corrupt(why: str) -> CorruptFileError:
        return CorruptFileError(
            f"{path} is not a valid safetensors file: {why}.",
            path=path,
            hint="The file may be truncated or damaged; download or save it again.",
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt("it is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise corrupt(f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CorruptFileError(f"Cannot read {path}: {e.strerror or e}.", path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")
    data_start = 8 + n
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"entry {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in BY_ST:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or not (0 <= b <= e):
            raise corrupt(f"tensor {name!r} has invalid shape or offsets")
        if (e - b) != math.prod(shape) * BY_ST[dtype].itemsize:
            raise corrupt(f"tensor {name!r}: {e - b} bytes do not hold shape {list(shape)} of {dtype}")
        infos.append(TensorInfo(name, path, dtype, shape, data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in infos:
        if t.begin != pos:
            raise corrupt(f"tensor {t.name!r} does not start where the previous one ends")
        pos = t.end
    if pos != size:
        raise corrupt(f"the header describes {pos} bytes but the file has {size} (truncated?)")
    return Header(path, {t.name: t for t in infos}, dict(metadata), data_start)


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor from its byte range (a fresh, writable CPU tensor)."""
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        got = 0
        while got < info.nbytes:
            k = f.readinto(view[got:])
            if not k:
                raise CorruptFileError(f"{info.file} ended inside tensor {info.name!r}.", path=info.file)
            got += k
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    return torch.frombuffer(buf, dtype=info.torch_dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Writes one safetensors file whose entries are known in advance, tensor by tensor.

    ``entries`` are (name, safetensors dtype, shape) in the order the data will be written.
    Call :meth:`write_tensor` or :meth:`copy_range` once per entry, in order, then :meth:`close`.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            n = math.prod(shape) * BY_ST[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expected.append((name, n))
            offset += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
        self.path = path
        self._f: BinaryIO = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0
        self.total = offset

    def _take(self, name: str) -> int:
        want, n = self._expected[self._next]
        if want != name:
            raise RuntimeError(f"internal: writing {name!r} where {want!r} was planned")
        self._next += 1
        return n

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        n = self._take(name)
        data = tensor_bytes(t)
        if data.nbytes != n:
            raise RuntimeError(f"internal: {name!r} has {data.nbytes} bytes, {n} planned")
        self._f.write(data)

    def copy_range(self, name: str, info: TensorInfo) -> None:
        n = self._take(name)
        if info.nbytes != n:
            raise RuntimeError(f"internal: {name!r} has {info.nbytes} bytes, {n} planned")
        with open(info.file, "rb") as src:
            src.seek(info.begin)
            left = n
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise CorruptFileError(f"{info.file} ended inside tensor {info.name!r}.", path=info.file)
                self._f.write(chunk)
                left -= len(chunk)

    def close(self) -> None:
        if self._next != len(self._expected):
            self._f.close()
            raise RuntimeError(f"internal: {len(self._expected) - self._next} tensors not written to {self.path}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors (adapters) in one go, in name order."""
    entries = [(k, st_name(v.dtype), tuple(v.shape)) for k, v in sorted(tensors.items())]
    w = StreamWriter(path, entries, metadata or {})
    try:
        for k, _, _ in entries:
            w.write_tensor(k, tensors[k])
    except BaseException:
        w.abort()
        raise
    w.close()
