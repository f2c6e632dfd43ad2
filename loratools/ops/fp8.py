"""FP8 block-quantized weights: dequantize, change, requantize.

The FP8 releases people serve (DeepSeek-V3, Qwen3-FP8, transformers' fine-grained FP8, ComfyUI's
scaled_fp8, compressed-tensors) store a weight as ``float8_e4m3fn`` codes and, beside it, a scale
tensor that multiplies them: W = q · s, with one ``s`` per block of rows × columns
(``weight_block_size`` in ``quantization_config``, 128 × 128 in DeepSeek's and Qwen's releases),
per row, or per tensor. The scale is named ``<weight>_scale_inv`` (DeepSeek and transformers: the
inverse of the quantizer's scale, so it too multiplies), ``<weight>_scale`` (compressed-tensors,
FBGEMM) or ``<stem>.scale_weight`` (ComfyUI). It may be float32, bfloat16 or ``float8_e8m0fnu``
(powers of two: DeepSeek-V3.1's ``ue8m0``). Leading dimensions (fused experts, (E, N, K)) carry
their own scales (E, ·, ·).

A changed weight is computed band by band: the band's codes times their scales (float32, or
float64 with ``--precision fp64``), the edits added, then either

* requantized (the output stays FP8): per block, s' = max|W'| / 448 rounded *up* to the scale's
  dtype (a power of two for e8m0), q' = round-to-nearest-even(W' / s') — every element within half
  an e4m3 step of s' of W', nothing saturates; or
* rounded once to ``--dtype`` (bf16, fp16, fp32): the scale tensor is dropped and config.json's
  ``quantization_config`` removed, so transformers loads the output as a plain model.

Only e4m3fn is requantized (its 448 is what every FP8 runtime assumes); e5m2 codes with scales
can be dequantized with ``--dtype`` but not written back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.safetensors_io import TensorInfo
from ..errors import UnsupportedAdapterError

E4M3_MAX = 448.0
QUANTIZED = ("F8_E4M3", "F8_E5M2")  # codes that carry a scale


@dataclass(frozen=True)
class BlockScale:
    """How one FP8 weight is quantized: its scale tensor and the block each scale covers."""

    weight: str
    scale: str  # the scale tensor's name
    info: TensorInfo  # the scale tensor
    block: tuple[int, int]  # rows × columns of the last two dimensions one scale covers
    lead: tuple[int, ...] = ()  # leading dimensions with scales of their own (fused experts)
    per_tensor: bool = False  # one scale for the whole tensor (whatever its shape)
    info_weight_shape: tuple[int, ...] = ()
    pow2: bool = False  # scales must be powers of two (e8m0 storage, or quantization_config.scale_fmt "ue8m0")

    @property
    def grid(self) -> tuple[int, ...]:
        """The scales' shape as (…lead, blocks down, blocks across)."""
        if self.per_tensor:
            return (1, 1)
        return (*self.lead, *(math.ceil(n / b) for n, b in zip(self.matrix, self.block)))

    @property
    def matrix(self) -> tuple[int, int]:
        shape = tuple(self.info_weight_shape)
        return (shape[-2], shape[-1]) if len(shape) >= 2 else ((shape[0] if shape else 1), 1)


@dataclass
class QuantStats:
    """What requantizing one tensor cost, against what the FP8 release itself carries."""

    name: str
    requant_sq: float = 0.0  # Σ (Q(W') − W')²
    value_sq: float = 0.0  # Σ W'²
    delta_sq: float = 0.0  # Σ (W' − W)²
    original_sq: float = 0.0  # Σ (step(W)/√12)²: the expected rounding error of the original codes
    worst_steps: float = 0.0  # max |Q(W') − W'| in e4m3 steps of its block (≤ 0.5)

    @property
    def requant_rel(self) -> float:
        return math.sqrt(self.requant_sq / self.value_sq) if self.value_sq else 0.0

    @property
    def original_rel(self) -> float:
        return math.sqrt(self.original_sq / self.value_sq) if self.value_sq else 0.0

    @property
    def delta_rel(self) -> float:
        return math.sqrt(self.delta_sq / self.value_sq) if self.value_sq else 0.0


