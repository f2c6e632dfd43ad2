"""merge BASE.gguf ADAPTER OUT.gguf: adapters merged into a llama.cpp model file.

What llama.cpp's ``llama-export-lora`` does, exactly and streamed: the base's metadata (every key,
the tokenizer included) and tensor order are kept; each tensor an adapter changes is read,
dequantized by the ``gguf`` package where it is quantized, W + Σ wᵢ·ΔWᵢ computed in float32 (ΔW
from the adapter's own factors, rows permuted where llama.cpp's converter permutes q/k), and
rounded once to its output type:

* F32 / F16 / BF16 tensors keep their type (one rounding, round to nearest even);
* quantized tensors are requantized to their own type where the ``gguf`` package can quantize it
  (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1…), else written as F16 — what export-lora writes for every
  quantized tensor; ``--dtype fp16|bf16|fp32`` chooses the type of changed tensors instead.

Every other tensor is copied byte for byte. A split base (``-00001-of-0000N.gguf``) is written as
the same splits. Adapter modules are matched to GGUF tensors through the package's own HF→GGUF
name tables for the architecture in ``general.architecture``; a module with no tensor in the base
is refused by name, never dropped.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..adapter import Adapter, LoraModule
from ..errors import CorruptFileError, InvalidArgumentError, NonFiniteError, UnsupportedAdapterError, VerificationError
from ..jsonio import clip
from ..options import Options
from .execute import Result

SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
RECORD_KEY = "loratools.record"
SAMPLE_ROWS = 32


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".gguf" and p.is_file()


def split_files(path: Path) -> list[Path]:
    """The files of a (possibly split) GGUF model, in order."""
    m = SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    files = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CorruptFileError(f"{path} is split into {count} files, but {', '.join(missing[:3])} "
                               f"{'is' if len(missing) == 1 else 'are'} missing.", path=path)
    return files


def _readers(files: list[Path]) -> list[Any]:
    from ..formats.gguf_lora import _gguf

    gguf = _gguf()
    out = []
    for f in files:
        try:
            out.append(gguf.GGUFReader(str(f)))
        except Exception as e:  # the package raises ValueError / struct errors for broken files
            raise CorruptFileError(f"{f} is not a readable GGUF file: {clip(' '.join(str(e).split()), 200)}.",
                                   path=f) from None
    return out


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


def model_config(reader: Any, path: Path) -> dict:
    """The HF-style config the name tables need, from the GGUF metadata: model_type, layers, heads."""
    from ..formats.gguf_lora import ARCHS

    arch = _field(reader, "general.architecture")
    gtype = _field(reader, "general.type")
    if gtype == "adapter":
        raise InvalidArgumentError(f"{path} is a GGUF LoRA adapter, not a model: give it as ADAPTER, the model as BASE.")
    model_type = next((mt for mt, (a, _) in ARCHS.items() if a == arch), None)
    if model_type is None:
        raise UnsupportedAdapterError(
            f"{path}: GGUF architecture {clip(repr(arch), 60)} is not supported for merging yet (supported: "
            f"{', '.join(sorted({a for a, _ in ARCHS.values()}))}).", path=path,
            hint="Each architecture's tensor layout must be checked against llama.cpp's converter first.")
    cfg: dict[str, Any] = {"model_type": model_type, "_source": str(path)}
    for key, name in (("block_count", "num_hidden_layers"), ("attention.head_count", "num_attention_heads"),
                      ("attention.head_count_kv", "num_key_value_heads"), ("expert_count", "num_experts"),
                      ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
                      ("expert_feed_forward_length", "moe_intermediate_size")):
        value = _field(reader, f"{arch}.{key}")
        if isinstance(value, list):  # per-layer head counts: uniform ones only
            value = value[0] if value and all(v == value[0] for v in value) else None
        if value is not None:
            cfg[name] = int(value)
    if model_type == "llama" and cfg.get("num_experts"):  # llama.cpp writes Mixtral as llama with experts
        cfg["model_type"] = "mixtral"
        cfg["num_local_experts"] = cfg["num_experts"]
    if "num_hidden_layers" not in cfg:
        raise CorruptFileError(f"{path}: {arch}.block_count is missing; the tensor names need it.", path=path)
    return cfg


@dataclass
class Change:
    """One GGUF tensor and what is added to it."""

    name: str
    parts: list[tuple[LoraModule, float, int]]  # (module, signed weight, first row in the (rows, cols) view)
    perm: torch.Tensor | None  # HF row of each GGUF row (q/k of llama-family models)


def plan_changes(adapters: list[tuple[Adapter, float]], config: dict, tensors: dict[str, Any],
                 path: Path) -> dict[str, Change]:
    from ..formats.gguf_lora import EXPERT, _check_heads, _fused_name, _heads, _name_map, _permute

    layers = int(config["num_hidden_layers"])
    tmap, arch, permute = _name_map(config, layers)
    changes: dict[str, Change] = {}
    for adapter, weight in adapters:
        for target, m in sorted(adapter.modules.items()):
            if m.magnitude is not None or not getattr(m.delta, "additive", True) or m.bias is not None:
                raise UnsupportedAdapterError(
                    f"{clip(target)}: {'DoRA' if m.magnitude is not None else 'a bias' if m.bias is not None else m.delta.kind} "
                    "cannot be merged into a GGUF model (llama.cpp's LoRA has no form for it either).", tensor=target,
                    hint="Merge into the safetensors model, then convert it with llama.cpp's convert_hf_to_gguf.py.")
            expert = EXPERT.match(target)
            name = _fused_name(int(expert.group(1)), expert.group(2), expert.group(4)) if expert else target
            gname = tmap.get_name(name, try_suffixes=(".weight",)) if name.endswith(".weight") else None
            if gname is None or gname not in tensors:
                raise UnsupportedAdapterError(
                    f"{clip(target)} ({adapter.path.name if adapter.path else 'adapter'}) has no tensor in {path} "
                    f"({arch}{': it would be ' + gname if gname else ''}).", tensor=target, path=path,
                    hint="Check that BASE is the model the adapter was made for; nothing was written.")
            t = tensors[gname]
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # numpy order: (out, in) or (E, out, in)
            want = tuple(m.stored_shape)
            offset = 0
            if expert:  # one expert's slice of the stacked (E, out, in) tensor
                e = int(expert.group(3))
                if len(shape) != 3 or shape[1:] != want or e >= shape[0]:
                    raise UnsupportedAdapterError(f"{clip(target)}: expert {e}'s ΔW {list(want)} does not fit {gname} "
                                                  f"{list(shape)} in {path}.", tensor=target, path=path)
                offset = e * shape[1]
            elif shape != want:
                raise UnsupportedAdapterError(f"{clip(target)}: ΔW {list(want)} does not fit {gname} {list(shape)} in "
                                              f"{path}.", tensor=target, path=path)
            perm = None
            heads = _heads(target, config) if permute and not expert else None
            if heads:
                rows = shape[0]
                perm = _permute(torch.arange(rows).reshape(rows, 1),
                                _check_heads(rows, heads, where=path, what=f"the heads of {clip(target)}")).reshape(-1)
            ch = changes.setdefault(gname, Change(gname, [], perm))
            ch.parts.append((m, weight, offset))
    return changes


def _dequantizable(gguf: Any, qtype: Any) -> bool:
    """Whether the ``gguf`` package can read this type as numbers (not the integer types)."""
    if qtype.name.startswith("I") and qtype.name[1:].isdigit():
        return False
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, gguf.quants.QuantError, KeyError, ValueError, TypeError):
        return False
    return True


def _quantizable(gguf: Any, qtype: Any) -> bool:
    """Whether the ``gguf`` package can quantize this type (it dequantizes many more)."""
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.quantize(np.zeros((1, block * 8), dtype=np.float32), qtype)
    except (NotImplementedError, gguf.quants.QuantError, KeyError, ValueError, TypeError):
        return False
    return True


FLOATS = ("F32", "F16", "BF16")
TYPE_OF = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def _encode(gguf: Any, W: torch.Tensor, qtype: Any) -> np.ndarray:
    """W (float32, rows × cols) stored as ``qtype``: F32/F16/BF16 rounded once (nearest even), a
    quantized type through the package's own quantizer."""
    name = qtype.name
    if name == "F32":
        return W.numpy()
    if name == "F16":
        return W.to(torch.float16).numpy()
    if name == "BF16":
        return W.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return gguf.quants.quantize(W.numpy(), qtype)


