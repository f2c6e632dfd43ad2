"""The streaming writer and its byte check, against the bytes themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loratools.checkpoint import stream


def _write(path: Path, pieces: list, *, size: int) -> tuple[bytes, list[stream.Range]]:
    """Write ``pieces`` (bytes to reserve-and-fill, tensors to put, or (file, begin, n) to copy)
    through a Stage with tiny buffers; returns the bytes expected after an 8-byte header."""
    expected = bytearray(b"H" * 8)
    with open(path, "wb") as f:
        f.write(b"H" * 8)
        f.flush()
        st = stream.Stage(f.fileno(), 8, size=size, buffers=2)
        for i, p in enumerate(pieces):
            st.label(f"t{i}")
            if isinstance(p, bytes):
                st.reserve(len(p)).copy_(torch.frombuffer(bytearray(p), dtype=torch.uint8))
                expected += p
            elif isinstance(p, torch.Tensor):
                st.put(p)
                expected += p.reshape(-1).view(torch.uint8).numpy().tobytes()
            else:
                src, begin, n = p
                st.copy(src, begin, n)
                expected += src.read_bytes()[begin:begin + n]
        ranges = st.close()
    return bytes(expected), ranges


def test_stage_writes_every_byte_in_order_across_buffers(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(torch.randint(0, 256, (20000,), generator=g, dtype=torch.uint8).tolist()))
    pieces = [os.urandom(40), torch.randn(300, generator=g), (src, 3, 9001), os.urandom(64), torch.arange(7),
              (src, 0, 0), torch.randn(50, generator=g).to(torch.bfloat16)]
    out = tmp_path / "out.bin"
    expected, ranges = _write(out, pieces, size=64)
    assert out.read_bytes() == expected
    assert sum(r.length for r in ranges) == len(expected) - 8
    assert stream.check_ranges(out, ranges) == []


@pytest.mark.parametrize("where", [0, 4095, 4096, 9000, -1])
def test_check_ranges_sees_one_changed_byte_anywhere(tmp_path: Path, where: int) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(12345))
    out = tmp_path / "out.bin"
    expected, ranges = _write(out, [(src, 0, 12345), os.urandom(100)], size=1 << 16)
    data = bytearray(out.read_bytes())
    pos = 8 + (where % 12345)
    data[pos] ^= 0x80
    out.write_bytes(bytes(data))
    bad = stream.check_ranges(out, ranges)
    assert [r.label for r in bad] == ["t0"]


def test_a_moved_page_changes_the_fingerprint() -> None:
    a, b = os.urandom(4096), os.urandom(4096)
    assert stream.fingerprint(a + b) != stream.fingerprint(b + a)
    assert stream.fingerprint(a + b) == stream.fingerprint(bytearray(a + b))


def test_writer_errors_reach_the_caller(tmp_path: Path, monkeypatch) -> None:
    def full(*a, **k):  # noqa: ANN002, ANN003
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream, "_pwrite_all", full)
    with open(tmp_path / "x", "wb") as f:
        st = stream.Stage(f.fileno(), 0, size=16, buffers=2)
        with pytest.raises(OSError, match="No space"):
            for _ in range(100):
                st.put(torch.zeros(4))
            st.close()
        st.abort()
