#!/usr/bin/env python
"""A seeded fuzzing campaign against every file format loratools reads (issue 14).

Valid inputs are made in a temporary folder — a tiny Llama-shaped base (one file, sharded with an
index, a pickle), PEFT adapters (safetensors and pickle, patterns, layers_to_transform, embedding,
DoRA, modules_to_save), kohya (with and without loratools' name metadata), diffusers, MLX, GGUF
and raw factor files (safetensors and pickle) — then each input is one of them with one to three
mutations: JSON values (types, huge numbers, deep nesting, NaN, regexes), safetensors headers
(dtypes, shapes, offsets, names, metadata, the length prefix, many empty tensors), tensors (shapes,
ranks of 0, dtypes, non-finite values, missing and extra keys, amplifying rank-1 factors), pickles,
GGUF metadata and tensors, and raw bytes. Each input is driven through ``load_adapter``, the CLI's
``info`` (click's CliRunner), ``convert`` and ``merge``, in a worker process whose address space is
limited (``RLIMIT_AS``) and which is killed when one input takes longer than ``--timeout``.

Every outcome is one of: ``ok``; ``error`` — a LoraToolsError, as it should be; ``bug`` — any other
exception (a traceback for the user); ``timeout``; ``memory`` — an allocation beyond the budget;
``crash`` — the worker died. Errors are also checked for form: the message names the input
(``unnamed`` otherwise), the CLI prints nothing before ``Error:`` (``noisy``), the message is short
(``long``), and no file outside BASE reaches OUT through a link (``leak``). Inputs that end in
anything but ok / error are saved under ``--save`` with what happened.

    python benchmarks/fuzz_campaign.py --inputs 5000 --seed 0
    python benchmarks/fuzz_campaign.py --inputs 200 --ops load,info     # the test suite's slice
    python benchmarks/fuzz_campaign.py --only 1234 --keep /tmp/case     # one input, kept for study

The same ``--seed`` and index always give the same input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUTCOMES = ("ok", "error", "bug", "timeout", "memory", "crash")
LIGHT = {"on": False}  # --light: no input of more than a few hundred KB (the test suite's slice)
FLAGS = ("unnamed", "noisy", "long", "leak")
ALL_OPS = ("load", "info", "convert", "merge")
MAX_MESSAGE = 2000

# --- the seeds: small valid inputs of every format ------------------------------------------------------------------

H, INTER, LAYERS, HEADS, KV, VOCAB = 16, 32, 2, 4, 2, 32
BASE_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": INTER,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}


@dataclass
class Seed:
    name: str
    format: str  # what the table counts it as
    kind: str  # "adapter" or "base"
    entry: str  # the path given to loratools, relative to the seed's folder ("" = the folder)
    parts: list[tuple[str, str]]  # (file relative to the seed folder, how to mutate it)
    convert_to: str = "peft"
    needs_base: bool = False  # convert needs --base (raw factors, GGUF output)


def _base_shapes() -> dict[str, tuple[int, ...]]:
    kvdim = H // HEADS * KV
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,),
                                          "lm_head.weight": (VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kvdim, H),
            p + "self_attn.v_proj.weight": (kvdim, H), p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
            p + "mlp.down_proj.weight": (H, INTER), p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        })
    return shapes


def _peft_pair(g: Any, name: str, shape: tuple[int, ...], r: int, prefix: str = "base_model.model.") -> dict:
    import torch

    out_f, in_f = shape
    return {f"{prefix}{name}.lora_A.weight": torch.randn(r, in_f, generator=g) * 0.3,
            f"{prefix}{name}.lora_B.weight": torch.randn(out_f, r, generator=g) * 0.3}


def _peft_config(**fields: Any) -> dict:
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny-llama", "r": 4,
           "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
           "use_dora": False, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
           "alpha_pattern": {}}
    cfg.update(fields)
    return cfg


def build_seeds(root: Path) -> dict[str, Seed]:
    """Write every seed under ``root`` (deterministic) and describe them."""
    import torch
    from safetensors.torch import save_file

    import loratools

    g = torch.Generator().manual_seed(1234)
    shapes = _base_shapes()
    base_sd = {n: torch.randn(s, generator=g) * 0.2 for n, s in shapes.items()}
    seeds: dict[str, Seed] = {}

    def base_files(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(BASE_CONFIG, indent=2))
        (folder / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}')

    base = root / "base"
    base_files(base)
    save_file(base_sd, str(base / "model.safetensors"), {"format": "pt"})
    seeds["base"] = Seed("base", "base", "base", "", [("model.safetensors", "safetensors"),
                                                      ("config.json", "json"), ("", "folder")])

    sharded = root / "base_sharded"
    base_files(sharded)
    names = sorted(base_sd)
    half = len(names) // 2
    shard_names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, part in zip(shard_names, (names[:half], names[half:])):
        save_file({n: base_sd[n] for n in part}, str(sharded / fname), {"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * 4 for t in base_sd.values())
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    seeds["base_sharded"] = Seed("base_sharded", "base-index", "base", "", [
        ("model.safetensors.index.json", "json"), (shard_names[0], "safetensors"), ("config.json", "json"),
        ("", "folder")])

    pickled = root / "base_pickle"
    base_files(pickled)
    torch.save(base_sd, pickled / "pytorch_model.bin")
    seeds["base_pickle"] = Seed("base_pickle", "base-pickle", "base", "", [
        ("pytorch_model.bin", "pickle"), ("config.json", "json")])

    def peft(name: str, cfg: dict, tensors: dict, *, fmt: str = "peft", pickle: bool = False) -> None:
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        if pickle:
            torch.save(tensors, folder / "adapter_model.bin")
            weights = ("adapter_model.bin", "pickle")
        else:
            save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
            weights = ("adapter_model.safetensors", "safetensors")
        seeds[name] = Seed(name, fmt, "adapter", "", [("adapter_config.json", "json"), weights],
                           convert_to="kohya")

    def pairs(targets: list[str], r: int, ranks: dict[str, int] | None = None) -> dict:
        t: dict = {}
        for n in targets:
            t.update(_peft_pair(g, n.removesuffix(".weight"), shapes[n], (ranks or {}).get(n, r)))
        return t

    qv = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(LAYERS) for p in ("q", "v")]
    peft("peft", _peft_config(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                              alpha_pattern={"v_proj": 4}),
         pairs(qv, 4, {"model.layers.1.self_attn.q_proj.weight": 2}))
    ou = [f"model.layers.1.{p}.weight" for p in ("self_attn.o_proj", "mlp.gate_proj")]
    peft("peft_layers", _peft_config(target_modules=["o_proj", "gate_proj"], layers_to_transform=[1],
                                     layers_pattern="layers", use_rslora=True), pairs(ou, 4))
    up = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]
    peft("peft_regex", _peft_config(target_modules=r".*\.(q_proj|up_proj)", r=2, lora_alpha=3,
                                    rank_pattern={"^model\\.layers\\.0\\.mlp\\.up_proj": 4}),
         pairs(up[1:], 2) | pairs(up[:1], 4))
    emb = pairs(["model.layers.0.self_attn.q_proj.weight"], 4)
    emb["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.rand(H, generator=g) + 0.5
    emb["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, VOCAB, generator=g) * 0.3
    emb["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(H, 4, generator=g) * 0.3
    emb["base_model.model.lm_head.weight"] = base_sd["lm_head.weight"] + 0.01
    peft("peft_emb_dora", _peft_config(target_modules=["q_proj", "embed_tokens"], use_dora=True,
                                       modules_to_save=["lm_head"]), emb)
    peft("peft_pickle", _peft_config(target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
                                     alpha_pattern={"v_proj": 4}),
         pairs(qv, 4, {"model.layers.1.self_attn.q_proj.weight": 2}), fmt="peft-pickle", pickle=True)

    def converted(name: str, fmt: str, to: str, entry: str, part_kind: str, *, source: str = "peft",
                  base_needed: bool = False, convert_to: str = "peft") -> None:
        folder = root / name
        loratools.convert(root / source, folder, to=to, base=base if base_needed else None)
        parts = [(entry, part_kind)] + [(p.name, "json") for p in sorted(folder.glob("*.json"))]
        seeds[name] = Seed(name, fmt, "adapter", entry, parts, convert_to=convert_to, needs_base=base_needed)

    converted("kohya", "kohya", "kohya", "pytorch_lora_weights.safetensors", "safetensors")
    converted("diffusers", "diffusers", "diffusers", "pytorch_lora_weights.safetensors", "safetensors")
    converted("mlx", "mlx", "mlx", "", "safetensors")
    seeds["mlx"].parts = [("adapters.safetensors", "safetensors"), ("adapter_config.json", "json")]
    converted("gguf", "gguf", "gguf", "adapter.gguf", "gguf", base_needed=True)

    kohya_plain = root / "kohya_plain"
    kohya_plain.mkdir()
    kt: dict = {}
    for n in qv + up:
        stem = "lora_unet_" + n.removesuffix(".weight").replace(".", "_")
        out_f, in_f = shapes[n]
        kt[stem + ".lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.3
        kt[stem + ".lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
        kt[stem + ".alpha"] = torch.tensor(1.0)
    save_file(kt, str(kohya_plain / "lora.safetensors"), {"ss_network_dim": "2", "ss_network_alpha": "1"})
    seeds["kohya_plain"] = Seed("kohya_plain", "kohya", "adapter", "lora.safetensors",
                                [("lora.safetensors", "safetensors")])

    raw: dict = {}
    for n in (qv[1], "model.layers.0.mlp.down_proj.weight", up[0]):
        out_f, in_f = shapes[n]
        stem = n.removesuffix(".weight")
        raw[stem + ".lora_A"] = torch.randn(in_f, 3, generator=g) * 0.3  # x @ A @ B style: (in, r), (r, out)
        raw[stem + ".lora_B"] = torch.randn(3, out_f, generator=g) * 0.3
    (root / "raw").mkdir()
    save_file(raw, str(root / "raw" / "factors.safetensors"))
    seeds["raw"] = Seed("raw", "raw", "adapter", "factors.safetensors", [("factors.safetensors", "safetensors")],
                        needs_base=True)
    (root / "raw_pickle").mkdir()
    torch.save(raw, root / "raw_pickle" / "factors.pt")
    seeds["raw_pickle"] = Seed("raw_pickle", "raw-pickle", "adapter", "factors.pt", [("factors.pt", "pickle")],
                               needs_base=True)
    own = {"layer.weight": torch.randn(8, 12, generator=g), "layer.bias": torch.randn(8, generator=g),
           "layer.lora_a": torch.randn(8, 2, generator=g), "layer.lora_b": torch.randn(2, 12, generator=g)}
    (root / "raw_self").mkdir()
    save_file(own, str(root / "raw_self" / "model_with_lora.safetensors"))
    seeds["raw_self"] = Seed("raw_self", "raw", "adapter", "model_with_lora.safetensors",
                             [("model_with_lora.safetensors", "safetensors")])
    # an FP8 block-quantized base (DeepSeek/Qwen3-FP8 layout: codes and weight_scale_inv, 8×8 blocks here)
    fp8 = root / "base_fp8"
    base_files(fp8)
    cfg = dict(BASE_CONFIG, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                 "weight_block_size": [8, 8]})
    (fp8 / "config.json").write_text(json.dumps(cfg, indent=2))
    q: dict = {}
    for n, t in base_sd.items():
        if t.dim() == 2 and n.startswith("model.layers"):
            rows, cols = t.shape
            blocks = t.reshape(rows // 8, 8, cols // 8, 8)
            scale = blocks.abs().amax(dim=(1, 3)) / 448
            q[n] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            q[n + "_scale_inv"] = scale.float()
        else:
            q[n] = t
    save_file(q, str(fp8 / "model.safetensors"), {"format": "pt"})
    seeds["base_fp8"] = Seed("base_fp8", "base-fp8", "base", "", [("model.safetensors", "safetensors"),
                                                                  ("config.json", "json")])
    # a llama.cpp model (GGUF), as convert_hf_to_gguf.py writes it: names from the package, q/k permuted
    import gguf

    (root / "base_gguf").mkdir()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    w = gguf.GGUFWriter(str(root / "base_gguf" / "model.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_embedding_length(H)
    w.add_feed_forward_length(INTER)
    for n, t in base_sd.items():
        a = t.numpy()
        heads = HEADS if n.endswith("q_proj.weight") else KV if n.endswith("k_proj.weight") else 0
        if heads:
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        gname = tmap.get_name(n, try_suffixes=(".weight",))
        if gname is not None:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    seeds["base_gguf"] = Seed("base_gguf", "base-gguf", "base", "model.gguf", [("model.gguf", "gguf")])
    return seeds


# --- mutations ------------------------------------------------------------------------------------------------------

class Raw:
    """JSON text inserted as is (numbers and nestings json.dumps cannot write)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 20 else self.text[:17] + "..."


