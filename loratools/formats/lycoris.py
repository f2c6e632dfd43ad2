"""LyCORIS module kinds inside kohya-style files: LoHa (``hada_*``), LoKr (``lokr_*``) and full
diffs (``diff``, ``diff_b``), as ComfyUI, Forge, A1111 and LyCORIS itself read them.

The facts (LyCORIS 3.x/4.x ``lycoris/modules/{loha,lokr,full}.py``, ComfyUI
``comfy/weight_adapter/{loha,lokr}.py``):

* **LoHa** ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·k)``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``:
  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, r = rows of ``hada_w1_b``. Conv weights are
  stored flattened (``hada_w1_b`` (r, in·kh·kw)) unless Tucker: ``hada_t1 (r, r, kh, kw)``,
  ``hada_w1_a (r, out)``, ``hada_w1_b (r, in)``, each half = einsum("i j k l, j r, i p -> p r k l",
  t, w_b, w_a).
* **LoKr** ``lokr_w1`` (a, c) or ``lokr_w1_a (a, r)`` @ ``lokr_w1_b (r, c)``, and ``lokr_w2``
  (b, d[, kh, kw]) or ``lokr_w2_a (b, r)`` @ ``lokr_w2_b (r, d·k)`` or Tucker
  ``lokr_t2 (r, r, kh, kw)``, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``: ΔW = kron(w1, w2) · scale,
  scale = alpha / r with r the rows of the factorized half's ``_b`` (w2's when both are), and 1 when
  both halves are whole (LyCORIS then saves alpha = its rank; ComfyUI ignores alpha).
* **full** ``diff`` (ΔW itself, the weight's shape) and ``diff_b`` (the bias's change), no scale.
* A missing or zero ``alpha`` means alpha = r (scale 1), as for kohya LoRA and in LyCORIS.
* ``dora_scale`` (DoRA on these kinds) is read by the kohya reader for every kind.

* **(IA)³** ``weight`` (factor − 1 per output, or per input with ``on_input`` = 1), ``on_input``:
  W' = W · (1 + weight) along that axis (LyCORIS ``modules/ia3.py``).
* **OFT** ``oft_blocks`` (n, b, b) and **BOFT** ``oft_blocks`` (m, n, b, b), optional ``rescale``,
  ``alpha`` = the norm constraint per output: Q = B − Bᵀ (scaled down to alpha·out when larger),
  R = (I + Q)(I − Q)⁻¹; OFT W'_k = R_kᵀ W_k per block of b outputs, BOFT m butterfly stages
  (LyCORIS ``functional/{diag_oft,boft}.py``). These two change W as a function of W: no ΔW
  exists without the base (``deltas.Transform``).

``lora_mid`` (LoCon Tucker), GLoRA and norm modules are not read here: they are refused by name
(``--allow-skip`` leaves them out and says so).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from ..adapter import LoraModule
from ..deltas import Delta, Full, Hadamard, Kronecker, Product, Rotation, Scaling
from ..errors import AdapterFormatError, InternalError, UnsupportedAdapterError
from ..jsonio import clip

Roles = dict[str, tuple[str, torch.Tensor]]

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b")
IA3 = ("weight", "on_input")
OFT = ("oft_blocks", "rescale")
ROLES = LOHA + LOKR + FULL + IA3 + OFT
# suffix → role, for keys.group_keys
SUFFIXES = {f".{role}": role for role in ROLES}


def kind_of(roles: Roles) -> str | None:
    """Which LyCORIS kind a group of keys is (None: not one of these)."""
    kinds = {k for k, names in (("loha", LOHA), ("lokr", LOKR), ("full", FULL), ("ia3", IA3), ("oft", OFT))
             if any(r in roles for r in names)}
    if kinds == {"ia3"} and "on_input" not in roles:
        return None  # a bare ``.weight`` is not (IA)³: LyCORIS always saves on_input beside it
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None)


def _t(roles: Roles, role: str) -> torch.Tensor | None:
    return roles[role][1] if role in roles else None


def _bad(f: Path, stem: str, what: str) -> AdapterFormatError:
    return AdapterFormatError(f"{f}: LyCORIS module {clip(stem)}: {what}.", path=f, tensor=stem)


def _alpha_scale(alpha: float | None, rank: int | None) -> float:
    if rank is None:
        return 1.0
    if alpha is None or alpha == 0.0:
        return 1.0
    return alpha / rank


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _product(f: Path, stem: str, roles: Roles, whole: str | None, a: str, b: str, core: str | None) -> Product:
    """One half: a whole matrix, a product a @ b, or a Tucker chain (core, a (r, rows), b (r, in))."""
    w = _t(roles, whole) if whole else None
    wa, wb = _t(roles, a), _t(roles, b)
    t = _t(roles, core) if core else None
    if w is not None:
        if wa is not None or wb is not None or t is not None:
            raise _bad(f, stem, f"holds both {whole} and its factors {a} / {b}")
        if w.dim() < 2:
            raise _bad(f, stem, f"{whole} has shape {_shape(w)}; a matrix is needed")
        return Product(w)
    if wa is None or wb is None:
        raise _bad(f, stem, f"needs {whole + ', or ' if whole else ''}both {a} and {b}")
    if wa.dim() != 2:
        raise _bad(f, stem, f"{a} has shape {_shape(wa)}; a matrix is needed")
    if t is not None:
        if t.dim() < 3 or wb.dim() != 2 or t.shape[0] != wa.shape[0] or t.shape[1] != wb.shape[0]:
            raise _bad(f, stem, f"Tucker factors do not chain: {core} {_shape(t)}, {a} {_shape(wa)}, {b} {_shape(wb)} "
                       "(expected (r, r, kh, kw), (r, out), (r, in))")
        return Product(wa, wb, t)
    if wa.shape[1] != wb.shape[0]:
        raise _bad(f, stem, f"{a} {_shape(wa)} and {b} {_shape(wb)} do not multiply (ranks {wa.shape[1]} and "
                   f"{wb.shape[0]})")
    return Product(wa, wb)


def _loha(f: Path, stem: str, roles: Roles, alpha: float | None) -> Delta:
    if ("hada_t1" in roles) != ("hada_t2" in roles):
        raise _bad(f, stem, "holds one of hada_t1 / hada_t2 without the other")
    W1 = _product(f, stem, roles, None, "hada_w1_a", "hada_w1_b", "hada_t1")
    W2 = _product(f, stem, roles, None, "hada_w2_a", "hada_w2_b", "hada_t2")
    if (W1.rows_n, W1.cols_n) != (W2.rows_n, W2.cols_n):
        raise _bad(f, stem, f"its two halves have different shapes ({W1.rows_n}×{W1.cols_n} and "
                   f"{W2.rows_n}×{W2.cols_n})")
    rank = W1.rank
    return Hadamard(W1, W2, _alpha_scale(alpha, rank), alpha if alpha else float(rank or 1))


def _lokr(f: Path, stem: str, roles: Roles, alpha: float | None) -> Delta:
    W1 = _product(f, stem, roles, "lokr_w1", "lokr_w1_a", "lokr_w1_b", None)
    W2 = _product(f, stem, roles, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    rank = W2.rank if W2.rank is not None else W1.rank  # ComfyUI: the last factorized half's rows
    return Kronecker(W1, W2, _alpha_scale(alpha, rank), alpha)


def _full(f: Path, stem: str, roles: Roles) -> tuple[Delta | None, torch.Tensor | None]:
    diff, diff_b = _t(roles, "diff"), _t(roles, "diff_b")
    if diff is not None and diff.dim() < 2:
        raise _bad(f, stem, f"diff has shape {_shape(diff)}: a full diff of a 1-D tensor (a norm or bias weight) "
                   "is not read yet")
    if diff_b is not None and diff_b.dim() != 1:
        raise _bad(f, stem, f"diff_b has shape {_shape(diff_b)}; a bias change is one vector")
    return (None if diff is None else Full(diff.reshape(diff.shape[0], -1))), diff_b


def _ia3(f: Path, stem: str, roles: Roles) -> Delta:
    """LyCORIS (IA)³: ``weight`` holds factor − 1 per output (or per input with ``on_input``):
    (out,) / (in,) for a Linear, (1, c, 1, 1) for a conv. The base gives the other dimensions."""
    w, flag = roles["weight"][1], roles["on_input"][1]
    if flag.numel() != 1:
        raise _bad(f, stem, f"on_input has shape {_shape(flag)}; it is one flag")
    if w.dim() not in (1,) and not (w.dim() >= 3 and w.shape[0] == 1 and all(s == 1 for s in w.shape[2:])):
        raise _bad(f, stem, f"weight has shape {_shape(w)}; (IA)³ holds one factor per channel")
    return Scaling(w, on_input=bool(int(flag.reshape(-1)[0])), offset=1.0)


def _oft(f: Path, stem: str, roles: Roles, alpha: float | None) -> Delta:
    """LyCORIS OFT ``oft_blocks`` (n, b, b) / BOFT (m, n, b, b), optional ``rescale`` (out, 1…),
    ``alpha`` the norm constraint per output (0: none)."""
    blocks = roles["oft_blocks"][1]
    if blocks.dim() not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]:
        raise _bad(f, stem, f"oft_blocks has shape {_shape(blocks)}; (n, b, b) or (m, n, b, b) blocks are needed")
    if blocks.dim() == 4 and blocks.shape[-1] % 2:
        raise _bad(f, stem, f"BOFT blocks of odd size {blocks.shape[-1]} do not pair up")
    out = int(blocks.shape[-3]) * int(blocks.shape[-1])
    rescale = _t(roles, "rescale")
    if rescale is not None and rescale.numel() != out:
        raise _bad(f, stem, f"rescale has {rescale.numel()} values for {out} outputs")
    a = float(alpha or 0.0)
    return Rotation(blocks, constraint=a * out, rescale=rescale, alpha=a)


def bias_change(f: Path, stem: str, roles: Roles) -> torch.Tensor | None:
    """``diff_b`` (a bias change, added unscaled) beside any kind of module, or None."""
    return _full(f, stem, {k: v for k, v in roles.items() if k == "diff_b"})[1]


def build(f: Path, stem: str, roles: Roles, alpha: float | None) -> tuple[Delta | None, tuple[int, ...],
                                                                          torch.Tensor | None]:
    """(delta, conv kernel if the tensors tell it, bias change) of one LyCORIS group of keys."""
    kind = kind_of(roles)
    if kind == "mixed":
        raise _bad(f, stem, "mixes keys of different kinds (" + ", ".join(sorted(r for r in roles if r in ROLES)) + ")")
    if kind == "loha":
        d = _loha(f, stem, roles, alpha)
        t = _t(roles, "hada_t1")
        return d, (_shape(t)[2:] if t is not None else ()), None
    if kind == "lokr":
        d = _lokr(f, stem, roles, alpha)
        w2 = _t(roles, "lokr_w2")
        t = _t(roles, "lokr_t2")
        kernel = _shape(w2)[2:] if w2 is not None else (_shape(t)[2:] if t is not None else ())
        return d, kernel, None
    if kind == "ia3":
        return _ia3(f, stem, roles), (), None
    if kind == "oft":
        return _oft(f, stem, roles, alpha), (), None
    if kind == "full":
        d, bias = _full(f, stem, roles)
        diff = _t(roles, "diff")
        return d, (_shape(diff)[2:] if diff is not None else ()), bias
    raise _bad(f, stem, "is not a LyCORIS kind loratools reads")


def bias_tensor(m: LoraModule) -> torch.Tensor:
    """The module's bias change as ``diff_b`` holds it: added as it is (PEFT's lora_B.bias times the
    module's scale, one rounding in its dtype)."""
    if m.bias is None:
        raise InternalError(f"{m.target}: no bias change to write")
    f = m.bias_factor
    return (m.bias if f == 1.0 else (m.bias.double() * f).to(m.bias.dtype)).contiguous()


