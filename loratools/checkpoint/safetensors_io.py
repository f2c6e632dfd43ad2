"""The safetensors format: what the ``safetensors`` library cannot do for us, and nothing more.

A file is: 8 bytes little-endian header length N, N bytes of JSON header
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``), then the
data; offsets are relative to the end of the header and must tile the data without gaps.

The library is the judge of the format: :func:`read_header` has ``safetensors.safe_open`` validate
every file and :func:`load_tensor` reads tensors through it (memory-mapped). Two things it does not
offer are done here. Byte ranges, so untouched tensors are copied byte for byte: the header JSON is
parsed again (bounded, nothing it claims allocated) and cross-checked against what the library
reports. And a streaming writer: :class:`StreamWriter` writes the header first from the planned
names, dtypes and shapes, then each tensor's bytes, so no more than one tensor is held in memory;
it lays the data out so that every tensor starts at a multiple of its item size.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from typing import TYPE_CHECKING

from safetensors import safe_open

from ..dtypes import BY_ST, SUB_BYTE_ST, st_name
from ..errors import CorruptFileError, InternalError, UnsupportedAdapterError

if TYPE_CHECKING:  # torch is imported where tensors are made: headers and byte copies need none
    import torch


MAX_HEADER = 100_000_000  # the safetensors library's own limit on N
# Tensors in one file: a whole MoE model's shard holds a few thousand, a LoRA on every expert of the
# largest MoE models under 100,000. A header listing more is refused before it costs seconds and
# hundreds of megabytes (parsing costs about 15 µs and 1 KB a tensor).
MAX_TENSORS = 250_000
MAX_DIMS = 64  # dimensions of one tensor (safetensors' own readers take far fewer)
COPY_CHUNK = 64 * 1024 * 1024
_MAX_HANDLES = 4  # safe_open handles kept open (each one maps its file; none keeps a descriptor)
_MAX_HEADERS = 8  # parsed headers kept, by the identity of the file's content (read_header is called per format)


def _short(x: object, limit: int = 80) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > 10**20:
        return "<integer of more than 20 digits>"
    if isinstance(x, (list, dict)) and len(x) > 8:
        return f"<{type(x).__name__} of {len(x)} items>"
    try:
        r = repr(x)
    except (ValueError, RecursionError):  # a nesting too deep or an int too long to print
        return f"<{type(x).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


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
        """The torch dtype; UnsupportedAdapterError when the installed torch lacks it."""
        import torch

        found = BY_ST[self.dtype].torch
        if found is None:
            raise UnsupportedAdapterError(
                f"Tensor {self.name!r} in {self.file} is stored as {self.dtype}, which torch {torch.__version__} "
                f"does not have (torch.{BY_ST[self.dtype].torch_name}).",
                path=self.file,
                tensor=self.name,
                hint="Upgrade torch to read it; its bytes can still be copied unchanged.",
            )
        return found


@dataclass(frozen=True)
class Header:
    file: Path
    tensors: dict[str, TensorInfo]  # in data order
    metadata: dict[str, str]
    data_start: int


class _Bad(Exception):
    """What is wrong with a header, in words (never escapes this module)."""


class _Unsupported(_Bad):
    """A valid file that loratools cannot handle."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Bad(f"its header names {_short(k)} twice")
            seen.add(k)
    return out


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0


