"""Options: one frozen object built at the API boundary and passed down, named for what they are.

``Options.build(**keywords)`` checks every value once (unknown names, devices, precisions,
dtypes, sizes) and raises InvalidArgumentError; below the boundary nothing re-parses a string.
``compute_dtype`` is what the arithmetic runs in, ``output_dtype`` what floating tensors are written
as (None: each keeps its own) — never the same word for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int, str], None]
PRECISIONS = ("fp32", "fp64")
# --layout: how raw factor pairs are oriented when shapes cannot tell (layout.py applies them)
LAYOUTS = {
    "out-r-in": "factors (out,r) and (r,in); ΔW = first @ second",
    "in-r-out": "factors (in,r) and (r,out); ΔW = (first @ second)ᵀ",
    "linear-ab": "nn.Linear lora_A.weight (r,in) and lora_B.weight (out,r); ΔW = B @ A",
}
# sample: every byte read back + seeded rows in float64 (the default); full: every element in float64
VERIFY_LEVELS = ("sample", "full", "none")


@dataclass(frozen=True)
class Options:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # the arithmetic: fp32, or fp64 for reference runs
    output_dtype: str | None = None  # --dtype: floating tensors written as this (None: keep each one's)
    verify: str = "sample"  # what is checked before OUT appears: sample | full | none (docs/numerics.md)
    reversible: bool = False  # store what a bit-exact undo needs
    overwrite: bool = False  # replace an existing OUT
    dry_run: bool = False  # plan and report; write nothing
    force: bool = False  # take out adapters MERGED's record does not list
    exact: bool = True  # restore bit for bit when the undo data allows it
    layout: str | None = None  # orientation of raw factor pairs
    from_format: str | None = None  # the adapters' format, overriding detection
    allow_skip: bool = False  # apply what can be applied, report the rest
    max_shard_size: int | None = None  # bytes; None: the input's sharding
    progress: Progress | None = None  # called (done, total, name) during long work

    @classmethod
    def build(cls, *, dtype: Any = None, verify: Any = True, max_shard_size: Any = None, **given: Any) -> Options:
        """Options from the public API's keywords (``dtype`` is the output dtype; ``verify`` True,
        False or a level; ``max_shard_size`` '5GB' or bytes)."""
        from .checkpoint.writer import parse_size

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidArgumentError(f"Unknown option(s): {', '.join(unknown)}.",
                                       hint=f"Known: {', '.join(sorted(known | {'dtype'}))}.")
        if isinstance(verify, bool):
            verify = "sample" if verify else "none"
        if verify not in VERIFY_LEVELS:
            raise InvalidArgumentError(f"Unknown verification level {verify!r}.", hint="Use sample, full or none.")
        precision = given.get("precision", "fp32")
        if precision not in PRECISIONS:
            raise InvalidArgumentError(f"Unknown precision {precision!r}.", hint="Use fp32 or fp64.")
        out_dtype = None
        if dtype is not None:
            from .dtypes import parse_dtype, short_name

            out_dtype = short_name(parse_dtype(dtype) if isinstance(dtype, str) else dtype)
        layout = given.get("layout")
        if layout is not None:
            if layout not in LAYOUTS:
                raise InvalidArgumentError(f"Unknown layout {layout!r}.", hint=f"Use one of: {', '.join(LAYOUTS)}.")
        size = parse_size(max_shard_size) if max_shard_size is not None else None
        opts = cls(**given, output_dtype=out_dtype, verify=verify, max_shard_size=size)
        if opts.device not in (None, "auto"):
            resolve_device(opts.device)  # a wrong device is refused before anything is read
        return opts

    def with_(self, **changes: Any) -> Options:
        return replace(self, **changes)

    @property
    def compute_dtype(self) -> torch.dtype:
        import torch

        return torch.float64 if self.precision == "fp64" else torch.float32

    @property
    def torch_output_dtype(self) -> torch.dtype | None:
        if self.output_dtype is None:
            return None
        from .dtypes import parse_dtype

        return parse_dtype(self.output_dtype)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(device: str | None) -> torch.device:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"Unknown device {device!r}.", hint="Use auto, cpu, cuda or cuda:N.") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {device}: no CUDA device is available here.", hint="Use --device cpu.")
    if d.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"Unsupported device {device!r}.", hint="Use auto, cpu, cuda or cuda:N.")
    return d


def check_weights(weights: Any, count: int, *, default: float | None = 1.0) -> list[float | None]:
    """One finite weight per adapter, in order; ``default`` for all when none are given (None:
    decided later, as unmerge does from the merge's record)."""
    if not weights:
        return [default] * count
    if len(weights) != count:
        raise InvalidArgumentError(
            f"{len(weights)} --weight value(s) for {count} adapter(s).",
            hint="Give --weight once per adapter, in the same order, or not at all.",
        )
    out: list[float | None] = []
    for w in weights:
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"--weight {w!r} is not a number.") from None
        if not math.isfinite(value):
            raise InvalidArgumentError(f"--weight {w!r} is not a finite number.",
                                       hint="Weights multiply ΔW; NaN or Inf would destroy every tensor they touch.")
        out.append(value)
    return out