@dataclass
class QuantState:
    """Per plan: the scales computed so far (a scale tensor written before its weight is computed
    from the same bands; the check reads the values computed), and the statistics."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, QuantStats] = field(default_factory=dict)


def scale_candidates(name: str) -> list[str]:
    out = [name + "_scale_inv", name + "_scale"]
    if name.endswith(".weight"):
        out.append(name.removesuffix(".weight") + ".scale_weight")
    return out


def _config_block(config: dict) -> tuple[int, int] | None:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    block = qc.get("weight_block_size")
    if (isinstance(block, (list, tuple)) and len(block) == 2
            and all(type(b) is int and b > 0 for b in block)):
        return int(block[0]), int(block[1])
    return None


def _scale_fmt(config: dict) -> object:
    """DeepSeek-V3.1's ``quantization_config.scale_fmt``: "ue8m0" asks for power-of-two scales
    (DeepGEMM's kernels) even where they are stored as float32."""
    qc = config.get("quantization_config")
    return qc.get("scale_fmt") if isinstance(qc, dict) else None


def find_quantized(ckpt: Checkpoint) -> dict[str, BlockScale | UnsupportedAdapterError]:
    """Every FP8 weight of ``ckpt`` that has a scale tensor beside it, with the block its scales
    cover — or, where that cannot be told from shapes and config, the error to raise if the weight
    is to be changed or cast (an untouched one is copied with its scales as it is)."""
    names = ckpt.tensors
    configured = _config_block(ckpt.config)
    found: dict[str, BlockScale] = {}
    for name, info in names.items():
        if info.dtype not in QUANTIZED:
            continue
        scale_name = next((s for s in scale_candidates(name) if s in names), None)
        if scale_name is None:
            continue
        sinfo = names[scale_name]
        try:
            block, lead, per_tensor = _block(ckpt, info, sinfo, configured)
        except UnsupportedAdapterError as e:
            found[name] = e
            continue
        found[name] = BlockScale(name, scale_name, sinfo, block, lead, per_tensor, tuple(info.shape),
                                 pow2=sinfo.dtype == "F8_E8M0" or _scale_fmt(ckpt.config) == "ue8m0")
    return found


def _block(ckpt: Checkpoint, w: TensorInfo, s: TensorInfo,
           configured: tuple[int, int] | None) -> tuple[tuple[int, int], tuple[int, ...], bool]:
    """(rows × columns one scale covers, leading dimensions, per tensor) from the shapes (and
    ``weight_block_size``)."""
    shape = tuple(w.shape)
    if len(shape) < 2:
        rows, cols = (shape[0] if shape else 1), 1
        lead: tuple[int, ...] = ()
    else:
        lead, (rows, cols) = shape[:-2], shape[-2:]
    sshape = tuple(s.shape)
    numel = math.prod(sshape)

    def bad(why: str) -> UnsupportedAdapterError:
        return UnsupportedAdapterError(
            f"{ckpt.path}: the scales {s.name} {list(sshape)} of the FP8 weight {w.name} {list(shape)}: {why}.",
            path=s.file, tensor=s.name,
            hint="loratools reads per-tensor, per-row and block scales (block size from quantization_config."
                 "weight_block_size in config.json); add weight_block_size if this is a block-scaled model.")

    if s.dtype not in ("F32", "BF16", "F16", "F8_E8M0"):
        raise bad(f"stored as {s.dtype}, not as float32, bfloat16, float16 or e8m0 scales")
    if numel == 1:
        return (rows, cols), (), True
    slead = sshape[:len(lead)] if len(sshape) > len(lead) else ()
    if lead and slead == lead and numel == math.prod(lead):
        return (rows, cols), lead, False  # one scale per expert
    if lead and slead != lead:
        raise bad("their leading dimensions are not the weight's")
    tail = sshape[len(lead):]
    if len(tail) == 1 or (len(tail) == 2 and tail[1] == 1):
        if tail[0] == rows:
            return (1, cols), lead, False  # per row (output channel)
        raise bad("one scale per row would need as many scales as rows")
    if len(tail) != 2:
        raise bad("they are neither per tensor, per row nor per block")
    if configured is None:
        # one scale across a dimension, or one per element of it, is the same whatever the block
        # size; anything between is not (300 rows in 3 blocks: 100 or 128 rows each?)
        sizes = [n if k == 1 else 1 if k == n else None for n, k in ((rows, tail[0]), (cols, tail[1]))]
        if None not in sizes:
            return (sizes[0], sizes[1]), lead, False
        raise bad("config.json gives no quantization_config.weight_block_size, and a grid of that shape fits more "
                  "than one block size")
    br, bc = configured
    if math.ceil(rows / br) != tail[0] or math.ceil(cols / bc) != tail[1]:
        raise bad(f"weight_block_size {list(configured)} would need {math.ceil(rows / br)}×{math.ceil(cols / bc)} "
                  "scales")
    return (br, bc), lead, False


# --- the arithmetic ------------------------------------------------------------------------------------------------


def expand(scales: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Scales (…, a, b) spread over the (…, rows, cols) elements they cover."""
    s = scales.reshape(*scales.shape[:-2], -1, scales.shape[-1]) if scales.dim() >= 2 else scales.reshape(-1, 1)
    s = s.repeat_interleave(block[0], dim=-2)[..., :rows, :] if s.shape[-2] != rows else s
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols] if s.shape[-1] != cols else s
    return s


_VALUES: dict[torch.dtype, torch.Tensor] = {}


def widen(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 codes as ``dtype`` values, through a 256-entry table (exact: every code's value is a
    float32; about twice as fast as torch's own fp8 cast on a CPU)."""
    if codes.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2) or codes.device.type != "cpu":
        return codes.to(dtype)
    table = _VALUES.get(codes.dtype)
    if table is None:
        table = _VALUES[codes.dtype] = torch.arange(256, dtype=torch.uint8).view(codes.dtype).to(torch.float32)
    return torch.take(table, codes.contiguous().view(torch.uint8).long()).to(dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q · s in ``dtype`` for a band of codes (…, rows, cols) and the scales of its blocks."""
    rows, cols = codes.shape[-2:]
    br, bc = block
    if rows % br == 0 and cols % bc == 0 and scales.shape[-2:] == (rows // br, cols // bc):
        # whole blocks: one broadcast multiply, no spread copy of the scales
        lead = codes.shape[:-2]
        view = widen(codes, dtype).reshape(*lead, rows // br, br, cols // bc, bc)
        return (view * scales.to(dtype).reshape(*lead, rows // br, 1, cols // bc, 1)).reshape(codes.shape)
    return widen(codes, dtype) * expand(scales.to(dtype), block, rows, cols)


def _block_view(W: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """W (…, rows, cols) padded with zeros to whole blocks and viewed as (…, a, br, b, bc)."""
    rows, cols = W.shape[-2:]
    br, bc = block
    a, b = math.ceil(rows / br), math.ceil(cols / bc)
    if a * br != rows or b * bc != cols:
        W = torch.nn.functional.pad(W, (0, b * bc - cols, 0, a * br - rows))
    return W.reshape(*W.shape[:-2], a, br, b, bc), (a, b)


def block_amax(W: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    view, _ = _block_view(W.abs(), block)
    return view.amax(dim=(-3, -1))


def round_up_scales(exact: torch.Tensor, dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """``exact`` (float32/64, ≥ 0) rounded up to ``dtype``: the smallest representable s ≥ exact,
    so that |W'| / s ≤ 448 (no saturation). e8m0 (or ``pow2``): the next power of two."""
    if dtype == torch.float8_e8m0fnu or pow2:
        e = torch.ceil(torch.log2(exact.double().clamp_min(2.0**-127)))
        return torch.exp2(e).to(dtype)
    s = exact.to(dtype)
    low = s.double() < exact.double()
    if bool(low.any()):
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[s.element_size()]
        s.view(ints)[low] += 1  # positive floats: the next bit pattern is the next value up
    return s


def quantize(W: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype,
             keep: torch.Tensor | None = None, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn, scales in ``scale_dtype``) for W (…, rows, cols): per block
    s = max|W| / 448 rounded up, q = W / s rounded to nearest even. An all-zero block keeps the
    scale given in ``keep`` (its original one) or 1. ``block`` may cover a band's whole rows."""
    rows, cols = W.shape[-2:]
    amax = block_amax(W, block)
    exact = amax.double() / E4M3_MAX
    scales = round_up_scales(exact, scale_dtype, pow2)
    zero = amax == 0
    if bool(zero.any()):
        fill = keep.to(scale_dtype) if keep is not None else torch.ones_like(scales.float()).to(scale_dtype)
        scales = torch.where(zero, fill.view(scales.shape).float(), scales.float()).to(scale_dtype)
    s = expand(scales.to(W.dtype), block, rows, cols)
    codes = (W / s).to(torch.float8_e4m3fn)
    return codes, scales


# --- band by band -------------------------------------------------------------------------------------------------


def bands(bs: BlockScale, shape: tuple[int, ...], whole: bool, chunk: int) -> list[tuple[int, int]]:
    """Ranges of the first dimension to compute at a time: whole blocks of rows (one expert at a
    time for fused experts; the whole tensor for a per-tensor scale or an edit that needs it)."""
    rows = shape[0] if shape else 1
    if bs.per_tensor or whole or len(shape) < 2:
        return [(0, rows)]
    if bs.lead:
        return [(i, i + 1) for i in range(rows)]
    br = bs.block[0]
    step = br * max(1, chunk // max(1, br * shape[1]))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def scale_band(bs: BlockScale, grid: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """The scales (in ``bs.grid`` shape) of rows i:j of the first dimension."""
    return grid[scale_slice(bs, i, j)]


def scale_slice(bs: BlockScale, i: int, j: int) -> slice:
    """Where the scales of rows i:j of the first dimension sit in the grid's first dimension."""
    if bs.per_tensor:
        return slice(None)
    if bs.lead:
        return slice(i, j)
    return slice(i // bs.block[0], math.ceil(j / bs.block[0]))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def dequantize_band(bs: BlockScale, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if bs.per_tensor:
        return widen(codes, dtype) * scales.to(dtype).reshape(())
    return dequantize(codes, scales, bs.block, dtype)


def quantize_band(bs: BlockScale, W: torch.Tensor, scale_dtype: torch.dtype,
                  keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if bs.per_tensor:
        flat = W.reshape(1, -1)
        codes, scales = quantize(flat, (1, flat.shape[1]), scale_dtype, keep.reshape(1, 1), bs.pow2)
        return codes.reshape(W.shape), scales.reshape(1, 1)
    return quantize(W, bs.block, scale_dtype, keep, bs.pow2)


STAT_ELEMENTS = 1 << 16  # elements per band the statistics are taken on (a row sample: they are estimates)


def tally(stats: QuantStats, bs: BlockScale, W: torch.Tensor, exact: torch.Tensor, codes: torch.Tensor,
          scales: torch.Tensor, old_scales: torch.Tensor) -> None:
    """Add one band's requantization error to ``stats``, measured on every k-th row of the band
    (about STAT_ELEMENTS elements: the report's numbers are estimates; the half-step bound itself
    holds by construction and the verification checks it)."""
    rows = exact.shape[-2] if exact.dim() >= 2 else 1
    k = max(1, rows * exact.shape[-1] // STAT_ELEMENTS) if exact.dim() >= 2 else 1
    if exact.dim() >= 2 and k > 1 and not bs.per_tensor:
        sel = slice(None, None, k)
        taken = torch.arange(rows)[sel]
        x, w, q = exact[..., sel, :].float(), W[..., sel, :].float(), codes[..., sel, :].float()
        s_new = _row_scales(scales, bs.block, taken, x.shape[-1]).float()
        s_old = _row_scales(old_scales, bs.block, taken, x.shape[-1]).float()
    else:
        x, w, q = exact.float(), W.float(), codes.float()
        if bs.per_tensor:
            s_new, s_old = scales.float().reshape(()), old_scales.float().reshape(())
        else:
            s_new = expand(scales.float(), bs.block, *x.shape[-2:])
            s_old = expand(old_scales.float(), bs.block, *x.shape[-2:])
    err = (q * s_new - x).abs_()
    stats.requant_sq += float(err.square().sum(dtype=torch.float64))
    stats.value_sq += float(x.square().sum(dtype=torch.float64))
    stats.delta_sq += float((x - w).square_().sum(dtype=torch.float64))
    stats.original_sq += float((e4m3_step(w / s_old) * s_old).square_().sum(dtype=torch.float64)) / 12.0
    if err.numel():
        stats.worst_steps = max(stats.worst_steps, float((err / (e4m3_step(x / s_new) * s_new)).max()))


def dequantize_rows(bs: BlockScale, codes: torch.Tensor, grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the first dimension, dequantized in float64 (codes: those rows)."""
    if bs.per_tensor:
        return codes.double() * grid.double().reshape(())
    if bs.lead:
        return dequantize(codes, grid[idx], bs.block, torch.float64)
    return codes.double() * expand_rows(bs, grid, idx, codes.shape[-1])


def expand_rows(bs: BlockScale, grid: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """The scale of every element of rows ``idx`` (float64), for block-scaled 2-D weights."""
    if bs.per_tensor:
        return grid.double().reshape(1, 1).expand(len(idx), cols)
    if bs.lead:
        rows = bs.matrix[0]
        return expand(grid[idx].double(), bs.block, rows, cols)
    return _row_scales(grid, bs.block, idx, cols).double()


def _row_scales(grid: torch.Tensor, block: tuple[int, int], idx: torch.Tensor, cols: int) -> torch.Tensor:
    """The scale of every element of rows ``idx`` of the last two dimensions (the block row each row
    falls in, spread over its columns)."""
    s = grid[..., torch.div(idx, block[0], rounding_mode="floor"), :]
    return s.repeat_interleave(block[1], dim=-1)[..., :cols]


def e4m3_step(x: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3fn at each |x| (x in code units): 2^(max(⌊log2|x|⌋, −6) − 3), from the
    exponent frexp gives (|x| = m·2^e with m in [½, 1): ⌊log2|x|⌋ = e − 1)."""
    _, e = torch.frexp(x)
    e = torch.where(x == 0, -6, e - 1).clamp_(min=-6)  # 0 and subnormals: the subnormal spacing
    return torch.ldexp(torch.ones_like(x), e - 3)


def refuse_unless_requantizable(bs: BlockScale, dtype: str, path: object) -> None:
    if dtype != "F8_E4M3":
        raise UnsupportedAdapterError(
            f"{path}: {bs.weight} is {dtype} with scales ({bs.scale}): loratools requantizes only float8_e4m3fn (scale = "
            "block max / 448), so it cannot write this weight back as FP8.",
            tensor=bs.weight, path=path,
            hint="Pass --dtype bf16 to write the merged weights dequantized.")


def _span(lo: float, hi: float) -> str:
    return f"{lo:.2e}" if f"{lo:.2e}" == f"{hi:.2e}" else f"{lo:.2e}–{hi:.2e}"


def summarize(stats: list[QuantStats]) -> list[str]:
    """Lines for the report: the requantization error next to the rounding the original carries."""
    if not stats:
        return []
    worst = max(stats, key=lambda s: s.requant_rel)
    orig = max(s.original_rel for s in stats)
    lost = [s for s in stats if s.delta_sq and s.requant_sq > 0.25 * s.delta_sq]
    line = (f"requantized {len(stats)} FP8 weight(s) (e4m3, scale = block max / 448): error of the written values "
            f"against the exact W+ΔW ≤ {max(s.worst_steps for s in stats):.2f} e4m3 step of its block, relative "
            f"(Frobenius) at most {worst.requant_rel:.2e} ({worst.name}); the original FP8 codes carry about "
            f"{orig:.2e} from their own rounding (half-step uniform model); the adapters changed the weights by "
            f"{_span(min(s.delta_rel for s in stats), max(s.delta_rel for s in stats))} (relative).")
    lines = [line]
    if lost:
        lines.append(f"warning: in {len(lost)} weight(s) the requantization error is more than half the size of the "
                     f"change the adapters made (e.g. {lost[0].name}): much of the adapter is lost to FP8 rounding; "
                     "--dtype bf16 keeps it.")
    return lines
