"""The safetensors reader and streaming writer against the safetensors library, and hostile files
built byte by byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.checkpoint.safetensors_io import StreamWriter, load_tensor, read_header, save_tensors
from loratools.errors import CorruptFileError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
          torch.uint8, torch.float8_e4m3fn]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 10
    return (x > 0) if dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_matches_safetensors_library(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"a": _tensor(dtype, (3, 5)), "b.scalar": _tensor(dtype, ()), "c": _tensor(dtype, (0, 4)),
               "d": _tensor(dtype, (2, 3, 4))}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    for name, t in tensors.items():
        got = load_tensor(header.tensors[name])
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(_bytes(got), _bytes(t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_writer_output_is_read_by_safetensors_library(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"z": _tensor(dtype, (4, 3)), "a": _tensor(dtype, (7,)), "m": _tensor(dtype, ())}
    path = tmp_path / "w.safetensors"
    save_tensors(path, tensors, {"format": "pt", "note": "ü"})
    loaded = load_file(str(path))
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(_bytes(loaded[k]), _bytes(t))
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # data aligned like the reference writer


def test_stream_writer_copies_byte_ranges(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    save_file({"x": torch.arange(10, dtype=torch.float32), "y": torch.ones(3, dtype=torch.bfloat16)}, str(src))
    info = read_header(src).tensors
    out = tmp_path / "out.safetensors"
    w = StreamWriter(out, [("y", "BF16", (3,)), ("x", "F32", (10,))], {})
    assert w.order == ["x", "y"]  # data laid out largest item size first
    w.copy_range("x", info["x"])
    w.copy_range("y", info["y"])
    w.close()
    got = load_file(str(out))
    assert torch.equal(got["x"], torch.arange(10, dtype=torch.float32)) and torch.equal(got["y"], torch.ones(3, dtype=torch.bfloat16))


def _file(tmp_path: Path, header: object, data: bytes, *, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    "header, data, says",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "file has"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "does not start"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "does not start"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "invalid shape"),
        ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "lacks"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_hostile_headers_are_refused(tmp_path: Path, header: object, data: bytes, says: str) -> None:
    path = _file(tmp_path, header, data)
    with pytest.raises(CorruptFileError, match=says) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CorruptFileError, match="header length"):
        read_header(path)


def test_invalid_utf8_header(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match="not JSON"):
        read_header(_file(tmp_path, None, b"", raw=b"\xff\xfe{}"))


# --- every dtype, alignment, hostile headers, handles (the safetensors library is the oracle) ---

import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tracemalloc  # noqa: E402

from safetensors import safe_open  # noqa: E402

from loratools import dtypes  # noqa: E402
from loratools.checkpoint import safetensors_io  # noqa: E402
from loratools.dtypes import BY_ST  # noqa: E402
from loratools.errors import InternalError, UnsupportedAdapterError  # noqa: E402

ROWS = [row for row in BY_ST.values() if row.torch is not None]


def _random(row: dtypes.DType, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Every bit pattern the dtype has (NaNs and all), except for bool where only 0 and 1 are values."""
    g = torch.Generator().manual_seed(seed)
    if row.st == "BOOL":
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * row.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(row.torch).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


@pytest.mark.parametrize("st", [row.st for row in ROWS])
def test_every_dtype_round_trips(tmp_path: Path, st: str) -> None:
    row = BY_ST[st]
    tensors = {"m": _random(row, (5, 3), 1), "s": _random(row, (), 2), "e": _random(row, (0, 2), 3),
               "v": _random(row, (7,), 4), "u8": _random(BY_ST["U8"], (3,), 5)}
    ours = tmp_path / "ours.safetensors"
    save_tensors(ours, tensors, {"k": "v"})
    oracle = load_file(str(ours))
    header = read_header(ours)
    assert header.metadata == {"k": "v"}
    for k, t in tensors.items():
        assert _same(oracle[k], t), k
        assert _same(load_tensor(header.tensors[k]), t), k
    # the library's writer -> our reader -> byte copies -> the library's reader
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs))
    infos = read_header(theirs).tensors
    for k, t in tensors.items():
        assert _same(load_tensor(infos[k]), t), k
    out = tmp_path / "copied.safetensors"
    w = StreamWriter(out, [(k, i.dtype, i.shape) for k, i in infos.items()], {})
    for k in w.order:
        w.copy_range(k, infos[k])
    w.close()
    back = load_file(str(out))
    assert all(_same(back[k], t) for k, t in tensors.items())


