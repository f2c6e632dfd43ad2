"""The ``verify`` command: MERGED checked against BASE + adapters (the same open → bind as merge,
then the checks of ``verify.py`` instead of a write), and ``--round-trip``."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint.reader import open_checkpoint
from ..hub import resolve
from ..options import Options, check_weights
from ..pipeline import AdapterGroup, bind_groups, open_base
from ..verify import _FLOAT_FACTS, VerifyReport, check_against, ulp
from .merge import merge, unmerge
from .plan import build_plan, collect_ops


def verify_checkpoint(
    base: str | Path,
    adapters: Sequence[str | Path],
    merged: str | Path,
    *,
    weights: Sequence[float] | None = None,
    forward: bool = False,
    **options: object,
) -> VerifyReport:
    """MERGED == round(BASE + Σ wᵢ·ΔWᵢ) tensor by tensor; every other tensor bit-identical; no
    tensor missing or extra. With ``forward`` also a forward pass through every adapted layer.
    A diffusers pipeline folder is verified component by component (tensor names ``unet/…``)."""
    opts = Options.build(**options)  # type: ignore[arg-type]
    ws = check_weights(weights, len(adapters))
    from .gguf_merge import is_gguf, verify_gguf

    if is_gguf(base):  # a llama.cpp model, merged by loratools or by llama.cpp's export-lora
        if forward:
            from ..errors import InvalidArgumentError

            raise InvalidArgumentError("--forward does not apply to GGUF models: every element is checked.")
        return verify_gguf(Path(base), list(adapters), list(ws), Path(resolve(merged)), opts)
    opened = open_base(base)
    merged_path = Path(resolve(merged))
    inputs = bind_groups(opened, [AdapterGroup(adapters, ws, 1.0)], opts)
    if not opened.is_pipeline:
        plan = build_plan("verify", opened.parts[""], inputs[""], collect_ops(inputs[""]))
        return check_against(plan, open_checkpoint(merged_path), forward=forward, progress=opts.progress)
    report = VerifyReport()
    for component, ckpt in opened.parts.items():
        out = open_checkpoint(merged_path / component)
        ins = inputs.get(component, [])
        # untouched components: every tensor must be the base's, bit for bit
        part = check_against(build_plan("verify", ckpt, ins, collect_ops(ins)), out, forward=forward and bool(ins),
                             progress=opts.progress)
        report.checks += [replace(c, name=f"{component}/{c.name}") for c in part.checks]
    return report


@dataclass
class RoundTrip:
    tensors: int
    elements: int
    bit_exact: int
    max_ulps: float
    reversible_overhead: int
    reversible_exact: bool
    weights_bytes: int


def round_trip(base: str | Path, adapters: Sequence[str | Path], *, weights: Sequence[float] | None = None,
               layout: str | None = None, device: str = "auto", workdir: str | Path | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> RoundTrip:
    """merge, unmerge, and report how far BASE came back (ulps, fraction of bit-exact elements);
    then the same with ``--reversible``, which must come back bit for bit, and its size overhead."""
    tmp = Path(tempfile.mkdtemp(prefix="loratools-roundtrip-", dir=workdir))
    try:
        name = "m.safetensors" if Path(base).suffix == ".safetensors" else "m"
        back_name = "b.safetensors" if name.endswith(".safetensors") else "b"
        opts: dict[str, object] = dict(layout=layout, device=device, verify=False, progress=progress)
        merged = merge(base, adapters, tmp / name, weights=weights, reversible=True, **opts)
        unmerge(tmp / name, adapters, tmp / back_name, exact=False, **opts)
        orig, back, mid = open_checkpoint(resolve(base)), open_checkpoint(tmp / back_name), open_checkpoint(tmp / name)
        changed = set(merged.changed)
        exact = elements = 0
        worst = 0.0
        for n in changed:
            a, b = orig.get(n), back.get(n)
            elements += a.numel()
            exact += int((a == b).sum())
            if a.dtype in _FLOAT_FACTS:
                # ulps of the larger of |W| and |ΔW| (≈ |W' − W|): an exact zero in W has no meaningful ulp
                a64, m64 = a.double(), mid.get(n).double()
                unit = ulp(torch.maximum(a64.abs(), (m64 - a64).abs()), a.dtype)
                worst = max(worst, float(((a64 - b.double()).abs() / unit).max()))
        shutil.rmtree(tmp / back_name) if (tmp / back_name).is_dir() else (tmp / back_name).unlink()
        unmerge(tmp / name, adapters, tmp / back_name, exact=True, **opts)
        back = open_checkpoint(tmp / back_name)
        bit_exact = all(torch.equal(orig.get(n).reshape(-1).view(torch.uint8), back.get(n).reshape(-1).view(torch.uint8))
                        for n in changed)
        return RoundTrip(len(changed), elements, exact, worst, merged.undo_bytes, bit_exact, merged.bytes_written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
