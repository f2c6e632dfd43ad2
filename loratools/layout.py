"""Binding an adapter to a base: which base tensor each module changes, and in which orientation.

Orientation is settled here, once (DESIGN.md "Layouts and orientation"):

1. a format's own declaration (PEFT ``fan_in_fan_out``, embeddings, conv kernels) must fit the base;
2. an undeclared module fits the base as (out, in) or as (in, out); a non-square base tells which;
3. a square base cannot tell: a format default (PEFT: (out, in), or (in, out) for a ``Conv1D``
   architecture, as PEFT itself decides) applies, else the declared ``--layout``, else the
   orientation every non-square module of the adapter agrees on, else LayoutAmbiguousError.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from .adapter import Adapter, LoraModule
from .errors import LayoutAmbiguousError, ShapeMismatchError, UnboundModuleError
from .jsonio import clip
from .options import LAYOUTS

__all__ = ["LAYOUTS", "bind", "resolve_name", "split_key", "PAIRS", "DOWN_NAMES", "is_conv1d_target"]

# Raw factor pairs: names that mark LoRA factors; the order inside a pair says nothing about orientation
PAIRS: list[tuple[str, str]] = [
    ("lora_a", "lora_b"),
    ("lora_A", "lora_B"),
    ("lora_down", "lora_up"),
    ("lora_u", "lora_v"),
    ("U", "V"),
]
# which member of a pair is the "A" (down) factor in nn.Linear convention, for --layout linear-ab
DOWN_NAMES = {"lora_a", "lora_A", "lora_down"}
FACTOR_NAMES = {n for pair in PAIRS for n in pair}

# Architectures whose projections are transformers' Conv1D (weights stored (in, out)); PEFT turns
# fan_in_fan_out on for these layers by itself. From `grep -l "Conv1D(" transformers/models/*/modeling_*.py`.
CONV1D_ARCHS = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"}
CONV1D_MODULES = {"c_attn", "q_attn", "c_proj", "c_fc"}

ConfigSource = Mapping[str, Any] | Callable[[str], Mapping[str, Any]] | None


def config_for(base_config: ConfigSource, name: str) -> Mapping[str, Any]:
    """The config of the model that holds tensor ``name`` (a pipeline has one per component)."""
    if callable(base_config):
        return base_config(name) or {}
    return base_config or {}


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, factor name) for a raw factor key, ``None`` for any other key.

    A whole PEFT model's ``state_dict()`` names its factors ``….lora_A.<adapter>.weight``: the
    adapter name is dropped (two adapters on one module then collide and are reported)."""
    stem = key.removesuffix(".weight")
    prefix, _, last = stem.rpartition(".")
    if last in FACTOR_NAMES:
        return prefix, last
    outer, _, middle = prefix.rpartition(".")
    if middle in FACTOR_NAMES and key.endswith(".weight") and last.isidentifier():
        return outer, middle
    return None


class SuffixFinder:
    """Names that end with a given suffix, found by binary search over the reversed names: binding
    M modules to N tensors costs O((N + M) log N), not O(N·M) (an adapter of 100,000 modules that
    do not match their base by name would otherwise take hours)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = names
        self._sorted: list[str] | None = None  # built on first use: most targets match exactly
        self._longest: int | None = None

    @property
    def _reversed(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(n[::-1] for n in self._names)
        return self._sorted

    @property
    def longest(self) -> int:
        """The length of the longest name."""
        if self._longest is None:
            self._longest = max((len(r) for r in self._reversed), default=0)
        return self._longest

    def ending(self, suffix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` names ending in ``suffix``."""
        key = suffix[::-1]
        i = bisect.bisect_left(self._reversed, key)
        found = []
        while i < len(self._reversed) and len(found) < limit and self._reversed[i].startswith(key):
            found.append(self._reversed[i][::-1])
            i += 1
        return found


def resolve_name(target: str, shapes: Mapping[str, tuple[int, ...]], finder: SuffixFinder | None = None) -> str | None:
    """The base tensor a target names: itself, else the one base name ending in ``.target``.

    A suffix that fits several base tensors is ambiguous and binds nothing.
    """
    if target in shapes:
        return target
    finder = finder or SuffixFinder(shapes)
    hits = finder.ending("." + target)
    if len(hits) == 1:
        return hits[0]
    # an adapter made on the full model (``model.x``) applied to a bare backbone (``x``): the tails of
    # the target, shortest last; none longer than the longest base name can match
    i = target.find(".")
    longest = finder.longest if i >= 0 else 0
    while i >= 0:
        if len(target) - i - 1 <= longest and target[i + 1:] in shapes:
            return target[i + 1:]
        i = target.find(".", i + 1)
    return None