def _raw_pool() -> list[Raw]:
    return [Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("9" * 5000),
            Raw("-" + "9" * 30), Raw("[" * 3000 + "]" * 3000), Raw('{"a":' * 3000 + "1" + "}" * 3000),
            Raw("1.5e308"), Raw("4.9e-324")]


REGEXES = [r"(a+)+$", r"(\w+)+x", r"(.+)+x", r"([a-z_.0-9]+)*z", r"(.*)*X", r"(a|a)*b", r"(q|q_|_proj|proj)+Z",
           "[", "((((", r"\1", r"(?<=a)b", r"q_proj|v_proj", r".*q_proj", r"layers\.1\..*", "x{1000000}",
           r"a{2,3}{4}", r"(?i)Q_PROJ", "*", "\\", r"(?P<idx>\d+)", r".*\.(q_proj|up_proj)", "(" * 200 + ")" * 200,
           r".*.*.*.*.*.*.*.*.*.*.*.*x", r"((.*)*)*\.q_proj$", "q_proj" * 400]
KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
        "use_rslora", "fan_in_fan_out", "peft_type", "init_lora_weights", "use_dora", "lora_parameters", "scale",
        "rank", "fine_tune_type", "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "architectures", "tie_word_embeddings", "weight_map", "metadata", "hidden_size", "modules_to_save", "bias",
        "exclude_modules", "lora_bias", "base_model_name_or_path", "layer_replication", "unet.lora_alpha",
        "unet.alpha_pattern", "unet.rank_pattern", "unet.r", "unet.use_rslora", "task_type", "keys", "dropout"]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(22)
    if choice == 0:
        return rng.choice(_raw_pool())
    if choice == 1:
        return rng.choice(REGEXES)
    if choice == 2:
        return {rng.choice(REGEXES): hostile_value(rng, depth + 1) if depth < 2 else 1}
    if choice == 3:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(3))] if depth < 2 else []
    return rng.choice([None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**64, 10**30, 0.5, -0.0, 1e-320, 1e308, "",
                       "eight", "0", "1e400", "NaN", "lora", "LORA", "llama", "gpt2", "qwen2", "mistral", "dora",
                       "all-linear", [], [0], [1, 1], ["q_proj"], [[0]], {}, {"a": 1}, "x" * 100_000,
                       "\x1b[31mred\x1b[0m", "../../etc/passwd", "/etc/passwd", "model.safetensors",
                       ["LlamaForCausalLM"], [3], "pissa", "gaussian"])


