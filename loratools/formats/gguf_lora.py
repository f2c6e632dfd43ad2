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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter import Adapter, LoraModule, check_finite, lowrank_module
from ..errors import AdapterFormatError, AdapterNotFoundError, InvalidArgumentError, UnsupportedAdapterError
from ..jsonio import load_json
from .common import fold_scale, lowrank, most_common
from .keys import group_keys

NAME = "gguf"
FILE = "adapter.gguf"
# HF model_type → (gguf architecture name, whether q/k rows are permuted as in LlamaModel)
ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}


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


def _arch(config: dict) -> tuple[str, bool]:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise UnsupportedAdapterError(
            f"GGUF: architecture {model_type!r} is not supported yet (supported: {', '.join(ARCHS)}).",
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
        return int(config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _name_map(config: dict) -> tuple[Any, str, bool]:
    gguf = _gguf()
    arch_name, permute = _arch(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    return gguf.get_tensor_name_map(arch, int(config["num_hidden_layers"])), arch_name, permute


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          **_: Any) -> list[Path]:
    if base_config is None:
        raise InvalidArgumentError("Writing GGUF needs the base model (--base): its config gives the architecture and "
                                   "llama.cpp's tensor names.")
    gguf = _gguf()
    tmap, arch_name, permute = _name_map(base_config)
    mods = adapter.modules
    alpha = float(most_common([m.rank for m in mods.values()])) if mods else 1.0
    writer = gguf.GGUFWriter(str(out / FILE), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    names: dict[str, str] = {}
    for target, m in sorted(mods.items()):
        gname = tmap.get_name(target, try_suffixes=(".weight",))
        if gname is None:
            raise UnsupportedAdapterError(f"{target} has no llama.cpp tensor name for {arch_name}.", tensor=target)
        d = lowrank(fold_scale(m, alpha / m.rank))  # llama.cpp applies alpha / rank to every pair
        A, B = d.A.float(), d.B.float()
        heads = _heads(target, base_config) if permute else None
        if heads:
            B = _permute(B, heads)
        a_np = (A.T if m.kind == "embedding" else A).contiguous().numpy()
        writer.add_tensor(gname + ".lora_a", a_np)
        writer.add_tensor(gname + ".lora_b", B.contiguous().numpy())
        names[gname] = target
    # our own keys (llama.cpp ignores them): read back without the base
    writer.add_string("loratools.hf_names", json.dumps(names, separators=(",", ":")))
    if permute:
        writer.add_uint32("loratools.n_head", int(base_config["num_attention_heads"]))
        writer.add_uint32("loratools.n_head_kv", int(base_config.get("num_key_value_heads")
                                                      or base_config["num_attention_heads"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [out / FILE]


def read(path: Path, *, base_config: dict | None = None, **_: Any) -> Adapter:
    gguf = _gguf()
    f = _file(path)
    try:
        reader = gguf.GGUFReader(str(f))
    except Exception as e:  # the package raises ValueError / struct errors for broken files
        raise AdapterFormatError(f"{f} is not a readable GGUF file: {e}.", path=f) from None

    def field(key: str) -> Any:
        fld = reader.get_field(key)
        return None if fld is None else fld.contents()

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise AdapterFormatError(f"{f} is a GGUF file but not a LoRA adapter (general.type = "
                                 f"{field('general.type')!r}).", path=f)
    alpha = float(field("adapter.lora.alpha") or 0.0)
    hf_names = load_json(field("loratools.hf_names") or "{}", where=f, what="metadata loratools.hf_names")
    config = base_config or {}
    arch = field("general.architecture")
    permute = {gguf_name: p for gguf_name, p in ARCHS.values()}.get(arch, False)
    n_head = field("loratools.n_head") or config.get("num_attention_heads")
    n_head_kv = field("loratools.n_head_kv") or config.get("num_key_value_heads") or n_head
    by_name = {t.name: t for t in reader.tensors}
    named, leftovers = group_keys(by_name, {".lora_a": "lora_a", ".lora_b": "lora_b"})
    if leftovers:
        raise AdapterFormatError(f"{f}: tensor(s) {', '.join(sorted(leftovers)[:8])} are not lora_a / lora_b "
                                 "(llama.cpp would refuse them too).", path=f)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for stem, roles in named.items():
        for role, key in roles.items():
            t = by_name[key]
            data = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]))
            check_finite(data, what=f"adapter tensor {t.name}", path=f)
            pairs.setdefault(stem, {})[role] = data
    modules: dict[str, LoraModule] = {}
    for gname, roles in sorted(pairs.items()):
        if "lora_a" not in roles or "lora_b" not in roles:
            raise AdapterFormatError(f"{f}: {gname} lacks lora_a or lora_b.", path=f)
        A, B = roles["lora_a"], roles["lora_b"]
        emb = gname.startswith("token_embd")
        if emb:
            A = A.T.contiguous()
        r = int(A.shape[0])
        target = hf_names.get(gname) or (_hf_name(gname, config) if config.get("model_type") in ARCHS else None)
        if target is None:
            raise AdapterFormatError(
                f"{f}: the GGUF tensor {gname} cannot be mapped back to a Hugging Face name without the base.",
                path=f, hint="Pass the base model (--base) whose config.json gives the architecture.")
        if permute and target.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = n_head if target.endswith("q_proj.weight") else n_head_kv
            if not heads:
                raise AdapterFormatError(f"{f}: un-permuting {target} needs the base's head counts (--base).", path=f)
            B = _permute(B, int(heads), inverse=True)
        modules[target] = lowrank_module(target, A, B, alpha / r if alpha else 1.0, alpha or float(r), kind="embedding" if emb else "linear",
                                     transposed=True if emb else False, source_keys=(gname + ".lora_a", gname + ".lora_b"))
    return Adapter(modules=modules, meta={"format": NAME, "architecture": arch}, path=path, files=[f])


def _hf_name(gname: str, config: dict) -> str | None:
    """The HF tensor name of a GGUF name, by running the package's map over the names this
    architecture has (no table of our own)."""
    tmap, _, _ = _name_map(config)
    n = int(config["num_hidden_layers"])
    candidates = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(n):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                    "mlp.up_proj", "mlp.down_proj"):
            candidates.append(f"model.layers.{i}.{mod}.weight")
    for c in candidates:
        if tmap.get_name(c, try_suffixes=(".weight",)) == gname:
            return c
    return None