def children_index(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Every ``.weight`` by its grandparent: ``a.b`` → [``a.b.q_proj.weight``, …] (``""`` for top level)."""
    index: dict[str, list[str]] = {}
    for n in shapes:
        if n.endswith(".weight"):
            head, _, _ = n.removesuffix(".weight").rpartition(".")
            index.setdefault(head, []).append(n)
    return index


def sibling_target(m: LoraModule, shapes: Mapping[str, tuple[int, ...]], where: str = "",
                   children: dict[str, list[str]] | None = None) -> str | None:
    """For factors that are submodules of a parent (``attn.lora_A.weight`` beside ``attn.q_proj.weight``):
    the one weight among the parent's direct children whose shape fits the factors."""
    parent = m.target.removesuffix(".weight")
    children = children if children is not None else children_index(shapes)
    fits = [n for n in children.get(parent, [])
            if tuple(shapes[n]) in (m.storage_shape(False), m.storage_shape(True))]
    if len(fits) > 1:
        raise LayoutAmbiguousError(
            f"{where}LoRA factors {', '.join(clip(k) for k in m.source_keys)} fit several weights of "
            f"{clip(parent) or 'the model'}: {', '.join(clip(f) for f in sorted(fits)[:6])}; loratools will not guess "
            "which one they belong to.",
            tensor=m.target,
            hint="Rename the factors to sit under the module they adapt (e.g. q_proj.lora_A.weight).",
        )
    return fits[0] if fits else None


def is_conv1d_target(name: str, base_config: ConfigSource) -> bool:
    model_type = config_for(base_config, name).get("model_type")
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    return isinstance(model_type, str) and model_type in CONV1D_ARCHS and module in CONV1D_MODULES


# where each diffusers component's tensors live in the checkpoints kohya files are applied to
COMPONENT_PREFIXES = {
    "unet": ("unet.", "model.diffusion_model."),
    "text_encoder": ("text_encoder.", "cond_stage_model.", "conditioner.embedders.0.", "te1.", "te."),
    "text_encoder_2": ("text_encoder_2.", "conditioner.embedders.1.", "te2."),
    "text_encoder_3": ("text_encoder_3.", "te3."),
    "transformer": ("transformer.", "model.diffusion_model."),
}


def flat_index(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Every base weight by its name flattened the kohya way ('.' → '_', without '.weight')."""
    index: dict[str, list[str]] = {}
    for n in shapes:
        if n.endswith(".weight"):
            index.setdefault(n.removesuffix(".weight").replace(".", "_"), []).append(n)
    return index


# Prefixes a kohya name carries that some checkpoints of the same module do not (from where each comes):
# transformers 5 saves CLIPTextModel's weights without their ``text_model.`` prefix, while kohya files
# name them lora_te_text_model_encoder_… (sd-scripts flattens the module path of transformers 4).
OPTIONAL_FLAT_PREFIXES = ("text_model_",)


def resolve_flat(target: str, index: dict[str, list[str]], where: str = "",
                 finder: SuffixFinder | None = None) -> str | None:
    """The base weight a flattened kohya name denotes: the flattened base name equal to it, or
    ending in '_' + it (a checkpoint with a component prefix), or the same without a prefix the
    checkpoint does not store (:data:`OPTIONAL_FLAT_PREFIXES`); among several, the one in the
    module's component. Never a guess: more than one candidate raises."""
    component, _, flat = target.rpartition(":")
    finder = finder or SuffixFinder(index)
    hits: list[str] = []
    for name in [flat] + [flat[len(p):] for p in OPTIONAL_FLAT_PREFIXES if flat.startswith(p)]:
        hits = list(index.get(name, [])) or [n for f in finder.ending("_" + name, limit=64) for n in index[f]]
        if hits:
            break
    if len(hits) > 1 and component:
        inside = [n for n in hits if n.startswith(COMPONENT_PREFIXES.get(component, ()))]
        hits = inside or hits
    if len(hits) > 1:
        raise LayoutAmbiguousError(
            f"{where}the kohya name {clip(flat)} fits several base tensors: "
            f"{', '.join(clip(h) for h in sorted(hits)[:4])}.",
            tensor=target,
            hint="Pass the component's own checkpoint (the UNet, or one text encoder) as BASE.",
        )
    return hits[0] if hits else None


def _where(adapter: Adapter) -> str:
    """How a message names the adapter: its path (messages also name the module and tensor)."""
    return f"{adapter.path}: " if adapter.path is not None else ""


def _as_kind_of(m: LoraModule, shape: tuple[int, ...]) -> LoraModule:
    """1×1 conv factors on a Linear target (SD1 proj_in/out vs SD2/SDXL), and Linear factors on a
    1×1 conv target — or flattened factors (LyCORIS, (r, in·kh·kw)) on any conv: the same matrix,
    so the module takes the target's form."""
    if m.kind == "conv" and len(shape) == 2 and all(k == 1 for k in m.kernel):
        return m.with_(kind="linear", kernel=())
    if m.kind == "linear" and len(shape) > 2 and not m.transposed and (
            all(k == 1 for k in shape[2:]) or (shape[0] == m.fan_out and math.prod(shape[1:]) == m.fan_in)):
        # LyCORIS stores conv factors flattened, (r, in·kh·kw): ΔW is the same matrix
        return m.with_(kind="conv", kernel=tuple(shape[2:]), transposed=False)
    return m


def _fit_transform(m: LoraModule, shape: tuple[int, ...], where: str = "", in_base: str = "") -> LoraModule:
    """A change that is a function of W ((IA)³, OFT) knows only the axis it acts on: the base tensor
    gives the rest, once that axis fits."""
    from .deltas import InputButterfly, InputRotation, Rotation, Scaling

    d = m.delta
    if len(shape) < 2:
        raise ShapeMismatchError(f"{where}adapter module {clip(m.target)} ({d.kind}) needs a matrix or conv weight; "
                                 f"base tensor {clip(m.target)}{in_base} has shape {tuple(shape)}.", tensor=m.target)
    transposed = bool(m.transposed) and len(shape) == 2  # PEFT fan_in_fan_out: stored (in, out)
    out_ch, in_ch = (int(shape[1]), int(shape[0])) if transposed else (int(shape[0]), int(shape[1]))
    fan_in = math.prod(shape) // out_ch
    if isinstance(d, Scaling):
        n, axis = d.vector.numel(), ("input" if d.on_input else "output")
        if n != (in_ch if d.on_input else out_ch):
            raise ShapeMismatchError(
                f"{where}adapter module {clip(m.target)} ((IA)³ on {axis}s) has {n} factors, base tensor "
                f"{clip(m.target)}{in_base} of shape {tuple(shape)} has {in_ch if d.on_input else out_ch} {axis}s.",
                tensor=m.target, hint="The adapter was trained on a different base model. Check BASE.")
        d = replace(d, fan_out=out_ch, fan_in=fan_in)
    elif isinstance(d, InputRotation):
        blocks = 1 if d.block_share else int(d.vectors.shape[0])
        if fan_in % d.block_size or (not d.block_share and blocks * d.block_size != fan_in) or transposed:
            raise ShapeMismatchError(
                f"{where}adapter module {clip(m.target)} (OFT, {blocks} block(s) of {d.block_size}) does not fit base "
                f"tensor {clip(m.target)}{in_base} of shape {tuple(shape)} ({fan_in} inputs"
                f"{'; stored (in, out)' if transposed else ''}).",
                tensor=m.target, hint="The adapter was trained on a different base model. Check BASE.")
        d = replace(d, fan_out=out_ch, fan_in=fan_in)
    elif isinstance(d, InputButterfly):
        m_, n_, b_, _ = d.blocks.shape
        if n_ * b_ != fan_in or d.scale.numel() != out_ch or transposed or fan_in % (b_ * 2 ** (m_ - 1)):
            raise ShapeMismatchError(
                f"{where}adapter module {clip(m.target)} (BOFT, {m_} stage(s) of {n_} blocks of {b_}, "
                f"{d.scale.numel()} output factors) does not fit base tensor {clip(m.target)}{in_base} of shape "
                f"{tuple(shape)}.", tensor=m.target, hint="The adapter was trained on a different base model. Check BASE.")
        d = replace(d, fan_out=out_ch, fan_in=fan_in)
    elif isinstance(d, Rotation):
        if d.out_features != out_ch:
            raise ShapeMismatchError(
                f"{where}adapter module {clip(m.target)} ({d.describe()['kind'].upper()}) rotates {d.out_features} "
                f"outputs, base tensor {clip(m.target)}{in_base} of shape {tuple(shape)} has {out_ch}.",
                tensor=m.target, hint="The adapter was trained on a different base model. Check BASE.")
        d = replace(d, fan_in=math.prod(shape[1:]))
    kernel = tuple(int(k) for k in shape[2:])
    return m.with_(delta=d, kind="conv" if kernel else "linear", kernel=kernel, transposed=transposed)


def _orient(m: LoraModule, shape: tuple[int, ...], default: bool | None, where: str = "",
            in_base: str = "") -> bool | None:
    """True/False when the module fits ``shape`` in one orientation; None when both fit (square)."""
    if m.kind == "conv":
        fits = shape == m.storage_shape(False)
        return False if fits else _mismatch(m, shape, where, in_base)
    normal, trans = m.storage_shape(False), m.storage_shape(True)
    if m.transposed is not None:  # declared by the format
        if shape == m.storage_shape(m.transposed):
            return m.transposed
        if default is None and shape == m.storage_shape(not m.transposed):
            return not m.transposed
        return _mismatch(m, shape, where, in_base)
    if shape == normal and shape == trans:
        return default
    if shape == normal:
        return False
    if shape == trans:
        return True
    return _mismatch(m, shape, where, in_base)


def _mismatch(m: LoraModule, shape: tuple[int, ...], where: str = "", in_base: str = "") -> bool:
    extra = ""
    if m.kind == "conv" and len(shape) == len(m.storage_shape(False)) and shape[0] == m.fan_out:
        groups = m.fan_in // max(1, math.prod(m.kernel)) // max(1, shape[1])
        if groups > 1:
            extra = f" (a grouped conv with {groups} groups? grouped-conv LoRA is not a plain delta)"
    factors = ", ".join(f"{role} {tuple(t.shape)}" for role, t in m.delta.tensors().items())
    rank = f", rank {m.rank}" if m.rank is not None else ""
    raise ShapeMismatchError(
        f"{where}adapter module {clip(m.target)} ({factors}{rank}) does not fit "
        f"base tensor {clip(m.target)}{in_base} of shape {tuple(shape)}: it needs {m.storage_shape(bool(m.transposed))}{extra}.",
        tensor=m.target,
        expected=m.storage_shape(bool(m.transposed)),
        actual=tuple(shape),
        hint="The adapter was trained on a different base model. Check BASE.",
    )


def _normalize(m: LoraModule, layout: str | None, where: str = "") -> LoraModule:
    """Raw factor pairs: the base is a plain (out, in) weight, so a transposed product means the
    factors were stored transposed: keep ΔW, store A (r, in) and B (out, r) like every other format."""
    if layout == "linear-ab":
        second = split_key(m.source_keys[1]) if len(m.source_keys) > 1 else None
        if m.transposed or second is None or second[1] not in DOWN_NAMES:
            raise LayoutAmbiguousError(
                f"{where}--layout linear-ab says ΔW = B @ A with A (r, in), but "
                f"{', '.join(clip(k) for k in m.source_keys)} do not fit that: "
                f"ΔW would be {'(first @ second)ᵀ' if m.transposed else 'first @ second'} with the factors named "
                "the other way round.",
                tensor=m.target,
                hint="Use --layout out-r-in or in-r-out, which go by shapes, not names.",
            )
    if not m.transposed:
        return m
    return replace(m, delta=m.delta.T.map(lambda t: t.contiguous()), transposed=False,
                   source_keys=tuple(reversed(m.source_keys)))


def _check_extras(m: LoraModule, name: str, shapes: Mapping[str, tuple[int, ...]], where: str = "") -> str | None:
    """A module's lora_bias target and DoRA magnitude must fit the base; returns the bias target."""
    bias_target = m.bias_target
    if m.bias is not None:
        bias_target = name.removesuffix(".weight") + ".bias"
        if bias_target not in shapes:
            raise UnboundModuleError(
                f"{where}adapter module {clip(m.target)} carries a LoRA bias (lora_bias) but the base has no "
                f"{clip(bias_target)} to merge it into.",
                tensor=bias_target,
                hint="PEFT refuses this merge too: the base layer has no bias.",
            )
        if tuple(shapes[bias_target]) != (m.fan_out,):
            raise ShapeMismatchError(
                f"{where}the LoRA bias of {clip(m.target)} has {m.fan_out} values, base {clip(bias_target)} has shape "
                f"{tuple(shapes[bias_target])}.",
                tensor=bias_target,
            )
    if getattr(m.delta, "with_bias", False):  # PEFT (IA)³ on outputs scales the bias too, where there is one
        bias_target = name.removesuffix(".weight") + ".bias"
        return bias_target if bias_target in shapes else None
    along = m.fan_in // max(1, math.prod(m.kernel)) if m.dora_per_input else m.fan_out  # per input channel
    if m.magnitude is not None and m.magnitude.numel() != along:
        raise ShapeMismatchError(
            f"{where}the DoRA magnitude of {clip(m.target)} has {m.magnitude.numel()} values for {along} "
            f"{'inputs' if m.dora_per_input else 'outputs'}.",
            tensor=m.target,
        )
    return bias_target


def _target_of(m: LoraModule, adapter: Adapter, shapes: Mapping[str, tuple[int, ...]],
               flat: dict[str, list[str]] | None, finder: SuffixFinder, children: dict[str, list[str]]) -> str | None:
    where = _where(adapter)
    name = resolve_name(m.target, shapes, finder) if flat is None else resolve_flat(m.target, flat, where, finder)
    if name is None and adapter.meta.get("sibling_binding"):
        if not children:
            children.update(children_index(shapes))
        name = sibling_target(m, shapes, where, children)
    return name


def _default_orientation(m: LoraModule, name: str, adapter: Adapter, base_config: ConfigSource,
                         layout: str | None) -> bool | None:
    """The orientation a square target takes when the module does not declare one."""
    if m.transposed is None and is_conv1d_target(name, base_config):
        return True
    if m.transposed is None and adapter.format == "peft":
        return False  # PEFT's convention for a Linear that fan_in_fan_out does not flip
    return {"out-r-in": False, "linear-ab": False, "in-r-out": True}.get(layout or "")


def _missing_components(adapter: Adapter, missing: list[str], warnings: list[str]) -> list[str]:
    """A kohya file for a whole pipeline applied to one component's checkpoint: the components
    with no tensor here at all belong elsewhere (a warning); a component that binds in part is an
    error (returned as still missing)."""
    def comp(t: str) -> str:
        return t.rpartition(":")[0] or "unet"

    bound_components = {comp(m.target) for m in adapter.modules.values() if m.target not in missing}
    elsewhere = [t for t in missing if comp(t) not in bound_components]
    if bound_components and elsewhere:
        by = sorted({comp(t) for t in elsewhere})
        warnings.append(f"{len(elsewhere)} module(s) of {', '.join(by)} are not in this checkpoint and were left "
                        "out; apply the adapter to that component's checkpoint too")
        return [t for t in missing if t not in elsewhere]
    return missing


def _unbound_error(missing: list[str], base_config: ConfigSource, where: str = "", in_base: str = "") -> UnboundModuleError:
    tied = any(t.endswith("lm_head.weight") and config_for(base_config, t).get("tie_word_embeddings")
               for t in missing)
    return UnboundModuleError(
        f"{where}{len(missing)} adapter module(s) have no tensor in the base{in_base}: {', '.join(clip(n) for n in missing[:6])}"
        + (" …" if len(missing) > 6 else "")
        + ".",
        tensor=missing[0],
        hint="BASE ties lm_head to the input embeddings and stores only one of them; merging an lm_head LoRA "
        "would change both. Untie the weights in BASE first." if tied else
        "The adapter was made for a different model, or BASE is the wrong checkpoint.",
    )


def _settle_square(modules: dict[str, LoraModule], undecided: list[tuple[LoraModule, tuple[int, ...]]],
                   votes: set[bool], where: str = "") -> None:
    """Square modules without a declaration take the orientation every non-square one agrees on."""
    if not undecided:
        return
    if len(votes) == 1:
        agreed = next(iter(votes))
        for bound, _ in undecided:
            modules[bound.target] = replace(bound, transposed=agreed)
        return
    names = ", ".join(f"{clip(b.target)} {s}" for b, s in undecided[:6])
    raise LayoutAmbiguousError(
        f"{where}cannot tell the orientation of square module(s) from shapes: {names}"
        + (" …" if len(undecided) > 6 else "")
        + (" (the non-square modules disagree)" if votes else "")
        + ".",
        tensor=undecided[0][0].target,
        hint="Declare it with --layout: " + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()) + ".",
    )


def _bind_replacements(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]],
                       finder: SuffixFinder, in_base: str = "") -> tuple[dict, list[str]]:
    where = _where(adapter)
    replacements = {}
    copies: list[str] = []
    missing: list[str] = []
    for target, t in adapter.replacements.items():
        name = resolve_name(target, shapes, finder)
        if name is None:
            missing.append(target)
            continue
        if target in adapter.meta.get("base_copies", ()):
            copies.append(name)
        if tuple(shapes[name]) != tuple(t.shape):
            raise ShapeMismatchError(
                f"{where}the adapter replaces {clip(name)} with a tensor of shape {tuple(t.shape)}, but the base{in_base} has "
                f"{tuple(shapes[name])}.",
                tensor=name,
                expected=tuple(shapes[name]),
                actual=tuple(t.shape),
                hint="A resized vocabulary (added tokens) changes the model's shape; loratools keeps BASE's shapes, "
                "so resize the base the same way first.",
            )
        replacements[name] = t
    if missing:
        raise UnboundModuleError(
            f"{where}the adapter replaces tensor(s) the base{in_base} does not have: {', '.join(clip(n) for n in missing[:6])}.",
            tensor=missing[0],
            hint="The adapter was made for a different model, or BASE is the wrong checkpoint.",
        )
    return replacements, copies


