"""Dtype facts in one table: safetensors names, torch dtypes, sizes, and the CLI's spellings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class DType:
    st: str  # the safetensors header name
    torch: torch.dtype
    itemsize: int
    floating: bool


_ROWS = [
    DType("F64", torch.float64, 8, True),
    DType("F32", torch.float32, 4, True),
    DType("F16", torch.float16, 2, True),
    DType("BF16", torch.bfloat16, 2, True),
    DType("F8_E4M3", torch.float8_e4m3fn, 1, True),
    DType("F8_E5M2", torch.float8_e5m2, 1, True),
    DType("I64", torch.int64, 8, False),
    DType("I32", torch.int32, 4, False),
    DType("I16", torch.int16, 2, False),
    DType("I8", torch.int8, 1, False),
    DType("U8", torch.uint8, 1, False),
    DType("U16", torch.uint16, 2, False),
    DType("U32", torch.uint32, 4, False),
    DType("U64", torch.uint64, 8, False),
    DType("BOOL", torch.bool, 1, False),
]

BY_ST: dict[str, DType] = {row.st: row for row in _ROWS}
BY_TORCH: dict[torch.dtype, DType] = {row.torch: row for row in _ROWS}

# What users type for --dtype.
_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "f32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
DTYPE_CHOICES = ["fp32", "fp16", "bf16", "fp64"]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise InvalidArgumentError(
            f"Unknown dtype {name!r}.", hint=f"Use one of: {', '.join(DTYPE_CHOICES)}."
        ) from None


def st_name(dtype: torch.dtype) -> str:
    return BY_TORCH[dtype].st


def short_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch.")
    )