def _matrix(t: Any) -> tuple[int, int, Any]:
    """(rows, cols, data) of a GGUF tensor viewed as a matrix: every dimension but the last as rows
    (stacked experts (E, out, in) are E·out rows); ``data`` the package's array, rows first."""
    shape = [int(n) for n in reversed(t.shape.tolist())]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows, shape[-1], t.data.reshape(rows, -1)


def _rows(gguf: Any, t: Any, i: int | torch.Tensor, j: int | None = None) -> torch.Tensor:
    """Rows i:j (or rows ``i``, an index tensor) of a GGUF tensor as float32, dequantized by the
    package where quantized."""
    _, _, data = _matrix(t)
    part = data[i:j] if j is not None else data[i.numpy()]
    return torch.from_numpy(np.array(gguf.quants.dequantize(part, t.tensor_type), dtype=np.float32))  # writable


def _delta_at(ch: Change, idx: torch.Tensor, cols: int, dtype: torch.dtype, *, magnitude: bool = False
              ) -> tuple[torch.Tensor, int]:
    """Σ wᵢ·ΔWᵢ at rows ``idx`` of the tensor's matrix view (each part at its own rows, q/k rows
    permuted as llama.cpp stores them), from the adapters' own factors; and the largest depth."""
    total = torch.zeros(len(idx), cols, dtype=dtype)
    depth = 0
    for m, w, off in ch.parts:
        n = int(m.stored_shape[0])
        hit = (idx >= off) & (idx < off + n)
        if not bool(hit.any()):
            continue
        local = idx[hit] - off
        if ch.perm is not None:
            local = ch.perm[local]
        total[hit] += m.take(local, dtype=dtype, weight=w, magnitude=magnitude).reshape(-1, cols)
        depth += int(m.delta.depth)
    return total, depth


