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
    w.copy_range("y", info["y"])
    w.copy_range("x", info["x"])
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