def _parse(path: Path, raw: bytes, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """Our reading of the header (raises _Bad): infos in data order, and the metadata.

    Linear in the header's size, and nothing it claims is allocated: a shape's byte count is
    multiplied out only until it passes what the offsets hold."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"its header is not JSON ({e})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _Bad("its header is not JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise _Bad(f"its header is not JSON ({_short(str(e), 120)})") from None
    if not isinstance(header, dict):
        raise _Bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _Bad(f"its header lists {len(header)} tensors, more than any model or adapter file holds "
                   f"({MAX_TENSORS})")
    data_start = 8 + len(raw)
    data_size = size - data_start
    infos: list[TensorInfo] = []
    keys = {"dtype", "shape", "data_offsets"}
    for name, entry in header.items():
        if type(entry) is not dict or not keys <= entry.keys():
            raise _Bad(f"entry {_short(name)} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        row = BY_ST.get(dtype) if type(dtype) is str else None
        if row is None:
            if type(dtype) is str and dtype in SUB_BYTE_ST:
                raise _Unsupported(f"tensor {_short(name)} has dtype {dtype}, whose elements are smaller than a "
                                   "byte; loratools does not read or copy those")
            raise _Bad(f"tensor {_short(name)} has unknown dtype {_short(dtype)}")
        if type(shape) is not list or len(shape) > MAX_DIMS or not all(_is_uint(s) for s in shape):
            raise _Bad(f"tensor {_short(name)} has invalid shape {_short(shape)}")
        if not (type(offsets) is list and len(offsets) == 2 and _is_uint(offsets[0]) and _is_uint(offsets[1])
                and offsets[0] <= offsets[1]):
            raise _Bad(f"tensor {_short(name)} has invalid data_offsets {_short(offsets)}")
        b, e = offsets
        # the byte count, stopping as soon as it exceeds what the offsets claim (no huge products)
        count = 0 if 0 in shape else row.itemsize
        for dim in shape:
            count *= dim
            if count > e - b:
                break
        if count != e - b:
            raise _Bad(f"tensor {_short(name)}: {e - b} bytes do not hold shape {_short(shape)} of {dtype}")
        if e > data_size:
            raise _Bad(f"tensor {_short(name)} ends at byte {e} of the data, but the file holds {data_size} "
                       "(truncated?)")
        infos.append(TensorInfo(name, path, dtype, tuple(shape), data_start + b, data_start + e))
    infos.sort(key=lambda t: (t.begin, t.end))
    pos = data_start
    for t in infos:
        if t.begin != pos:
            raise _Bad(f"tensor {_short(t.name)} does not start where the previous one ends")
        pos = t.end
    if pos != size:
        raise _Bad(f"the header describes {pos} bytes but the file has {size} (truncated?)")
    return infos, metadata


def _library_view(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str], list[str] | None]:
    """What safetensors reads in the file: {name: (dtype, shape)}, metadata, names in offset order."""
    with safe_open(path, framework="numpy") as f:  # numpy: reading a header needs no torch
        seen = {}
        for name in f.keys():
            s = f.get_slice(name)
            seen[name] = (s.get_dtype(), tuple(s.get_shape()))
        offset_keys = getattr(f, "offset_keys", None)
        return seen, dict(f.metadata() or {}), list(offset_keys()) if offset_keys else None


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; raise CorruptFileError naming the file.

    The safetensors library validates the file; the header is also parsed here, for the byte
    ranges, and both readings must agree.
    """

    def corrupt(why: str) -> CorruptFileError:
        return CorruptFileError(
            f"{path} is not a valid safetensors file: {why}.",
            path=path,
            hint="The file may be truncated or damaged; download or save it again.",
        )

    try:
        st = os.stat(path)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open below forever
            raise corrupt("it is not a regular file")
        key = (os.fspath(path), os.getcwd(), st.st_dev, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns)
        with _headers_lock:
            cached = _headers.get(key)
            if cached is not None:
                _headers.move_to_end(key)
                return cached
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt("it is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise corrupt(f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
            if len(raw) != n:
                raise corrupt("it ended inside its header")
    except OSError as e:
        raise CorruptFileError(f"Cannot read {path}: {e.strerror or e}.", path=path) from e

    if raw.count(b'"data_offsets"') > MAX_TENSORS + 1:  # before any parsing: a header of millions of entries
        raise corrupt(f"its header lists more than {MAX_TENSORS} tensors, more than any model or adapter file holds")
    try:
        infos, metadata = _parse(path, raw, size)
    except _Unsupported as e:
        raise CorruptFileError(f"{path}: {e}.", path=path) from None
    except _Bad as e:
        raise corrupt(str(e)) from None
    except Exception as e:  # a bug in the parse above must still not let a raw exception out
        raise corrupt(f"its header cannot be read ({type(e).__name__})") from None
    library_error: str | None = None
    try:
        seen, seen_meta, offset_order = _library_view(path)
    except Exception as e:  # SafetensorError, OSError, anything: the library refuses the file
        library_error = " ".join(str(e).split())[:400] or type(e).__name__
    if library_error is not None:
        for row in BY_ST.values():
            if f"unknown variant `{row.st}`" in library_error:
                import safetensors

                raise CorruptFileError(
                    f"{path} holds {row.st} tensors, which safetensors {safetensors.__version__} cannot read.",
                    path=path,
                    hint="Upgrade safetensors (pip install -U safetensors).",
                )
        raise corrupt(f"the safetensors library refuses it ({library_error})")
    ours = {t.name: (t.dtype, t.shape) for t in infos}
    if ours != seen:
        differ = sorted(set(ours) ^ set(seen)) or sorted(k for k in ours if ours[k] != seen[k])
        raise corrupt(f"the safetensors library reads its header differently (at {_short(differ[0])})")
    if metadata != seen_meta:
        raise corrupt("the safetensors library reads its __metadata__ differently")
    if offset_order is not None:
        filled = [t.name for t in infos if t.nbytes]  # zero-size tensors share offsets: any order
        filled_set = set(filled)
        if [k for k in offset_order if k in filled_set] != filled:
            raise corrupt("the safetensors library orders its tensors differently")
    header = Header(path, {t.name: t for t in infos}, dict(metadata), 8 + n)
    with _headers_lock:
        _headers[key] = header
        while len(_headers) > _MAX_HEADERS or sum(len(h.tensors) for h in _headers.values()) > MAX_TENSORS:
            _headers.popitem(last=False)
    return header


# Parsed headers, most recently used last, keyed by the file's identity and change times: detecting a
# format and reading it parse one header several times.
_headers: OrderedDict[tuple, Header] = OrderedDict()
_headers_lock = threading.Lock()


# safe_open handles, most recently used last, keyed by what identifies the file's current content.
_handles: OrderedDict[tuple, Any] = OrderedDict()
_handles_lock = threading.Lock()


def _close(handle: Any) -> None:
    try:
        handle.__exit__(None, None, None)
    except Exception:
        pass


def _forget(path: Path) -> None:
    """Close the cached handles of ``path`` (before it is written)."""
    where = os.path.abspath(path)
    with _handles_lock:
        for key in [k for k in _handles if k[0] == where]:
            _close(_handles.pop(key))


def _handle(file: Path) -> Any:
    """A cached ``safe_open`` handle of ``file`` (call with ``_handles_lock`` held)."""
    where = os.path.abspath(file)
    st = os.stat(where)
    key = (where, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    handle = _handles.pop(key, None)
    if handle is None:
        for stale in [k for k in _handles if k[0] == where]:
            _close(_handles.pop(stale))
        handle = safe_open(where, framework="pt")
    _handles[key] = handle
    while len(_handles) > _MAX_HANDLES:
        _close(_handles.popitem(last=False)[1])
    return handle


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor through ``safetensors.safe_open``: a fresh CPU tensor, independent of the file."""
    return load_tensors([info])[info.name]


def load_tensors(infos: list[TensorInfo]) -> dict[str, torch.Tensor]:
    """:func:`load_tensor` of several tensors of one file, through one handle (an adapter's
    thousands of small tensors would otherwise pay a file lookup each)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    if not infos:
        return out
    file = infos[0].file
    try:
        with _handles_lock:
            handle = _handle(file)
            for info in infos:
                dtype = info.torch_dtype  # a clear error if this torch lacks the dtype
                if info.file != file:
                    raise _internal(f"load_tensors of {info.file} and {file} in one call")
                try:
                    view = handle.get_tensor(info.name)  # maps the file; copy-on-write, aligned or not
                except OSError:
                    raise
                except Exception as e:  # SafetensorError and the like
                    raise CorruptFileError(
                        f"Cannot read tensor {_short(info.name)} from {info.file}: {' '.join(str(e).split())}.",
                        path=info.file,
                        tensor=info.name,
                        hint="The file may have changed since it was opened, or be damaged.",
                    ) from None
                if view.dtype != dtype or tuple(view.shape) != info.shape:
                    raise CorruptFileError(
                        f"{info.file} changed since it was opened: tensor {_short(info.name)} is now {view.dtype} "
                        f"{list(view.shape)}, not {info.dtype} {list(info.shape)}.",
                        path=info.file,
                        tensor=info.name,
                    )
                # A copy: the view keeps the whole file mapped, and a mapping of a file that is later truncated
                # or rewritten in place faults on access.
                out[info.name] = view.clone(memory_format=torch.contiguous_format)
    except OSError as e:
        raise CorruptFileError(f"Cannot read {file}: {e.strerror or e}.", path=file) from e
    return out


def tensor_bytes(t: torch.Tensor) -> memoryview:
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamWriter:
    """Writes one safetensors file whose entries are known in advance, tensor by tensor.

    ``entries`` are (name, safetensors dtype, shape). The data is laid out largest item size first
    (a stable sort, so the given order holds among equal sizes): as the data starts 8-byte aligned,
    every tensor starts at a multiple of its item size. :attr:`order` holds the names in that
    order; write each name once, in that order — :meth:`write_tensor` (a whole tensor),
    :meth:`copy_range` (bytes of another file, copied by the kernel), or :meth:`begin`, then
    :meth:`reserve` room for each computed block and fill it, then :meth:`end` — and :meth:`close`.
    The header lists the entries in the given order. The data goes through a
    :class:`~loratools.checkpoint.stream.Stage` (a background writer); :attr:`ranges` holds the
    fingerprinted byte ranges for reading back.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], *,
                 fingerprints: bool = True, after: dict[str, str] | None = None):
        from .stream import BUFFER_BYTES, Stage

        entries = list(entries)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        for name, dtype, _ in entries:
            if dtype not in BY_ST:
                raise _internal(f"{name!r} planned with unknown dtype {dtype!r}")
            if name in header:
                raise _internal(f"{name!r} planned twice")
            header[name] = None
        self.order: list[str] = [e[0] for e in sorted(entries, key=lambda e: -BY_ST[e[1]].itemsize)]
        planned = {name: (dtype, tuple(int(s) for s in shape)) for name, dtype, shape in entries}
        if after:
            self.order = _placed_after(self.order, planned, after)
        offset = 0
        self._expected: list[tuple[str, str, int]] = []
        self.offsets: dict[str, tuple[int, int]] = {}  # name → (begin, end), relative to the data start
        for name in self.order:
            dtype, shape = planned[name]
            n = BY_ST[dtype].itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._expected.append((name, dtype, n))
            self.offsets[name] = (offset, offset + n)
            offset += n
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, like the reference writer's
        self.path = path
        self.data_start = 8 + len(raw)
        _forget(path)
        self._f: BinaryIO = open(path, "wb")
        try:
            self._f.write(struct.pack("<Q", len(raw)))
            self._f.write(raw)
            self._f.flush()
        except BaseException:
            self._f.close()
            raise
        # buffers no larger than the file: an adapter or undo part of a few KB does not allocate 16 MiB
        self._stage = Stage(self._f.fileno(), self.data_start, fingerprints=fingerprints,
                            size=max(4096, min(BUFFER_BYTES, offset)))
        self._next = 0
        self._open: tuple[str, int] | None = None  # the tensor being written, bytes still due
        self.total = offset
        self.ranges: list = []

    def _take(self, name: str, dtype: str, nbytes: int) -> None:
        if self._open is not None:
            raise _internal(f"writing {name!r} before {self._open[0]!r} is complete")
        if self._next >= len(self._expected):
            raise _internal(f"writing {name!r} after all {len(self._expected)} planned tensors of {self.path}")
        want, want_dtype, n = self._expected[self._next]
        if want != name:
            raise _internal(f"writing {name!r} where {want!r} was planned")
        if dtype != want_dtype or nbytes != n:
            raise _internal(f"{name!r} is {dtype} of {nbytes} bytes, {want_dtype} of {n} planned")
        self._next += 1
        self._stage.label(name)

    def begin(self, name: str, dtype: str) -> None:
        """Start tensor ``name`` (the next planned one), written block by block with :meth:`reserve`."""
        n = self._expected[self._next][2] if self._next < len(self._expected) else -1
        self._take(name, dtype, n)
        self._open = (name, n)

    def reserve(self, nbytes: int) -> torch.Tensor:
        """Room for the next ``nbytes`` of the open tensor: a flat uint8 tensor to fill now."""
        if self._open is None or nbytes > self._open[1]:
            raise _internal(f"reserving {nbytes} bytes beyond the open tensor of {self.path}")
        self._open = (self._open[0], self._open[1] - nbytes)
        return self._stage.reserve(nbytes)

    def put(self, t: torch.Tensor) -> None:
        """The next bytes of the open tensor, from a CPU tensor."""
        nbytes = t.numel() * t.element_size()
        if self._open is None or nbytes > self._open[1]:
            raise _internal(f"writing {nbytes} bytes beyond the open tensor of {self.path}")
        self._open = (self._open[0], self._open[1] - nbytes)
        self._stage.put(t)

    def end(self) -> None:
        if self._open is None or self._open[1] != 0:
            raise _internal(f"tensor {self._open[0] if self._open else None!r} of {self.path} ended early")
        self._open = None

    def write_tensor(self, name: str, t: torch.Tensor) -> None:
        self.begin(name, st_name(t.dtype))
        self.put(t)
        self.end()

    def copy_range(self, name: str, info: TensorInfo) -> None:
        self._take(name, info.dtype, info.nbytes)
        self._stage.copy(info.file, info.begin, info.nbytes)

    def close(self) -> None:
        if self._next != len(self._expected) or self._open is not None:
            self.abort()
            raise _internal(f"{len(self._expected) - self._next} tensors not written to {self.path}")
        try:
            self.ranges = self._stage.close()
        finally:
            self._f.close()

    def abort(self) -> None:
        self._stage.abort()
        self._f.close()


def _placed_after(order: list[str], planned: dict[str, tuple[str, tuple[int, ...]]],
                  after: dict[str, str]) -> list[str]:
    """``order`` with each entry of ``after`` (name → the name it should follow) moved right behind
    that one — when every tensor still starts at a multiple of its item size; else ``order``.
    (An FP8 weight's scales are computed with the weight: written after it, they need no second
    pass.)"""
    moved = [n for n in order if n not in after or after[n] not in planned]
    for name in [n for n in order if n in after and after[n] in planned]:
        moved.insert(moved.index(after[name]) + 1, name)
    offset = 0
    for name in moved:
        dtype, shape = planned[name]
        size = BY_ST[dtype].itemsize
        if offset % size:
            return order
        n = size
        for d in shape:
            n *= d
        offset += n
    return moved


def _internal(message: str) -> InternalError:
    return InternalError(message)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors (adapters) in one go: header in name order, data in ``order``."""
    entries = [(k, st_name(v.dtype), tuple(v.shape)) for k, v in sorted(tensors.items())]
    w = StreamWriter(path, entries, metadata or {})
    try:
        for k in w.order:
            w.write_tensor(k, tensors[k])
    except BaseException:
        w.abort()
        raise
    w.close()
