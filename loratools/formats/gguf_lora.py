"""GGUF LoRA adapters for llama.cpp, through the ``gguf`` package (the optional ``gguf`` extra).

Facts followed (llama.cpp's ``convert_lora_to_gguf.py`` and ``gguf-py``):

* ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32, one
  global value; llama.cpp scales each tensor pair by alpha / its rank), ``general.architecture``;
* tensor names are the base model's GGUF names + ``.lora_a`` / ``.lora_b``, mapped from HF names by
  the package's own ``get_tensor_name_map``; numpy shapes are PEFT's, lora_a (r, in) and lora_b
  (out, r) — except ``token_embd``, whose lora_a is transposed to (vocab, r);
* llama.cpp's HF→GGUF conversion permutes the rows of Llama-family ``q_proj`` / ``k_proj``
  weights for its rotary layout, and the LoRA converter applies the same permutation to lora_b:
  so do we, and undo it when reading.

Writing needs the base (its config.json: architecture, heads, layers). Per-module scales are
folded into B so that one global alpha holds for all. DoRA, lora_bias and full tensors have no
form in llama.cpp's LoRA and are refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, LoraModule, check_finite, lowrank_module
from ..errors import (AdapterFormatError, AdapterNotFoundError, CorruptFileError, InvalidArgumentError,
                      UnsupportedAdapterError)
from ..jsonio import clip, get_field, load_json, source_of
from .common import check_rank, check_scale, fold_scale, lowrank, most_common
from .keys import group_keys

NAME = "gguf"
FILE = "adapter.gguf"
# HF model_type → (gguf architecture name, whether q/k rows are permuted as in LlamaModel)
ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    # checked against llama.cpp's convert_lora_to_gguf.py on tiny models (tests/test_interop.py)
    "qwen3": ("qwen3", False),
    "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
    "phi3": ("phi3", False),
    # mixture of experts: per-expert LoRA stacked into the 3-D ffn_*_exps tensors, as llama.cpp's
    # converter stacks the experts (and convert_lora_to_gguf.py their factors)
    "qwen3_moe": ("qwen3moe", False),
    "mixtral": ("llama", True),
}
# one expert's tensor (HF, on disk) → (layer, family, expert, part)
EXPERT = re.compile(r"^model\.layers\.(\d{1,6})\.(mlp|block_sparse_moe)\.experts\.(\d{1,6})\."
                    r"(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def _fused_name(layer: int, family: str, part: str) -> str:
    """The HF name llama.cpp's converter gives a layer's stacked experts (what the name tables map)."""
    if family == "mlp":
        return f"model.layers.{layer}.mlp.experts.{part}.weight"
    return f"layers.{layer}.feed_forward.experts.{part}.weight"  # Mixtral (conversion/llama.py)


def _expert_name(fused: str, expert: int) -> str | None:
    """One expert's HF name from the stacked name (the inverse of :func:`_fused_name`)."""
    m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight$", fused)
    if m:
        return f"model.layers.{m.group(1)}.mlp.experts.{expert}.{m.group(2)}.weight"
    m = re.match(r"^layers\.(\d+)\.feed_forward\.experts\.(w1|w2|w3)\.weight$", fused)
    if m:
        return f"model.layers.{m.group(1)}.block_sparse_moe.experts.{expert}.{m.group(2)}.weight"
    return None


def _n_experts(config: dict) -> int | None:
    for key in ("num_experts", "num_local_experts"):
        if (v := _config_int(config, key)) is not None:
            return v
    return None


