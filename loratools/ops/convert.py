"""convert: rewrite an adapter in another format, keeping every module's ΔW.

The plan of a conversion is the adapter to write (bound as far as the target needs, shaped for a
server with ``--for``, factors cast with ``--dtype``); ``pipeline.write_adapter_output`` refuses
what the format cannot hold, writes it, reads it back and compares every module's ΔW in float64
before OUT appears.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..adapter import Adapter
from ..dtypes import parse_dtype
from ..errors import InvalidArgumentError, UnsupportedAdapterError
from ..formats import Capabilities, cannot_hold, spec
from ..formats.common import fold_scale, pad_rank
from ..options import Options
from ..pipeline import check_adapter_out, prepare_adapter, write_adapter_output
from .stack import ModuleReport, as_lowrank


@dataclass
class ConvertResult:
    out: Path
    format: str
    modules: int
    max_rel_err: float = 0.0
    warnings: list[str] = field(default_factory=list)
    approximated: list[ModuleReport] = field(default_factory=list)  # --to-lora: what each module kept


def convert(
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    to: str,
    base: str | Path | None = None,
    scale: float | None = None,
    server: str | None = None,
    max_rank: int | None = None,
    dtype: str | torch.dtype | None = None,
    to_lora: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    **options: object,
) -> ConvertResult:
    """Write ``adapter`` to ``out`` in format ``to``; every module's ΔW is kept.

    ``to_lora`` (with ``rank`` and/or ``energy``) is the one exception: every module that is not a
    plain LoRA (LoHa, LoKr, full diffs…) becomes the best plain LoRA of that rank (Eckart–Young, one
    module's ΔW at a time), and ``ConvertResult.approximated`` gives each one's relative error
    ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F. Plain LoRA modules are written as they are.

    ``dtype`` stores the factors in that dtype. ``server`` ("vllm" or "tgi", with ``to="peft"``)
    shapes the adapter for what that server loads (see :func:`for_server`);
    ``ConvertResult.warnings`` says what was changed. Other options: ``layout``, ``from_format``,
    ``allow_skip``, ``overwrite``, ``verify``.
    """
    out = Path(out)
    opts = Options.build(**options)  # type: ignore[arg-type]
    s = spec(to, writing=True)
    if to_lora and rank is None and energy is None:
        raise InvalidArgumentError("--to-lora needs --rank R (and/or --energy E).")
    if not to_lora and (rank is not None or energy is not None):
        raise InvalidArgumentError("--rank / --energy go with --to-lora (to shrink plain LoRA, use loratools resize).")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidArgumentError("--energy is a fraction in (0, 1].")
    check_adapter_out(out, [adapter, base], opts, command="convert")
    a = prepare_adapter(adapter, opts, base=base, scale=scale)
    notes: list[str] = []
    approximated: list[ModuleReport] = []
    if to_lora:
        modules = dict(a.modules)
        others = [n for n, m in sorted(a.modules.items()) if m.delta.kind != "lowrank"]
        weighty = [n for n in others if not getattr(a.modules[n].delta, "additive", True)]
        if weighty:
            raise UnsupportedAdapterError(
                f"--to-lora: {len(weighty)} module(s) change the weight as a function of itself "
                f"({', '.join(f'{n} ({a.modules[n].delta.kind})' for n in weighty[:6])}{' …' if len(weighty) > 6 else ''}): "
                "their ΔW exists only against the base's tensors, which convert does not read.",
                hint="Merge the adapter into the base instead, or extract a LoRA from the merged model: "
                "loratools extract BASE MERGED OUT --rank R.")
        for n_done, name in enumerate(others, start=1):
            if opts.progress:
                opts.progress(n_done, len(others), name)
            modules[name], report = as_lowrank(a.modules[name], rank=rank, energy=energy)
            approximated.append(report)
        a = replace(a, modules=modules)
        if not others:
            notes.append("--to-lora: every module already is a plain LoRA; nothing was approximated")
    copies = [n for n in a.meta.get("base_copies", ()) if n in a.replacements]
    if copies and (to != "peft" or server is not None):
        # PEFT saves the base's embedding beside an embedding LoRA; it carries nothing of the adapter (and
        # vLLM / TGI skip it)
        a = replace(a, replacements={n: t for n, t in a.replacements.items() if n not in copies})
        notes.append(f"left out PEFT's copy of the base tensor(s) {', '.join(copies)}: they hold no change")
    if server is not None:
        if to != "peft":
            raise InvalidArgumentError("--for shapes PEFT adapters for a server: use it with --to peft.")
        a, server_notes = for_server(a, server, max_rank=max_rank)
        notes += server_notes
    target_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if target_dtype is not None:
        a = replace(a, modules={n: m.with_(delta=m.delta.map(lambda t: t.to(target_dtype))) for n, m in a.modules.items()},
                    replacements={n: t.to(target_dtype) for n, t in a.replacements.items()})
    result = ConvertResult(out=out, format=s.name, modules=len(a.modules), warnings=list(a.warnings) + notes,
                           approximated=approximated)
    written = write_adapter_output(a, out, opts, to=s.name, operation="convert", sources=[adapter],
                                   context={"base_config": a.meta.get("base_config")})
    result.max_rel_err = written.max_rel_err
    result.warnings = written.notes + result.warnings
    return result


SERVERS: dict[str, Capabilities] = {
    # vLLM and TGI/LoRAX read lora_A / lora_B (and embedding) tensors with one r and one lora_alpha
    "vllm": Capabilities(embedding=True, transposed=True, per_module_rank=False, per_module_scale=False),
    "tgi": Capabilities(embedding=True, transposed=True, per_module_rank=False, per_module_scale=False),
}


def for_server(a: Adapter, server: str, *, max_rank: int | None = None) -> tuple[Adapter, list[str]]:
    """Shape a PEFT adapter for vLLM or TGI/LoRAX, keeping every ΔW exact, and say what changed.

    Both read only ``lora_A`` / ``lora_B`` (and embedding) tensors, one ``r`` and one
    ``lora_alpha`` (``rank_pattern`` / ``alpha_pattern`` are ignored): so smaller ranks are padded
    with zeros to the largest and every module's scale is folded into B with alpha = r. What their
    capabilities (:data:`SERVERS`) do not hold — full tensors, DoRA, lora_bias, conv — is refused.
    TGI drops a module type that some layers lack, so missing (layer, module) pairs get zero factors.
    """
    if server not in SERVERS:
        raise InvalidArgumentError(f"Unknown server {server!r}.", hint=f"Use one of: {', '.join(sorted(SERVERS))}.")
    problems = cannot_hold(SERVERS[server], a)
    if problems:
        raise UnsupportedAdapterError(
            f"{server} cannot load: {', '.join(problems[:6])}{' …' if len(problems) > 6 else ''}.",
            hint="Merge those parts into the base model instead, or serve the merged model.")
    rank = max(int(m.rank or 0) for m in a.modules.values())
    if max_rank is not None and rank > max_rank:
        raise UnsupportedAdapterError(f"The adapter's rank {rank} exceeds --max-rank {max_rank}.",
                                      hint=f"loratools resize ADAPTER OUT --rank {max_rank} makes a smaller one first.")
    notes = []
    padded = sorted(n for n, m in a.modules.items() if (m.rank or 0) < rank)
    rescaled = sorted(n for n, m in a.modules.items() if m.scale != 1.0)
    # scale 1 = alpha / r with alpha = r: one global alpha, folded per module
    modules = {n: pad_rank(fold_scale(m, 1.0), rank) for n, m in a.modules.items()}
    modules = {n: m.with_(delta=replace(m.delta, alpha=float(rank))) for n, m in modules.items()}
    if rescaled:
        notes.append(f"{server}: folded the scale of {len(rescaled)} module(s) into lora_B; lora_alpha = r = {rank}")
    if padded:
        notes.append(f"{server}: padded {len(padded)} module(s) with zero rank to r = {rank}")
    if server == "tgi":
        layered: dict[str, set[tuple[str, int]]] = {}
        for n in modules:
            match = re.match(r"^(.*\.layers\.)(\d+)(\..*)$", n)
            if match:
                layered.setdefault(match.group(3), set()).add((match.group(1), int(match.group(2))))
        layers = {(p, i) for v in layered.values() for p, i in v}
        added = 0
        for suffix, present in layered.items():
            template = next(m for n, m in modules.items() if n.endswith(suffix) and ".layers." in n)
            for prefix, i in sorted(layers - present):
                name = f"{prefix}{i}{suffix}"
                modules[name] = template.with_(target=name, delta=template.delta.map(torch.zeros_like), source_keys=())
                added += 1
        if added:
            notes.append(f"tgi: added {added} zero module(s) so that every layer carries every module type")
    return replace(a, modules=modules), notes