def bind(
    adapter: Adapter,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    base_config: ConfigSource = None,
    layout: str | None = None,
    base: object = None,
) -> Adapter:
    """Return ``adapter`` with every module's ``target``, ``shape`` and ``transposed`` settled.

    Raises UnboundModuleError for a module or replacement with no tensor in the base,
    ShapeMismatchError when factors do not fit, LayoutAmbiguousError when a square module's
    orientation cannot be known. ``base`` (a path) is named in those messages.
    """
    from .flux import bind_flux
    from .namemaps import rename_for

    adapter = bind_flux(adapter, shapes)  # Flux: BFL (fused qkv) ↔ diffusers (split) names, exactly
    adapter = rename_for(adapter, shapes)  # Wan: original ↔ diffusers names
    in_base = f" of {base}" if base is not None else ""
    missing: list[str] = []
    modules: dict[str, LoraModule] = {}
    undecided: list[tuple[LoraModule, tuple[int, ...]]] = []
    votes: set[bool] = set()
    flat = flat_index(shapes) if adapter.meta.get("flat_names") else None
    finder = SuffixFinder(flat if flat is not None else shapes)
    children: dict[str, list[str]] = {}
    where = _where(adapter)
    for m in adapter.modules.values():
        name = _target_of(m, adapter, shapes, flat, finder, children)
        if name is None:
            missing.append(m.target)
            continue
        if name in modules or any(u.target == name for u, _ in undecided):
            raise LayoutAmbiguousError(
                f"{where}two modules of the adapter bind to the same base tensor {clip(name)} (one of them is "
                f"{clip(m.target)}).",
                tensor=name,
                hint="The adapter's names are ambiguous against this base; check that BASE is the right model.",
            )
        shape = tuple(shapes[name])
        m = _as_kind_of(m, shape) if getattr(m.delta, "additive", True) else _fit_transform(m, shape, where, in_base)
        t = _orient(m, shape, _default_orientation(m, name, adapter, base_config, layout), where, in_base)
        bound = replace(m, target=name, shape=shape, transposed=t, bias_target=_check_extras(m, name, shapes, where))
        if t is None:
            undecided.append((bound, shape))
            continue
        if m.transposed is None and shape[0] != (shape[1] if len(shape) > 1 else None):
            votes.add(t)
        modules[name] = bound
    warnings = list(adapter.warnings)
    if missing and flat is not None:
        missing = _missing_components(adapter, missing, warnings)
    if missing:
        raise _unbound_error(missing, base_config, where, in_base)
    _settle_square(modules, undecided, votes, where)
    if adapter.meta.get("factor_orientation"):
        modules = {n: _normalize(m, layout, where) for n, m in modules.items()}
    replacements, copies = _bind_replacements(adapter, shapes, finder if flat is None else SuffixFinder(shapes),
                                              in_base)
    meta = {**adapter.meta, "base_copies": copies} if "base_copies" in adapter.meta else dict(adapter.meta)
    meta["flat_names"] = False  # bound: targets are base names now
    return replace(adapter, modules=modules, replacements=replacements, meta=meta, warnings=warnings)