def test_writer_aligns_every_tensor(tmp_path: Path) -> None:
    spec = [("u", "U8", (3,)), ("d", "F64", (1,)), ("h", "BF16", (3,)), ("f", "F32", (5,)), ("b", "BOOL", (1,)),
            ("c", "C64", (2,)), ("i", "I16", (1,)), ("g", "F32", (1,)), ("z", "F64", (0,)), ("e", "F8_E8M0", (1,)),
            ("l", "I64", (3,))]
    tensors = {n: _random(BY_ST[d], s, k) for k, (n, d, s) in enumerate(spec)}
    path = tmp_path / "mixed.safetensors"
    w = StreamWriter(path, spec, {"format": "pt"})
    assert w.order == ["d", "c", "z", "l", "f", "g", "h", "i", "u", "b", "e"]  # stable, largest first
    for n in w.order:
        w.write_tensor(n, tensors[n])
    w.close()
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    assert (8 + hlen) % 8 == 0
    assert [k for k in header if k != "__metadata__"] == [n for n, _, _ in spec]  # header keeps the given order
    for n, d, _ in spec:
        begin = header[n]["data_offsets"][0]
        assert begin % BY_ST[d].itemsize == 0 and (8 + hlen + begin) % BY_ST[d].itemsize == 0, n
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n in tensors:
            assert _same(f.get_tensor(n), tensors[n]), n
    infos = read_header(path).tensors
    assert list(infos) == w.order and all(_same(load_tensor(infos[n]), tensors[n]) for n in tensors)


def test_save_tensors_follows_writer_order(tmp_path: Path) -> None:
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(1, dtype=torch.float64),
               "c": torch.ones(2, dtype=torch.bfloat16)}
    path = tmp_path / "s.safetensors"
    save_tensors(path, tensors)
    assert list(read_header(path).tensors) == ["b", "c", "a"]
    assert all(_same(v, tensors[k]) for k, v in load_file(str(path)).items())


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    entries = [("a", "F32", (2,)), ("b", "F64", (1,))]
    w = StreamWriter(tmp_path / "m.safetensors", entries, {})
    with pytest.raises(InternalError, match="writing 'a' where 'b' was planned"):
        w.write_tensor("a", torch.zeros(2))
    assert issubclass(InternalError, RuntimeError)
    with pytest.raises(InternalError, match="planned"):
        w.write_tensor("b", torch.zeros(2))  # F32 bytes where F64 was planned
    w.write_tensor("b", torch.zeros(1, dtype=torch.float64))
    with pytest.raises(InternalError, match="not written"):
        w.close()
    with pytest.raises(InternalError, match="twice"):
        StreamWriter(tmp_path / "d.safetensors", [("a", "F32", (1,)), ("a", "F32", (1,))], {})
    with pytest.raises(InternalError, match="unknown dtype"):
        StreamWriter(tmp_path / "d.safetensors", [("a", "Q4", (1,))], {})


def _entry(dtype: str = "F32", shape: str = "[1]", offsets: str = "[0,4]", name: str = "a") -> bytes:
    return b'{"%s":{"dtype":%s,"shape":%s,"data_offsets":%s}}' % (
        name.encode(), dtype.encode() if dtype.startswith(("{", "[")) else b'"%s"' % dtype.encode(),
        shape.encode(), offsets.encode())


HOSTILE: dict[str, tuple[bytes, int]] = {
    "dict as dtype": (_entry(dtype='{"F32":1}'), 4),
    "list as dtype": (_entry(dtype='["F32"]'), 4),
    "string offsets": (_entry(offsets='["0","4"]'), 4),
    "float offsets": (_entry(offsets="[0.0,4.0]"), 4),
    "negative offset": (_entry(offsets="[-4,0]"), 4),
    "three offsets": (_entry(offsets="[0,4,4]"), 4),
    "shape 1e400": (_entry(shape="[1e400]"), 4),
    "shape NaN": (_entry(shape="[NaN]"), 4),
    "bool in shape": (_entry(shape="[true]"), 4),
    "5000-digit shape": (_entry(shape="[" + "9" * 5000 + "]"), 4),
    "5000-digit offset": (_entry(offsets="[0," + "9" * 5000 + "]"), 4),
    "offset beyond 2**64": (_entry(shape="[4611686018427387904,4]", offsets="[0,18446744073709551616]"), 0),
    "arrays nested 10000 deep": (b'{"a":' + b"[" * 10000 + b"]" * 10000 + b"}", 0),
    "objects nested 10000 deep": (b'{"a":' + b'{"x":' * 10000 + b"1" + b"}" * 10000 + b"}", 0),
    "huge shape on a tiny file": (_entry(shape="[1073741824,1073741824]", offsets="[0,4611686018427387904]"), 16),
    "shape product overflows": (_entry(shape="[4294967296,4294967296,4294967296]", offsets="[0,4]"), 4),
    "many large dims": (_entry(shape="[" + ",".join(["4294967295"] * 3000) + "]", offsets="[0,4]"), 4),
    "truncated data": (_entry(shape="[4]", offsets="[0,16]"), 8),
    "overlapping offsets": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                            b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12),
    "duplicate name": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8),
    "entry not an object": (b'{"a":5}', 0),
    "metadata not an object": (b'{"__metadata__":[1]}', 0),
    "lone surrogate in a name": (_entry(name="a\\ud800"), 4),
    "trailing garbage": (b"{} xx", 0),
    "empty header": (b"", 0),
    "sub-byte dtype": (_entry(dtype="F4", shape="[2]", offsets="[0,1]"), 1),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_headers_allocate_nothing(tmp_path: Path, case: str) -> None:
    body, data = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError) as e:
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(e.value) and "cannot be read (" not in str(e.value)  # a diagnosis, not a fallback
    assert peak < 16 * 1024 * 1024 + 20 * len(body), peak


