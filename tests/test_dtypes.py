"""The dtype table: torch-free to import, lazy torch dtypes, and the same dtypes the safetensors
library knows."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loratools import dtypes
from loratools.dtypes import (BY_ST, BY_TORCH, DTYPE_CHOICES, SUB_BYTE_ST, DType, by_torch, parse_dtype, short_name,
                              st_name)
from loratools.errors import InvalidArgumentError


def test_import_does_not_import_torch() -> None:
    code = "import sys, loratools.dtypes as d; assert 'torch' not in sys.modules, 'torch imported'; print(len(d.BY_ST))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


def test_rows_agree_with_torch() -> None:
    for row in BY_ST.values():
        t = row.torch
        if t is None:  # an older torch: only U16/U32/U64 (torch<2.3) and the newer float8 types may be missing
            assert row.st in {"U16", "U32", "U64", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"}
            continue
        assert isinstance(t, torch.dtype) and t.itemsize == row.itemsize, row
        assert row.floating == (t.is_floating_point and row.st != "F8_E8M0"), row
        assert BY_TORCH[t] is row and by_torch(t) is row and st_name(t) == row.st
    assert BY_ST["F8_E8M0"].torch is getattr(torch, "float8_e8m0fnu", None)
    assert BY_TORCH[torch.float32].st == "F32" and dtypes.BY_TORCH is BY_TORCH


def test_missing_torch_dtype_resolves_to_none() -> None:
    assert DType("X", "no_such_dtype", 1, False).torch is None
    assert DType("X", "nn", 1, False).torch is None  # an attribute that is not a dtype


def test_unstorable_dtype() -> None:
    with pytest.raises(InvalidArgumentError, match="complex128"):
        st_name(torch.complex128)
    with pytest.raises(KeyError):
        BY_TORCH[torch.complex128]
    with pytest.raises(AttributeError):
        dtypes.NO_SUCH_NAME  # noqa: B018


def test_cli_spellings() -> None:
    for choice in DTYPE_CHOICES:
        assert short_name(parse_dtype(choice)) == choice
        assert parse_dtype(choice.upper()) == parse_dtype(choice)
    assert parse_dtype("half") is torch.float16 and parse_dtype("bfloat16") is torch.bfloat16
    assert short_name(torch.int8) == "int8" and short_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    with pytest.raises(InvalidArgumentError, match="Unknown dtype 'fp8'"):
        parse_dtype("fp8")


def test_table_is_what_the_safetensors_library_knows(tmp_path: Path) -> None:
    """The library's own list, from its refusal of an unknown dtype; only sub-byte types are left out."""
    body = json.dumps({"a": {"dtype": "NO_SUCH", "shape": [0], "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "probe.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(Exception) as e:
        safe_open(str(path), framework="pt")
    found = re.search(r"expected one of (.*?)(?: at line|$)", str(e.value))
    if found is None:
        pytest.skip(f"this safetensors words the refusal differently: {e.value}")
    known = set(re.findall(r"`(\w+)`", found.group(1)))
    assert set(BY_ST) <= known, set(BY_ST) - known
    assert known - set(BY_ST) <= SUB_BYTE_ST, known - set(BY_ST)
    for st, row in BY_ST.items():  # and the library reads each as the torch dtype the table says
        if row.torch is None:
            continue
        body = json.dumps({"a": {"dtype": st, "shape": [2], "data_offsets": [0, 2 * row.itemsize]}}).encode()
        path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * (2 * row.itemsize))
        with safe_open(str(path), framework="pt") as f:
            assert f.get_tensor("a").dtype == row.torch, st
