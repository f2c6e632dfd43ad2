"""Dtype facts in one table: safetensors names, torch dtypes, sizes, and the CLI's spellings.

Importing this module does not import torch (the CLI's ``--help`` must start without it): a row
names its torch dtype by attribute name and :attr:`DType.torch` resolves it on first use, giving
``None`` where the installed torch (``torch>=2.1`` is supported) lacks that dtype — the bytes of
such a tensor can still be copied, only loading it needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "BY_ST", "BY_TORCH", "DTYPE_CHOICES", "by_torch", "parse_dtype", "st_name", "short_name"]


@dataclass(frozen=True)
class DType:
    st: str  # the safetensors header name
    torch_name: str  # the attribute of the torch module
    itemsize: int  # bytes per element
    floating: bool  # --dtype converts it, and deltas may be added to it

    @property
    def torch(self) -> torch.dtype | None:
        """The torch dtype, or None when the installed torch lacks it."""
        import torch

        found = getattr(torch, self.torch_name, None)
        return found if isinstance(found, torch.dtype) else None


# Every dtype safetensors 0.8 reads whose elements are whole bytes. Left out: F4 (torch stores it as
# float4_e2m1fn_x2, two values a byte, so the header's shape is not torch's) and F6_E2M3 / F6_E3M2
# (6-bit, no torch dtype): byte ranges of sub-byte elements cannot be sized or loaded per element.
_ROWS = [
    DType("F64", "float64", 8, True),
    DType("F32", "float32", 4, True),
    DType("F16", "float16", 2, True),
    DType("BF16", "bfloat16", 2, True),
    DType("F8_E4M3", "float8_e4m3fn", 1, True),
    DType("F8_E5M2", "float8_e5m2", 1, True),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", 1, True),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", 1, True),
    # Powers of two only (MX block scales): no sign, no mantissa, so never converted by --dtype
    # (fp16 cannot hold 2**±127) and never a merge target; copied byte for byte.
    DType("F8_E8M0", "float8_e8m0fnu", 1, False),
    DType("C64", "complex64", 8, False),
    DType("I64", "int64", 8, False),
    DType("I32", "int32", 4, False),
    DType("I16", "int16", 2, False),
    DType("I8", "int8", 1, False),
    DType("U8", "uint8", 1, False),
    DType("U16", "uint16", 2, False),  # torch>=2.3
    DType("U32", "uint32", 4, False),  # torch>=2.3
    DType("U64", "uint64", 8, False),  # torch>=2.3
    DType("BOOL", "bool", 1, False),
]

BY_ST: dict[str, DType] = {row.st: row for row in _ROWS}

# Names safetensors knows whose elements are smaller than a byte (see above).
SUB_BYTE_ST = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

_by_torch: dict[Any, DType] | None = None


def _torch_table() -> dict[torch.dtype, DType]:
    global _by_torch
    if _by_torch is None:
        _by_torch = {row.torch: row for row in _ROWS if row.torch is not None}
    return _by_torch


def by_torch(dtype: torch.dtype) -> DType:
    """The row of a torch dtype; InvalidArgumentError if safetensors cannot store it."""
    row = _torch_table().get(dtype)
    if row is None:
        raise InvalidArgumentError(
            f"Tensors of dtype {dtype} cannot be stored in safetensors.",
            hint=f"Convert them to one of: {', '.join(str(d).removeprefix('torch.') for d in _torch_table())}.",
        )
    return row


def __getattr__(name: str) -> Any:
    # BY_TORCH (torch dtype -> DType) is built on first access, so importing this module needs no torch.
    if name == "BY_TORCH":
        return _torch_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What users type for --dtype, by torch attribute name.
_NAMES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp64": "float64",
    "float64": "float64",
}
DTYPE_CHOICES = ["fp32", "fp16", "bf16", "fp64"]
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def parse_dtype(name: str) -> torch.dtype:
    try:
        attr = _NAMES[name.lower()]
    except (KeyError, AttributeError):
        raise InvalidArgumentError(
            f"Unknown dtype {name!r}.", hint=f"Use one of: {', '.join(DTYPE_CHOICES)}."
        ) from None
    import torch

    return getattr(torch, attr)


def st_name(dtype: torch.dtype) -> str:
    return by_torch(dtype).st


def short_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return _SHORT.get(name, name)
