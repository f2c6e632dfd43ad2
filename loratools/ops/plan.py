"""Plans: what each output tensor becomes, decided before anything is read or written.

A plan lists, per output shard, per tensor, the edits on it (``ops/edits.py``) in order.
``--dry-run`` prints it; execution follows it to the letter; verification checks the written files
against it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import Adapter
from ..checkpoint.reader import Checkpoint
from ..checkpoint.safetensors_io import TensorInfo
from ..dtypes import BY_ST, st_name
from ..errors import InternalError, UnsupportedAdapterError
from .edits import AddBias, AddDelta, Apply, Dora, DoraUndo, Edit, Replace
from .fp8 import BlockScale, QuantState, find_quantized, refuse_unless_requantizable


@dataclass
class TensorPlan:
    name: str
    source: TensorInfo
    out_dtype: str  # safetensors name
    ops: list[Edit] = field(default_factory=list)
    quant: BlockScale | None = None  # an FP8 weight with scales: dequantized, and requantized when out_dtype is FP8
    scale_of: str | None = None  # the scales of a requantized FP8 weight: computed with it

    @property
    def copy(self) -> bool:
        """Untouched and same dtype: copied byte for byte."""
        return not self.ops and self.out_dtype == self.source.dtype and self.quant is None and self.scale_of is None

    @property
    def out_nbytes(self) -> int:
        return math.prod(self.source.shape) * BY_ST[self.out_dtype].itemsize


@dataclass
class ShardPlan:
    filename: str
    tensors: list[TensorPlan]


@dataclass
class AdapterInput:
    adapter: Adapter
    weight: float | None  # None until decided (unmerge takes the weight recorded at merge time)
    sha256: str
    label: str
    sign: float = 1.0  # −1: taken out (unmerge, the old adapter of swap)
    source: str = ""  # what records name it by: its Hub id, or its file name (never a local absolute path)

    def record(self) -> dict:
        return {
            "path": self.source or (self.adapter.path.name if self.adapter.path else self.label),
            "format": self.adapter.format,
            "sha256": self.sha256,
            "weight": self.weight,
            "base_model": self.adapter.meta.get("base_model"),
        }


@dataclass
class UndoData:
    """What loratools stores beside a merge (``loratools_undo.safetensors``) to take it out again."""

    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA ‖W+ΔW‖ per output, float32
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors replaced whole
    patches: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (encoded positions, values)
    sha256: dict[str, str] = field(default_factory=dict)  # of the original bytes of patched tensors
    adapters: list[dict] = field(default_factory=list)  # the merge these belong to
    kernel: str = "addmm"  # how the merge's low-rank sums were formed (ops/undo.py KERNEL)


@dataclass
class Plan:
    operation: str
    base: Checkpoint
    adapters: list[AdapterInput]
    shards: list[ShardPlan]
    sharded: bool  # write an index
    index_name: str | None
    warnings: list[str] = field(default_factory=list)
    merged_after: list[dict] = field(default_factory=list)  # the adapters merged into the output
    undo_in: UndoData | None = None  # read from the input (unmerge, swap)
    reversible: bool = False  # store what exact undo needs
    exact_undo: bool = False  # restore patched tensors bit for bit (all merged adapters taken out)
    base_model: str | None = None  # the base's Hub repo id, when known
    output_dtype: str | None = None  # --dtype (short name): config.json says so too
    dequantized: bool = False  # FP8 weights with scales written as --dtype: config.json loses quantization_config
    quant: QuantState = field(default_factory=QuantState)  # FP8 scales computed while writing, and their cost

    def tensors(self) -> list[TensorPlan]:
        return [t for s in self.shards for t in s.tensors]

    def changed(self) -> list[TensorPlan]:
        return [t for t in self.tensors() if t.ops]

    def total_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors())


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p.suffix == ".json":
            continue  # the weights identify an adapter; configs get reformatted by tools
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def collect_ops(adapters: list[AdapterInput], undo: UndoData | None = None) -> dict[str, list[Edit]]:
    """Edits per base tensor from bound adapters, in the order they apply.

    Adapters with ``sign`` −1 are taken out (unmerge, the old side of swap); their edits come
    first. Taking out a DoRA module needs the row norms, and taking out a full replacement needs
    the original tensor: both come from ``undo`` (stored beside a loratools merge).
    """
    removals: dict[str, list[Edit]] = {}
    additions: dict[str, list[Edit]] = {}
    for i, ai in enumerate(adapters):
        if ai.weight is None:
            raise InternalError(f"{ai.label}: weight not decided before planning")
        w = ai.sign * ai.weight
        taking_out = ai.sign < 0
        target = removals if taking_out else additions
        for name, m in ai.adapter.modules.items():
            if not getattr(m.delta, "additive", True):
                if m.magnitude is not None:
                    raise UnsupportedAdapterError(f"{ai.label}: module {name} combines DoRA with a {m.delta.kind} "
                                                  "change, which loratools does not apply.", tensor=name)
                target.setdefault(name, []).append(Apply(i, w, module=m, inverted=taking_out))
                if getattr(m.delta, "with_bias", False) and m.bias_target:  # the bias is one vector of outputs
                    target.setdefault(m.bias_target, []).append(
                        Apply(i, w, module=m.with_(transposed=False, kind="linear", kernel=()), inverted=taking_out))
            elif m.magnitude is not None:
                if abs(w) != 1.0:
                    raise UnsupportedAdapterError(
                        f"{ai.label}: DoRA module {name} cannot be applied with weight {abs(w):g}: DoRA rescales the "
                        "whole weight, so a fraction of it has no meaning.",
                        tensor=name,
                        hint="Use weight 1 for DoRA adapters.",
                    )
                if taking_out:
                    norm = undo.norms.get(name) if undo else None
                    if norm is None:
                        raise UnsupportedAdapterError(
                            f"{ai.label}: taking out DoRA module {name} needs the row norms ‖W+ΔW‖ of the original merge, "
                            "and MERGED does not carry them.",
                            tensor=name,
                            hint="loratools stores them in loratools_undo.safetensors beside its DoRA merges; "
                            "a model merged by another tool cannot be un-merged exactly.",
                        )
                    target.setdefault(name, []).append(DoraUndo(i, w, module=m, norm=norm))
                else:
                    target.setdefault(name, []).append(Dora(i, w, module=m))
            else:
                target.setdefault(name, []).append(AddDelta(i, w, module=m))
            if m.bias is not None and m.bias_target:
                target.setdefault(m.bias_target, []).append(AddBias(i, w, module=m))
        for name, t in ai.adapter.replacements.items():
            if abs(w) != 1.0:
                raise UnsupportedAdapterError(
                    f"{ai.label} replaces {name} whole (modules_to_save / trained bias); it cannot be applied with "
                    f"weight {abs(w):g}.",
                    tensor=name,
                    hint="Give this adapter weight 1, or remove the full tensors from it.",
                )
            if taking_out:
                original = undo.originals.get(name) if undo else None
                if original is None and name in ai.adapter.meta.get("base_copies", ()):
                    original = t  # PEFT saved the base tensor itself beside its LoRA
                if original is None:
                    raise UnsupportedAdapterError(
                        f"{ai.label} replaced {name} whole; the original tensor is needed to take it out, and MERGED "
                        "does not carry it.",
                        tensor=name,
                        hint="loratools keeps replaced tensors in loratools_undo.safetensors beside its merges.",
                    )
                target.setdefault(name, []).append(Replace(i, w, tensor=original))  # applied last, see below
            else:
                target.setdefault(name, []).insert(0, Replace(i, w, tensor=t))
    _check_order(removals, additions, adapters)
    ops: dict[str, list[Edit]] = {}
    for name in list(removals) + [n for n in additions if n not in removals]:
        ops[name] = removals.get(name, []) + additions.get(name, [])
    return ops


def _check_order(removals: dict[str, list[Edit]], additions: dict[str, list[Edit]],
                 adapters: list[AdapterInput]) -> None:
    """Refuse edits whose result would depend on the order they are given in (several whole
    replacements, a replacement beside other changes, DoRA beside anything); put restores last."""
    for name, lst in removals.items():
        # undo in reverse: the restore of a replaced tensor comes after taking its deltas out
        lst.sort(key=lambda e: e.replaces)
        if any(isinstance(e, DoraUndo) for e in lst) and len(lst) > 1:
            raise UnsupportedAdapterError(
                f"{name}: a DoRA module cannot be taken out together with other changes to the same tensor.",
                tensor=name,
            )
    for name, lst in additions.items():
        replacing = [e for e in lst if e.replaces]
        if len(replacing) > 1:
            raise UnsupportedAdapterError(f"Several adapters replace {name} whole; the result would depend on order.",
                                          tensor=name)
        if replacing and len({e.adapter for e in lst}) > 1:
            raise UnsupportedAdapterError(
                f"{adapters[lst[0].adapter].label} replaces {name} whole, and another adapter changes it too; the result "
                "would depend on order.",
                tensor=name,
            )
        if any(isinstance(e, Dora) for e in lst) and len(lst) > 1:
            raise UnsupportedAdapterError(
                f"{name} is changed by a DoRA module and by other adapters; DoRA's rescaling does not commute with "
                "them.",
                tensor=name,
                hint="Merge the adapters one at a time, in the order you intend.",
            )


def build_plan(
    operation: str,
    base: Checkpoint,
    adapters: list[AdapterInput],
    ops: dict[str, list[Edit]],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
) -> Plan:
    tensor_plans: dict[str, TensorPlan] = {}
    quantized = find_quantized(base)
    scales = {q.scale: w for w, q in quantized.items() if isinstance(q, BlockScale)}
    # static activation scales of FP8 layers: meaningless once the weights are dequantized
    activation = {w.removesuffix(".weight") + s: w for w in scales.values() if w.endswith(".weight")
                  for s in (".input_scale", ".activation_scale")} if dtype is not None else {}
    dequantize = dtype is not None and any(isinstance(q, BlockScale) for q in quantized.values())
    for w, q in quantized.items():
        if isinstance(q, UnsupportedAdapterError) and (ops.get(w) or dtype is not None):
            raise q
    for shard in base.shards:
        for name in shard.names:
            info = base.tensors[name]
            out_dtype = info.dtype
            edits = ops.get(name, [])
            if name in activation:
                continue
            if name in scales:
                weight = scales[name]
                if dtype is None and ops.get(weight):  # written again with the requantized weight
                    tensor_plans[name] = TensorPlan(name, info, info.dtype, scale_of=weight)
                elif dtype is None:
                    tensor_plans[name] = TensorPlan(name, info, info.dtype)
                continue  # --dtype: dequantized weights need no scales
            if dtype is not None and BY_ST[info.dtype].floating:
                out_dtype = st_name(dtype)
            q = quantized.get(name)
            if isinstance(q, BlockScale) and (edits or dtype is not None):
                if dtype is None:
                    refuse_unless_requantizable(q, info.dtype, info.file)
                tensor_plans[name] = TensorPlan(name, info, out_dtype, edits, quant=q)
                continue
            if edits and not BY_ST[info.dtype].floating and not all(e.replaces for e in edits):
                raise UnsupportedAdapterError(
                    f"{name} in {info.file} is stored as {info.dtype}, not as floating point: an adapter cannot be "
                    "added to it.", path=info.file, tensor=name,
                    hint="The adapter targets a tensor that is not a weight (an index, a mask, complex values); "
                    "check that BASE is the model the adapter was made for.")
            tensor_plans[name] = TensorPlan(name, info, out_dtype, edits)
    unknown = sorted(set(ops) - set(tensor_plans))
    if unknown:  # binding resolves names against the same checkpoint
        raise InternalError(f"edits planned for tensors not in the base: {unknown[:5]}")
    if max_shard_size is None:
        shards = [ShardPlan(s.filename, [tensor_plans[n] for n in s.names if n in tensor_plans])
                  for s in base.shards]
        sharded = base.index_name is not None
        index_name = base.index_name
        if base.is_pickle():  # pickles are rewritten as safetensors
            shards, sharded, index_name = _reshard(list(tensor_plans.values()), None, base)
    else:
        shards, sharded, index_name = _reshard(list(tensor_plans.values()), max_shard_size, base)
    return Plan(operation, base, adapters, shards, sharded, index_name, dequantized=dequantize)


def _reshard(tensors: list[TensorPlan], limit: int | None, base: Checkpoint) -> tuple[list[ShardPlan], bool, str | None]:
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if limit is not None and groups[-1] and size + t.out_nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.out_nbytes
    stem = "model"
    if base.shards and base.shards[0].filename.endswith(".safetensors"):
        first = base.shards[0].filename.removesuffix(".safetensors")
        stem = first.split("-0", 1)[0] if "-of-" in first else first
    elif base.shards:
        own = Path(base.shards[0].filename).stem.split("-0")[0]
        stem = {"pytorch_model": "model"}.get(own, own)
    if len(groups) == 1:
        return [ShardPlan(f"{stem}.safetensors", groups[0])], False, None
    n = len(groups)
    shards = [ShardPlan(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]
    return shards, True, f"{stem}.safetensors.index.json"