def _delta_rows(ch: Change, i: int, j: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return _delta_at(ch, torch.arange(i, j), cols, dtype)[0]


@dataclass
class Opened:
    """A GGUF model (all its splits) opened once, and the adapters read against it."""

    files: list[Path]
    readers: list[Any]
    config: dict
    tensors: dict[str, Any]
    adapters: list[tuple[Adapter, float]]


def open_model(base: Path, refs: list[Any], weights: list[float], options: Options) -> Opened:
    """BASE's files and readers, the config its metadata gives, and the adapters read with it (their
    names and head counts are the model's)."""
    from ..formats import read_adapter
    from ..hub import resolve

    files = split_files(base)
    readers = _readers(files)
    config = model_config(readers[0], base)
    adapters = [(ref if isinstance(ref, Adapter) else read_adapter(
        resolve(ref, kind="adapter"), format=options.from_format, base_config=config, allow_skip=options.allow_skip),
        float(w)) for ref, w in zip(refs, weights)]
    return Opened(files, readers, config, {t.name: t for r in readers for t in r.tensors}, adapters)


def merge_gguf(base: Path, refs: list[Any], weights: list[float], out: Path, options: Options) -> Result:
    """merge BASE.gguf ADAPTER… OUT.gguf: OUT (the same splits as BASE) with the adapters merged;
    see the module doc."""
    from ..checkpoint.writer import check_output
    from ..formats.gguf_lora import _gguf
    from ..pipeline import commit, forgotten_out
    from .plan import file_sha256

    for opt, what in ((options.reversible, "--reversible"), (options.max_shard_size, "--max-shard-size")):
        if opt:
            raise InvalidArgumentError(f"{what} does not apply to a GGUF model.")
    if out.suffix != ".gguf":
        raise InvalidArgumentError(f"BASE {base.name} is a GGUF model: OUT must end in .gguf (got {out.name}).")
    if not SPLIT.match(base.name) and not options.dry_run:  # split OUTs are checked where they are moved in
        check_output(out, inputs=[base], overwrite=options.overwrite, expected=set(),
                     forgotten_out_hint=forgotten_out("merge", out))
    gguf = _gguf()
    model = open_model(base, refs, weights, options)
    files, readers, tensors = model.files, model.readers, model.tensors
    records = [{"path": a.path.name if a.path else "adapter", "format": a.format,
                "sha256": file_sha256(list(a.files)) if a.files else None, "weight": w} for a, w in model.adapters]
    changes = plan_changes(model.adapters, model.config, tensors, base)
    forced = TYPE_OF.get(options.output_dtype or "")
    if options.output_dtype and forced is None:
        raise InvalidArgumentError(f"--dtype {options.output_dtype} has no GGUF type: use fp32, fp16 or bf16.")
    out_types: dict[str, Any] = {}
    notes: list[str] = []
    fallback: list[str] = []
    for name, ch in changes.items():
        t = tensors[name]
        qtype = t.tensor_type
        if qtype.name not in FLOATS and not _dequantizable(gguf, qtype):
            raise UnsupportedAdapterError(
                f"{name} in {base} is stored as {qtype.name}: "
                f"{'not floating point' if qtype.name.startswith('I') else 'a type the gguf package cannot read'}, so "
                "an adapter cannot be added to it.", tensor=name, path=base,
                hint="Check that BASE is the model the adapter was made for.")
        if forced is not None:
            out_types[name] = gguf.GGMLQuantizationType[forced]
        elif qtype.name in FLOATS or _quantizable(gguf, qtype):
            out_types[name] = qtype
        else:
            out_types[name] = gguf.GGMLQuantizationType.F16
            fallback.append(f"{name} ({qtype.name})")
    if fallback:
        notes.append(f"{len(fallback)} changed tensor(s) of a type the gguf package cannot quantize are written as F16 "
                     f"(as llama.cpp's export-lora does), e.g. {fallback[0]}.")
    if options.dry_run:
        return Result(out=None, changed=sorted(changes), warnings=notes)
    m = SPLIT.match(out.name)
    if len(files) > 1:
        stem = m.group("stem") if m else out.name.removesuffix(".gguf")
        names = [f"{stem}-{i:05d}-of-{len(files):05d}.gguf" for i in range(1, len(files) + 1)]
    else:
        names = [out.name]
    record = json.dumps({"tool": f"loratools {__version__}", "operation": "merge", "adapters": records},
                        separators=(",", ":"))
    stats: dict[str, float] = {}

    def write(tmp: Path) -> Result:
        start = time.perf_counter()
        result = Result(out=out, warnings=list(notes))
        written = 0
        for n, (reader, fname) in enumerate(zip(readers, names)):
            _write_file(gguf, reader, tmp / fname, changes, out_types, record if n == 0 else None, stats,
                        source=files[n])
            written += (tmp / fname).stat().st_size
        result.bytes_written = written
        result.changed = sorted(changes)
        result.copied = len(tensors) - len(changes)
        result.seconds = time.perf_counter() - start
        if options.verify != "none":
            got = {t.name: t for r in _readers([tmp / f for f in names]) for t in r.tensors}
            result.verify = _check(gguf, got, tensors, changes, out_types, full=options.verify == "full")
            if not result.verify.ok:
                raise VerificationError("merge: the written GGUF failed verification; nothing was written. "
                                        + result.verify.summary(),
                                        hint="This is a bug in loratools or a failing disk; please report it.")
        return result

    if len(files) > 1:
        result = _commit_split(out, names, options, write, base)
    else:
        result = commit(out, options, write=write, single_file=True)
    result.out = out if len(files) == 1 else out.parent / names[0]
    result.adapter_count = len(model.adapters)
    requant = [n for n, q in out_types.items() if q.name not in FLOATS]
    if requant:
        worst = max(stats.get(n, 0.0) for n in requant)
        result.notes.append(f"requantized {len(requant)} tensor(s) to their own type with the gguf package "
                            f"({', '.join(sorted({out_types[n].name for n in requant}))}): relative error "
                            f"(Frobenius) of the written values against the exact W+ΔW at most {worst:.2e}.")
    return result


def _commit_split(out: Path, names: list[str], options: Options, write: Any, base: Path) -> Result:
    """A split OUT: all files written in one temporary folder beside them, then moved into place."""
    from ..pipeline import commit

    folder = out.parent
    final = [folder / n for n in names]
    inputs = {p.resolve() for p in split_files(base)}
    for p in final:
        if p.resolve() in inputs:
            raise InvalidArgumentError(f"OUT would write {p}, a file of BASE: inputs are never modified.", path=p,
                                       hint="Give OUT another name or folder.")
    clash = [p for p in final if p.exists()]
    if clash and not options.overwrite:
        raise InvalidArgumentError(f"{clash[0]} already exists; nothing was written.", hint="Pass --overwrite to replace it.")
    staging = folder / (names[0] + ".loratools-split")
    result = commit(staging, options, write=write)
    for n in names:
        (staging / n).replace(folder / n)
    staging.rmdir()
    return result


def _copy_fields(writer: Any, reader: Any, gguf: Any) -> None:
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
    for name, f in reader.fields.items():
        if name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise UnsupportedAdapterError(f"metadata {name} is an array of arrays, which the gguf package cannot "
                                          "write back.")
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)