def test_library_refusal_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    body, data = HOSTILE["lone surrogate in a name"]
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data)
    with pytest.raises(CorruptFileError, match="safetensors library refuses it"):
        read_header(path)


def test_damaged_files_raise_only_corrupt_file_error(tmp_path: Path) -> None:
    src = tmp_path / "ok.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16),
               "i": torch.arange(3)}, str(src), metadata={"format": "pt"})
    good = src.read_bytes()
    (hlen,) = struct.unpack("<Q", good[:8])
    rng = random.Random(0)
    path = tmp_path / "damaged.safetensors"
    outcomes = set()
    for trial in range(400):
        data = bytearray(good)
        if trial < 60:
            data = data[: rng.randrange(len(good))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(8 + hlen)] = rng.choice(b'{}[]",:0123456789-.eE \\' + bytes([rng.randrange(256)]))
        path.write_bytes(bytes(data))
        try:
            h = read_header(path)
            for info in h.tensors.values():
                load_tensor(info)
            outcomes.add("ok")
        except CorruptFileError as e:
            assert str(path) in str(e)
            outcomes.add("corrupt")
    assert "corrupt" in outcomes


def test_loaded_tensor_is_independent_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(8, dtype=torch.float32)}, str(path))
    t = load_tensor(read_header(path).tensors["a"])
    t.add_(1)  # in place: a private copy
    assert torch.equal(load_file(str(path))["a"], torch.arange(8, dtype=torch.float32))
    path.write_bytes(b"")  # truncated in place: the loaded tensor must not fault
    path.unlink()
    assert torch.equal(t, torch.arange(8, dtype=torch.float32) + 1)
    save_file({"a": torch.full((3,), 7, dtype=torch.float64)}, str(path))  # the same path, new content
    assert torch.equal(load_tensor(read_header(path).tensors["a"]), torch.full((3,), 7, dtype=torch.float64))


def test_writing_over_a_read_file_reads_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.zeros(4)})
    assert torch.equal(load_tensor(read_header(path).tensors["a"]), torch.zeros(4))
    save_tensors(path, {"a": torch.ones(4)})  # same size, maybe the same mtime: the cached handle must go
    assert torch.equal(load_tensor(read_header(path).tensors["a"]), torch.ones(4))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_open_handles_are_bounded(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    paths = []
    for i in range(12):
        p = tmp_path / f"f{i}.safetensors"
        save_file({"a": torch.full((4,), float(i))}, str(p))
        paths.append(p)
        assert torch.equal(load_tensor(read_header(p).tensors["a"]), torch.full((4,), float(i)))
    maps = Path("/proc/self/maps").read_text()
    assert sum(str(p) in maps for p in paths) <= safetensors_io._MAX_HANDLES
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_dtype_missing_from_torch_can_still_be_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "e8m0.safetensors"
    scales = _random(BY_ST["F8_E8M0"], (4, 2), 7)
    save_file({"scale": scales, "w": torch.ones(2)}, str(src))
    real = dtypes.DType.torch
    monkeypatch.setattr(dtypes.DType, "torch", property(lambda row: None if row.st == "F8_E8M0" else real.fget(row)))
    infos = read_header(src).tensors
    assert infos["scale"].dtype == "F8_E8M0" and infos["scale"].nbytes == 8
    with pytest.raises(UnsupportedAdapterError, match="F8_E8M0") as e:
        load_tensor(infos["scale"])
    assert str(src) in str(e.value) and "torch" in str(e.value)
    out = tmp_path / "out.safetensors"
    w = StreamWriter(out, [("scale", "F8_E8M0", (4, 2)), ("w", "F32", (2,))], {})
    for n in w.order:
        w.copy_range(n, infos[n])
    w.close()
    monkeypatch.undo()
    assert _same(load_file(str(out))["scale"], scales)