def _stack_experts(mods: dict[str, LoraModule], config: dict, alpha: float) -> tuple[
        dict[str, LoraModule], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-expert modules stacked per (layer, part) into (E, R, in) / (E, out, R) factors — zeros
    for experts the adapter leaves alone, ranks padded to the largest (exact: zero rows and
    columns), each expert's scale folded into its B so that llama.cpp's alpha / R holds. Returns
    (the other modules, {fused HF name: (A, B)})."""
    groups: dict[tuple[int, str, str], dict[int, LoraModule]] = {}
    rest = {}
    for target, m in mods.items():
        hit = EXPERT.match(target)
        if hit is None:
            rest[target] = m
            continue
        groups.setdefault((int(hit.group(1)), hit.group(2), hit.group(4)), {})[int(hit.group(3))] = m
    stacked = {}
    n = _n_experts(config)
    for (layer, family, part), experts in sorted(groups.items()):
        if n is None or max(experts) >= n:
            raise UnsupportedAdapterError(
                f"expert {max(experts)} of layer {layer} {part}: the base config gives "
                f"{'no expert count' if n is None else f'{n} experts'}.", tensor=next(iter(experts.values())).target)
        R = max(m.rank for m in experts.values())
        first = lowrank(next(iter(experts.values())))
        rows, cols = first.out_features, first.in_features
        A = torch.zeros(n, R, cols, dtype=torch.float32)
        B = torch.zeros(n, rows, R, dtype=torch.float32)
        for e, m in experts.items():
            d = lowrank(fold_scale(m, alpha / R)).padded(R)
            if (d.out_features, d.in_features) != (rows, cols):
                raise UnsupportedAdapterError(f"{clip(m.target)}: experts of one layer with different shapes.",
                                              tensor=m.target)
            A[e], B[e] = d.A.float(), d.B.float()
        stacked[_fused_name(layer, family, part)] = (A, B)
    return rest, stacked



def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InvalidArgumentError(
            "GGUF needs the gguf package.", hint="pip install 'loratools[gguf]' (or pip install gguf)."
        ) from None
    return gguf


def _file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf"))
    if len(files) != 1:
        raise AdapterNotFoundError(f"{path}: expected one .gguf file, found {len(files)}.", path=path)
    return files[0]


def detect(path: Path) -> bool:
    try:
        f = _file(path)
    except AdapterNotFoundError:
        return False
    with open(f, "rb") as fh:
        return fh.read(4) == b"GGUF"


MAX_LAYERS = 100_000  # a num_hidden_layers beyond this is a damaged config, not a model
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
# what the factors are written as, by their dtype (llama.cpp's convert_lora_to_gguf: --outtype f32|f16|bf16),
# with general.file_type's value for each (LlamaFileType)
WRITE_TYPES = {torch.float16: ("F16", 1), torch.bfloat16: ("BF16", 32)}  # anything else: F32 (0)


def _config_int(config: dict, key: str, default: Any = None, *, positive: bool = True) -> Any:
    """A count from the base's config.json (heads, layers), checked."""
    return get_field(config, key, int, default, where=source_of(config), what="the model config",
                     check=(lambda v: 0 < v <= MAX_LAYERS) if positive else None,
                     must=f"an integer from 1 to {MAX_LAYERS}")


def _arch(config: dict) -> tuple[str, bool]:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHS:
        raise UnsupportedAdapterError(
            f"{source_of(config, 'GGUF')}: architecture (model_type) {clip(repr(model_type), 80)} is not supported by "
            f"the GGUF format yet (supported: {', '.join(ARCHS)}).", path=source_of(config),
            hint="Each architecture needs its llama.cpp tensor layout checked before loratools writes it.",
        )
    return ARCHS[model_type]


def _permute(B: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's q/k row permutation (LlamaModel.permute) applied to the output rows of B."""
    rows = B.shape[0]
    if inverse:
        return B.reshape(n_head, rows // n_head // 2, 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)
    return B.reshape(n_head, 2, rows // n_head // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def _heads(name: str, config: dict) -> int | None:
    if name.endswith("self_attn.q_proj.weight"):
        return _config_int(config, "num_attention_heads")
    if name.endswith("self_attn.k_proj.weight"):
        return _config_int(config, "num_key_value_heads") or _config_int(config, "num_attention_heads")
    return None


def _check_heads(rows: int, heads: Any, *, where: str | Path | None, what: str) -> int:
    """A head count that splits ``rows`` into pairs of rows per head, as the permutation needs."""
    if not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 and rows % (2 * heads) == 0):
        raise CorruptFileError(
            f"{str(where) + ': ' if where else ''}{what}: "
            f"{clip(repr(heads), 40)} heads cannot split {rows} rows into pairs of rows per head.",
            path=where, hint="The head counts (loratools.n_head, or the base's config.json) do not fit the tensor.")
    return heads


_LAYER = re.compile(r"\.layers\.(\d{1,6})\.")


def _name_map(config: dict, layers: int) -> tuple[Any, str, bool]:
    """gguf's HF→GGUF name map for the first ``layers`` blocks (never more than the config has)."""
    gguf = _gguf()
    arch_name, permute = _arch(config)
    total = _config_int(config, "num_hidden_layers")
    if total is None:
        raise CorruptFileError(f"{source_of(config, 'the model config')}: num_hidden_layers is missing; llama.cpp's "
                               "tensor names need it.", path=source_of(config))
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, min(total, max(1, layers))), arch_name, permute


def _add(writer: Any, gguf: Any, name: str, t: torch.Tensor) -> None:
    """One factor in the adapter's storage type: F32, F16, or BF16 (gguf-py's own conversion)."""
    kind, _ = WRITE_TYPES.get(t.dtype, ("F32", 0))
    if kind == "BF16":
        qtype = gguf.GGMLQuantizationType.BF16
        writer.add_tensor(name, gguf.quants.quantize(t.float().numpy(), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, t.to(torch.float16 if kind == "F16" else torch.float32).contiguous().numpy())


def _general(writer: Any, gguf: Any, adapter: Adapter, base_model: str | None, ftype: int, name: str) -> None:
    """The general.* keys llama.cpp's own LoRA converter writes beside adapter.*."""
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(ftype)
    base = base_model or adapter.meta.get("base_model")
    if isinstance(base, str) and base.count("/") == 1 and not base.startswith((".", "/", "~")):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base.split("/")[1])
        writer.add_base_model_organization(0, base.split("/")[0])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{base}")
    writer.add_tags(["lora", "loratools"])


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          filename: str = FILE, record: str | None = None, **_: Any) -> list[Path]:
    """``out/filename`` (``adapter.gguf`` unless OUT names the file), factors stored in their own
    dtype (F32, F16 or BF16), with the general.* metadata llama.cpp's converter writes."""
    if base_config is None:
        raise InvalidArgumentError("Writing GGUF needs the base model (--base): its config gives the architecture and "
                                   "llama.cpp's tensor names.")
    gguf = _gguf()
    used = [int(m.group(1)) + 1 for t in adapter.modules if (m := _LAYER.search(t))]
    tmap, arch_name, permute = _name_map(base_config, max(used, default=1))
    mods = adapter.modules
    alpha = float(most_common([m.rank for m in mods.values()])) if mods else 1.0
    writer = gguf.GGUFWriter(str(out / filename), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    dtypes = {t.dtype for m in mods.values() for t in m.delta.tensors().values()}
    _, ftype = WRITE_TYPES.get(next(iter(dtypes)), ("F32", 0)) if len(dtypes) == 1 else ("F32", 0)
    _general(writer, gguf, adapter, base_model, ftype, Path(filename).stem if filename != FILE else "adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    names: dict[str, str] = {}
    mods, stacked = _stack_experts(dict(mods), base_config, alpha)
    for fused, (A, B) in stacked.items():
        gname = tmap.get_name(fused, try_suffixes=(".weight",))
        if gname is None:
            raise UnsupportedAdapterError(f"{clip(fused)} (stacked experts) has no llama.cpp tensor name for "
                                          f"{arch_name}.", tensor=fused)
        _add(writer, gguf, gname + ".lora_a", A.contiguous())
        _add(writer, gguf, gname + ".lora_b", B.contiguous())
        names[gname] = fused
    for target, m in sorted(mods.items()):
        gname = tmap.get_name(target, try_suffixes=(".weight",))
        if gname is None:
            raise UnsupportedAdapterError(f"{clip(target)} has no llama.cpp tensor name for {arch_name}.",
                                          tensor=target)
        d = lowrank(fold_scale(m, alpha / m.rank))  # llama.cpp applies alpha / rank to every pair
        stored = d.A.dtype if d.A.dtype in WRITE_TYPES else torch.float32
        A, B = d.A.float(), d.B.float()
        heads = _heads(target, base_config) if permute else None
        if heads:
            B = _permute(B, _check_heads(B.shape[0], heads, where=source_of(base_config),
                                         what=f"the heads of {clip(target)}"))
        _add(writer, gguf, gname + ".lora_a", (A.T if m.kind == "embedding" else A).contiguous().to(stored))
        _add(writer, gguf, gname + ".lora_b", B.contiguous().to(stored))
        names[gname] = target
    # our own keys (llama.cpp ignores them): read back without the base
    writer.add_string("loratools.hf_names", json.dumps(names, separators=(",", ":")))
    if record is not None:
        writer.add_string("loratools.record", record)
    if permute:
        n_head = _config_int(base_config, "num_attention_heads")
        if n_head is None:
            raise CorruptFileError(f"{source_of(base_config, 'the model config')}: num_attention_heads is missing; "
                                   "llama.cpp's q/k layout needs it.", path=source_of(base_config))
        writer.add_uint32("loratools.n_head", n_head)
        writer.add_uint32("loratools.n_head_kv", _config_int(base_config, "num_key_value_heads") or n_head)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [out / filename]


def _kv(reader: Any, key: str, f: Path) -> Any:
    fld = reader.get_field(key)
    if fld is None:
        return None
    try:
        return fld.contents()
    except Exception as e:  # the package's own reading of a damaged value
        raise CorruptFileError(f"{f}: GGUF metadata {key} cannot be read ({type(e).__name__}).", path=f) from None


def _number(value: Any, key: str, f: Path, *, integer: bool = False) -> Any:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not integer and not math.isfinite(value):
        ok = False
    if not ok:
        raise CorruptFileError(f"{f}: GGUF metadata {key} must be {'an integer' if integer else 'a finite number'}, "
                               f"not {clip(repr(value), 40)}.", path=f)
    return value


def _tensor(t: Any, f: Path) -> torch.Tensor:
    kind = getattr(t.tensor_type, "name", str(t.tensor_type))
    if kind not in FLOAT_TYPES:
        raise UnsupportedAdapterError(f"{f}: tensor {clip(t.name)} is stored as {kind}; loratools reads F32, F16 "
                                      ", BF16 and F64 GGUF adapters.", path=f, tensor=t.name,
                                      hint="Convert the adapter again without quantizing it.")
    shape = [int(d) for d in reversed(t.shape)]
    try:
        if kind == "BF16":  # gguf-py's own conversion of its bfloat16 bytes
            raw = _gguf().quants.dequantize(np.asarray(t.data), t.tensor_type)
        else:
            raw = np.asarray(t.data, dtype=FLOAT_TYPES[kind])
        data = np.array(raw, dtype=np.float32).reshape(shape)  # a writable copy: the file's map is read-only
    except (ValueError, TypeError, AssertionError):
        raise CorruptFileError(f"{f}: tensor {clip(t.name)} does not hold {shape} values.", path=f,
                               tensor=t.name) from None
    out = torch.from_numpy(data)
    check_finite(out, what=f"{f}: adapter tensor {clip(t.name)}", path=f)
    return out


def read(path: Path, *, base_config: dict | None = None, **_: Any) -> Adapter:
    gguf = _gguf()
    f = _file(path)
    try:
        reader = gguf.GGUFReader(str(f))
    except Exception as e:  # the package raises ValueError / struct errors / … for broken files
        raise CorruptFileError(f"{f} is not a readable GGUF file: {clip(' '.join(str(e).split()), 200)}.",
                               path=f) from None
    gtype, atype = _kv(reader, "general.type", f), _kv(reader, "adapter.type", f)
    if gtype != "adapter" or atype != "lora":
        raise AdapterFormatError(f"{f} is a GGUF file but not a LoRA adapter (general.type = "
                                 f"{clip(repr(gtype), 60)}, adapter.type = {clip(repr(atype), 60)}).", path=f)
    alpha = float(_number(_kv(reader, "adapter.lora.alpha", f) or 0.0, "adapter.lora.alpha", f))
    names = _kv(reader, "loratools.hf_names", f)
    if names is not None and not isinstance(names, str):
        raise CorruptFileError(f"{f}: GGUF metadata loratools.hf_names must be a JSON string.", path=f)
    hf_names = load_json(names or "{}", where=f, what="metadata loratools.hf_names")
    bad = next((k for k, v in hf_names.items() if not (isinstance(v, str) and v.endswith(".weight"))), None)
    if bad is not None:
        raise CorruptFileError(f"{f}: metadata loratools.hf_names maps {clip(bad)} to {clip(repr(hf_names[bad]), 60)}, "
                               "not a tensor name.", path=f)
    config = base_config or {}
    arch = _kv(reader, "general.architecture", f)
    permute = {gguf_name: p for gguf_name, p in ARCHS.values()}.get(arch, False) if isinstance(arch, str) else False
    n_head = _kv(reader, "loratools.n_head", f)
    n_head = _number(n_head, "loratools.n_head", f, integer=True) if n_head is not None else \
        _config_int(config, "num_attention_heads")
    n_head_kv = _kv(reader, "loratools.n_head_kv", f)
    n_head_kv = _number(n_head_kv, "loratools.n_head_kv", f, integer=True) if n_head_kv is not None else \
        (_config_int(config, "num_key_value_heads") or n_head)
    by_name = {t.name: t for t in reader.tensors}
    named, leftovers = group_keys(by_name, {".lora_a": "lora_a", ".lora_b": "lora_b"}, path=f)
    if leftovers:
        raise AdapterFormatError(f"{f}: tensor(s) {', '.join(clip(n) for n in sorted(leftovers)[:8])} are not "
                                 "lora_a / lora_b (llama.cpp would refuse them too).", path=f)
    modules: dict[str, LoraModule] = {}
    for gname, roles in sorted(named.items()):
        if "lora_a" not in roles or "lora_b" not in roles:
            raise AdapterFormatError(f"{f}: {clip(gname)} lacks lora_a or lora_b.", path=f)
        A, B = _tensor(by_name[roles["lora_a"]], f), _tensor(by_name[roles["lora_b"]], f)
        if A.dim() == 3 or B.dim() == 3:  # stacked experts (ffn_*_exps): one module per expert
            known = isinstance(config.get("model_type"), str) and config.get("model_type") in ARCHS
            fused = hf_names.get(gname) or (_hf_name(gname, config) if known else None)
            for target, m in _split_experts(f, gname, fused, A, B, alpha).items():
                if target in modules:
                    raise AdapterFormatError(f"{f}: two GGUF tensor pairs map to {clip(target)}.", path=f, tensor=target)
                modules[target] = m
            continue
        emb = gname.startswith("token_embd")
        if emb:
            if A.dim() != 2:
                check_rank(f, gname, tuple(A.shape), tuple(B.shape))
            A = A.T.contiguous()
        r = check_rank(f, gname, tuple(A.shape), tuple(B.shape), what="lora_a / lora_b")
        if A.dim() != 2 or B.dim() != 2 or int(B.shape[1]) != r:
            raise AdapterFormatError(f"{f}: {clip(gname)} has lora_a {tuple(A.shape)} and lora_b {tuple(B.shape)}, "
                                     "not a pair of matrices of one rank.", path=f, tensor=gname)
        known = isinstance(config.get("model_type"), str) and config.get("model_type") in ARCHS
        target = hf_names.get(gname) or (_hf_name(gname, config) if known else None)
        if target is None:
            raise AdapterFormatError(
                f"{f}: the GGUF tensor {clip(gname)} cannot be mapped back to a Hugging Face name without the base.",
                path=f, hint="Pass the base model (--base) whose config.json gives the architecture.")
        if target in modules:
            raise AdapterFormatError(f"{f}: two GGUF tensor pairs map to {clip(target)}.", path=f, tensor=target)
        if permute and target.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = n_head if target.endswith("q_proj.weight") else n_head_kv
            if not heads:
                raise AdapterFormatError(f"{f}: un-permuting {clip(target)} needs the base's head counts (--base).",
                                         path=f)
            B = _permute(B, _check_heads(int(B.shape[0]), heads, where=f, what=f"un-permuting {clip(target)}"),
                         inverse=True)
        check_scale(f, gname, alpha / r if alpha else 1.0)
        modules[target] = lowrank_module(target, A, B, alpha / r if alpha else 1.0, alpha or float(r),
                                         kind="embedding" if emb else "linear", transposed=True if emb else False,
                                         source_keys=(gname + ".lora_a", gname + ".lora_b"))
    if not modules:
        raise AdapterFormatError(f"{f} holds no lora_a / lora_b pairs.", path=f)
    return Adapter(modules=modules, meta={"format": NAME, "architecture": arch if isinstance(arch, str) else None},
                   path=path, files=[f])


def _split_experts(f: Path, gname: str, fused: str | None, A: torch.Tensor, B: torch.Tensor,
                   alpha: float) -> dict[str, LoraModule]:
    """A stacked expert pair, lora_a (E, r, in) / lora_b (E, out, r), as one module per expert (an
    expert whose B is all zero changes nothing and is left out)."""
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2] or A.shape[1] == 0:
        raise AdapterFormatError(f"{f}: {clip(gname)} has lora_a {tuple(A.shape)} and lora_b {tuple(B.shape)}, not "
                                 "stacked expert factors (E, r, in) and (E, out, r).", path=f, tensor=gname)
    if fused is None or _expert_name(fused, 0) is None:
        raise AdapterFormatError(f"{f}: the stacked expert tensor {clip(gname)} cannot be mapped back to Hugging Face "
                                 "names.", path=f, hint="Pass the base model (--base) whose config.json gives the "
                                 "architecture.")
    r = int(A.shape[1])
    scale = alpha / r if alpha else 1.0
    check_scale(f, gname, scale)
    out = {}
    for e in range(int(A.shape[0])):
        if not bool(B[e].any()):
            continue
        target = _expert_name(fused, e)
        out[target] = lowrank_module(target, A[e].contiguous(), B[e].contiguous(), scale, alpha or float(r),
                                     kind="linear", transposed=False,
                                     source_keys=(gname + ".lora_a", gname + ".lora_b"))
    return out


def _hf_name(gname: str, config: dict) -> str | None:
    """The HF tensor name of a GGUF name, by running the package's map over the names this
    architecture has (no table of our own) — for the one block the name belongs to."""
    block = re.match(r"blk\.(\d{1,6})\.", gname)
    layer = int(block.group(1)) if block else None
    tmap, _, _ = _name_map(config, (layer or 0) + 1)
    total = _config_int(config, "num_hidden_layers")
    candidates = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    if layer is not None and layer < total:
        mods = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
        if config.get("model_type") == "phi3":  # fused in HF; gguf maps gate_up_proj and up_proj both to ffn_up
            mods = ("self_attn.qkv_proj", "mlp.gate_up_proj", "self_attn.o_proj", "mlp.down_proj")
        for mod in mods:
            candidates.append(f"model.layers.{layer}.{mod}.weight")
        if _n_experts(config):  # stacked experts: Mixtral's names, or Qwen-MoE's
            if config.get("model_type") == "mixtral":
                candidates += [_fused_name(layer, "block_sparse_moe", p) for p in ("w1", "w2", "w3")]
            else:
                candidates += [_fused_name(layer, "mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
    for c in candidates:
        if tmap.get_name(c, try_suffixes=(".weight",)) == gname:
            return c
    return None