def _write_file(gguf: Any, reader: Any, out: Path, changes: dict[str, Change], out_types: dict[str, Any],
                record: str | None, stats: dict[str, float], *, source: Path) -> None:
    """One output file: ``reader``'s keys and tensors (of the model file ``source``, which messages
    name), the changed ones computed."""
    arch = _field(reader, "general.architecture") or "llama"
    writer = gguf.GGUFWriter(str(out), arch)
    _copy_fields(writer, reader, gguf)
    if record is not None:
        writer.add_string(RECORD_KEY, record)
    encoded: dict[str, tuple[Any, tuple[int, ...], int]] = {}
    for t in reader.tensors:
        if t.name in changes:
            qtype = out_types[t.name]
            rows, cols, _ = _matrix(t)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            if cols % block:
                raise UnsupportedAdapterError(f"{t.name}: {cols} columns do not fill {qtype.name} blocks of {block}.")
            nbytes = rows * cols // block * size
            encoded[t.name] = (qtype, (rows, cols), nbytes)
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, int(t.data.nbytes), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        if t.name not in changes:
            writer.write_tensor_data(t.data)
            continue
        qtype, (rows, cols), nbytes = encoded[t.name]
        ch = changes[t.name]
        step = max(1, (1 << 22) // max(cols, 1))
        parts, err_sq, val_sq = [], 0.0, 0.0
        for i in range(0, rows, step):
            j = min(i + step, rows)
            W = _rows(gguf, t, i, j)
            exact = W + _delta_rows(ch, i, j, cols, torch.float32)
            if not bool(torch.isfinite(exact).all()):
                held = not bool(torch.isfinite(W).all())
                raise NonFiniteError(
                    f"merge would write NaN or Inf into {t.name} (from {source})"
                    f"{': the model tensor already holds non-finite values' if held else ''}; nothing was written.",
                    tensor=t.name, path=source,
                    hint="The GGUF model is damaged." if held else "Check the adapter weights (a weight far too "
                    "large overflows float32).")
            data = _encode(gguf, exact, qtype)
            if data.dtype == np.float16 and not np.isfinite(data).all():
                raise InvalidArgumentError(f"merge: {t.name} overflows F16; nothing was written.",
                                           hint="Pass --dtype bf16 or fp32.")
            if qtype.name not in FLOATS:
                back = torch.from_numpy(gguf.quants.dequantize(data, qtype)).double()
                err_sq += float((back - exact.double()).square().sum())
                val_sq += float(exact.double().square().sum())
            parts.append(data)
        whole = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        assert whole.nbytes == nbytes
        writer.write_tensor_data(whole)
        if val_sq:
            stats[t.name] = math.sqrt(err_sq / val_sq)
    writer.close()


def _check(gguf: Any, got: dict[str, Any], base: dict[str, Any], changes: dict[str, Change],
           out_types: dict[str, Any], *, full: bool) -> Any:
    """OUT as the package's reader read it back (``got``): every untouched tensor byte for byte the base's, and
    every changed one at seeded rows (all rows with ``full``) against float64 W + Σ wᵢ·ΔWᵢ from the
    adapters' own factors — within one ulp of its float type plus the float32 bound, or, where
    requantized, equal to the package's quantizer applied to the float64 reference up to the
    float32 arithmetic (a code off by one step where W+ΔW lies on a rounding boundary)."""
    from ..verify import TensorCheck, VerifyReport, sample_rows, ulp

    report = VerifyReport(level="full" if full else "sample", sample_rows=0 if full else SAMPLE_ROWS)
    for name, t in base.items():
        o = got.get(name)
        if o is None:
            report.checks.append(TensorCheck(name, t.tensor_type.name, "FAIL", "missing"))
            continue
        if name not in changes:
            same = o.tensor_type == t.tensor_type and o.data.shape == t.data.shape and np.array_equal(
                o.data.reshape(-1).view(np.uint8), t.data.reshape(-1).view(np.uint8))
            report.checks.append(TensorCheck(name, t.tensor_type.name, "ok" if same else "FAIL", "identical"))
            report.bytes_checked += int(o.data.nbytes)
            continue
        ch = changes[name]
        if list(o.shape) != list(t.shape):
            report.checks.append(TensorCheck(name, o.tensor_type.name, "FAIL", "shape"))
            continue
        rows, cols, _ = _matrix(t)
        idx_all = torch.arange(rows) if full else sample_rows(name, rows, SAMPLE_ROWS, 0)
        step = max(1, (1 << 20) // max(cols, 1))  # rows per chunk: temporaries stay small in a full check
        qtype = out_types[name]
        bad = 0
        ulps = ratio = err_max = ref_max = 0.0
        for c in range(0, len(idx_all), step):
            idx = idx_all[c:c + step]
            W = _rows(gguf, t, idx).double()
            dW, depth = _delta_at(ch, idx, cols, torch.float64)
            mag = W.abs() + _delta_at(ch, idx, cols, torch.float64, magnitude=True)[0]
            ref = W + dW
            arith = mag * (1.01 * (depth + 2 + len(ch.parts)) * 2.0**-24)
            written = _rows(gguf, o, idx).double()
            err = (written - ref).abs()
            if qtype.name in FLOATS:
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype.name]
                bound = ulp(ref, dtype) + arith
                ulps = max(ulps, float((err / ulp(torch.maximum(W.abs(), dW.abs()), dtype)).max()))
            else:
                # the package's quantizer on the float64 reference (rounded to float32, as the merge's input was)
                again = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(ref.float().numpy(), qtype), qtype))
                bound = 2 * (again.double() - ref).abs().amax(dim=1, keepdim=True) + arith + 1e-30
            bad += int((err > bound).sum()) + int((~torch.isfinite(written)).sum())
            ratio = max(ratio, float((err / bound).max()))
            err_max, ref_max = max(err_max, float(err.max())), max(ref_max, float(ref.abs().max()))
        report.checks.append(TensorCheck(name, qtype.name, "ok" if bad == 0 else "FAIL", "changed", max_ulps=ulps,
                                         rel_err=err_max / max(ref_max, 1e-30), mismatched=bad, numel=rows * cols,
                                         bound_ratio=ratio, sampled=0 if full else len(idx_all)))
    return report


def verify_gguf(base: Path, refs: list[Any], weights: list[float], merged: Path, options: Options) -> Any:
    """``loratools verify BASE.gguf ADAPTER… MERGED.gguf``: every tensor of MERGED against BASE + Σ
    wᵢ·ΔWᵢ — changed ones at every row in float64, each in the type MERGED stores it (llama.cpp's
    export-lora writes F16 where the base was quantized: held to F16's rounding), the others byte
    for byte; tensors missing from MERGED or extra in it fail."""
    from ..formats.gguf_lora import _gguf
    from ..verify import TensorCheck

    model = open_model(base, refs, weights, options)
    changes = plan_changes(model.adapters, model.config, model.tensors, base)
    got = {t.name: t for r in _readers(split_files(merged)) for t in r.tensors}
    out_types = {name: got[name].tensor_type for name in changes if name in got}
    report = _check(_gguf(), got, model.tensors, changes, out_types, full=True)
    for name in sorted(set(got) - set(model.tensors)):
        report.checks.append(TensorCheck(name, got[name].tensor_type.name, "FAIL", "extra"))
    return report