def _alpha_out(d: Hadamard | Kronecker) -> float:
    """The alpha that gives the delta's scale with alpha / r: the file's own when it does."""
    if d.rank is None:  # LoKr with both halves whole: scale 1 whatever alpha says
        return float(d.alpha) if d.alpha else 1.0
    if d.alpha and math.isclose(d.alpha / d.rank, d.scale, rel_tol=1e-12, abs_tol=0.0):
        return float(d.alpha)
    return float(d.scale) * d.rank


def halves(stem: str, d: Hadamard | Kronecker) -> dict[str, torch.Tensor]:
    """The two halves' tensors under LyCORIS' (and PEFT's) names: ``hada_w{n}_a/_b`` (+ ``hada_t{n}``)
    for LoHa; ``lokr_w{n}`` when whole, else ``lokr_w{n}_a/_b`` (+ ``lokr_t{n}``) for LoKr."""
    kind = "hada" if isinstance(d, Hadamard) else "lokr"
    out: dict[str, torch.Tensor] = {}
    for n, P in (("1", d.W1), ("2", d.W2)):
        if P.down is None:
            out[f"{stem}.{kind}_w{n}"] = P.up
            continue
        out[f"{stem}.{kind}_w{n}_a"] = P.up
        out[f"{stem}.{kind}_w{n}_b"] = P.down
        if P.core is not None:
            out[f"{stem}.{kind}_t{n}"] = P.core
    return out


