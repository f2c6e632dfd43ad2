"""What ``loratools info`` shows, built in one of two ways that give the same answer:

* :func:`summarize_fast` — a PEFT adapter in safetensors, from its config and header alone
  (``formats/peft_layout.plan_state_dict``) plus the factors read as numpy arrays for ‖ΔW‖: no
  torch, so ``info`` answers in a fraction of a second. Anything out of the ordinary (another
  format, a pickle, a dtype numpy cannot hold, an input that would be refused) returns None;
* :func:`summarize_adapter` — any adapter, read and bound by the pipeline (torch).

``tests/test_summary.py`` holds the fast path to the full one for every PEFT fixture.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import LoraToolsError

if TYPE_CHECKING:
    from .adapter import Adapter

SHORT_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64"}


def storage_shape(kind: str, fan_out: int, fan_in: int, kernel: tuple[int, ...], transposed: bool) -> list[int]:
    if kind == "conv":
        return [fan_out, fan_in // max(1, math.prod(kernel)), *kernel]
    return [fan_in, fan_out] if transposed else [fan_out, fan_in]


def lowrank_norm(B: np.ndarray, A: np.ndarray, scale: float) -> float:
    """‖scale · B @ A‖_F (B (out, r), A (r, in)) in memory the factors justify: from the r×r Gram
    matrices when r² ≤ out·in — the (out, in) product of a rank-1 pair of 2**16-long factors (a
    1 MB file) would be 32 GB —, else from the product itself (a rank of 2**16 on a 1×1 module must
    not make a 2**16 × 2**16 Gram matrix). min(r², out·in) ≤ r·(out + in) / 2: never more values
    than the file holds."""
    out, r = B.shape
    inp = A.shape[1]
    if r * r <= out * inp:
        return abs(float(scale)) * math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))
    return abs(float(scale)) * float(np.linalg.norm(B @ A))


def _delta_norm(delta: Any) -> float | None:
    """‖ΔW‖_F of a module's delta without forming more than its tensors justify (see lowrank_norm);
    None for a change that is a function of the base weight ((IA)³, OFT): it has no ΔW alone."""
    from .deltas import LowRank

    if not getattr(delta, "additive", True):
        return None
    if isinstance(delta, LowRank):
        return lowrank_norm(delta.B.double().numpy(), delta.A.double().numpy(), delta.scale)
    return float(delta.norm())


_NUMPY = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def _load(data: np.ndarray, begin: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A tensor's bytes (from the file mapped as ``data``) as float64 — F32, F16, F64, BF16 widened
    by its bit pattern —, or None for another dtype."""
    if dtype not in _NUMPY:
        return None
    count = math.prod(shape)
    values = data[begin:begin + count * np.dtype(_NUMPY[dtype]).itemsize].view(_NUMPY[dtype])
    if dtype == "BF16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    if values.size != count:
        return None
    return values.astype(np.float64).reshape(shape)


def summarize_fast(path: Path, *, shown_as: str) -> dict[str, Any] | None:
    """The ``info --json`` document of a PEFT safetensors adapter without torch, or None."""
    from .checkpoint.safetensors_io import read_header
    from .formats import peft_layout as peft

    try:
        if not peft.detect(path):
            return None
        config_path, weights = peft.find_files(path)
        if weights.suffix != ".safetensors":
            return None
        cfg = peft.read_config(config_path)
        header = read_header(weights)
        plan = peft.plan_state_dict(cfg, config_path, weights, {k: tuple(t.shape) for k, t in header.tensors.items()})
        if not plan.modules and not plan.replacements:
            return None
        data = np.memmap(weights, dtype=np.uint8, mode="r")  # one mapping for every tensor of the file
        arrays = {}
        wanted = {k for spec in plan.modules for k in (spec.a_key, spec.b_key)}
        for key, t in header.tensors.items():
            a = _load(data, t.begin, t.dtype, tuple(t.shape))
            if a is None or not bool(np.isfinite(a).all()):
                return None  # the full reader says what is wrong
            if key in wanted:
                arrays[key] = a
        del data
    except LoraToolsError:
        return None  # the full path raises the same error, the way every command does
    rows = []
    for spec in plan.modules:
        A = arrays[spec.a_key].reshape(spec.rank, -1)
        B = arrays[spec.b_key].reshape(-1, spec.rank)
        fan_out, fan_in = int(B.shape[0]), int(A.shape[1])
        rows.append({
            "target": spec.name + ".weight",
            "kind": spec.kind + (" (transposed)" if spec.transposed else ""),
            "delta": "lowrank",
            "source_keys": list(spec.keys.values()),
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": spec.scale,
            "dtype": SHORT_DTYPES[header.tensors[spec.a_key].dtype],
            "shape": storage_shape(spec.kind, fan_out, fan_in, spec.kernel, bool(spec.transposed)),
            "dora": "magnitude" in spec.keys,
            "lora_bias": "bias" in spec.keys,
            "delta_norm": lowrank_norm(B, A, spec.scale),
        })
    rows.sort(key=lambda r: r["target"])
    return {
        "path": shown_as,
        "format": peft.NAME,
        "base_model": cfg.get("base_model_name_or_path"),
        "modules": len(rows),
        "replacements": sorted(plan.replacements),
        "parameters": sum(math.prod(t.shape) for t in header.tensors.values()),
        "ranks": sorted({r["rank"] for r in rows}),
        "bound_to": None,
        "unbound": {},
        "warnings": plan.warnings,
        "module_list": rows,
    }


def summarize_adapter(a: Adapter, *, shown_as: str, base: str | None, unbound: dict[str, str]) -> dict[str, Any]:
    """The ``info --json`` document of an adapter read (and possibly bound) by the pipeline."""
    from .dtypes import short_name

    rows = []
    for target, m in sorted(a.modules.items()):
        d = m.delta.describe()
        rows.append({
            "target": target,
            "kind": m.kind + (" (transposed)" if m.transposed else " (orientation open)" if m.transposed is None
                              and a.meta.get("factor_orientation") else ""),
            "delta": d["kind"],
            "source_keys": list(m.source_keys),
            "rank": m.rank,
            "alpha": d.get("alpha"),
            "scale": m.scale,
            "dtype": short_name(m.delta.dtype),
            "shape": list(m.stored_shape),
            "dora": m.magnitude is not None,
            "lora_bias": m.bias is not None,
            "delta_norm": _delta_norm(m.delta),
        })
    return {
        "path": shown_as,
        "format": a.format,
        "base_model": a.meta.get("base_model"),
        "modules": len(a.modules),
        "replacements": sorted(a.replacements),
        "parameters": a.parameter_count(),
        "ranks": sorted({r["rank"] for r in rows if r["rank"] is not None}),
        "bound_to": base,
        "unbound": unbound,
        "warnings": a.warnings,
        "module_list": rows,
    }


def describe_model(path: Path, *, shown_as: str) -> dict[str, Any] | None:
    """``info`` of a model instead of an adapter: its size and, when loratools wrote it, what is
    merged into it (the provenance record). None when ``path`` is not a model either."""
    from .checkpoint.reader import open_checkpoint
    from .ops.undo import read_record

    try:
        ckpt = open_checkpoint(path)
    except LoraToolsError:
        return None
    record = read_record(ckpt)
    return {
        "path": shown_as,
        "format": "model",
        "tensors": len(ckpt.tensors),
        "parameters": sum(math.prod(t.shape) for t in ckpt.tensors.values()),
        "files": [s.filename for s in ckpt.shards],
        "merged": record,
    }