def dump_json(value: Any) -> str:
    """json.dumps that writes :class:`Raw` values as their text."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), ensure_ascii=False)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw)
    return text


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:20]):
            out += _paths(v, prefix + (i,))
    return out


def _set(doc: Any, path: tuple, value: Any, *, delete: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def mutate_json_value(doc: Any, rng: random.Random) -> tuple[Any, str]:
    """One change to a parsed JSON document; what it was, in words."""
    paths = _paths(doc)
    op = rng.randrange(10)
    if op < 5 or not isinstance(doc, dict):
        path = rng.choice(paths)
        value = hostile_value(rng)
        return _set(doc, path, value), f"set {'/'.join(map(str, path))[:60]} = {_show(value)}"
    if op < 7:
        dicts = [p for p in paths if isinstance(_get(doc, p), dict) and _get(doc, p)]
        if dicts:
            path = rng.choice(dicts)
            key = rng.choice(list(_get(doc, path)))
            return _set(doc, path + (key,), None, delete=True), f"delete {'/'.join(map(str, path + (key,)))[:60]}"
    dicts = [p for p in paths if isinstance(_get(doc, p), dict)] or [()]
    path = rng.choice(dicts)
    key = rng.choice(KEYS + REGEXES[:6])
    value = hostile_value(rng)
    target = _get(doc, path)
    if isinstance(target, dict):
        target[key] = value
    return doc, f"add {'/'.join(map(str, path + (key,)))[:60]} = {_show(value)}"


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _show(v: Any) -> str:
    text = v.text if isinstance(v, Raw) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def mutate_json_file(path: Path, rng: random.Random) -> str:
    try:
        doc = json.loads(path.read_text())
    except Exception:
        doc = {}
    if rng.random() < 0.08:
        text = rng.choice([dump_json(rng.choice(_raw_pool())), "", "[]", "null", "{", "\xff", '{"a": 1, "a": 2}'])
        path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff\xfe")
        return f"replace {path.name} with {text[:30]!r}"
    what = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        doc, w = mutate_json_value(doc, rng)
        what.append(w)
    path.write_text(dump_json(doc))
    return f"{path.name}: " + "; ".join(what)


def mutate_bytes(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    op = rng.randrange(6)
    if op == 0 and data:
        n = rng.randrange(len(data))
        path.write_bytes(bytes(data[:n]))
        return f"{path.name}: truncated to {n} bytes"
    if op == 1:
        path.write_bytes(b"")
        return f"{path.name}: emptied"
    if op == 2 and data:
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        path.write_bytes(bytes(data))
        return f"{path.name}: random bytes"
    if op == 3 and data:
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        path.write_bytes(bytes(data))
        return f"{path.name}: bytes inserted at {i}"
    if op == 4 and len(data) > 16:
        i = rng.randrange(min(len(data), 64))  # the format's own header
        data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        return f"{path.name}: bit flipped at {i}"
    path.write_bytes(bytes(data) + os.urandom(0) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100))))
    return f"{path.name}: bytes appended"


# safetensors ----------------------------------------------------------------------------------------------------


def _read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_st(path: Path, header_text: str, payload: bytes, *, length: int | None = None) -> None:
    raw = header_text.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + payload)


def mutate_st_header(path: Path, rng: random.Random) -> str:
    """Mutations of the header JSON itself (the data bytes are kept)."""
    header, payload = _read_st(path)
    names = [k for k in header if k != "__metadata__"]
    op = rng.randrange(12)
    name = rng.choice(names) if names else "x"
    entry = header.get(name) if isinstance(header.get(name), dict) else {}
    if op == 0:
        entry["dtype"] = rng.choice([{"a": 1}, 5, None, "F4", "X", "F8_E4M3", "F8_E5M2", "C64", "BOOL", "I64", "F64",
                                     "U8", "F8_E8M0", "", "f32", ["F32"]])
        what = f"dtype of {name[:40]} = {_show(entry['dtype'])}"
    elif op == 1:
        entry["shape"] = rng.choice([[], [0], [Raw("1e400")], [-1], ["4"], [4.0], [2**64], [0, 2**40],
                                     [Raw("9" * 5000)], [[4]], None, "4", [2**62, 2**62], [1] * 5000,
                                     [0, 2**31, 2**31]])
        what = f"shape of {name[:40]} = {_show(entry['shape'])}"
    elif op == 2:
        entry["data_offsets"] = rng.choice([["0", "4"], [0.0, 4.0], [4, 0], [0], [0, 2**64], [2**63, 2**63 + 4],
                                            [Raw("9" * 5000), 0], None, [0, 0], [-4, 0], [0, Raw("1e400")]])
        what = f"data_offsets of {name[:40]} = {_show(entry['data_offsets'])}"
    elif op == 3 and names:
        new = rng.choice(["x" * 100_000, "\x1b[31m" + name, "../" + name, "/etc/passwd", "", "__metadata__",
                          name + "\n", name.replace("lora", "LORA"), "é" * 300 + name, name + ".lora_A.weight",
                          name.replace(".weight", ".other"), "base_model.model." + name])
        header = {(new if k == name else k): v for k, v in header.items()}
        what = f"rename {name[:40]} to {_show(new)}"
    elif op == 4:
        meta = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
        json_keys = [k for k, v in meta.items() if isinstance(v, str) and v[:1] in "{["]
        if json_keys and rng.random() < 0.7:
            key = rng.choice(json_keys)
            try:
                doc = json.loads(meta[key])
            except ValueError:
                doc = {}
            doc, w = mutate_json_value(doc, rng)
            meta[key] = dump_json(doc) if rng.random() < 0.8 else rng.choice(["not json", "", "[1,2]", "null"])
            what = f"metadata {key}: {w}"
        else:
            key = rng.choice(["loratools_targets", "lora_adapter_metadata", "loratools_added_component", "format",
                              "ss_network_dim", "loratools"])
            meta[key] = rng.choice(["not json", "[]", "{}", '{"a": 5}', '{"lora_unet_x": "y"}', "x" * 100_000,
                                    '{"unet.lora_alpha": "big"}', '{"unet.alpha_pattern": {"(a+)+$": 1}}', "unet",
                                    dump_json(Raw("[" * 3000 + "]" * 3000))])
            what = f"metadata {key} = {_show(meta[key])}"
        header["__metadata__"] = meta
    elif op == 5:
        header["__metadata__"] = rng.choice([[], 5, {"a": 5}, {"a": None}, {"a": {"b": "c"}}, "x"])
        what = f"__metadata__ = {_show(header['__metadata__'])}"
    elif op == 6:
        del header[name]
        what = f"entry {name[:40]} removed from the header"
    elif op == 7:
        count = rng.choice([1000, 1000, 20_000, 100_000])
        count = min(count, 2000) if LIGHT["on"] else count
        for i in range(count):
            header[f"empty.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
        what = f"{count} empty tensors added"
    elif op == 8:
        text = json.dumps(header)
        length = rng.choice([0, 1, len(text) - 1, len(text) + 1, 2**63, 2**64 - 1, 100_000_001, len(text) + len(payload)])
        _write_st(path, text, payload, length=length)
        return f"{path.name}: header length {length}"
    elif op == 9:
        # the whole header one entry claiming a huge rank-0 tensor
        entry["shape"], entry["data_offsets"] = [0, 2**40], [0, 0]
        what = f"{name[:40]} is rank 0 of shape [0, 2**40]"
    elif op == 10:
        text = dump_json(header)
        text = text[:-1] + ', "' + name.replace('"', "") + '": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
        _write_st(path, text, payload)
        return f"{path.name}: {name[:40]} listed twice"
    else:
        header = rng.choice([[], "x", 5, None, Raw("[" * 3000 + "]" * 3000), {"__metadata__": {}}])
        what = f"header = {_show(header)}"
    if isinstance(header, dict) and name in header and op in (0, 1, 2, 9):
        header[name] = entry
    _write_st(path, dump_json(header), payload)
    return f"{path.name}: {what}"


def _partner(name: str, names: list[str]) -> str | None:
    swaps = [("lora_A", "lora_B"), ("lora_down", "lora_up"), ("lora_a", "lora_b"), ("lora_embedding_A",
                                                                                  "lora_embedding_B")]
    for x, y in swaps:
        for a, b in ((x, y), (y, x)):
            if a in name and name.replace(a, b) in names:
                return name.replace(a, b)
    return None


def mutate_tensors(tensors: dict, rng: random.Random, *, big_ok: bool = True) -> str:
    """Semantic mutations of a state dict (the file stays valid)."""
    for _ in range(20):
        what = _mutate_tensors_once(tensors, rng, big_ok=big_ok)
        if what:
            return what
    return "unchanged"


def _mutate_tensors_once(tensors: dict, rng: random.Random, *, big_ok: bool) -> str | None:
    """One semantic mutation, or None when the one drawn does not apply to the tensor drawn."""
    import torch

    names = list(tensors)
    if not names:
        tensors["x.lora_A.weight"] = torch.zeros(2, 3)
        return "a tensor added to an empty file"
    name = rng.choice(names)
    t = tensors[name]
    op = rng.randrange(16)
    if op == 0:
        tensors[name] = t.reshape(-1)
        return f"{name} made 1-D"
    if op == 1:
        tensors[name] = t.unsqueeze(0)
        return f"{name} made {t.dim() + 1}-D"
    if op == 2:
        tensors[name] = t.reshape(-1)[:1].reshape(()) if t.numel() else torch.tensor(1.0)
        return f"{name} made a scalar"
    if op == 3 and t.dim() == 2:
        tensors[name] = t.T.contiguous()
        return f"{name} transposed"
    if op == 4:
        other = _partner(name, names)
        dims = list(t.shape) or [1]
        dims[rng.randrange(len(dims))] = 0
        tensors[name] = torch.empty(dims, dtype=t.dtype)
        if other is not None:
            od = list(tensors[other].shape) or [1]
            od[rng.randrange(len(od))] = 0
            tensors[other] = torch.empty(od, dtype=tensors[other].dtype)
        return f"{name} and its partner given a 0 dimension"
    if op == 5:
        other = _partner(name, names)
        huge = 2**40
        if other is not None:
            a_first = any(s in name for s in ("lora_A", "lora_down", "lora_embedding_A"))
            tensors[name] = torch.empty((0, huge) if a_first else (huge, 0))
            tensors[other] = torch.empty((huge, 0) if a_first else (0, huge))
            return f"{name} / {other}: rank 0, dimensions 2**40"
        tensors[name] = torch.empty((0, huge))
        return f"{name}: shape (0, 2**40)"
    if op == 6 and big_ok and not LIGHT["on"] and rng.random() < 0.3:
        other = _partner(name, names)
        n = 2**16
        if other is not None:
            a_first = any(s in name for s in ("lora_A", "lora_down", "lora_embedding_A"))
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            tensors[name] = torch.randn((1, n) if a_first else (n, 1), generator=g)
            tensors[other] = torch.randn((n, 1) if a_first else (1, n), generator=g)
            return f"{name} / {other}: rank 1 with 2**16 rows and columns (ΔW of 2**32 values)"
    if op == 7:
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
                            torch.int8, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.int32])
        tensors[name] = t.to(dtype)
        return f"{name} as {dtype}"
    if op == 8 and t.is_floating_point() and t.numel():
        bad = rng.choice([float("nan"), float("inf"), -float("inf"), 3e38, 1e-45])
        t = t.clone()
        t.reshape(-1)[rng.randrange(t.numel())] = bad
        tensors[name] = t
        return f"{name} holds {bad}"
    if op == 9:
        del tensors[name]
        return f"{name} removed"
    if op == 10:
        new = rng.choice(["x" * 100_000, "\x1b[31mred\x1b[0m.lora_A.weight", "mystery.weight", "a.lora_A.weight",
                          "a.lora_B.weight", name + ".extra", name.replace("layers.0", "layers.00"),
                          name.replace("layers.0", "layers.9"), "lora_unet_x.hada_w1_a",
                          name.replace(".weight", ".default.weight"), "base_model.model." + name,
                          name.replace("base_model.model.", ""), "base_model.model.x.lora_mystery"])
        tensors[new] = tensors.pop(name)
        return f"{name} renamed {_show(new)}"
    if op == 11:
        tensors[name + "_copy".replace("_copy", "") .replace(".weight", ".default.weight")] = t.clone()
        return f"{name} duplicated under another adapter name"
    if op == 12 and name.endswith(".alpha"):
        tensors[name] = rng.choice([torch.empty(0), torch.tensor([]), torch.tensor(float("nan")),
                                    torch.tensor(-4.0), torch.tensor(0.0), torch.tensor([2.0, 3.0]),
                                    torch.tensor(3e38), torch.tensor(5, dtype=torch.int64), torch.tensor(1e-30)])
        return f"{name} = {tensors[name]!r}"[:120]
    if op == 13:
        for n in names:
            if n.endswith(".alpha"):
                tensors[n] = rng.choice([torch.empty(0), torch.tensor(float("inf")), torch.tensor(3e38)])
                return f"alpha {n} = {tensors[n]!r}"[:120]
        tensors[name] = t * 1e30 if t.is_floating_point() else t
        return f"{name} multiplied by 1e30"
    if op == 14:
        tensors[name] = torch.zeros(0) if rng.random() < 0.5 else torch.zeros(t.shape[:1] + (7,) if t.dim() else (7,))
        return f"{name} replaced by shape {tuple(tensors[name].shape)}"
    if op == 15:
        tensors.clear()
        return "every tensor removed"
    return None


def mutate_st_tensors(path: Path, rng: random.Random) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    what = [mutate_tensors(tensors, rng) for _ in range(rng.choice((1, 1, 2)))]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), meta)
    return f"{path.name}: " + "; ".join(what)


def mutate_safetensors(path: Path, rng: random.Random) -> str:
    x = rng.random()
    if x < 0.5:
        return mutate_st_tensors(path, rng)
    if x < 0.85:
        return mutate_st_header(path, rng)
    return mutate_bytes(path, rng)


# pickles ------------------------------------------------------------------------------------------------------------


def mutate_pickle(path: Path, rng: random.Random) -> str:
    import torch

    x = rng.random()
    if x < 0.3:
        return mutate_bytes(path, rng)
    sd = torch.load(path, weights_only=True)
    if x < 0.6:
        what = mutate_tensors(sd, rng, big_ok=False)
        torch.save(sd, path)
        return f"{path.name}: {what}"
    if x < 0.75 and sd:
        name = rng.choice(list(sd))
        t = sd[name].reshape(-1)[:1] if sd[name].numel() else torch.zeros(1)
        view = rng.choice(["expand", "overlap", "transpose", "legacy"])
        if view == "expand":
            sd[name] = t.expand(2**40)
        elif view == "overlap":
            base = torch.randn(64)
            sd[name] = base.as_strided((32, 32), (1, 1))
        elif view == "transpose" and sd[name].dim() == 2:
            sd[name] = sd[name].T
        torch.save(sd, path, _use_new_zipfile_serialization=view != "legacy")
        if view == "legacy" and rng.random() < 0.5:
            return f"{path.name}: legacy format; " + mutate_bytes(path, rng)
        return f"{path.name}: {name} as a {view} view"
    obj = rng.choice([{}, [], 5, "x", {"state_dict": sd}, {"state_dict": 5}, {k: 1 for k in sd},
                      {k: v.tolist() for k, v in list(sd.items())[:2]}, torch.zeros(3), {1: torch.zeros(2)},
                      {"a": {"b": torch.zeros(2)}}, {k: torch.zeros(2, dtype=torch.complex64) for k in sd}])
    torch.save(obj, path)
    return f"{path.name}: pickled {_show(obj)}"


# GGUF ---------------------------------------------------------------------------------------------------------------


def _gguf_spec(path: Path) -> tuple[str, dict, dict]:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    kv = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kv[key] = fld.contents()
    arch = reader.get_field("general.architecture").contents()
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return arch, kv, tensors


def _gguf_write(path: Path, arch: Any, kv: dict, tensors: dict) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), str(arch))
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            if value < 0:
                w.add_int64(key, value)
            elif value < 2**32:
                w.add_uint32(key, value)
            else:
                w.add_uint64(key, min(value, 2**64 - 1))
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in value):
            w.add_array(key, value)
        else:
            w.add_string(key, json.dumps(value, default=str))
    for name, array in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mutate_gguf(path: Path, rng: random.Random) -> str:
    import numpy as np

    if rng.random() < 0.3:
        return mutate_bytes(path, rng)
    arch, kv, tensors = _gguf_spec(path)
    op = rng.randrange(8)
    if op == 0:
        key = rng.choice(["adapter.lora.alpha", "loratools.n_head", "loratools.n_head_kv", "general.type",
                          "adapter.type", "loratools.hf_names"])
        value = rng.choice(["big", "", 0, 3, 5, 2**40, -1.0, float("nan"), float("inf"), 0.0, -8.0, 7.0, True,
                            "not json", "[1, 2]", '{"blk.0.attn_q": 5}', "{}", "adapter", "lora", [1, 2], 1e38,
                            '{"blk.0.attn_q": "' + "x" * 100_000 + '"}', '{"blk.0.attn_q": "lm_head.weight"}'])
        kv[key] = value
        what = f"{key} = {_show(value)}"
    elif op == 1:
        key = rng.choice(list(kv))
        del kv[key]
        what = f"{key} removed"
    elif op == 2:
        arch = rng.choice(["gpt2", "qwen2", "bert", "x" * 300, "llama"])
        what = f"architecture {arch[:20]}"
    elif op == 3 and tensors:
        name = rng.choice(list(tensors))
        t = tensors[name]
        tensors[name] = rng.choice([t.reshape(-1), t[None], t.T.copy(), np.zeros((0, t.shape[-1]), t.dtype),
                                    t.astype(np.float16), t.astype(np.int32), t[:, :1].copy() if t.ndim == 2 else t,
                                    np.full_like(t, np.nan)])
        what = f"{name}: shape {tensors[name].shape} dtype {tensors[name].dtype}"
    elif op == 4 and tensors:
        name = rng.choice(list(tensors))
        new = rng.choice(["blk.0.attn_q.lora_c", "token_embd.lora_a", "x" * 200 + ".lora_a", "blk.99.attn_q.lora_a",
                          name.replace("lora_a", "lora_b")])
        tensors[new] = tensors.pop(name)
        what = f"{name} renamed {new[:40]}"
    elif op == 5 and tensors:
        name = rng.choice(list(tensors))
        del tensors[name]
        what = f"{name} removed"
    elif op == 6:
        kv["loratools.hf_names"] = json.dumps({k.rsplit(".", 1)[0]: rng.choice(["lm_head.weight", "", "x", 5])
                                               for k in tensors})
        what = "hf_names pointing elsewhere"
    else:
        tensors.clear()
        what = "no tensors"
    _gguf_write(path, arch, kv, tensors)
    return f"{path.name}: {what}"


# folders -------------------------------------------------------------------------------------------------------------


def mutate_folder(folder: Path, rng: random.Random) -> str:
    op = rng.randrange(6)
    if op == 0:
        (folder / "tokenizer.model").symlink_to("/etc/passwd")
        return "tokenizer.model -> /etc/passwd"
    if op == 1:
        (folder / "special_tokens_map.json").symlink_to(folder / "config.json")
        return "special_tokens_map.json -> config.json (inside)"
    if op == 2:
        (folder / "vocab").symlink_to("/etc", target_is_directory=True)
        return "vocab -> /etc"
    if op == 3:
        outside = folder.parent / "outside.txt"
        outside.write_text("secret")
        (folder / "notes.txt").symlink_to("../outside.txt")
        return "notes.txt -> ../outside.txt"
    if op == 4:
        (folder / "dangling.json").symlink_to(folder / "nowhere")
        return "dangling.json -> nowhere"
    os.mkfifo(folder / "merges.txt")
    return "merges.txt is a FIFO"


MUTATORS: dict[str, Callable[[Path, random.Random], str]] = {
    "json": mutate_json_file, "safetensors": mutate_safetensors, "pickle": mutate_pickle, "gguf": mutate_gguf,
    "folder": mutate_folder,
}


@dataclass
class Case:
    index: int
    seed: Seed
    folder: Path  # the case's own folder (its name is the token every message must contain)
    target: Path  # the mutated input (adapter entry or base folder)
    mutations: list[str]
    part_kind: str

    @property
    def token(self) -> str:
        return self.folder.name


def make_case(index: int, master_seed: int, seeds: dict[str, Seed], seeds_root: Path, cases_root: Path,
              formats: list[str] | None = None) -> Case:
    """The input with this index: a seed copied and mutated (deterministic in (seed, index))."""
    rng = random.Random(f"{master_seed}:{index}")
    names = sorted(n for n, s in seeds.items() if not formats or s.format in formats)
    seed = seeds[names[index % len(names)]]
    folder = cases_root / f"c{index:06d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    inside = folder / seed.name
    shutil.copytree(seeds_root / seed.name, inside, symlinks=True)
    mutations = []
    kinds = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        rel, kind = rng.choice(seed.parts)
        path = inside / rel if rel else inside
        if kind == "folder":
            if any(p.is_symlink() or p.name == "merges.txt" for p in inside.iterdir()):
                continue
        elif not path.is_file():
            continue
        try:
            mutations.append(MUTATORS[kind](path, rng))
        except Exception as e:  # the mutator could not parse what an earlier mutation left
            mutations.append(f"{rel}: {kind} mutation skipped ({type(e).__name__})")
            mutations.append(mutate_bytes(path, rng) if path.is_file() else "")
        kinds.append(kind)
    target = inside / seed.entry if seed.entry else inside
    return Case(index, seed, folder, target, mutations, "+".join(sorted(set(kinds))) or "none")


# --- the regression corpus: one small input per kind of failure found ------------------------------------------------
#
# ``--write-corpus DIR`` writes each case below as the files that differ from its seed, and DIR/cases.json;
# tests/test_fuzz.py copies the seed, lays the files over it and checks that the operation ends in the
# expected LoraToolsError naming the input.


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    doc = json.loads(path.read_text())
    out = change(doc)  # edits in place; a new document only when it returns one
    path.write_text(dump_json(out if isinstance(out, (dict, list, Raw)) else doc))


def _edit_header(path: Path, change: Callable[[dict], Any]) -> None:
    header, payload = _read_st(path)
    out = change(header)
    _write_st(path, dump_json(header if out is None else out), payload)


def _edit_tensors(path: Path, change: Callable[[dict], Any], meta: Callable[[dict], Any] | None = None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    if meta is not None:
        meta(metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)


def _first(header: dict, part: str = "") -> str:
    return next(k for k in header if k != "__metadata__" and part in k)


def _entry(field_name: str, value: Any, part: str = "") -> Callable[[dict], None]:
    def change(header: dict) -> None:
        header[_first(header, part)][field_name] = value
    return change


def _edit_gguf(path: Path, kv: dict | None = None, drop: tuple = ()) -> None:
    arch, fields, tensors = _gguf_spec(path)
    fields.update(kv or {})
    for k in drop:
        fields.pop(k, None)
    _gguf_write(path, arch, fields, tensors)


def _gguf_edit(path: Path, change: Callable[[dict], Any]) -> None:
    """Rewrite a GGUF file with ``change`` applied to its tensors (name → writable numpy array)."""
    arch, kv, tensors = _gguf_spec(path)
    tensors = {k: v.copy() for k, v in tensors.items()}
    change(tensors)
    _gguf_write(path, arch, kv, tensors)


def _peft_sd(folder: Path, change: Callable[[dict], Any]) -> None:
    _edit_tensors(folder / "adapter_model.safetensors", change)


def _zero_rank(sd: dict, *, huge: int = 0) -> None:
    import torch

    a = _first(sd, "lora_A")
    b = a.replace("lora_A", "lora_B")
    sd[a] = torch.empty((0, huge or sd[a].shape[1]))
    sd[b] = torch.empty((huge or sd[b].shape[0], 0))


def _raw_zero_rank(sd: dict) -> None:
    import torch

    a = _first(sd, ".lora_A")
    sd[a] = torch.empty((2**40, 0))
    sd[a.replace("lora_A", "lora_B")] = torch.empty((0, 2**40))


def _expanded(path: Path) -> None:
    import torch

    sd = torch.load(path, weights_only=True)
    sd[_first(sd, "lora_A")] = torch.zeros(1).expand(2**40)
    torch.save(sd, path)


@dataclass
class CorpusCase:
    name: str
    seed: str
    op: str  # load | info | convert | merge (as the campaign runs them for the seed's kind)
    expect: str  # the LoraToolsError subclass
    says: str  # part of the message
    make: Callable[[Path], Any]
    note: str = ""


CORPUS = [
    CorpusCase("st-dtype-dict", "peft", "load", "CorruptFileError", "unknown dtype",
               lambda d: _edit_header(d / "adapter_model.safetensors", _entry("dtype", {"a": 1}))),
    CorpusCase("st-offsets-strings", "peft", "info", "CorruptFileError", "invalid data_offsets",
               lambda d: _edit_header(d / "adapter_model.safetensors", _entry("data_offsets", ["0", "64"]))),
    CorpusCase("st-offsets-floats", "kohya", "load", "CorruptFileError", "invalid data_offsets",
               lambda d: _edit_header(d / "pytorch_lora_weights.safetensors", _entry("data_offsets", [0.0, 4.0]))),
    CorpusCase("st-shape-1e400", "diffusers", "load", "CorruptFileError", "invalid shape",
               lambda d: _edit_header(d / "pytorch_lora_weights.safetensors", _entry("shape", [Raw("1e400")]))),
    CorpusCase("st-5000-digits", "raw", "load", "CorruptFileError", "not json",
               lambda d: _edit_header(d / "factors.safetensors", _entry("shape", [Raw("9" * 5000)]))),
    CorpusCase("st-nested-deep", "mlx", "load", "CorruptFileError", "nested too deeply",
               lambda d: _edit_header(d / "adapters.safetensors",
                                      lambda h: Raw('{"a":' + "[" * 5000 + "]" * 5000 + "}"))),
    CorpusCase("st-header-length", "kohya_plain", "info", "CorruptFileError", "header length",
               lambda d: _write_st(d / "lora.safetensors", "{}", b"", length=2**63)),
    CorpusCase("st-rank0-huge-shape", "raw", "load", "AdapterFormatError", "dimension of 0",
               lambda d: _edit_tensors(d / "factors.safetensors", _raw_zero_rank),
               "a few bytes whose header claims (2**40, 0) factors: info allocated 8.6 GB"),
    CorpusCase("peft-r-eight", "peft", "load", "CorruptFileError", "'r'",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(r="eight"))),
    CorpusCase("peft-alpha-null", "peft", "info", "CorruptFileError", "lora_alpha",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=None))),
    CorpusCase("peft-alpha-infinity", "peft", "info", "CorruptFileError", "not json",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=Raw("Infinity")))),
    CorpusCase("peft-alpha-1e400", "peft", "info", "CorruptFileError", "finite number",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_alpha=Raw("1e400")))),
    CorpusCase("peft-layers-string", "peft_layers", "load", "CorruptFileError", "layers_to_transform",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(layers_to_transform="0"))),
    CorpusCase("peft-target-bad-regex", "peft_regex", "info", "CorruptFileError", "not a valid regular expression",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(target_modules="(q_proj"))),
    CorpusCase("peft-target-list-int", "peft", "load", "CorruptFileError", "target_modules",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(target_modules=["q_proj", 1]))),
    CorpusCase("peft-rank-pattern-bad-regex", "peft", "merge", "CorruptFileError", "not a valid regular expression",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(rank_pattern={"((": 2}))),
    CorpusCase("peft-rank-pattern-backtracking", "peft", "load", "CorruptFileError", "quantifier inside a repeated",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(rank_pattern={r"(\w+)+x": 2})),
               "held the process until killed at 40 s"),
    CorpusCase("peft-rank-pattern-null", "peft_regex", "load", "CorruptFileError", "null",
               lambda d: _edit_json(d / "adapter_config.json",
                                    lambda c: c["rank_pattern"].update({k: None for k in c["rank_pattern"]}))),
    CorpusCase("peft-rank-zero", "peft", "load", "AdapterFormatError", "rank 0",
               lambda d: _peft_sd(d, _zero_rank)),
    CorpusCase("peft-1d-factor", "peft", "info", "AdapterFormatError", "matrices",
               lambda d: _peft_sd(d, lambda sd: sd.update({_first(sd, "lora_A"): sd[_first(sd, "lora_A")].reshape(-1)}))),
    CorpusCase("peft-empty-convert", "peft", "convert", "AdapterFormatError", "empty adapter",
               lambda d: _peft_sd(d, lambda sd: sd.clear())),
    CorpusCase("peft-complex-factor", "peft_pickle", "load", "UnsupportedAdapterError", "floating-point",
               lambda d: _edit_pickle(d / "adapter_model.bin", "lora_B", "complex64")),
    CorpusCase("kohya-targets-not-json", "kohya", "load", "CorruptFileError", "not json",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors", lambda sd: None,
                                       lambda m: m.update(loratools_targets="not json"))),
    CorpusCase("kohya-targets-list", "kohya", "info", "CorruptFileError", "json object",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors", lambda sd: None,
                                       lambda m: m.update(loratools_targets="[1, 2]"))),
    CorpusCase("kohya-targets-not-a-tensor", "kohya", "convert", "CorruptFileError", "tensor names",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors", lambda sd: None,
                                       lambda m: m.update(loratools_targets=json.dumps(
                                           {k: "pissa" for k in json.loads(m["loratools_targets"])})))),
    CorpusCase("kohya-alpha-empty", "kohya_plain", "load", "AdapterFormatError", "one number",
               lambda d: _edit_tensors(d / "lora.safetensors", lambda sd: sd.update({_first(sd, ".alpha"): _empty()}))),
    CorpusCase("kohya-alpha-inf", "kohya", "merge", "NonFiniteError", "inf",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors",
                                       lambda sd: sd.update({_first(sd, ".alpha"): _scalar(float("inf"))}))),
    CorpusCase("kohya-rank-zero", "kohya_plain", "load", "AdapterFormatError", "dimension of 0",
               lambda d: _edit_tensors(d / "lora.safetensors", lambda sd: _kohya_zero(sd))),
    CorpusCase("diffusers-1d-factor", "diffusers", "load", "AdapterFormatError", "matrices",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors",
                                       lambda sd: sd.update({_first(sd, "lora_B"): sd[_first(sd, "lora_B")].reshape(-1)}))),
    CorpusCase("diffusers-alpha-pattern-null", "diffusers", "info", "CorruptFileError", "null",
               lambda d: _edit_tensors(d / "pytorch_lora_weights.safetensors", lambda sd: None,
                                       lambda m: m.update(lora_adapter_metadata=json.dumps(
                                           {"unet.alpha_pattern": {"v_proj": None}})))),
    CorpusCase("mlx-parameters-list", "mlx", "load", "CorruptFileError", "lora_parameters",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c.update(lora_parameters=[1, 2]))),
    CorpusCase("mlx-scale-big", "mlx", "info", "CorruptFileError", "scale",
               lambda d: _edit_json(d / "adapter_config.json", lambda c: c["lora_parameters"].update(scale="big"))),
    CorpusCase("gguf-names-not-json", "gguf", "load", "CorruptFileError", "not json",
               lambda d: _edit_gguf(d / "adapter.gguf", {"loratools.hf_names": "not json"})),
    CorpusCase("gguf-alpha-string", "gguf", "info", "CorruptFileError", "adapter.lora.alpha",
               lambda d: _edit_gguf(d / "adapter.gguf", {"adapter.lora.alpha": "big"})),
    CorpusCase("gguf-base-int-tensor", "base_gguf", "merge", "UnsupportedAdapterError", "not floating point",
               lambda d: _gguf_edit(d / "model.gguf", lambda t: t.update(
                   {"blk.0.attn_v.weight": t["blk.0.attn_v.weight"].astype("int32")})),
               "the gguf package has no dequantizer for I32: it raised NotImplementedError"),
    CorpusCase("gguf-base-nan", "base_gguf", "merge", "NonFiniteError", "already holds non-finite",
               lambda d: _gguf_edit(d / "model.gguf", lambda t: t["blk.0.attn_q.weight"].__setitem__((0, 0), float("nan")))),
    CorpusCase("fp8-block-size-unknown", "base_fp8", "merge", "UnsupportedAdapterError", "weight_block_size",
               lambda d: _edit_json(d / "config.json", lambda c: c["quantization_config"].pop("weight_block_size") and None)),
    CorpusCase("fp8-e5m2-codes", "base_fp8", "merge", "UnsupportedAdapterError", "e4m3",
               lambda d: _edit_tensors(d / "model.safetensors", lambda sd: sd.update(
                   {k: v.float().to(__import__("torch").float8_e5m2) for k, v in sd.items() if v.element_size() == 1}))),
    CorpusCase("gguf-heads-do-not-divide", "gguf", "merge", "CorruptFileError", "cannot split",
               lambda d: _edit_gguf(d / "adapter.gguf", {"loratools.n_head": 3})),
    CorpusCase("gguf-heads-negative", "gguf", "load", "CorruptFileError", "loratools.n_head",
               lambda d: _edit_gguf(d / "adapter.gguf", {"loratools.n_head": -8.0})),
    CorpusCase("base-config-no-layers", "base", "convert", "CorruptFileError", "num_hidden_layers",
               lambda d: _edit_json(d / "config.json", lambda c: c.pop("num_hidden_layers"))),
    CorpusCase("base-config-heads-float", "base", "convert", "CorruptFileError", "num_key_value_heads",
               lambda d: _edit_json(d / "config.json", lambda c: c.update(num_key_value_heads=1e308))),
    CorpusCase("base-config-model-type-list", "base_sharded", "merge", "CorruptFileError", "model_type",
               lambda d: _edit_json(d / "config.json", lambda c: c.update(model_type=["llama"]))),
    CorpusCase("base-pickle-empty", "base_pickle", "merge", "CorruptFileError", "could not be read",
               lambda d: (d / "pytorch_model.bin").write_bytes(b"")),
    CorpusCase("base-pickle-expanded-view", "base_pickle", "load", "CorruptFileError", "repeats or overruns",
               lambda d: _expanded_base(d / "pytorch_model.bin")),
    CorpusCase("raw-pickle-expanded-view", "raw_pickle", "info", "CorruptFileError", "repeats or overruns",
               lambda d: _expanded(d / "factors.pt")),
    CorpusCase("index-values-int", "base_sharded", "merge", "CorruptFileError", "weight_map",
               lambda d: _edit_json(d / "model.safetensors.index.json",
                                    lambda c: c["weight_map"].update({k: 1 for k in list(c["weight_map"])[:1]}))),
    CorpusCase("index-metadata-int", "base_sharded", "load", "CorruptFileError", "metadata",
               lambda d: _edit_json(d / "model.safetensors.index.json", lambda c: c.update(metadata=5))),
    CorpusCase("index-dotdot", "base_sharded", "merge", "CorruptFileError", "outside its folder",
               lambda d: _edit_json(d / "model.safetensors.index.json", lambda c: c["weight_map"].update(
                   {k: "../model-00001-of-00002.safetensors" for k in list(c["weight_map"])[:1]}))),
    CorpusCase("index-absolute", "base_sharded", "info", "CorruptFileError", "outside its folder",
               lambda d: _edit_json(d / "model.safetensors.index.json", lambda c: c["weight_map"].update(
                   {k: "/etc/passwd" for k in list(c["weight_map"])[:1]}))),
    CorpusCase("index-name-too-long", "base_sharded", "load", "CheckpointNotFoundError", "missing",
               lambda d: _edit_json(d / "model.safetensors.index.json", lambda c: c["weight_map"].update(
                   {k: "x" * 300 + ".safetensors" for k in list(c["weight_map"])[:1]}))),
]


def _empty() -> Any:
    import torch

    return torch.empty(0)


def _scalar(value: float) -> Any:
    import torch

    return torch.tensor(value)


def _kohya_zero(sd: dict) -> None:
    import torch

    down = _first(sd, "lora_down")
    sd[down] = torch.empty((0, sd[down].shape[1]))
    up = down.replace("lora_down", "lora_up")
    sd[up] = torch.empty((sd[up].shape[0], 0))


def _edit_pickle(path: Path, part: str, dtype: str) -> None:
    import torch

    sd = torch.load(path, weights_only=True)
    key = _first(sd, part)
    sd[key] = sd[key].to(getattr(torch, dtype))
    torch.save(sd, path)


def _expanded_base(path: Path) -> None:
    import torch

    sd = torch.load(path, weights_only=True)
    sd["model.norm.weight"] = torch.zeros(1).expand(2**40)
    torch.save(sd, path)


def write_corpus(dest: Path) -> None:
    """Every CORPUS case as the files that differ from its seed, and dest/cases.json."""
    import filecmp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        manifest = []
        for case in CORPUS:
            work = root / "corpus" / case.name / case.seed
            shutil.copytree(root / "seeds" / case.seed, work)
            case.make(work)
            changed = [p for p in sorted(work.rglob("*")) if p.is_file() and not filecmp.cmp(
                p, root / "seeds" / case.seed / p.relative_to(work), shallow=False)]
            for p in changed:
                target = dest / case.name / p.relative_to(work)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, target)
            manifest.append({"name": case.name, "seed": case.seed, "op": case.op, "expect": case.expect,
                             "says": case.says, "files": [str(p.relative_to(work)) for p in changed],
                             **({"note": case.note} if case.note else {})})
        (dest / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")


# --- running one input ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    op: str
    kind: str  # OUTCOMES
    flags: list[str] = field(default_factory=list)
    detail: str = ""
    seconds: float = 0.0
    rss_mb: float = 0.0


def _is_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "not enough memory" in text or \
        "Cannot allocate memory" in text


def _summary(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "loratools" in f.filename or "fuzz" in f.filename] or frames
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours[-3:]))
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} [{where}]"


def _check_message(message: str, case: Case) -> list[str]:
    flags = []
    if case.token not in message:
        flags.append("unnamed")
    if len(message) > MAX_MESSAGE:
        flags.append("long")
    return flags


def ops_for(case: Case, seeds_root: Path) -> dict[str, Callable[[Path], Any]]:
    """What each operation runs for this input (``out`` is a fresh path for outputs)."""
    import loratools
    from click.testing import CliRunner

    from loratools.cli import cli

    base = seeds_root / "base"
    peft = seeds_root / "peft"
    if case.seed.kind == "base":
        mbase = case.target

        def info(out: Path) -> Any:
            return CliRunner().invoke(cli, ["info", str(peft), "--base", str(mbase)], catch_exceptions=True)

        return {
            "load": lambda out: loratools.load_adapter(peft, base=mbase),
            "info": info,
            "convert": lambda out: loratools.convert(peft, out, to="gguf", base=mbase),
            # a llama.cpp model is merged into a .gguf file
            "merge": lambda out: loratools.merge(mbase, [peft], out.with_name(out.name + ".gguf")
                                                 if mbase.suffix == ".gguf" else out),
        }
    adapter = case.target

    def info_adapter(out: Path) -> Any:
        return CliRunner().invoke(cli, ["info", str(adapter)], catch_exceptions=True)

    to = case.seed.convert_to
    return {
        "load": lambda out: loratools.load_adapter(adapter),
        "info": info_adapter,
        "convert": lambda out: loratools.convert(adapter, out, to=to, base=base if case.seed.needs_base else None),
        "merge": lambda out: loratools.merge(base, [adapter], out),
    }


def _leaks(out: Path, case: Case) -> bool:
    """A file of OUT that came through a link out of BASE (the campaign's links are named so)."""
    if not out.exists():
        return False
    names = {"tokenizer.model", "notes.txt", "vocab"}
    return any(p.name in names for p in out.rglob("*"))


def run_op(op: str, fn: Callable[[Path], Any], case: Case) -> Outcome:
    out = case.folder / f"out-{op}"
    start = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result: Outcome
    try:
        value = fn(out)
    except BaseException as e:  # noqa: BLE001 - classifying everything is the point
        if isinstance(e, KeyboardInterrupt):
            raise
        from loratools.errors import InternalError, LoraToolsError, VerificationError

        if isinstance(e, (InternalError, VerificationError)):  # loratools' own "this is a bug" errors
            result = Outcome(op, "bug", [], _summary(e))
        elif isinstance(e, LoraToolsError):
            result = Outcome(op, "error", _check_message(str(e), case), str(e).splitlines()[0][:300])
        elif _is_memory(e):
            result = Outcome(op, "memory", [], _summary(e))
        else:
            result = Outcome(op, "bug", [], _summary(e))
    else:
        result = Outcome(op, "ok")
        if op == "info":
            exc = value.exception
            text = value.output
            if exc is not None and not isinstance(exc, SystemExit):
                kind = "memory" if _is_memory(exc) else "bug"
                result = Outcome(op, kind, [], _summary(exc))
            elif value.exit_code != 0:
                message = text[text.find("Error: "):] if "Error: " in text else text
                flags = _check_message(message, case)
                if not text.startswith("Error: "):
                    flags.append("noisy")
                if "Traceback" in text:
                    flags.append("noisy")
                kind = "error" if value.exit_code == 1 else "bug"
                if "internal error" in message or "please report" in message:  # the CLI's message for a bug
                    kind = "memory" if "allocate memory" in message else "bug"
                result = Outcome(op, kind, flags, message.splitlines()[0][:300] if message else
                                 f"exit {value.exit_code}")
    if op == "merge" and result.kind == "ok" and _leaks(out, case):
        result.flags.append("leak")
    result.seconds = time.perf_counter() - start
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.rss_mb = (rss1 - rss0) / 1024
    if result.kind in ("ok", "error") and result.rss_mb > 1024:
        result.flags.append("rss")
    if out.exists():
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
    return result


# --- the worker: runs inputs in a limited process, one line per event on stdout ----------------------------------


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch

    import loratools.cli  # noqa: F401  everything the operations import, before the limit is set
    import loratools.ops.convert  # noqa: F401
    import loratools.ops.merge  # noqa: F401

    warnings.simplefilter("default")
    torch.set_num_threads(1)
    seeds_root = Path(args.root) / "seeds"
    seeds = {k: Seed(**v) for k, v in json.loads((seeds_root / "seeds.json").read_text()).items()}
    cases_root = Path(args.root) / "cases"
    if args.memory_mb:
        limit = _vm_bytes() + args.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ops = args.ops.split(",")
    for i in range(args.start, args.stop):
        case = make_case(i, args.seed, seeds, seeds_root, cases_root, args.formats)
        print(json.dumps({"event": "case", "i": i, "seed": case.seed.name, "part": case.part_kind,
                          "mutations": case.mutations}), flush=True)
        for op, fn in ops_for(case, seeds_root).items():
            if op not in ops or (op in ("merge", "convert") and i % args.heavy_every):
                continue
            print(json.dumps({"event": "run", "i": i, "op": op}), flush=True)
            o = run_op(op, fn, case)
            print(json.dumps({"event": "done", "i": i, "op": op, "kind": o.kind, "flags": o.flags,
                              "detail": o.detail, "seconds": round(o.seconds, 4), "rss_mb": round(o.rss_mb, 1)}),
                  flush=True)
        if not args.keep:
            shutil.rmtree(case.folder, ignore_errors=True)
    print(json.dumps({"event": "end"}), flush=True)


# --- the campaign: workers, timeouts, the tables -------------------------------------------------------------------


@dataclass
class Record:
    i: int
    seed: str
    format: str
    part: str
    mutations: list[str]
    outcomes: list[dict] = field(default_factory=list)


def _spawn(args: argparse.Namespace, start: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--root", str(args.root), "--seed", str(args.seed),
           "--start", str(start), "--stop", str(args.stop), "--ops", args.ops, "--memory-mb", str(args.memory_mb),
           "--heavy-every", str(args.heavy_every)]
    if args.formats:
        cmd += ["--formats", ",".join(args.formats)]
    if args.light:
        cmd += ["--light"]
    if args.keep:
        cmd += ["--keep"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="default")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True, bufsize=1)


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, 9)
    except ProcessLookupError:
        pass
    p.wait()