def tensors(stem: str, m: LoraModule) -> dict[str, torch.Tensor]:
    """The keys of one module in LyCORIS' own names and shapes (a kohya → kohya round trip gives
    every tensor back)."""
    d = m.delta
    out: dict[str, torch.Tensor] = {}
    if isinstance(d, Hadamard):
        out.update(halves(stem, d))
        out[f"{stem}.alpha"] = torch.tensor(_alpha_out(d), dtype=torch.float32)
    elif isinstance(d, Kronecker):
        if d.rank is None and d.scale != 1.0:  # both halves whole: no alpha can carry a scale
            d = replace(d, W1=Product((d.W1.up.double() * d.scale).to(d.W1.up.dtype)), scale=1.0)
        out.update(halves(stem, d))
        out[f"{stem}.alpha"] = torch.tensor(_alpha_out(d), dtype=torch.float32)
    elif isinstance(d, Scaling):
        if d.with_bias:
            raise UnsupportedAdapterError(f"{m.target}: PEFT (IA)³ on outputs scales the layer's bias too, which a "
                                          "LyCORIS (IA)³ module does not do.", tensor=m.target)
        vector = d.vector if d.offset == 1.0 else (d.vector.double() + (d.offset - 1.0)).to(d.vector.dtype)
        out[f"{stem}.weight"] = vector  # LyCORIS stores factor − 1
        out[f"{stem}.on_input"] = torch.tensor(float(d.on_input), dtype=d.vector.dtype)  # as LyCORIS saves it
    elif isinstance(d, Rotation):
        out[f"{stem}.oft_blocks"] = d.blocks
        if d.rescale is not None:
            out[f"{stem}.rescale"] = d.rescale
        out[f"{stem}.alpha"] = torch.tensor(float(d.alpha), dtype=torch.float32)
    elif isinstance(d, Full):
        W = d.W if d.scale == 1.0 else (d.W.double() * d.scale).to(d.W.dtype)
        out[f"{stem}.diff"] = W.reshape(m.stored_shape if m.kind == "conv" else W.shape)
    if not out:
        raise InternalError(f"{m.target}: a {d.kind} delta reached the LyCORIS writer")
    return {k: v.contiguous() for k, v in out.items()}
