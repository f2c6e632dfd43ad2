"""Streaming I/O for the merge engine: memory-mapped reads with no intermediate copy, and writes
through a few reusable buffers by a background thread, so that the disk and the CPU work at once.

* :func:`mapped` maps the byte range of one tensor read-only and unmaps it when done: the base is
  read straight from the page cache, and the pages a tensor touched leave the process with it (a
  whole-file mapping would count every page read as resident memory).
* :class:`Stage` is the data section of one output file: callers :meth:`Stage.reserve` space in
  the current buffer and compute into it, or hand over whole byte ranges of another file to copy
  (``copy_file_range``: the kernel copies, as ``cp`` does). A full buffer goes to the writer
  thread, which ``pwrite``\\ s it while the next one fills.
* Every range the stage writes gets a :func:`fingerprint` taken *before* it is handed to the writer
  (from the computed bytes, or from the source of a copy); :func:`check_ranges` reads the finished
  file back and compares. That is the check that what was written is byte for byte what was
  computed, cheap enough to run on every merge.

Nothing here is durable on power loss by itself: like ``cp`` and every model tool, files are not
fsync'ed; atomicity (an output appears complete or not at all) comes from the rename of the
pipeline's temporary folder.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InternalError

PAGE = 4096  # fingerprints sum 64-bit words per page of this many bytes
BUFFER_BYTES = 16 << 20  # one staging buffer
BUFFERS = 3  # in flight: one filling, one being written, one spare
_MASK = (1 << 64) - 1
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def fingerprint(mem: Any, offset: int = 0, length: int | None = None) -> int:
    """A 64-bit fingerprint of ``length`` bytes of ``mem`` (anything with the buffer protocol)
    from ``offset``: per 4 KiB page the wrapping sum of its 64-bit words, the pages combined with odd
    weights by position, the tail (< 4 KiB) by CRC-32. Any change that alters some page's word sum,
    and any page moved to another place, changes it; what it cannot see is a permutation of the
    8-byte words inside one page (the float64 row check sees that). Runs at memory speed."""
    if length is None:
        length = len(memoryview(mem).cast("B")) - offset
    full = length // PAGE * PAGE
    h = 0
    if full:
        with warnings.catch_warnings():  # a read-only buffer: nothing here writes to it
            warnings.simplefilter("ignore")
            words = torch.frombuffer(mem, dtype=torch.int64, count=full // 8, offset=offset)
        pages = words.view(-1, PAGE // 8).sum(1)  # int64 sums wrap modulo 2**64
        del words
        weights = torch.arange(1, 2 * pages.numel(), 2, dtype=torch.int64)
        h = int((pages * weights).sum()) & _MASK
    tail = memoryview(mem).cast("B")[offset + full:offset + length]
    return (h ^ (zlib.crc32(tail) << 11) ^ length) & _MASK


@contextmanager
def mapped(path: Path, begin: int, length: int, dtype: torch.dtype = torch.uint8) -> Iterator[torch.Tensor]:
    """A read-only view of ``length`` bytes of ``path`` from ``begin`` as a flat ``dtype`` tensor,
    backed by the page cache; unmapped on exit (drop every view of it before leaving the block)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if length == 0:
        yield torch.empty(0, dtype=dtype)
        return
    start = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), begin - start + length, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"Cannot map {length} bytes of {path} at {begin}: {e}.", path=path,
                               hint="The file may have changed or shrunk since it was opened.") from None
    try:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        with warnings.catch_warnings():  # read-only memory: loratools never writes through these views
            warnings.simplefilter("ignore")
            view = torch.frombuffer(mm, dtype=dtype, count=length // itemsize, offset=begin - start)
        yield view
    finally:
        view = None  # noqa: F841 (the caller's views must be gone too for the unmap)
        try:
            mm.close()
        except BufferError:  # a view still alive: the mapping goes with it
            pass


@dataclass(frozen=True)
class Range:
    """``length`` bytes of the output file at ``offset`` whose fingerprint must be ``expected``;
    ``label`` names what they hold (the first tensor)."""

    offset: int
    length: int
    expected: int | None
    label: str


class Stage:
    """The data section of one output file, written in order from ``start``.

    :meth:`reserve` returns room in the current buffer (a flat uint8 tensor the caller fills and
    views as it needs); :meth:`put` copies a tensor's bytes in; :meth:`copy` hands a byte range of
    another file to the kernel. Buffers go to a writer thread when full. Errors of the writer
    (a full disk…) are raised in the caller's thread at the next call. ``fingerprints``: record a
    :class:`Range` for everything written (copies are fingerprinted from their source).
    """

    def __init__(self, fd: int, start: int, *, fingerprints: bool = True, buffers: int = BUFFERS,
                 size: int = BUFFER_BYTES) -> None:
        self.fd = fd
        self.pos = start
        self.size = size
        self.fingerprints = fingerprints
        self.ranges: list[Range] = []
        self._free: queue.Queue[tuple[bytearray, torch.Tensor]] = queue.Queue()
        self._unmade = buffers  # buffers are made when first needed: a small file never pays for three
        self._todo: queue.Queue[Any] = queue.Queue()
        self._cur: tuple[bytearray, torch.Tensor] | None = None
        self._used = 0
        self._label = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="loratools-writer", daemon=True)
        self._thread.start()

    # --- the caller's side ------------------------------------------------------------------------

    def label(self, name: str) -> None:
        """Name what is written next (for reports)."""
        self._label = name

    def reserve(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` (≤ the buffer size) of the current buffer, to be filled before the next call."""
        if nbytes > self.size:
            raise InternalError(f"a reservation of {nbytes} bytes exceeds the {self.size}-byte buffer")
        if self._cur is None or self._used + nbytes > self.size:
            self._flush()
            self._cur = self._take()
            self._used = 0
        view = self._cur[1][self._used:self._used + nbytes]
        self._used += nbytes
        return view

    def put(self, t: torch.Tensor) -> None:
        """Append the bytes of a CPU tensor, through as many buffers as it takes."""
        t = t.detach().to("cpu").contiguous()
        if t.numel() == 0:
            return
        flat = t.reshape(-1).view(torch.uint8)
        done = 0
        while done < flat.numel():
            if self._cur is None or self._used == self.size:
                self._flush()
                self._cur = self._take()
                self._used = 0
            n = min(self.size - self._used, flat.numel() - done)
            self._cur[1][self._used:self._used + n].copy_(flat[done:done + n])
            self._used += n
            done += n

    def copy(self, path: Path, begin: int, length: int) -> None:
        """Append ``length`` bytes of ``path`` from ``begin``, copied by the kernel."""
        self._flush()
        for k in range(0, length, self.size):  # fingerprints in pieces: the mapping stays small
            n = min(self.size, length - k)
            expected = None
            if self.fingerprints:
                with mapped(path, begin + k, n) as view:
                    expected = fingerprint(view.numpy())
                    del view
            self.ranges.append(Range(self.pos + k, n, expected, self._label))
        self._send(("copy", path, begin, self.pos, length))
        self.pos += length

    def close(self) -> list[Range]:
        """Write what is left and wait for the writer; the ranges written (raises its error)."""
        self._flush()
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.ranges

    def abort(self) -> None:
        """Stop the writer without raising (the caller is already failing)."""
        self._cur = None
        self._todo.put(None)
        self._thread.join()

    def _take(self) -> tuple[bytearray, torch.Tensor]:
        if self._unmade and self._free.empty():
            self._unmade -= 1
            raw = bytearray(self.size)
            return raw, torch.frombuffer(raw, dtype=torch.uint8)
        while True:
            self._raise()
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _send(self, item: Any) -> None:
        self._raise()
        self._todo.put(item)

    def _flush(self) -> None:
        if self._cur is None:
            return
        cur, n = self._cur, self._used
        self._cur, self._used = None, 0
        if n == 0:
            self._free.put(cur)
            return
        expected = fingerprint(cur[0], 0, n) if self.fingerprints else None
        self.ranges.append(Range(self.pos, n, expected, self._label))
        self._send(("buffer", cur, self.pos, n))
        self.pos += n

    # --- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            try:
                if self._error is None:
                    if item[0] == "buffer":
                        _pwrite_all(self.fd, memoryview(item[1][0])[:item[3]], item[2])
                    else:
                        _copy_range(item[1], item[2], self.fd, item[3], item[4])
            except BaseException as e:  # handed to the caller's thread
                self._error = e
            finally:
                if item[0] == "buffer":
                    self._free.put(item[1])


WRITE_BYTES = 1 << 20  # per pwrite: the kernel throttles single huge writes (16 MiB ones ran at a tenth of the speed)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data[:WRITE_BYTES], offset)
        data = data[n:]
        offset += n


def _copy_range(path: Path, begin: int, fd: int, offset: int, length: int) -> None:
    with open(path, "rb") as src:
        left = length
        try:
            while left:
                n = os.copy_file_range(src.fileno(), fd, left, begin, offset)
                if n == 0:
                    raise CorruptFileError(f"{path} ended inside a tensor (at byte {begin}).", path=path)
                begin, offset, left = begin + n, offset + n, left - n
            return
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
        while left:  # file systems without copy_file_range between these files
            chunk = os.pread(src.fileno(), min(left, 64 << 20), begin)
            if not chunk:
                raise CorruptFileError(f"{path} ended inside a tensor (at byte {begin}).", path=path)
            _pwrite_all(fd, memoryview(chunk), offset)
            begin, offset, left = begin + len(chunk), offset + len(chunk), left - len(chunk)


def check_ranges(path: Path, ranges: list[Range]) -> list[Range]:
    """Read ``path`` back and return the ranges whose bytes do not have their fingerprint."""
    bad: list[Range] = []
    size = path.stat().st_size
    for r in ranges:
        if r.expected is None:
            continue
        if r.offset + r.length > size:
            bad.append(r)
            continue
        with mapped(path, r.offset, r.length) as view:
            got = fingerprint(view.numpy())
            del view
        if got != r.expected:
            bad.append(r)
    return bad