def run_campaign(args: argparse.Namespace) -> dict[int, Record]:
    seeds_root = Path(args.root) / "seeds"
    seeds = {k: Seed(**v) for k, v in json.loads((seeds_root / "seeds.json").read_text()).items()}
    records: dict[int, Record] = {}
    start = args.start
    while start < args.stop:
        p = _spawn(args, start)
        assert p.stdout is not None
        current: tuple[int, str] | None = None
        deadline = time.monotonic() + args.timeout + 60  # the first input also pays for the imports
        ended = False
        buffer = ""
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([p.stdout], [], [], max(0.0, left))
            if not ready:
                _kill(p)
                i, op = current or (start, "?")
                rec = records.get(i)
                if rec is not None:
                    rec.outcomes.append({"op": op, "kind": "timeout", "flags": [], "detail":
                                         f"no answer within {args.timeout} s"})
                start = i + 1
                break
            line = p.stdout.readline()
            if not line:
                p.wait()
                i, op = current or (start, "?")
                rec = records.get(i)
                if rec is not None:
                    kind = "memory" if p.returncode in (-9,) else "crash"
                    rec.outcomes.append({"op": op, "kind": kind, "flags": [], "detail":
                                         f"worker exited with {p.returncode}"})
                start = i + 1
                break
            buffer = line
            event = json.loads(buffer)
            if event["event"] == "end":
                ended = True
                p.wait()
                break
            i = event.get("i")
            if event["event"] == "case":
                records[i] = Record(i, event["seed"], seeds[event["seed"]].format, event["part"], event["mutations"])
                current = (i, "make")
            elif event["event"] == "run":
                current = (i, event["op"])
            elif event["event"] == "done":
                records[i].outcomes.append({k: event[k] for k in ("op", "kind", "flags", "detail", "seconds",
                                                                   "rss_mb")})
                if not args.quiet and event["kind"] not in ("ok", "error"):
                    print(f"  #{i} {records[i].seed} {event['op']}: {event['kind']}: {event['detail']}",
                          file=sys.stderr)
            deadline = time.monotonic() + args.timeout
        if ended:
            break
    return records


def save_failures(records: dict[int, Record], args: argparse.Namespace) -> int:
    """Inputs that ended in anything but ok / error, or with a flag, copied with what happened."""
    seeds_root = Path(args.root) / "seeds"
    seeds = {k: Seed(**v) for k, v in json.loads((seeds_root / "seeds.json").read_text()).items()}
    save = Path(args.save)
    saved = 0
    for rec in records.values():
        bad = [o for o in rec.outcomes if o["kind"] not in ("ok", "error") or set(o["flags"]) - {"unnamed"}]
        if not bad:
            continue
        saved += 1
        where = save / f"c{rec.i:06d}"
        if where.exists():
            shutil.rmtree(where)
        case = make_case(rec.i, args.seed, seeds, seeds_root, save / "_tmp", args.formats)
        shutil.move(str(case.folder), where)
        (where / "case.json").write_text(json.dumps({"index": rec.i, "seed": rec.seed, "mutations": rec.mutations,
                                                     "outcomes": bad, "campaign_seed": args.seed}, indent=2))
    shutil.rmtree(save / "_tmp", ignore_errors=True)
    return saved


def print_tables(records: dict[int, Record], seconds: float) -> None:
    by_format: dict[str, Counter] = defaultdict(Counter)
    by_part: dict[str, Counter] = defaultdict(Counter)
    by_op: dict[str, Counter] = defaultdict(Counter)
    inputs: Counter = Counter()
    parts: Counter = Counter()
    for rec in records.values():
        inputs[rec.format] += 1
        parts[rec.part] += 1
        for o in rec.outcomes:
            for c in (by_format[rec.format], by_part[rec.part], by_op[o["op"]]):
                c[o["kind"]] += 1
                for f in o["flags"]:
                    c[f] += 1

    def table(title: str, rows: dict[str, Counter], counts: Counter | None) -> None:
        cols = list(OUTCOMES) + list(FLAGS) + ["rss"]
        print(f"\n{title:<20}{'inputs':>7}" + "".join(f"{c:>8}" for c in cols))
        total: Counter = Counter()
        for name in sorted(rows):
            total.update(rows[name])
            n = counts[name] if counts is not None else sum(rows[name][k] for k in OUTCOMES)
            print(f"{name:<20}{n:>7}" + "".join(f"{rows[name][c]:>8}" for c in cols))
        n = sum(counts.values()) if counts is not None else sum(total[k] for k in OUTCOMES)
        print(f"{'total':<20}{n:>7}" + "".join(f"{total[c]:>8}" for c in cols))

    table("format", by_format, inputs)
    table("mutated part", by_part, parts)
    table("operation", by_op, None)
    times: dict[str, list[float]] = defaultdict(list)
    for rec in records.values():
        for o in rec.outcomes:
            if "seconds" in o:
                times[o["op"]].append(o["seconds"])
    print("\nseconds per run: " + ", ".join(f"{op} mean {sum(t) / len(t):.3f} max {max(t):.2f}"
                                          for op, t in sorted(times.items())))
    runs = sum(len(r.outcomes) for r in records.values())
    print(f"\n{len(records)} inputs, {runs} runs in {seconds:.0f} s "
          f"({seconds / max(1, len(records)):.2f} s per input)")
    bugs: Counter = Counter()
    for rec in records.values():
        for o in rec.outcomes:
            if o["kind"] not in ("ok", "error"):
                sig = o["detail"].split(" [")[0][:90] + (" [" + o["detail"].split(" [")[1][:80]
                                                          if " [" in o["detail"] else "")
                bugs[(o["kind"], sig)] += 1
    if bugs:
        print("\nfailures by signature:")
        for (kind, sig), n in bugs.most_common(60):
            print(f"  {n:>5}  {kind:<8} {sig}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1000, help="how many mutated inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index")
    ap.add_argument("--only", type=int, default=None, help="run this one input index")
    ap.add_argument("--ops", default=",".join(ALL_OPS), help="operations to drive (load,info,convert,merge)")
    ap.add_argument("--heavy-every", type=int, default=1,
                    help="run convert and merge on every Nth input only (they write and verify outputs)")
    ap.add_argument("--formats", type=lambda s: s.split(","), default=None, help="seed formats to use")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one operation may take")
    ap.add_argument("--memory-mb", type=int, default=3072, help="address space a worker may add (RLIMIT_AS)")
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--save", default="fuzz_failures", help="where inputs that failed are copied")
    ap.add_argument("--keep", action="store_true", help="keep every input's folder under ROOT/cases")
    ap.add_argument("--json", default=None, help="write every outcome to this file")
    ap.add_argument("--quiet", action="store_true", help="print the tables only, not each failure as it happens")
    ap.add_argument("--light", action="store_true",
                    help="leave out the largest inputs (100,000-tensor headers, 1 MB amplifying factors): a quick slice")
    ap.add_argument("--write-corpus", default=None, metavar="DIR",
                    help="write the regression corpus (tests/fuzz_corpus) and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stop", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only is not None:
        args.start, args.inputs = args.only, 1
    if args.stop is None:
        args.stop = args.start + args.inputs
    LIGHT["on"] = args.light
    return args


def prepare(root: Path) -> None:
    seeds_root = root / "seeds"
    if (seeds_root / "seeds.json").is_file():
        return
    if seeds_root.exists():
        shutil.rmtree(seeds_root)
    seeds_root.mkdir(parents=True)
    seeds = build_seeds(seeds_root)
    (seeds_root / "seeds.json").write_text(json.dumps({k: vars(v) for k, v in seeds.items()}, indent=1))


def main(argv: list[str] | None = None) -> dict[int, Record]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.write_corpus:
        write_corpus(Path(args.write_corpus))
        return {}
    own_root = args.root is None
    args.root = Path(args.root or tempfile.mkdtemp(prefix="loratools-fuzz-"))
    try:
        t0 = time.perf_counter()
        prepare(args.root)
        if not args.quiet:
            print(f"seeds ready in {time.perf_counter() - t0:.1f} s; {args.stop - args.start} inputs, "
                  f"seed {args.seed}, ops {args.ops}", file=sys.stderr)
        t1 = time.perf_counter()
        records = run_campaign(args)
        seconds = time.perf_counter() - t1
        saved = save_failures(records, args)
        if args.json:
            Path(args.json).write_text(json.dumps([vars(r) for r in records.values()], indent=1))
        print_tables(records, seconds)
        if saved:
            print(f"\n{saved} failing input(s) saved under {args.save}/")
        return records
    finally:
        if own_root and not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
